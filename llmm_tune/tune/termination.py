"""SIGTERM (what Kubernetes, Slurm and `ray job stop` send to end a job) stops a search as Ctrl+C does: Tune
stops its trials and saves its state, the search names the command that resumes it, exit code 143.

Tune stops gracefully on SIGINT and SIGUSR1 only (its handler sets an event its loop checks), and ray.init leaves
in the driver a C++ failure-signal handler that prints a stack dump on SIGTERM and aborts the process."""

from __future__ import annotations

import importlib
import signal
import sys
import threading

EXIT_CODE = 128 + signal.SIGTERM  # as a shell reports a process that SIGTERM ended
INTERRUPTED_CODE = 128 + signal.SIGINT
TUNE_MODULE = "ray.tune.tune"  # its run() holds the trial loop, its _setup_signal_catching() makes the stop event

_state: dict = {"received": False, "tune_stop": None, "deferrable": False}


def received() -> bool:
    """Whether this process received SIGTERM since `stop_on_sigterm`."""
    return _state["received"]


def interrupted_code() -> int:
    """The exit code of a search that stopped before its end, its state saved: 143 after SIGTERM, else 130."""
    return EXIT_CODE if received() else INTERRUPTED_CODE


def stop_on_sigterm() -> None:
    """After ray.init, in the main thread: SIGTERM while Tune runs the trials acts as Tune's Ctrl+C handler does;
    one before Tune's run stops it after its first step (which makes the trials); one after Tune's run (during the
    export) ends the process at once, with one line. A second SIGTERM ends the process at once, as a second Ctrl+C
    does. Tune's run, Ctrl+C or SIGTERM, always takes its first step."""
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set there, and Tune catches no signal off it either
    module = importlib.import_module(TUNE_MODULE)
    setup = getattr(module, "_setup_signal_catching", None)
    if setup is not None and not hasattr(setup, "watched"):
        module._setup_signal_catching = _watched(setup)
    _state.update(tune_stop=None, deferrable=setup is not None)
    signal.signal(signal.SIGTERM, _on_sigterm)


def _watched(setup):
    def setup_signal_catching():
        stop = setup()
        _state["tune_stop"] = stop
        if _state["received"]:  # before Tune's run
            stop.set()
        return _AfterFirstStep(stop)

    setup_signal_catching.watched = setup
    return setup_signal_catching


class _AfterFirstStep:
    """Tune's stop event as its loop sees it (`while not finished and not stop.is_set(): step()`): unset at the
    first check, so that the first step makes the trials even when the stop came before it (a run stopped before
    it has any saves a state that Tune does not resume: it starts afresh, without the search's settings)."""

    def __init__(self, stop: threading.Event):
        self.stop, self.looked = stop, False

    def is_set(self) -> bool:
        first, self.looked = not self.looked, True
        return not first and self.stop.is_set()

    def __getattr__(self, name: str):
        return getattr(self.stop, name)


def _in_tune_run(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_name == "run" and frame.f_globals.get("__name__") == TUNE_MODULE:
            return True
        frame = frame.f_back
    return False


def _on_sigterm(signum, frame) -> None:
    _state["received"] = True
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    stop = _state["tune_stop"]
    if stop is None and _state["deferrable"]:
        return  # Tune's run, when it starts, stops after its first step
    if stop is not None and _in_tune_run(frame):
        tune_handler = signal.getsignal(signal.SIGUSR1)  # Tune's own: it logs the stop and sets its event
        if callable(tune_handler):
            tune_handler(signum, frame)
        else:
            stop.set()
        return
    print("search terminated (SIGTERM) " + ("after its trials ended, before its export finished; export it with "
                                            "python -m llmm_tune.export EXPERIMENT (named above)" if stop is not None
                                            else "before its trials started; nothing to resume"), file=sys.stderr)
    raise SystemExit(EXIT_CODE)
