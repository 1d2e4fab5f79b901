"""Several objectives (`search --objectives mcc:max,ece:min`): Optuna's multi-objective sampling behind Ray's
OptunaSearch. The first objective selects (it replaces the space's `metric` for the search, in the task's own
direction); the others are validation metrics the trials report, each taken at the report that stands for the trial
(`best_val_<metric>`, llmm_tune.tune.runner). Optuna prunes no multi-objective study (optuna issues 2792 and 5268),
so ASHA, when it runs, ranks trials on the first objective alone."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from llmm_tune.errors import UsageError
from llmm_tune.tune.context import validation_key
from llmm_tune.tune.direction import MODES, Direction
from llmm_tune.tune.family import Task
from llmm_tune.tune.spaces import SearchSpec, load_spec

EXAMPLE = "--objectives mcc:max,ece:min"


@dataclass(frozen=True)
class Objective:
    """One objective of a search: a reported validation metric and the way it is better."""

    metric: str  # as the task names it (mcc), reported as val_<metric>
    mode: str  # "max" or "min"

    @property
    def key(self) -> str:
        """The reported key, and trials.csv's column."""
        return validation_key(self.metric)

    @property
    def searched(self) -> str:
        """What the searcher is told: the value at the report that stands for the trial."""
        return f"best_{self.key}"

    @property
    def direction(self) -> Direction:
        return Direction(self.mode)

    @property
    def words(self) -> str:
        return f"{self.key} ({self.direction.word} is better)"


def parse_objectives(text: str | None) -> list[Objective]:
    """`--objectives` METRIC:MODE,... as objectives ([] when not given); a UsageError naming the fix."""
    if text is None:
        return []
    objectives = []
    for item in text.split(","):
        metric, colon, mode = item.strip().partition(":")
        if not colon or not metric:
            raise UsageError(f"--objectives {text}: each objective is METRIC:MODE, e.g. {EXAMPLE}")
        if mode not in MODES:
            raise UsageError(f"--objectives: {metric}:{mode} has no mode max or min; write {metric}:max or "
                             f"{metric}:min")
        objectives.append(Objective(metric, mode))
    names = [objective.metric for objective in objectives]
    if len(names) < 2:
        raise UsageError(f"--objectives needs two or more objectives, the first selecting, e.g. {EXAMPLE}; to select "
                         "on one metric, set the space's metric:")
    if len(set(names)) < len(names):
        raise UsageError(f"--objectives {text} names a metric twice; give each once")
    return objectives


def check_objectives(objectives: list[Objective], task: Task) -> None:
    """The first objective is a metric of the task in the task's direction; each other one a metric its trials
    report (the task's, and what they report beside them: a classifier's ece, brier and nll)."""
    first = objectives[0]
    if first.metric not in task.metrics:
        raise UsageError(f"--objectives: the first objective selects trials, so it is a metric of {task.name} "
                         f"({', '.join(task.metrics)}), not {first.metric}; put one of those first")
    if first.mode != task.metrics[first.metric]:
        raise UsageError(f"--objectives: {first.metric} selects {task.name}'s trials, "
                         f"{Direction(task.metrics[first.metric]).word} being better; write "
                         f"{first.metric}:{task.metrics[first.metric]}")
    reported = {**task.metrics, **task.reported}
    unknown = [objective.metric for objective in objectives[1:] if objective.metric not in reported]
    if unknown:
        raise UsageError(f"--objectives: {task.name}'s trials report no {', '.join(unknown)}; choose among "
                         f"{', '.join(reported)}")


def selecting(spec: SearchSpec, text: str | None, profile: str, method: str,
              overrides: dict) -> tuple[SearchSpec, list[Objective]]:
    """(`spec` selecting on the first objective, the objectives), `text` (--objectives) checked against the space's
    task; (`spec`, []) without objectives."""
    objectives = parse_objectives(text)
    if not objectives:
        return spec, []
    check_objectives(objectives, spec.context().definition)
    return load_spec(str(spec.path), profile, method, spec.num_samples, text=spec.text, overrides=overrides,
                     metric=objectives[0].metric), objectives


def as_record(objectives: list[Objective]) -> list[dict]:
    """The objectives as the experiment's record keeps them."""
    return [asdict(objective) for objective in objectives]


def searcher_targets(objectives: list[Objective], value_key: str, mode: str) -> tuple[str | list[str],
                                                                                      str | list[str]]:
    """(metric, mode) as Ray's OptunaSearch takes them: the selection metric's standing value, or each objective's."""
    if not objectives:
        return f"best_{value_key}", mode
    return [objective.searched for objective in objectives], [objective.mode for objective in objectives]


def objectives_text(objectives: list[Objective], early_stopping: bool) -> str:
    """The console's line: what the search optimises, and what early stopping does with it."""
    named = ", ".join(objective.words for objective in objectives)
    stopping = (f"ASHA stops trials on the first, {objectives[0].key}, alone (Optuna prunes no multi-objective study)"
                if early_stopping else "every trial runs to its end")
    return f"objectives: {named}, sampled by Optuna for all at once; {stopping}"
