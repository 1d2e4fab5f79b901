"""Search-space files (`search_spaces/<task>.yaml`): parsed, validated and resolved for a profile
and a method. Every trial setting is either fixed or sampled; a bad file is rejected, naming the
key and the fix, before anything starts."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
import yaml

from llmm_tune.errors import UsageError
from llmm_tune.quant import BITS, METHODS
from llmm_tune.tasks import TASKS

SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
PROFILES = ("paper", "cpu")
METHOD_CHOICES = ("llmm", "loftq", "qlora", "lora")


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _non_negative(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


# trial setting -> (test, what it must be, default; None: required)
SETTINGS: dict[str, tuple[Callable, str, object]] = {
    "model": (lambda v: isinstance(v, str) and bool(v), "a hub id, a local path or a packaged name", None),
    "epochs": (_positive_int, "an integer >= 1", None),
    "batch_size": (_positive_int, "an integer >= 1", None),
    "max_length": (_positive_int, "an integer >= 1", None),
    "lr": (_positive, "a number > 0", None),
    "scale": (_positive, "a number > 0", None),
    "rank": (_positive_int, "an integer >= 1", None),
    "K": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0", None),
    "bits": (lambda v: v is None or v in BITS, f"one of {list(BITS)} (or null for no quantisation)", None),
    "quant_method": (lambda v: v in METHODS, f"one of {list(METHODS)}", None),
    "grad_accum": (_positive_int, "an integer >= 1", 1),
    "evals_per_epoch": (_positive_int, "an integer >= 1", 1),
    "loftq_iters": (_positive_int, "an integer >= 1", 5),
    "alpha": (_positive, "a number > 0", 16.0),
    "dropout": (lambda v: _non_negative(v) and v < 1, "a number in [0, 1)", 0.0),
    "weight_decay": (_non_negative, "a number >= 0", 0.0),
    "warmup_ratio": (lambda v: _non_negative(v) and v < 1, "a number in [0, 1)", 0.06),
    "max_grad_norm": (_positive, "a number > 0", 1.0),
    "init": (lambda v: v in (None, "loftq", "zero"), "loftq, zero or null", None),
    "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0", 0),
    "validation_size": (lambda v: _positive(v) and (v < 1 or float(v).is_integer()),
                        "a fraction in (0, 1) or a whole count", 0.1),
    "max_train_examples": (lambda v: v is None or _positive_int(v), "an integer >= 1 or null (all)", None),
}
OPTIONAL = {k for k, (_, _, default) in SETTINGS.items() if default is not None} | {"init", "max_train_examples"}
SAMPLERS = ("loguniform", "uniform", "int", "choice")
TOP_KEYS = {"task", "metric", "space", "fixed", "early_stopping", "profiles", "warm_start"}
PROFILE_KEYS = {"space", "fixed", "num_samples", "warm_start"}  # a profile's warm_start replaces the top one
EARLY_STOPPING = {"metric": None, "mode": "max", "grace_period": 1, "reduction_factor": 2}  # None: val_<metric>
# What --method fixes so the baselines share the space and budget of the method itself;
# None marks a setting the baseline does not use (the noise scale without moments, say).
METHOD_FIXED = {
    "llmm": {},
    "loftq": {"K": 0, "scale": None},
    "qlora": {"K": 0, "scale": None, "init": "zero", "bits": 4, "quant_method": "normal_float"},
    "lora": {"K": 0, "scale": None, "init": "zero", "bits": None, "quant_method": None},
}


@dataclass
class SearchSpec:
    """A search resolved for one profile and method."""

    path: Path
    task: str
    metric: str
    space: dict[str, dict]  # name -> {sampler: args}
    fixed: dict[str, object]
    early_stopping: dict
    num_samples: int
    warm_start: list[dict]
    adjustments: list[str]  # how warm-start points were moved into this space

    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        return {name: _distribution(entry) for name, entry in self.space.items()}


def space_path(task_or_path: str) -> Path:
    path = Path(task_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise UsageError(f"search space file {path} not found; pass an existing YAML file")
        return path.resolve()
    candidate = SPACES_DIR / f"{task_or_path}.yaml"
    if not candidate.is_file():
        known = sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))
        raise UsageError(f"unknown task {task_or_path!r}; choose one of {', '.join(known)} "
                         "or pass the path of your own YAML file")
    return candidate


def _distribution(entry: dict) -> optuna.distributions.BaseDistribution:
    (kind, args), = entry.items()
    if kind == "choice":
        return optuna.distributions.CategoricalDistribution(args)
    if kind == "int":
        return optuna.distributions.IntDistribution(args[0], args[1])
    return optuna.distributions.FloatDistribution(args[0], args[1], log=kind == "loguniform")


def _fail(path: Path, where: str, message: str) -> None:
    raise UsageError(f"{path}: {where}: {message}")


def _mapping(path: Path, where: str, value, allowed: set[str] | None = None) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        _fail(path, where, "must be a mapping of key: value")
    if allowed is not None:
        unknown = sorted(set(value) - allowed)
        if unknown:
            _fail(path, where, f"unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    return value


def _check_value(path: Path, where: str, name: str, value) -> None:
    test, need, _ = SETTINGS[name]
    if not test(value):
        _fail(path, where, f"{name} must be {need}, got {value!r}")


def _check_space(path: Path, where: str, space: dict) -> None:
    for name, entry in _mapping(path, where, space, set(SETTINGS)).items():
        at = f"{where}.{name}"
        if not isinstance(entry, dict) or len(entry) != 1 or next(iter(entry)) not in SAMPLERS:
            _fail(path, at, f"must be one of {{loguniform: [low, high]}}, {{uniform: [low, high]}}, "
                            f"{{int: [low, high]}}, {{choice: [v1, v2, ...]}}, got {entry!r}")
        (kind, args), = entry.items()
        if kind == "choice":
            if not isinstance(args, list) or not args:
                _fail(path, at, "choice needs a non-empty list of values")
            values = args
        else:
            if not (isinstance(args, list) and len(args) == 2 and all(_non_negative(a) or
                    isinstance(a, (int, float)) for a in args)):
                _fail(path, at, f"{kind} needs [low, high], got {args!r}")
            if not args[0] < args[1]:
                _fail(path, at, f"empty or inverted range [{args[0]}, {args[1]}]; make low < high")
            values = args
        for value in values:
            _check_value(path, at, name, value)


def load_spec(task_or_path: str, profile: str, method: str, num_samples: int | None = None) -> SearchSpec:
    """Parse and validate a search-space file and resolve it for `profile` and `method`."""
    path = space_path(task_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UsageError(f"{path}{line}: malformed YAML ({getattr(error, 'problem', error)}); "
                         "fix the syntax") from None
    raw = _mapping(path, "top level", raw, TOP_KEYS)
    if raw.get("task") not in TASKS:
        _fail(path, "task", f"must be one of {', '.join(TASKS)}, got {raw.get('task')!r}")
    profiles = _mapping(path, "profiles", raw.get("profiles"), set(PROFILES))
    if profile not in profiles:
        _fail(path, "profiles", f"no {profile!r} profile; add profiles.{profile} or choose "
                                f"--profile {' or '.join(profiles) or 'another'}")
    chosen = _mapping(path, f"profiles.{profile}", profiles[profile], PROFILE_KEYS)

    space, fixed = {}, {}
    for where, section in (("", raw), (f"profiles.{profile}.", chosen)):
        section_space = _mapping(path, f"{where}space", section.get("space"), set(SETTINGS))
        section_fixed = _mapping(path, f"{where}fixed", section.get("fixed"), set(SETTINGS))
        both = sorted(set(section_space) & set(section_fixed))
        if both:
            _fail(path, f"{where}fixed", f"{both} are both fixed and searched; keep each in one of them")
        _check_space(path, f"{where}space", section_space)
        for name, value in section_fixed.items():
            _check_value(path, f"{where}fixed", name, value)
        for name in section_space:  # a profile overrides the top level, sampled or fixed
            fixed.pop(name, None)
        for name in section_fixed:
            space.pop(name, None)
        space.update(copy.deepcopy(section_space))
        fixed.update(section_fixed)
    for name, (_, _, default) in SETTINGS.items():
        if name in OPTIONAL and name not in space:
            fixed.setdefault(name, default)
    for name, value in METHOD_FIXED[method].items():
        fixed[name] = value
        space.pop(name, None)
    missing = sorted(set(SETTINGS) - OPTIONAL - set(fixed) - set(space))
    if missing:
        _fail(path, "fixed", f"settings {missing} have no value; add them to fixed or space")

    task = raw["task"]
    metric = raw.get("metric", TASKS[task].metric)
    stopping = {**EARLY_STOPPING, **_mapping(path, "early_stopping", raw.get("early_stopping"),
                                             set(EARLY_STOPPING))}
    stopping["metric"] = stopping["metric"] or f"val_{metric}"
    if stopping["mode"] not in ("min", "max") or not isinstance(stopping["metric"], str):
        _fail(path, "early_stopping", "needs metric: a reported name (val_loss, val_<metric>) and mode: min or max")
    if not (_positive(stopping["grace_period"]) and _positive(stopping["reduction_factor"])
            and stopping["reduction_factor"] > 1):
        _fail(path, "early_stopping", "grace_period (epochs) must be > 0 and reduction_factor > 1")
    samples = num_samples if num_samples is not None else chosen.get("num_samples", 10)
    if not _positive_int(samples):
        _fail(path, f"profiles.{profile}.num_samples", f"must be an integer >= 1, got {samples!r}")
    warm, adjustments = _warm_start(path, chosen.get("warm_start", raw.get("warm_start")), space)
    return SearchSpec(path, task, metric, space, fixed, stopping, samples, warm, adjustments)


def _warm_start(path: Path, points, space: dict) -> tuple[list[dict], list[str]]:
    """Published configurations as first trials, made to fit this space: keys it does not search
    are dropped, values outside it move to its nearest edge or choice, searched keys a point lacks
    take the space's first choice or middle; each change is reported."""
    if points is None:
        return [], []
    if not isinstance(points, list):
        _fail(path, "warm_start", "must be a list of mappings")
    result, notes = [], []
    for i, point in enumerate(points):
        for name, value in _mapping(path, f"warm_start[{i}]", point, set(SETTINGS)).items():
            _check_value(path, f"warm_start[{i}]", name, value)
        projected = {}
        for name, entry in space.items():
            (kind, args), = entry.items()
            if name not in point:
                value = args[0] if kind == "choice" else _middle(kind, args)
                notes.append(f"warm start {i + 1}: no {name} given; enqueued with {name}={value}")
            elif kind == "choice":
                value = point[name] if point[name] in args else _nearest(point[name], args)
            else:
                value = min(max(point[name], args[0]), args[1])
            if name in point and value != point[name]:
                notes.append(f"warm start {i + 1}: published {name}={point[name]} is outside this space; "
                             f"enqueued with {name}={value}")
            projected[name] = value
        if projected not in result:
            result.append(projected)
    return result, notes


def _middle(kind: str, args: list):
    if kind == "loguniform":
        return math.sqrt(args[0] * args[1])
    return (args[0] + args[1]) // 2 if kind == "int" else (args[0] + args[1]) / 2


def _nearest(value, choices: list):
    numeric = [c for c in choices if isinstance(c, (int, float)) and not isinstance(c, bool)]
    if isinstance(value, (int, float)) and numeric:
        return min(numeric, key=lambda c: abs(c - value))
    return choices[0]
