"""The terminal while a long command runs: one live progress line, then the final tables.

Everything else (library INFO logs, Ray worker output, Ray Data's progress bars, C-level prints) goes to a log
file under the run's `logs/`; `-v` shows it all on screen instead. The redirection is at the file-descriptor
level, so output from C extensions and from Ray's log monitor lands in the file too.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

QUIET_ENV = "GEOLOC_QUIET"  # set while a quiet console is active (Ray Data's own progress bars are turned off)


class Progress:
    """One tqdm line: stage k/n, the stage's latest log message, elapsed time and an ETA when one is known."""

    def __init__(self, terminal: TextIO):
        from tqdm import tqdm

        self.terminal, self.started = terminal, time.monotonic()
        self.stage, self.status, self.remaining_s = "", "starting", None
        self.stage_started = self.started
        self.bar = tqdm(total=0, file=terminal, bar_format="{desc}", dynamic_ncols=True, leave=False)
        self._stop = threading.Event()
        threading.Thread(target=self._tick, daemon=True).start()

    def start_stage(self, name: str, index: int, total: int, remaining_s: float | None) -> None:
        """`remaining_s`: the expected seconds of this and the later stages (from the last run), if known."""
        self.stage, self.status = f"[{index}/{total}] {name}", "running"
        self.stage_started, self.remaining_s = time.monotonic(), remaining_s
        self.refresh()

    def set_status(self, text: str) -> None:
        self.status = text.replace("\n", " ")[:70]

    def refresh(self) -> None:
        now = time.monotonic()
        eta = "ETA ?"
        if self.remaining_s is not None:
            eta = f"ETA {_fmt(max(0.0, self.remaining_s - (now - self.stage_started)))}"
        self.bar.set_description_str(f"{self.stage} | {_fmt(now - self.started)} elapsed | {eta} | {self.status}")

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            self.refresh()

    def close(self) -> None:
        self._stop.set()
        self.bar.close()


class _StatusHandler(logging.Handler):
    """Our own INFO messages become the progress line's status text."""

    def __init__(self, progress: Progress):
        super().__init__(logging.INFO)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        self.progress.set_status(record.getMessage())


_ACTIVE: Progress | None = None


def progress() -> Progress | None:
    """The active progress line (None when output goes straight to the screen)."""
    return _ACTIVE


def announce(message: str) -> None:
    """A line the user must see even in quiet mode (e.g. the Ray dashboard's address)."""
    if _ACTIVE is not None:
        _ACTIVE.bar.write(message, file=_ACTIVE.terminal)
    else:
        logging.getLogger("geoloc_ray").info(message)


@contextmanager
def quiet(log_path: str) -> Iterator[Progress]:
    """Send stdout/stderr (fds 1 and 2) to `log_path` and show one progress line on the real terminal."""
    global _ACTIVE
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved_err), "w", buffering=1)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.environ[QUIET_ENV] = "1"
    bar = _ACTIVE = Progress(terminal)
    handler = _StatusHandler(bar)
    logging.getLogger("geoloc_ray").addHandler(handler)
    try:
        yield bar
    finally:
        logging.getLogger("geoloc_ray").removeHandler(handler)
        bar.close()
        _ACTIVE = None
        os.environ.pop(QUIET_ENV, None)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        for fd in (saved_out, saved_err, log_fd):
            os.close(fd)
        terminal.close()


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"
