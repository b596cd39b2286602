"""One progress shape for every long run: engines, the CLI's bars, the worker's jobs, the client and Slicer.

A :class:`Progress` says how far a run is (``step`` of ``total`` units: training steps, slices, blocks, bytes),
what it is doing (``message``), the training loss when there is one, the seconds so far and an estimate of the
seconds left. Every progress callback is a :data:`ProgressCallback`; a :class:`ProgressClock` fills in the
timing. No torch here: Slicer's side imports this module.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class Progress:
    """How far a run is: ``step`` of ``total`` units (``total`` 0: unknown), with seconds so far and to go."""

    step: float
    total: float
    message: str = ""
    loss: Optional[float] = None
    elapsed: float = 0.0
    #: estimated seconds left (None: unknown yet)
    remaining: Optional[float] = None

    @property
    def fraction(self) -> Optional[float]:
        """The share done, in [0, 1] (None when the total is unknown)."""
        if not self.total or self.total <= 0:
            return None
        return min(1.0, max(0.0, self.step / self.total))

    def describe(self, count: bool = True) -> str:
        """One line: "3/150, loss 0.512: training lora, 20 s left" (the count left out when not ``count``)."""
        parts = []
        if count and self.total:
            parts.append(f"{self.step:g}/{self.total:g}")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        text = ", ".join(parts)
        if self.message:
            text = f"{text}: {self.message}" if text else self.message
        left = self.left()
        return f"{text}, {left}" if text and left else text or left

    def left(self) -> str:
        """"20 s left", "3 min left"; empty when unknown, before the first unit, or once done."""
        if self.remaining is None or not self.step or self.step >= self.total:
            return ""
        return f"{format_seconds(self.remaining)} left"

    def to_json(self) -> dict[str, Any]:
        """The fields of a job's status: ``done``, ``total``, ``message``, ``loss``, ``elapsed``, ``remaining``."""
        return {"done": float(self.step), "total": float(self.total), "message": self.message,
                "loss": self.loss, "elapsed": round(float(self.elapsed), 3),
                "remaining": None if self.remaining is None else round(float(self.remaining), 3)}

    @classmethod
    def from_json(cls, status: dict[str, Any]) -> Progress:
        """The progress in a job's status (what :meth:`to_json` writes; absent timing fields: unknown)."""
        loss, remaining = status.get("loss"), status.get("remaining")
        return cls(float(status.get("done") or 0.0), float(status.get("total") or 0.0),
                   str(status.get("message") or ""), None if loss is None else float(loss),
                   float(status.get("elapsed") or 0.0), None if remaining is None else float(remaining))


#: What every progress callback is.
ProgressCallback = Callable[[Progress], None]


def format_seconds(seconds: float) -> str:
    """A duration for people: "45 s", "12 min", "1.5 h"."""
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class ProgressClock:
    """Reports a run's progress to ``callback`` (None: to nobody) with its timing: seconds since the clock
    started, and the seconds left at the average pace so far (units already done at the start, ``start``, as in
    a resumed download, do not count towards the pace)."""

    def __init__(self, callback: Optional[ProgressCallback], total: float = 0.0, message: str = "",
                 start: float = 0.0) -> None:
        self.callback, self.total, self.message, self.start = callback, total, message, start
        self.began = time.perf_counter()

    def __call__(self, step: float, total: Optional[float] = None, message: Optional[str] = None,
                 loss: Optional[float] = None) -> Optional[Progress]:
        """Report ``step`` (of ``total``, else the clock's), with a new message or the clock's; the Progress
        sent (None without a callback)."""
        if total is not None:
            self.total = total
        if message is not None:
            self.message = message
        if self.callback is None:
            return None
        elapsed = time.perf_counter() - self.began
        made = step - self.start
        remaining = elapsed / made * max(0.0, self.total - step) if made > 0 and self.total > 0 else None
        update = Progress(step, self.total, self.message, loss, elapsed, remaining)
        self.callback(update)
        return update


def bar_callback(bar: Any, describe: bool = True) -> ProgressCallback:
    """A callback that shows each Progress on a tqdm bar: its count and total, its message as the bar's
    description (when ``describe``), its loss after the bar."""

    def show(update: Progress) -> None:
        if update.total and bar.total != update.total:
            bar.total = update.total
        if describe and update.message:
            bar.set_description(update.message, refresh=False)
        if update.loss is not None:
            bar.set_postfix(loss=f"{update.loss:.3f}", refresh=False)
        bar.n = update.step
        bar.refresh()

    return show


def show_progress(requested: Optional[bool]) -> bool:
    """Whether a command reports its progress: unless switched off (``--no-progress``: False). On a terminal it
    is a bar, elsewhere (logs, CI, Slicer's subprocess) a line every few seconds (:func:`progress_bar`)."""
    return requested is not False


def progress_bar(show: bool, total: Optional[float] = None, unit: str = "it", desc: str = "",
                 interval: float = 5.0, stream: Any = None, **bar_options: Any) -> Any:
    """A tqdm bar on stderr when it is a terminal; otherwise a :class:`LineProgress` (same methods) writing a
    line every ``interval`` seconds; a silent tqdm when not ``show``."""
    from tqdm import tqdm

    stream = stream or sys.stderr
    if show and not (hasattr(stream, "isatty") and stream.isatty()):
        return LineProgress(total, unit, desc, interval, stream)
    return tqdm(total=total, unit=unit, desc=desc, disable=not show, file=stream, **bar_options)


class LineProgress:
    """Progress as plain lines (``Segmenting: 12/35 slices, 40 s elapsed, about 75 s left``) at most every
    ``interval`` seconds and when closed: for output that is not a terminal. Offers the tqdm methods FMSeg's
    commands use (``update``, ``n``, ``total``, ``set_description``, ``set_postfix``, ``refresh``, ``close``)."""

    def __init__(self, total: Optional[float], unit: str, desc: str, interval: float, stream: Any) -> None:
        self.total, self.unit, self.desc, self.interval, self.stream = total, unit, desc, interval, stream
        self.n: float = 0
        self.postfix = ""
        self.began = self.last = time.perf_counter()
        self.closed = False

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.close()

    def update(self, count: float = 1) -> None:
        self.n += count
        self.refresh(force=False)

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc
        if refresh:
            self.refresh(force=False)

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        self.postfix = ", ".join(f"{key} {value}" for key, value in values.items())
        if refresh:
            self.refresh(force=False)

    def refresh(self, force: bool = False) -> None:
        """Write a line if ``interval`` seconds went by since the last one (or ``force``)."""
        now = time.perf_counter()
        if force or now - self.last >= self.interval:
            self.last = now
            self.stream.write(self.line(now - self.began) + "\n")
            self.stream.flush()

    def line(self, elapsed: float) -> str:
        done = f"{self.n:g}" + (f"/{self.total:g}" if self.total else "")
        text = f"{self.desc or 'Working'}: {done} {self.unit}{'s' if self.n != 1 else ''}, " \
               f"{format_seconds(elapsed)} elapsed"
        if self.total and 0 < self.n < self.total:
            text += f", about {format_seconds(elapsed / self.n * (self.total - self.n))} left"
        return text + (f" ({self.postfix})" if self.postfix else "")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.refresh(force=True)
