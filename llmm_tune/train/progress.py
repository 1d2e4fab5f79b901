"""Long work says how far it is: one line (done / total, elapsed, an estimate of what is left) at least every 30
seconds while it runs and once at its end, on the console and in the log; never a wall of bars."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

EVERY = 30.0  # seconds between lines
log = logging.getLogger("llmm_tune.progress")


def duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s"


class Progress:
    """`with Progress("decoding the test split", 200) as progress: ... progress.advance(16)`. A background thread
    writes the line every `every` seconds, so a step that takes longer than that still shows the work is alive."""

    def __init__(self, what: str, total: int, every: float = EVERY, say: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.what, self.total, self.every, self.clock = what, total, every, clock
        self.say = say or _console_and_log
        self.done = 0
        self.started = clock()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, daemon=True)

    def line(self, final: bool = False) -> str:
        elapsed = self.clock() - self.started
        if final:
            return f"{self.what}: {self.done}/{self.total} in {duration(elapsed)}"
        estimate = (f"about {duration(elapsed / self.done * (self.total - self.done))} left" if self.done
                    else "no estimate yet")
        return f"{self.what}: {self.done}/{self.total}, {duration(elapsed)} elapsed, {estimate}"

    def advance(self, count: int = 1) -> None:
        self.done += count

    def _tick(self) -> None:
        while not self._stop.wait(self.every):
            self.say(self.line())

    def start(self) -> Progress:
        self._ticker.start()
        return self

    def finish(self, completed: bool = True) -> None:
        """Stop the lines; the last one says how long the work took (none when it failed)."""
        self._stop.set()
        self._ticker.join()
        if completed:
            self.say(self.line(final=True))

    def __enter__(self) -> Progress:
        return self.start()

    def __exit__(self, failure: type | None, *details) -> None:
        self.finish(completed=failure is None)


def _console_and_log(line: str) -> None:
    print(line, flush=True)
    log.info(line)
