"""Search-space files (`llmm_tune/search_spaces/<task>.yaml`, shipped inside the package): parsed, validated
and resolved for a profile and a method. Every trial setting is either fixed or sampled; a bad file is
rejected, naming the key and the fix, before anything starts."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import optuna
import yaml

from llmm_tune.errors import UsageError
from llmm_tune.method.config import BASELINES
from llmm_tune.project import SPACES_DIR
from llmm_tune.settings import REQUIRED, positive, positive_int
from llmm_tune.train.dataset import DataBlock, is_shipped
from llmm_tune.tune.context import TrialContext, validation_key
from llmm_tune.tune.direction import MODES
from llmm_tune.tune.family import Task, load_family
from llmm_tune.tune.strategy import default_strategy

PROFILES = ("paper", "gpu", "cpu")
METHOD_CHOICES = tuple(BASELINES)  # --method
SAMPLERS = ("loguniform", "uniform", "int", "choice")
TOP_KEYS = {"extends", "family", "task", "metric", "space", "fixed", "early_stopping", "profiles", "warm_start",
            "dataset", "shift"}
SHIFT_KEYS = {"name", "task", "files", "hash"}  # a shift entry's (hash: written when its file is resolved)
PROFILE_KEYS = {"space", "fixed", "num_samples", "warm_start", "metric", "early_stopping"}  # a profile's replaces
# the top-level one (space and fixed: key by key)
EARLY_STOPPING = {"metric": None, "mode": None, "grace_period": 1, "reduction_factor": 2}  # None: the selection's


@dataclass
class SearchSpec:
    """A search resolved for one profile and method."""

    path: Path
    text: str  # the YAML itself: records carry it, so a search resumes and exports without the file
    family: str
    task: str
    metric: str  # the selection metric, reported as val_<metric>
    mode: str  # "max" or "min": the metric's better direction
    space: dict[str, dict]  # name -> {sampler: args}
    fixed: dict[str, object]
    early_stopping: dict
    num_samples: int
    warm_start: list[dict]
    adjustments: list[str]  # how warm-start points were moved into this space
    dataset: DataBlock | None = None  # the resolved `dataset:` block (TrialContext.dataset), else None
    early_stopping_on: bool | None = None  # whether ASHA runs: as the command line asked, None: by the trial count
    shift: str | None = None  # the resolved `shift:` entries as JSON (TrialContext.shift), else None

    def stops_early(self, trials: int | None = None) -> bool:
        """Whether ASHA stops this search's trials (of `trials`, else its own count)."""
        if self.early_stopping_on is not None:
            return self.early_stopping_on
        return default_strategy(trials or self.num_samples)[1]

    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        return {name: _distribution(entry) for name, entry in self.space.items()}

    @property
    def recipe(self) -> ModuleType:
        return load_family(self.family)

    def context(self) -> TrialContext:
        """The trials' context, as far as the space decides it (no LoftQ cache, no remote code)."""
        return TrialContext.of(self.family, self.task, self.metric, dataset=self.dataset, shift=self.shift)


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


def space_name(path: Path) -> str:
    """A built-in space by name, any other file by its path as given (records must not hold this
    machine's absolute paths; they carry the YAML text anyway)."""
    return path.stem if path.parent == SPACES_DIR else path.name


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


def _check_value(path: Path, where: str, settings: dict, name: str, value) -> None:
    if not settings[name].test(value):
        _fail(path, where, f"{name} must be {settings[name].need}, got {value!r}")


def _check_space(path: Path, where: str, settings: dict, space: dict) -> None:
    for name, entry in _mapping(path, where, space, set(settings)).items():
        at = f"{where}.{name}"
        if not isinstance(entry, dict) or len(entry) != 1 or next(iter(entry)) not in SAMPLERS:
            _fail(path, at, f"must be one of {{loguniform: [low, high]}}, {{uniform: [low, high]}}, "
                            f"{{int: [low, high]}}, {{choice: [v1, v2, ...]}}, got {entry!r}")
        (kind, args), = entry.items()
        if kind == "choice":
            if not isinstance(args, list) or not args:
                _fail(path, at, "choice needs a non-empty list of values")
        else:
            if not (isinstance(args, list) and len(args) == 2
                    and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)):
                _fail(path, at, f"{kind} needs [low, high], got {args!r}")
            if not args[0] < args[1]:
                _fail(path, at, f"empty or inverted range [{args[0]}, {args[1]}]; make low < high")
        for value in args:
            _check_value(path, at, settings, name, value)


