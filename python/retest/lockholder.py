"""Who holds a lock: the process behind a lock-busy verdict, and whether the lock is stale.

Two kinds of lock reach a lock-busy verdict with a path (docs/verdicts.md):

* a lock *file* that git creates with ``O_EXCL`` and keeps open while it works
  (``index.lock``, ``HEAD.lock``, ``*.lock``): its holder is the process with the file open
  (``/proc/*/fd``); no such process means whoever made it died: a **stale** lock, which git
  never removes by itself;
* the gate's own ``flock`` (``retest-gate.lock``): the kernel names the holder in
  ``/proc/locks`` by device and inode; the kernel drops it when its holder dies, so it is never
  stale, and the pid the holder wrote in the file is the fallback.

Best effort, never raises; processes of other users are invisible without privileges, which
the text says ("no visible process").
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["LockHolder", "describe", "lock_path_in"]

CMDLINE_MAX = 160
#: git: ``Unable to create '/repo/.git/index.lock': File exists.``
_GIT_LOCK = re.compile(rb"Unable to create '([^'\n]+\.lock)': File exists")
_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class LockHolder:
    """A lock, the process that holds it (if one could be found), and whether it is stale."""

    path: str
    exists: bool
    #: Seconds since the lock file was last written (its age), ``None`` if it is gone.
    age_s: Optional[float]
    pid: Optional[int] = None
    cmdline: str = ""
    #: Seconds the holder has been running.
    holder_age_s: Optional[float] = None
    #: How the holder was found: ``"/proc/locks"``, ``"/proc/PID/fd"``, ``"pid in the file"``.
    how: str = ""
    #: The lock file exists but no live process holds it: left by a dead run.
    stale: bool = False

    def text(self) -> str:
        if not self.exists:
            return f"{self.path} is gone now (released since)"
        age = f"{self.age_s:.1f} s old" if self.age_s is not None else "age unknown"
        if self.pid is not None:
            run = f", running {self.holder_age_s:.0f} s" if self.holder_age_s is not None else ""
            return (f"{self.path} ({age}) is held by pid {self.pid} {self.cmdline!r}{run} "
                    f"(found in {self.how})")
        if self.stale:
            return (f"{self.path} ({age}) is stale: no live process holds it, its creator "
                    f"died; remove it")
        return f"{self.path} ({age}): no visible process holds it"

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "exists": self.exists,
                "age_s": None if self.age_s is None else round(self.age_s, 3), "pid": self.pid,
                "cmdline": self.cmdline, "holder_age_s": None if self.holder_age_s is None
                else round(self.holder_age_s, 3), "how": self.how, "stale": self.stale}


def lock_path_in(output: bytes) -> Optional[str]:
    """The lock file a git error names (the last one), or None."""
    found = _GIT_LOCK.findall(output[-65536:])
    return os.fsdecode(found[-1]) if found else None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            data = f.read(CMDLINE_MAX * 2)
    except OSError:
        return ""
    return data.replace(b"\0", b" ").strip().decode("utf-8", "replace")[:CMDLINE_MAX]


def _running_s(pid: int) -> Optional[float]:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        with open("/proc/uptime", "rb") as f:
            uptime = float(f.read().split()[0])
        return max(uptime - int(data[data.rfind(b")") + 2:].split()[19]) / _TICKS, 0.0)
    except (OSError, ValueError, IndexError):
        return None


def _flock_holder(st: os.stat_result) -> Optional[int]:
    """The pid ``/proc/locks`` names for a FLOCK/POSIX lock on this device and inode."""
    want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    try:
        with open("/proc/locks", "rb") as f:
            lines = f.read().decode("ascii", "replace").splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if "->" in fields or len(fields) < 6:
            continue  # a waiter, not a holder
        try:
            major, minor, inode = fields[5].split(":")
            key = (int(major, 16), int(minor, 16), int(inode))
            pid = int(fields[4])
        except ValueError:
            continue
        if key == want and pid > 0:
            return pid
    return None


def _opener(path: str, st: os.stat_result) -> Optional[int]:
    """A process with ``path`` open (its device and inode), by ``/proc/*/fd``."""
    try:
        pids = [int(n) for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return None
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") != path:
                    continue
                target = os.stat(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if (target.st_dev, target.st_ino) == (st.st_dev, st.st_ino):
                return pid
    return None


def _pid_in_file(path: str) -> Optional[int]:
    try:
        with open(path, "rb") as f:
            pid = int(f.read(32).split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if pid > 0 and os.path.exists(f"/proc/{pid}") else None


def describe(path: str, *, flock: bool = False) -> LockHolder:
    """Who holds the lock at ``path``: an ``flock`` (the gate's lock) or a lock file (git)."""
    path = os.path.abspath(path)
    try:
        st = os.stat(path)
    except OSError:
        return LockHolder(path, exists=False, age_s=None)
    age = max(time.time() - st.st_mtime, 0.0)
    pid, how = None, ""
    if flock:
        pid, how = _flock_holder(st), "/proc/locks"
        if pid is None:
            pid, how = _pid_in_file(path), "the pid in the file"
    if pid is None:
        pid = _opener(path, st)
        how = "/proc/PID/fd" if pid is not None else ""
    if pid is None:
        # A flock is dropped when its holder dies; a lock file nobody has open is stale.
        return LockHolder(path, True, age, stale=not flock)
    return LockHolder(path, True, age, pid, _cmdline(pid), _running_s(pid), how)
