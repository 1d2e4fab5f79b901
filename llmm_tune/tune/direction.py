"""Which way a metric improves: the one place that compares, ranks or names values by a metric's `mode`
("max" or "min", as Ray Tune, our spaces and our records spell it)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

MODES = ("max", "min")


@dataclass(frozen=True)
class Direction:
    mode: str

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"a metric's mode is max or min, not {self.mode!r}")

    @property
    def maximises(self) -> bool:
        return self.mode == "max"

    @property
    def optuna(self) -> str:
        """Optuna's name of the direction (`create_study(direction=...)`)."""
        return "maximize" if self.maximises else "minimize"

    @property
    def word(self) -> str:
        """How a table says which values are better."""
        return "higher" if self.maximises else "lower"

    @property
    def ascending(self) -> bool:
        """The sort order that puts the best first."""
        return not self.maximises

    def worst(self) -> float:
        """A value every real one beats."""
        return -math.inf if self.maximises else math.inf

    def better(self, a: float, b: float | None) -> bool:
        """Whether `a` beats `b` (None: nothing yet)."""
        return b is None or (a > b if self.maximises else a < b)

    def at_least_as_good(self, a: float, b: float) -> bool:
        return a >= b if self.maximises else a <= b

    def rank_key(self, value: float) -> float:
        """A sort key that puts the best value first (NaN last)."""
        if value is None or value != value:
            return math.inf
        return -value if self.maximises else value

    def best_label(self, values: pd.Series):
        """The index label of the best of `values` (NaN never chosen; the first of equal ones)."""
        return values.dropna().idxmax() if self.maximises else values.dropna().idxmin()

    def best_so_far(self, values: pd.Series) -> pd.Series:
        return values.cummax() if self.maximises else values.cummin()
