"""A tiny text progress bar on stderr for the CLI's long steps (build, profile, compare).

    with ProgressBar("tactics", total=120) as bar:
        for layer in layers:
            ...
            bar.advance()

The bar is drawn only where someone watches it: when the stream is a terminal, or when forced
(``enabled=True``); otherwise every call is a no-op, so logs and pipes stay clean. Redraws are
throttled (``min_interval`` seconds) except the final one. :func:`progress` adapts a bar to the
builder's ``progress(stage, done, total)`` callback (``engine.builder.build(progress=...)``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

#: Signature of the builder's progress callback: ``(stage, done, total)``.
ProgressCallback = Callable[[str, int, int], None]


def wants_progress(stream: TextIO, enabled: bool | None) -> bool:
    """Whether to draw: ``enabled`` if given, else whether ``stream`` is a terminal."""
    if enabled is not None:
        return enabled
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (OSError, ValueError):  # a closed or detached stream
        return False


class ProgressBar:
    """``label [#########.........]  12/40  30%`` redrawn in place with a carriage return.

    ``total`` is the number of units of work (0 or less: unknown, only the count is shown);
    ``width`` the bar's width in characters; ``min_interval`` the least time between redraws
    in seconds.
    """

    def __init__(
        self,
        label: str,
        total: int,
        *,
        stream: TextIO | None = None,
        enabled: bool | None = None,
        width: int = 30,
        min_interval: float = 0.1,
    ) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = wants_progress(self.stream, enabled)
        self.width = max(width, 1)
        self.min_interval = min_interval
        self.closed = False
        self._last_draw = -float("inf")
        self._last_length = 0
        self._started = time.perf_counter()

    def __enter__(self) -> ProgressBar:
        self._draw(force=True)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def update(self, done: int, total: int | None = None) -> None:
        """Set the units done so far (and the total, when it changes)."""
        if total is not None:
            self.total = total
        self.done = max(done, 0)
        self._draw(force=self.total > 0 and self.done >= self.total)

    def advance(self, units: int = 1) -> None:
        """Count ``units`` more units done."""
        self.update(self.done + units)

    def close(self) -> None:
        """Draw the final state and end the line (once; later calls do nothing)."""
        if self.closed:
            return
        self.closed = True
        if self.enabled:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()

    def render(self) -> str:
        """The bar's text (without the carriage return)."""
        elapsed = time.perf_counter() - self._started
        if self.total > 0:
            fraction = min(self.done / self.total, 1.0)
            filled = round(fraction * self.width)
            bar = "#" * filled + "." * (self.width - filled)
            return (
                f"{self.label} [{bar}] {self.done}/{self.total} {100 * fraction:3.0f}% "
                f"{elapsed:.1f}s"
            )
        return f"{self.label} {self.done} {elapsed:.1f}s"

    def _draw(self, force: bool = False) -> None:
        if not self.enabled or (self.closed and not force):
            return
        now = time.perf_counter()
        if not force and now - self._last_draw < self.min_interval:
            return
        self._last_draw = now
        text = self.render()
        padding = " " * max(self._last_length - len(text), 0)  # wipe a longer previous line
        self._last_length = len(text)
        self.stream.write("\r" + text + padding)
        self.stream.flush()


class StageProgress:
    """The builder's ``progress(stage, done, total)`` callback drawing one bar per stage.

    A call with a new stage closes the previous stage's bar and opens one for the new stage;
    :meth:`close` ends the last bar (call it when the build returns or fails).
    """

    def __init__(self, *, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = wants_progress(self.stream, enabled)
        self.bar: ProgressBar | None = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.bar is None or self.bar.label != stage:
            self.close()
            self.bar = ProgressBar(stage, total, stream=self.stream, enabled=self.enabled)
        self.bar.update(done, total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def progress(*, stream: TextIO | None = None, enabled: bool | None = None) -> StageProgress:
    """A ``progress(stage, done, total)`` callback for ``engine.builder.build(progress=...)``
    that draws on ``stream`` (stderr) when it is a terminal or ``enabled`` is True."""
    return StageProgress(stream=stream, enabled=enabled)
