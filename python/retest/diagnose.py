"""The diagnostic stage at the deadline: every probe process's Python stacks, bounded.

The probe registers ``faulthandler`` at SIGPWR (``retest_probe.DUMP_SIGNAL_NAME``) with a file
of its own in the run's private directory. For a probed run with a deadline and
``RETEST_DIAGNOSE_S`` > 0, the caller (not the shepherd) runs the stage: ``proc_group`` hands
the native runner a deadline ``d`` seconds later and a grace ``d`` seconds shorter (``d`` =
the setting, at most half the grace), so SIGKILL comes when it always did; a ``Stage`` thread
wakes at the real deadline, sends SIGPWR to each pid that wrote into the run's events file (a
private 0600 file only the tree can reach) and started after the run did (no recycled pid),
waits for their dumps up to ``d``, and lets the shepherd's SIGTERM follow at ``deadline + d``.
Why the caller: the shepherd cannot know which of its descendants carry the probe, and the
probe's pids arrive on the caller's channel already; this keeps the static shepherd and its
protocol unchanged. The price: SIGTERM comes ``d`` after the deadline even when the dumps
were quick (never later), and a suite that ends inside those ``d`` seconds is not timed out.
"""

from __future__ import annotations

import linecache
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional

__all__ = ["StackDump", "Stage", "DUMP_BYTES_MAX", "DUMPS_MAX"]

DUMP_SIGNAL = getattr(signal, "SIGPWR", None)
STACK_FILE = "stacks-{pid}.txt"
#: Bytes of one dump kept (its head: the current thread comes first), and dumps kept.
DUMP_BYTES_MAX = 16 * 1024
DUMPS_MAX = 20
_POLL_S = 0.02
_SETTLE_S = 0.1
_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class StackDump:
    """One process's Python stacks at the deadline."""

    pid: int
    worker: Optional[str]
    #: The test it was running (the probe's events), if any.
    nodeid: Optional[str]
    text: str
    truncated: bool = False

    def summary(self, frames: int = 3) -> str:
        """The innermost frames of the thread that runs the test (the one whose stack holds the
        test's function; else the first thread): ``File "t.py", line 5 in test_x <- ...``
        (faulthandler prints the most recent call first; xdist runs tests off the thread that
        takes the signal)."""
        threads: list[list[str]] = []
        for line in self.text.splitlines():
            line = line.strip()
            if line.startswith(("Thread 0x", "Current thread 0x")):
                threads.append([])
            elif line.startswith("File ") and threads:
                threads[-1].append(line)
        function = (self.nodeid or "").rsplit("::", 1)[-1].split("[", 1)[0]
        chosen = next((t for t in threads if function and any(ln.endswith(f" in {function}")
                                                              for ln in t)), None)
        if chosen is None:
            chosen = threads[0] if threads else []
        else:  # start at the test's own frame's callees: keep what it was doing
            chosen = chosen[:max(i for i, ln in enumerate(chosen) if ln.endswith(f" in {function}")) + 1]
        shown = chosen[:frames]
        if shown:  # the innermost frame's source line: what it was doing (e.g. time.sleep(60))
            shown[0] += _source_of(shown[0])
        return " <- ".join(shown)

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "worker": self.worker, "nodeid": self.nodeid,
                "text": self.text, "truncated": self.truncated}


_FRAME = re.compile(r'File "(?P<path>[^"]+)", line (?P<line>\d+) in ')
SOURCE_MAX = 120


def _source_of(frame: str) -> str:
    """``: <the source line>`` of a faulthandler frame line, or "" where it cannot be read."""
    match = _FRAME.match(frame)
    if match is None:
        return ""
    text = linecache.getline(match["path"], int(match["line"])).strip()
    linecache.clearcache()  # a worktree's files change from run to run
    return f": {text[:SOURCE_MAX]}" if text else ""


def _uptime_ticks() -> Optional[int]:
    try:
        with open("/proc/uptime", "rb") as f:
            return int(float(f.read().split()[0]) * _TICKS)
    except (OSError, ValueError, IndexError):
        return None


def _started_ticks(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rfind(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


class Stage:
    """A thread that, at ``deadline_s`` after ``start()``, dumps the probe processes' stacks."""

    def __init__(self, run_dir: str, deadline_s: float, budget_s: float,
                 probe_pids: Callable[[], Iterable[int]]) -> None:
        self.run_dir = run_dir
        self.deadline_s = deadline_s
        self.budget_s = budget_s
        self.probe_pids = probe_pids
        self.fired = False
        self.signalled: list[int] = []
        self.took_s = 0.0
        self._stop = threading.Event()
        self._since = _uptime_ticks()
        self._sizes: dict[int, tuple[int, float]] = {}
        self._thread = threading.Thread(target=self._run, name="retest-diagnose", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Called when the run returned: the stage, if it is still waiting, gives up."""
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        if self._stop.wait(self.deadline_s) or DUMP_SIGNAL is None:
            return
        began = time.monotonic()
        self.fired = True
        for pid in sorted(set(self.probe_pids())):
            started = _started_ticks(pid)
            if started is None or (self._since is not None and started < self._since):
                continue  # gone, or a recycled pid that is not ours
            try:
                os.kill(pid, DUMP_SIGNAL)
            except OSError:
                continue
            self.signalled.append(pid)
        end = began + self.budget_s
        while not self._stop.is_set() and time.monotonic() < end and not self._all_dumped():
            self._stop.wait(_POLL_S)
        self.took_s = time.monotonic() - began

    def _all_dumped(self) -> bool:
        """Every signalled process's file is non-empty and has not grown for ``_SETTLE_S``
        (faulthandler writes a dump in many small writes, from a signal handler that may be
        descheduled midway on a loaded machine)."""
        now = time.monotonic()
        settled = True
        for pid in self.signalled:
            try:
                size = os.path.getsize(self._path(pid))
            except OSError:
                size = 0
            seen = self._sizes.get(pid)
            if seen is None or seen[0] != size:
                self._sizes[pid] = (size, now)
                settled = False
            elif size == 0 or now - seen[1] < _SETTLE_S:
                settled = False
        return settled

    def _path(self, pid: int) -> str:
        return os.path.join(self.run_dir, STACK_FILE.format(pid=pid))

    def dumps(self, workers: Mapping[int, Optional[str]],
              running: Mapping[Optional[str], str]) -> tuple[StackDump, ...]:
        """The dumps written, attributed to their pid's xdist worker and running test."""
        out = []
        for pid in self.signalled[:DUMPS_MAX]:
            try:
                with open(self._path(pid), "rb") as f:
                    data = f.read(DUMP_BYTES_MAX + 1)
            except OSError:
                continue
            if not data:
                continue
            worker = workers.get(pid)
            out.append(StackDump(pid, worker, running.get(worker),
                                 data[:DUMP_BYTES_MAX].decode("utf-8", "replace"),
                                 len(data) > DUMP_BYTES_MAX))
        return tuple(out)
