"""LlmmConfig: every setting of the method, validated on construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from llmm_tune.method.quant import BITS, METHODS
from llmm_tune.settings import Setting, fraction, non_negative_int, positive, positive_int

INITS = ("loftq", "zero")


@dataclass(frozen=True)
class LlmmConfig:
    """Settings of a quantised distributional-LoRA fine-tune.

    The baselines come from the same config: `K=0` is plain LoRA on the LoftQ initialisation
    (LoftQ), `init="zero"` with 4-bit normal_float is QLoRA, `bits=None` is full-precision LoRA.
    """

    rank: int = 16
    scale: float = 600.0  # noise scale s: eps ~ N(0, I_K / s)
    K: int = 1  # number of moment directions per factor
    bits: int | None = 4  # None keeps the base weights in full precision
    quant_method: str = "normal_float"
    loftq_iters: int = 5
    double_quant: bool = False  # 4-bit normal_float: block scales in 8 bits too (bitsandbytes' compressed statistics)
    alpha: float = 16.0  # LoRA output scaling is alpha / rank
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None  # None: the architecture's defaults
    init: str | None = None  # "loftq" or "zero"; None: loftq when quantised, zero otherwise
    head_modules: tuple[str, ...] = ("classifier", "score", "pooler")  # trained in full

    def __post_init__(self) -> None:
        def check(ok: bool, field: str, need: str) -> None:
            if not ok:
                raise ValueError(f"LlmmConfig.{field} must be {need}, got {getattr(self, field)!r}")

        check(_is_int(self.rank) and self.rank >= 1, "rank", "an integer >= 1")
        check(_is_int(self.K) and self.K >= 0, "K", "an integer >= 0")
        check(_is_number(self.scale) and self.scale > 0, "scale", "a number > 0")
        check(self.bits is None or self.bits in BITS, "bits", f"one of {BITS} or None")
        check(self.quant_method in METHODS, "quant_method", f"one of {METHODS}")
        check(_is_int(self.loftq_iters) and self.loftq_iters >= 1, "loftq_iters", "an integer >= 1")
        check(isinstance(self.double_quant, bool), "double_quant", "true or false")
        check(not self.double_quant or (self.bits, self.quant_method) == (4, "normal_float"), "double_quant",
              "false unless bits is 4 and quant_method normal_float (bitsandbytes compresses NF4 scales only)")
        check(_is_number(self.alpha) and self.alpha > 0, "alpha", "a number > 0")
        check(_is_number(self.dropout) and 0 <= self.dropout < 1, "dropout", "in [0, 1)")
        check(self.init is None or self.init in INITS, "init", f"one of {INITS} or None")
        check(not (self.init == "loftq" and self.bits is None), "init",
              "'zero' or None when bits is None (LoftQ needs a quantised base)")
        for field in ("target_modules", "head_modules"):
            value = getattr(self, field)
            if value is not None:
                check(not isinstance(value, str) and all(isinstance(v, str) for v in value),
                      field, "a list of module-name suffixes")
                object.__setattr__(self, field, tuple(value))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def resolved_init(self) -> str:
        return self.init or ("loftq" if self.bits is not None else "zero")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> LlmmConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown LlmmConfig fields {unknown}; known fields are {sorted(known)}")
        return cls(**values)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# The method's settings as a search space sees them (None: a setting a baseline does not use).
METHOD_SETTINGS: dict[str, Setting] = {
    "rank": Setting(positive_int, "an integer >= 1"),
    "scale": Setting(positive, "a number > 0"),
    "K": Setting(non_negative_int, "an integer >= 0"),
    "bits": Setting(lambda v: v is None or v in BITS, f"one of {list(BITS)} (or null for no quantisation)"),
    "quant_method": Setting(lambda v: v in METHODS, f"one of {list(METHODS)}"),
    "loftq_iters": Setting(positive_int, "an integer >= 1", 5),
    "double_quant": Setting(lambda v: isinstance(v, bool), "true or false (4-bit normal_float only)", False),
    "alpha": Setting(positive, "a number > 0", 16.0),
    "dropout": Setting(fraction, "a number in [0, 1)", 0.0),
    "init": Setting(lambda v: v in (None, *INITS), "loftq, zero or null", None),
}


def llmm_config(config: dict, **overrides) -> LlmmConfig:
    """The method's settings of a trial; None marks a setting its baseline does not use."""
    defaults = LlmmConfig()
    values = {
        "rank": config["rank"], "K": config["K"], "bits": config["bits"], "alpha": config["alpha"],
        "scale": config["scale"] if config["scale"] is not None else defaults.scale,
        "quant_method": config["quant_method"] or defaults.quant_method,
        "loftq_iters": config["loftq_iters"], "dropout": config["dropout"], "init": config["init"],
        # applies to the 4-bit normal_float trials of a space that also searches other formats
        "double_quant": bool(config.get("double_quant")) and (config["bits"], config["quant_method"])
        == (4, "normal_float"),
    }
    return LlmmConfig(**{**values, **overrides})
