"""A live progress line for ``retest run`` on a terminal, drawn from the probe's events.

``[retest] 812/2000 done, 3 failed, running tests/test_x.py::test_slow (12s) +1 more, 1m02s``
on stderr, redrawn at most every ``interval_s`` and cleared before any of the command's own
output is written, so the two never mix on one line. Nothing is drawn when stderr is not a
terminal: logs and pipes get the command's output and the verdict line only.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from typing import Any, Mapping, Optional, TextIO

__all__ = ["Progress", "format_elapsed"]

_CLEAR = "\r\x1b[K"


def format_elapsed(seconds: float) -> str:
    """``42s``, ``3m07s``, ``1h02m``."""
    seconds = max(int(seconds), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Keeps the suite's state from its events and draws it on one terminal line."""

    def __init__(self, stream: TextIO, *, interval_s: float = 0.25,
                 clock: Any = time.monotonic) -> None:
        self.stream = stream
        self.interval_s = interval_s
        self.clock = clock
        self.started = clock()
        self.collected: Optional[int] = None
        self.done = 0
        self.failed = 0
        self.running: dict[tuple[Optional[str], str], float] = {}
        self._lock = threading.Lock()
        self._shown = False
        self._last_draw = 0.0

    # -- state

    def on_event(self, event: Mapping[str, Any]) -> None:
        kind = event.get("ev")
        with self._lock:
            if kind == "collected":
                self.collected = int(event.get("count") or 0)
            elif kind == "test_start":
                self.running[(event.get("worker"), str(event.get("nodeid")))] = self.clock()
            elif kind == "report":
                self._on_report(event)
            elif kind == "collect_error":
                self.failed += 1
            self._draw_locked(force=False)

    def _on_report(self, event: Mapping[str, Any]) -> None:
        outcome, when = event.get("outcome"), event.get("when")
        if outcome in ("failed", "error"):
            self.failed += 1
        if event.get("subtest") or outcome == "rerun":
            return
        if when == "call" or (when == "setup" and outcome != "passed"):
            self.done += 1
            nodeid = str(event.get("nodeid"))
            if self.running.pop((event.get("worker"), nodeid), None) is None:
                for key in [k for k in self.running if k[1] == nodeid][:1]:
                    del self.running[key]

    # -- drawing

    def line(self) -> str:
        """The progress line (without terminal control)."""
        now = self.clock()
        total = f"/{self.collected}" if self.collected is not None else ""
        parts = [f"[retest] {self.done}{total} done"]
        if self.failed:
            parts.append(f"{self.failed} failed")
        if self.running:
            (_, nodeid), since = min(self.running.items(), key=lambda kv: kv[1])
            more = f" +{len(self.running) - 1} more" if len(self.running) > 1 else ""
            parts.append(f"running {nodeid} ({format_elapsed(now - since)}){more}")
        parts.append(format_elapsed(now - self.started))
        return ", ".join(parts)

    def _draw_locked(self, *, force: bool) -> None:
        now = self.clock()
        if not force and now - self._last_draw < self.interval_s:
            return
        self._last_draw = now
        width = shutil.get_terminal_size((100, 24)).columns
        text = self.line()
        if len(text) >= width:
            text = text[: max(width - 4, 10)] + "..."
        self._write(_CLEAR + text)
        self._shown = True

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed terminal: progress is a courtesy, never a failure

    def clear(self) -> None:
        """Remove the line (before the command's own output, and at the end)."""
        with self._lock:
            if self._shown:
                self._write(_CLEAR)
                self._shown = False

    def redraw(self) -> None:
        with self._lock:
            self._draw_locked(force=True)


def wanted(stream: TextIO) -> bool:
    """Progress is drawn only on a terminal (and not with ``TERM=dumb``)."""
    try:
        return stream.isatty() and os.environ.get("TERM", "") != "dumb"
    except (AttributeError, ValueError):
        return False
