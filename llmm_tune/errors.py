"""Errors a user can act on: bad input (exit code 2, one line), a search stopped with its state saved, and trials
that fail for a reason."""

from __future__ import annotations

import torch

FAILURE_KEY = "failure"  # the result key of a trial that ended itself, with the reason
STARTED_AGAIN_KEY = "started_again"  # in a trial's first report after a resume that found its checkpoint gone


class UsageError(Exception):
    """Bad input: reported as one line naming the problem and the fix, exit code 2."""


class Interrupted(Exception):
    """A run that stopped before its end with its state saved: Ctrl+C (exit code 130), SIGTERM (143) or a
    failure of Ray (1). The message names the command that continues it."""

    def __init__(self, message: str, code: int = 130):
        super().__init__(message)
        self.code = code


class TrialFailure(Exception):
    """A trial that cannot go on (divergence, say): it ends itself and reports why."""


def failure_reason(error: BaseException) -> str | None:
    """Why a trial failed, for divergence and out of memory; None for errors that are bugs."""
    if isinstance(error, TrialFailure):
        return str(error)
    # CUDA raises torch.OutOfMemoryError; the CPU allocator raises a plain RuntimeError
    cpu_oom = isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)) or cpu_oom:
        return "out of memory: " + (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    return None