def _parse(path: Path, text: str | None, seen: tuple[Path, ...] = ()) -> tuple[dict, str]:
    """The file's mapping and its text; a file that `extends: other.yaml` (beside it, or a shipped space by name:
    `extends: sft`) is that file with its own keys laid over it, mapping by mapping, and its text is the merged
    YAML (records carry the whole space)."""
    text = path.read_text() if text is None else text
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UsageError(f"{path}{line}: malformed YAML ({getattr(error, 'problem', error)}); fix the syntax") from None
    raw = _mapping(path, "top level", raw, TOP_KEYS)
    if "extends" not in raw:
        return raw, text
    named = str(raw.pop("extends"))
    base = path.parent / named if (path.parent / named).is_file() else SPACES_DIR / f"{named}.yaml"
    if not base.is_file() or base.resolve() in seen:
        _fail(path, "extends", f"{named} is not a search-space file (or extends itself); name a YAML file beside it "
                               "or a shipped space (glue_cola, sft, ...)")
    merged = _overlay(_parse(base, None, (*seen, path.resolve()))[0], raw)
    return merged, yaml.safe_dump(merged, sort_keys=False)


def _overlay(base: dict, own: dict) -> dict:
    return {**base, **{k: _overlay(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                       for k, v in own.items()}}


def load_spec(task_or_path: str, profile: str, method: str, num_samples: int | None = None,
              text: str | None = None, dataset: dict | None = None, overrides: dict | None = None,
              metric: str | None = None) -> SearchSpec:
    """Parse and validate a search-space file (or its recorded `text`) and resolve it for `profile` and
    `method`, against the settings and tasks of the family it names; the command line's data options
    (`dataset`) are laid over the space's `dataset:` block, its fixed settings (`overrides`) over the profile's,
    and `metric` (--objectives' first) selects instead of the space's."""
    path = Path(task_or_path) if text is not None else space_path(task_or_path)
    raw, text = _parse(path, text)
    if not isinstance(raw.get("family"), str):
        _fail(path, "family", "missing; name the task family: glue, causal_lm, continual or a module path")
    recipe = load_family(raw["family"])
    if dataset or "dataset" in raw:
        raw["dataset"] = _resolved_dataset(path, raw, recipe, dataset or {})
        text = yaml.safe_dump(raw, sort_keys=False)
        task = recipe.dataset_task(raw.get("task"), raw["dataset"])
    elif raw.get("task") in recipe.TASKS:
        task = recipe.TASKS[raw["task"]]
    else:
        _not_a_task(path, raw, recipe)
    if "shift" in raw:
        raw["shift"] = _shift(path, raw["shift"], recipe, task)
        text = yaml.safe_dump(raw, sort_keys=False)
    profiles = _mapping(path, "profiles", raw.get("profiles"), set(PROFILES))
    if profile == "gpu" and "gpu" not in profiles and "paper" in profiles:
        profiles["gpu"] = gpu_profile(_mapping(path, "profiles.paper", profiles["paper"], PROFILE_KEYS), recipe)
    if profile not in profiles:
        _fail(path, "profiles", f"no {profile!r} profile; add profiles.{profile} or choose "
                                f"--profile {' or '.join(profiles) or 'another'}")
    chosen = _mapping(path, f"profiles.{profile}", profiles[profile], PROFILE_KEYS)
    space, fixed = _settings(path, raw, chosen, profile, recipe, method)
    fixed.update(overrides or {})
    metric = metric or chosen.get("metric", raw.get("metric", task.metric))
    if metric not in task.metrics:
        _fail(path, "metric", f"{metric!r} is not reported by {task.name}; choose one of {', '.join(task.metrics)}")
    stopping = _early_stopping(path, raw, chosen, profile, task, metric)
    samples = num_samples if num_samples is not None else chosen.get("num_samples", 10)
    if not positive_int(samples):
        _fail(path, f"profiles.{profile}.num_samples", f"must be an integer >= 1, got {samples!r}")
    warm, adjustments = _warm_start(path, recipe.SETTINGS, chosen.get("warm_start", raw.get("warm_start")), space)
    dataset = DataBlock.of(raw.get("dataset"))
    shift = json.dumps(raw["shift"], sort_keys=True) if "shift" in raw else None
    return SearchSpec(path, text, raw["family"], task.name, metric, task.metrics[metric], space, fixed, stopping,
                      samples, warm, adjustments, dataset, shift=shift)


def gpu_profile(paper: dict, recipe: ModuleType) -> dict:
    """A space's gpu profile where it gives none: the published recipe (`paper`) with the family's GPU model, one
    that needs no gated login (`GPU_MODEL`), for `--budget` to size (trials, epochs, rows, trials per GPU)."""
    model = getattr(recipe, "GPU_MODEL", None)
    return {**paper, "fixed": {**(paper.get("fixed") or {}), **({"model": model} if model else {})}}


def _shift(path: Path, entries, recipe: ModuleType, task: Task) -> list[dict]:
    """The space's extra held-out sets (`shift:`), each {name, task} or {name, files}, names unique; the family
    checks each against the trained task (same label set) and resolves it (`resolve_shift`)."""
    if not isinstance(entries, list) or not entries:
        _fail(path, "shift", "must be a list of {name: NAME, task: TASK} or {name: NAME, files: FILE}")
    if not hasattr(recipe, "resolve_shift"):
        _fail(path, "shift", f"the family of {task.name} scores no shift sets; drop shift: (glue classifiers take it)")
    resolved = []
    for i, entry in enumerate(entries):
        at = f"shift[{i}]"
        entry = _mapping(path, at, entry, SHIFT_KEYS)
        name = entry.get("name")
        if not (isinstance(name, str) and name.isidentifier()) or name in [e["name"] for e in resolved]:
            _fail(path, f"{at}.name", f"needs a name of its own, one word (letters, digits, _), got {name!r}")
        if ("task" in entry) == ("files" in entry):
            _fail(path, at, "needs exactly one of task: (a task of the family) or files: (a data file)")
        resolved.append(recipe.resolve_shift(entry, task, f"{path}: {at}"))
    return resolved


def _not_a_task(path: Path, raw: dict, recipe: ModuleType) -> None:
    _fail(path, "task", f"{raw.get('task')!r} is not a task of family {raw['family']}; choose one of "
                        f"{', '.join(recipe.TASKS)}, the family that has it, or give a dataset: block")


def _resolved_dataset(path: Path, raw: dict, recipe: ModuleType, options: dict) -> dict | list[dict]:
    """The space's data block with the command line's options over it (over a shipped task's: instead of it),
    checked against its data (once: a record's block is resolved already); a task sequence's list of blocks is
    checked by its family."""
    if not hasattr(recipe, "dataset_task"):
        _fail(path, "dataset", f"family {raw['family']} takes no dataset block; use glue (classification) or "
                               "causal_lm (fine-tuning on text)")
    if not isinstance(raw.get("task"), str) or not raw["task"]:
        _fail(path, "task", "name your task (a word for the results folder), e.g. task: my_tickets")
    block = raw.get("dataset")
    if isinstance(block, list):  # a task sequence: a shipped benchmark's tasks, one block each
        if options:
            _fail(path, "dataset", "a task sequence reads its benchmark's tasks from the data folder; drop --data "
                                   "(it names data for glue and causal_lm spaces)")
    else:
        block = _mapping(path, "dataset", block) or {}
        block = {**({} if options and is_shipped(block) else block), **options}  # the user's data replaces a shipped
        if options:  # data named anew: what was resolved for other data does not hold
            block = {k: v for k, v in block.items() if k not in ("files", "hashes", "labels") or k in options}
    if isinstance(block, dict) and is_shipped(block) and raw["task"] not in recipe.TASKS:  # its data is found by
        # the shipped task's name (a sequence's by its tasks' names: a new order is a new task)
        _not_a_task(path, raw, recipe)
    return recipe.resolve_dataset(block, f"{path}: dataset")


def _settings(path: Path, raw: dict, chosen: dict, profile: str, recipe: ModuleType,
              method: str) -> tuple[dict, dict]:
    """(searched, fixed) settings: the top level's, the profile's over them, defaults for the rest, then what
    the method fixes; every setting of the family has a value, and none that shapes the data is searched."""
    settings = recipe.SETTINGS
    space, fixed = {}, {}
    for where, section in (("", raw), (f"profiles.{profile}.", chosen)):
        section_space = _mapping(path, f"{where}space", section.get("space"), set(settings))
        section_fixed = _mapping(path, f"{where}fixed", section.get("fixed"), set(settings))
        both = sorted(set(section_space) & set(section_fixed))
        if both:
            _fail(path, f"{where}fixed", f"{both} are both fixed and searched; keep each in one of them")
        _check_space(path, f"{where}space", settings, section_space)
        for name, value in section_fixed.items():
            _check_value(path, f"{where}fixed", settings, name, value)
        for name in section_space:  # a profile overrides the top level, sampled or fixed
            fixed.pop(name, None)
        for name in section_fixed:
            space.pop(name, None)
        space.update(copy.deepcopy(section_space))
        fixed.update(section_fixed)
    for name, setting in settings.items():
        if setting.default is not REQUIRED and name not in space:
            fixed.setdefault(name, setting.default)
    for name, value in BASELINES[method].items():
        fixed[name] = value
        space.pop(name, None)
    missing = sorted(name for name in settings if name not in fixed and name not in space)
    if missing:
        _fail(path, "fixed", f"settings {missing} have no value; add them to fixed or space")
    searched_data = sorted(set(space) & set(recipe.DATA_SETTINGS))
    if searched_data:
        _fail(path, "space", f"{searched_data} shape the data every trial shares; move them to fixed")
    return space, fixed


def _early_stopping(path: Path, raw: dict, chosen: dict, profile: str, task: Task, metric: str) -> dict:
    """ASHA's settings: the profile's or the top level's over the defaults; metric and mode the selection's."""
    where = f"profiles.{profile}.early_stopping" if "early_stopping" in chosen else "early_stopping"
    stopping = {**EARLY_STOPPING, **_mapping(path, where, chosen.get("early_stopping", raw.get("early_stopping")),
                                             set(EARLY_STOPPING))}
    stopping["metric"] = stopping["metric"] or validation_key(metric)
    reported = {validation_key(m): d for m, d in task.metrics.items()}
    stopping["mode"] = stopping["mode"] or reported.get(stopping["metric"])
    if stopping["mode"] not in MODES or not isinstance(stopping["metric"], str):
        _fail(path, where, f"needs metric: a reported name ({', '.join(reported)}) and mode: min or max")
    if not (positive(stopping["grace_period"]) and positive(stopping["reduction_factor"])
            and stopping["reduction_factor"] > 1):
        _fail(path, where, "grace_period must be > 0 and reduction_factor > 1")
    return stopping


def _warm_start(path: Path, settings: dict, points, space: dict) -> tuple[list[dict], list[str]]:
    """Published configurations as first trials, made to fit this space: keys it does not search
    are dropped, values outside it move to its nearest edge or choice, searched keys a point lacks
    take the space's first choice or middle; each change is reported."""
    if points is None:
        return [], []
    if not isinstance(points, list):
        _fail(path, "warm_start", "must be a list of mappings")
    result, notes = [], []
    for i, point in enumerate(points):
        for name, value in _mapping(path, f"warm_start[{i}]", point, set(settings)).items():
            _check_value(path, f"warm_start[{i}]", settings, name, value)
        projected, changes = project(point, space)
        notes += [f"warm start {i + 1}: {change}" for change in changes]
        if projected not in result:
            result.append(projected)
    return result, notes


def project(point: dict, space: dict) -> tuple[dict, list[str]]:
    """`point`'s values of the settings `space` searches, moved into it: a value outside goes to the nearest edge
    or choice, a setting the point lacks takes the first choice or the middle; and what was changed, in words."""
    projected, changes = {}, []
    for name, entry in space.items():
        (kind, args), = entry.items()
        if name not in point:
            value = args[0] if kind == "choice" else _middle(kind, args)
            changes.append(f"no {name} given; enqueued with {name}={value}")
        elif kind == "choice":  # the space's own choice: 4, not a table's 4.0
            value = args[args.index(point[name])] if point[name] in args else _nearest(point[name], args)
        else:
            value = min(max(point[name], args[0]), args[1])
        if name in point and value != point[name]:
            changes.append(f"{name}={point[name]} is outside this space; enqueued with {name}={value}")
        projected[name] = value
    return projected, changes


def _middle(kind: str, args: list):
    if kind == "loguniform":
        return math.sqrt(args[0] * args[1])
    return (args[0] + args[1]) // 2 if kind == "int" else (args[0] + args[1]) / 2


def _nearest(value, choices: list):
    numeric = [c for c in choices if isinstance(c, (int, float)) and not isinstance(c, bool)]
    if isinstance(value, (int, float)) and numeric:
        return min(numeric, key=lambda c: abs(c - value))
    return choices[0]
