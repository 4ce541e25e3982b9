"""Progress on long jobs: a bar when stderr is a terminal, else a log line at most every 30 s.

Every long loop of robustse (training epochs, the sweep, drift, evaluation, gate means, image
decoding, the report's figures) counts its steps through :class:`Progress`. What it shows is set
once per process, or per ``with`` block, by :func:`progress_settings`: the CLI turns it off with
``--quiet`` and routes the lines through its logger. Without settings, lines go to stderr.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any

from tqdm import tqdm

LOG_EVERY_S = 30.0  # at most one progress line per job this often when stderr is not a terminal


@dataclass(frozen=True)
class ProgressSettings:
    """What progress shows: nothing (``show`` false), a bar on a terminal, or a line through
    ``log`` (stderr when None) at most every ``every`` seconds. ``terminal`` None asks stderr;
    ``clock`` is the time source (tests replace it)."""

    show: bool = True
    log: Callable[[str], None] | None = None
    every: float = LOG_EVERY_S
    terminal: bool | None = None
    clock: Callable[[], float] = time.monotonic


_DEFAULT = ProgressSettings()
_SETTINGS: ContextVar[ProgressSettings | None] = ContextVar("robustse_progress", default=None)


def current_settings() -> ProgressSettings:
    """The settings in force here."""
    return _SETTINGS.get() or _DEFAULT


@contextmanager
def progress_settings(**changes: Any) -> Iterator[ProgressSettings]:
    """Change the progress settings (fields of :class:`ProgressSettings`) inside the block."""
    settings = replace(current_settings(), **changes)
    token = _SETTINGS.set(settings)
    try:
        yield settings
    finally:
        _SETTINGS.reset(token)


def duration(seconds: float) -> str:
    """``seconds`` as ``1 min 05 s`` (or ``42 s``)."""
    s = max(round(seconds), 0)
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def eta(elapsed: float, done: float, total: float) -> str:
    """The time left for ``total`` steps after ``done`` took ``elapsed`` seconds, as :func:`duration`."""
    return duration(elapsed / max(done, 1) * max(total - done, 0))


def _stderr_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


class Progress:
    """``total`` steps of one job called ``desc``: a tqdm bar on a terminal, else a line
    ``desc: 120/480 batch (25%), 1 min 10 s so far, about 3 min 30 s left`` at most every
    :attr:`ProgressSettings.every` seconds (nothing for a job shorter than that)."""

    def __init__(self, total: int, desc: str, *, unit: str = "batch", show: bool = True, leave: bool = True) -> None:
        self.settings = current_settings()
        self.total, self.desc, self.unit, self.done = total, desc, unit, 0
        self.postfix: dict[str, Any] = {}
        on = show and self.settings.show and total > 0
        terminal = self.settings.terminal if self.settings.terminal is not None else _stderr_is_terminal()
        self.bar = tqdm(total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True) if on and terminal else None
        self.lines = on and not terminal
        self.start = self.last = self.settings.clock()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """``n`` more steps done."""
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.lines:
            now = self.settings.clock()
            if now - self.last >= self.settings.every and self.done < self.total:
                self.last = now
                (self.settings.log or _stderr_line)(self.line(now - self.start))

    def time_left(self, elapsed: float | None = None) -> str:
        """The time left at the rate so far (``elapsed``: seconds since the start; default now)."""
        if elapsed is None:
            elapsed = self.settings.clock() - self.start
        return eta(elapsed, self.done, self.total)

    def line(self, elapsed: float) -> str:
        """The log line after ``elapsed`` seconds."""
        pct = 100 * self.done / self.total
        text = (
            f"{self.desc}: {self.done}/{self.total} {self.unit} ({pct:.0f}%), {duration(elapsed)} so far, "
            f"about {self.time_left(elapsed)} left"
        )
        extra = " ".join(f"{k}={v}" for k, v in self.postfix.items())
        return f"{text} ({extra})" if extra else text

    def set_postfix(self, **values: Any) -> None:
        """Figures shown after the count (loss, accuracy)."""
        self.postfix = values
        if self.bar is not None:
            self.bar.set_postfix(**values)

    def set_description(self, desc: str) -> None:
        self.desc = desc
        if self.bar is not None:
            self.bar.set_description(desc)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def track(items: Any, desc: str, *, unit: str = "batch", show: bool = True, leave: bool = True) -> Iterator[Any]:
    """Iterate ``items`` (a sized iterable), counting each one as a step of :class:`Progress`."""
    with Progress(len(items), desc, unit=unit, show=show, leave=leave) as bar:
        for item in items:
            yield item
            bar.update()
