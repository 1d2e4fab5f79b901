"""Trial settings as data: each is (test, what it must be, default), so a search-space file is checked
against the settings of its family before anything runs. A default of `REQUIRED` means the YAML must
give a value; every other default (None included) makes the setting optional."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

REQUIRED = object()


class Setting(NamedTuple):
    test: Callable[[object], bool]
    need: str  # what a valid value is, for the error message
    default: object = REQUIRED


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def positive_int(v) -> bool:
    return is_int(v) and v >= 1


def non_negative_int(v) -> bool:
    return is_int(v) and v >= 0


def positive(v) -> bool:
    return is_number(v) and v > 0


def non_negative(v) -> bool:
    return is_number(v) and v >= 0


def fraction(v) -> bool:
    return non_negative(v) and v < 1


def optional(test: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda v: v is None or test(v)


def text(v) -> bool:
    return isinstance(v, str) and bool(v)


def size(v) -> bool:
    """A fraction in (0, 1) or a whole count."""
    return positive(v) and (v < 1 or float(v).is_integer())


def count(size_value: float, total: int) -> int:
    """What a `size` setting means for a split of `total` examples."""
    return round(size_value * total) if size_value < 1 else int(size_value)


COMMON: dict[str, Setting] = {
    "model": Setting(text, "a hub id, a local path or a packaged name"),
    "seed": Setting(non_negative_int, "an integer >= 0", 0),
}
