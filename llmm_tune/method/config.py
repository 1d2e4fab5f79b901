"""LlmmConfig: every setting of the method, validated on construction against METHOD_SETTINGS (the rules a
search space is checked against too); BASELINES: what LoftQ, QLoRA and LoRA fix of those settings."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from llmm_tune.settings import Setting, fraction, non_negative_int, positive, positive_int

BITS = (2, 4, 8)  # the formats quant.py stores
METHODS = ("normal_float", "uniform")
BLOCK = 64  # weights per quantisation block, each with its absmax scale (METHOD.md section 1)
INITS = ("loftq", "zero")


@dataclass(frozen=True)
class LlmmConfig:
    """Settings of a quantised distributional-LoRA fine-tune.

    The baselines come from the same config (`BASELINES` says what each fixes): `K=0` is plain LoRA on the
    LoftQ initialisation (LoftQ), `init="zero"` with 4-bit normal_float is QLoRA, `bits=None` is
    full-precision LoRA.
    """

    rank: int = 16
    scale: float = 600.0  # noise scale s: eps ~ N(0, I_K / s)
    K: int = 1  # number of moment directions per factor
    bits: int | None = 4  # None keeps the base weights in full precision
    quant_method: str = "normal_float"
    loftq_iters: int = 5
    double_quant: bool = False  # 4-bit normal_float: block scales in 8 bits too (bitsandbytes' compressed statistics)
    alpha: float = 16.0  # LoRA output scaling is alpha / rank, unless adapter_scale fixes it
    adapter_scale: float | None = None  # c, the adapter's output scale: None for alpha / rank (peft's), 1 the release's
    quantize_embeddings: bool = False  # the input embeddings too: a LoftQ base and a plain low-rank adapter
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None  # None: the architecture's defaults
    init: str | None = None  # "loftq" or "zero"; None: loftq when quantised, zero otherwise
    head_modules: tuple[str, ...] = ("classifier", "score", "pooler")  # trained in full
    compile: bool = False  # the adapter computation (not the quantised base) through torch.compile

    def __post_init__(self) -> None:
        """Each field against its rule in METHOD_SETTINGS (what a search space is checked against too), then
        the rules that join fields."""
        def check(ok: bool, field: str, need: str) -> None:
            if not ok:
                raise ValueError(f"LlmmConfig.{field} must be {need}, got {getattr(self, field)!r}")

        for field, setting in METHOD_SETTINGS.items():
            check(setting.test(getattr(self, field)), field, setting.need)
        check(not self.double_quant or (self.bits, self.quant_method) == (4, "normal_float"), "double_quant",
              "false unless bits is 4 and quant_method normal_float (bitsandbytes compresses NF4 scales only)")
        check(not (self.init == "loftq" and self.bits is None), "init",
              "'zero' or None when bits is None (LoftQ needs a quantised base)")
        check(not (self.quantize_embeddings and self.bits is None), "quantize_embeddings",
              "false when bits is None (there is no quantised base)")
        for field in ("target_modules", "head_modules"):
            value = getattr(self, field)
            if value is not None:
                check(not isinstance(value, str) and all(isinstance(v, str) for v in value),
                      field, "a list of module-name suffixes")
                object.__setattr__(self, field, tuple(value))

    @property
    def scaling(self) -> float:
        """c in y = Q x + c B A x (METHOD.md sections 1 and 5)."""
        return self.adapter_scale if self.adapter_scale is not None else self.alpha / self.rank

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


# The method's settings as a search space sees them, whose rules LlmmConfig checks its fields with; a space must
# give the ones without a default.
METHOD_SETTINGS: dict[str, Setting] = {
    "rank": Setting(positive_int, "an integer >= 1"),
    "scale": Setting(positive, "a number > 0"),
    "K": Setting(non_negative_int, "an integer >= 0"),
    "bits": Setting(lambda v: v is None or v in BITS, f"one of {list(BITS)} (or null for no quantisation)"),
    "quant_method": Setting(lambda v: v in METHODS, f"one of {list(METHODS)}"),
    "loftq_iters": Setting(positive_int, "an integer >= 1", LlmmConfig.loftq_iters),
    "double_quant": Setting(lambda v: isinstance(v, bool), "true or false (4-bit normal_float only)",
                            LlmmConfig.double_quant),
    "alpha": Setting(positive, "a number > 0", LlmmConfig.alpha),
    "adapter_scale": Setting(lambda v: v is None or positive(v), "a number > 0, or null for alpha / rank",
                             LlmmConfig.adapter_scale),
    "quantize_embeddings": Setting(lambda v: isinstance(v, bool), "true or false (the input embeddings quantised)",
                                   LlmmConfig.quantize_embeddings),
    "dropout": Setting(fraction, "a number in [0, 1)", LlmmConfig.dropout),
    "init": Setting(lambda v: v in (None, *INITS), "loftq, zero or null", LlmmConfig.init),
    "compile": Setting(lambda v: isinstance(v, bool), "true or false (the adapter computation through torch.compile)",
                       LlmmConfig.compile),
}

# What --method fixes, so that each baseline shares the space and budget of the method itself; None marks a
# setting the baseline does not use (the noise scale without moments, say).
BASELINES: dict[str, dict[str, object]] = {
    "llmm": {},
    "loftq": {"K": 0, "scale": None},
    "qlora": {"K": 0, "scale": None, "init": "zero", "bits": 4, "quant_method": "normal_float"},
    "lora": {"K": 0, "scale": None, "init": "zero", "bits": None, "quant_method": None},
}


def llmm_config(config: dict, **overrides) -> LlmmConfig:
    """The method's settings of a trial; None marks a setting its baseline does not use."""
    defaults = LlmmConfig()
    values = {
        "rank": config["rank"], "K": config["K"], "bits": config["bits"], "alpha": config["alpha"],
        "scale": config["scale"] if config["scale"] is not None else defaults.scale,
        "quant_method": config["quant_method"] or defaults.quant_method,
        "loftq_iters": config["loftq_iters"], "dropout": config["dropout"], "init": config["init"],
        "adapter_scale": config.get("adapter_scale"),  # .get: configurations recorded before these settings
        "quantize_embeddings": bool(config.get("quantize_embeddings")) and config["bits"] is not None,  # not lora's
        # applies to the 4-bit normal_float trials of a space that also searches other formats
        "double_quant": bool(config.get("double_quant")) and (config["bits"], config["quant_method"])
        == (4, "normal_float"),
        "compile": bool(config.get("compile")),
    }
    return LlmmConfig(**{**values, **overrides})
