"""A progress bar on stderr for long simulations.

Plain and dependency-free by default; with the ``progress`` extra installed (tqdm) and
``fancy=True`` it uses tqdm instead. Nothing is drawn during the first ``delay`` seconds,
so short runs stay silent.
"""

from __future__ import annotations

import importlib
import sys
import time
from typing import Any, TextIO

from cacheroute._validation import check_bool, check_int, check_real, check_str, fail

__all__ = ["ProgressBar"]


class ProgressBar:
    """``update(done)`` with an absolute count; ``close()`` when finished.

    Args:
        total: the count at completion.
        label: shown before the bar.
        stream: where to draw (default ``sys.stderr``).
        delay: seconds before anything is drawn.
        enabled: ``False`` draws nothing (``None``: only when ``stream`` is a terminal).
        fancy: use tqdm when it is installed.

    Raises:
        TypeError: ``total`` not an int, ``delay`` not a real number, ``label`` not a
            str, ``enabled`` not a bool or ``None``, ``fancy`` not a bool.
        ValueError: ``total`` negative or ``delay`` negative or not finite.
    """

    def __init__(
        self,
        total: int,
        label: str = "",
        *,
        stream: TextIO | None = None,
        delay: float = 2.0,
        enabled: bool | None = None,
        fancy: bool = True,
    ) -> None:
        check_int("total", total, minimum=0)
        check_str("label", label, empty_ok=True)
        check_real("delay", delay, minimum=0.0)
        if enabled is not None and not isinstance(enabled, bool):
            raise fail("enabled", "a bool or None", enabled, TypeError)
        check_bool("fancy", fancy)
        if stream is not None and not callable(getattr(stream, "write", None)):
            raise fail("stream", "None or a text stream (with write)", stream, TypeError)
        self.total = total
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self.delay = delay
        self._start = time.monotonic()
        self._last = 0.0
        self._drawn = False
        self._tqdm: Any = None
        self._fancy = fancy

    def update(self, done: int) -> None:
        """Report ``done`` of ``total``; redraws at most 10 times a second."""
        if type(done) is not int or done < 0:
            check_int("done", done, minimum=0)
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._start < self.delay or now - self._last < 0.1:
            return
        self._last = now
        if self._fancy and self._tqdm is None:
            try:
                tqdm = importlib.import_module("tqdm").tqdm  # the optional `progress` extra
            except ImportError:
                self._fancy = False
            else:
                self._tqdm = tqdm(total=self.total, desc=self.label, file=self.stream, leave=False)
        if self._tqdm is not None:
            self._tqdm.update(done - self._tqdm.n)
            return
        frac = min(done / self.total, 1.0) if self.total else 1.0
        width = 30
        fill = int(frac * width)
        elapsed = now - self._start
        eta = elapsed * (1 - frac) / frac if frac > 0 else 0.0
        self.stream.write(
            f"\r{self.label} [{'#' * fill}{'.' * (width - fill)}] {frac:6.1%} "
            f"{done}/{self.total} {elapsed:5.1f}s eta {eta:5.1f}s"
        )
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        """Erase the bar."""
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None
        if self._drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._drawn = False
