"""cgroup v2 mode of the runner: where each run's own cgroup is made, and making it.

The policy lives here; the mechanism is C (``ext/cgroup.c``): the shepherd places the command
in the cgroup at spawn, signals and kills it as a whole, waits for it to empty and removes it;
``ext/run.c`` kills and removes it if the shepherd is lost. A run's cgroup is
``<parent>/retest-<pid>-<n>``. One that ends as it was made (emptied without ``cgroup.kill``, no
controller, nothing changed in it: ``cg_reusable`` in ``ext/cgroup.c``) is kept by the shepherd
and serves the process's next run (``give_back``, then ``take`` says it is reused: the
shepherd reports its ``cpu.stat`` deltas). That saves ~200 us of kernel work per run (issue 15);
a cgroup with a controller, limits, or a kill behind it is removed and a fresh one made.

Making one costs ~45 us of ``mkdir`` (kernel work under ``cgroup_mutex``); the runner makes
the next run's cgroup ahead, in C, while the current run's shepherd starts its command (the
caller would sleep in poll then): ``next_name`` names it, ``add_spare`` keeps it, ``create``
takes it. At most ``SPARES_MAX`` wait per parent; they are removed at exit, and a later
process removes the empty ones of a caller that died (``_sweep_stale``).

The parent is ``RETEST_CGROUP_PARENT`` or the caller's own cgroup (the ``0::`` line of
``/proc/self/cgroup`` under the cgroup2 mount found in ``/proc/self/mountinfo``). Whether a
child cgroup can be made there (root, a delegated subtree, a container with its own cgroup
namespace) is found out by trying, once per parent.
"""

from __future__ import annotations

import atexit
import errno
import itertools
import logging
import os
import threading
from dataclasses import dataclass
from typing import Optional

log = logging.getLogger(__name__)

__all__ = ["Limits", "NO_LIMITS", "Unavailable", "parent_dir", "create", "take", "mark_unusable",
           "unusable_reason", "next_name", "add_spare", "give_back", "remove_spares"]

#: Cgroups made ahead and waiting for a run, per parent (one per thread running in a steady
#: stream; more would only sit there).
SPARES_MAX = 8

_names = itertools.count(1)
_lock = threading.Lock()
#: parent -> cgroups waiting for this process's next runs: made ahead (empty, no limits written
#: yet) or kept after a run (empty, as made; in ``_used``).
_spares: dict[str, list[str]] = {}
#: Spares that served a run already: their cpu.stat counters do not start at 0.
_used: set[str] = set()
#: parent -> whether the last run under it left its cgroup for the next one (then no cgroup
#: is made ahead for a run that asks to keep its own).
_kept_last: dict[str, bool] = {}
#: Parents whose stale cgroups of dead callers were swept by this process.
_swept: set[str] = set()
_exit_hook = False
#: Parents where a run's cgroup could not be made or used, with why (tried once each).
_unusable: dict[str, str] = {}
_warned: set[str] = set()


class Unavailable(Exception):
    """No cgroup of its own for this run; ``str()`` says why."""


@dataclass(frozen=True)
class Limits:
    """Limits of each run's cgroup, in the kernel's syntax; "" leaves a file alone."""

    memory_max: str = ""
    pids_max: str = ""
    cpu_max: str = ""

    def items(self) -> list[tuple[str, str, str]]:
        """(file, value, setting name) for each limit that is set."""
        table = [("memory.max", self.memory_max, "RETEST_CGROUP_MEMORY_MAX"),
                 ("pids.max", self.pids_max, "RETEST_CGROUP_PIDS_MAX"),
                 ("cpu.max", self.cpu_max, "RETEST_CGROUP_CPU_MAX")]
        return [row for row in table if row[1]]


#: No limit set (the default): ``create`` writes no file.
NO_LIMITS = Limits()


def _v2_mount(mountinfo: str) -> Optional[tuple[str, str]]:
    """(mount point, root within the hierarchy) of the first cgroup2 mount, or None."""
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if sep and right.split()[:1] == ["cgroup2"] and len(fields) >= 5:
            return _unescape(fields[4]), _unescape(fields[3])
    return None


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040...)."""
    return field.encode().decode("unicode_escape") if "\\" in field else field


def _own_cgroup(proc_cgroup: str) -> Optional[str]:
    """The caller's cgroup v2 path (the ``0::`` line), or None on a v1-only machine."""
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:] or "/"
    return None


#: (pid, parent) of the last parent_dir() answer: /proc is read once per process (~45 us a
#: run otherwise). A caller moved to another cgroup keeps the first answer, as it should:
#: the runs' cgroups stay where their siblings are.
_own_parent: Optional[tuple[int, str]] = None


def parent_dir(configured: str = "") -> str:
    """The directory under which this run's cgroup would be made; raise Unavailable."""
    global _own_parent
    if configured:
        return configured
    cached = _own_parent
    if cached is not None and cached[0] == os.getpid():
        return cached[1]
    parent = _find_own_parent()
    _own_parent = (os.getpid(), parent)
    return parent


def _find_own_parent() -> str:
    """The caller's own cgroup v2 directory, from /proc; raise Unavailable."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            mount = _v2_mount(f.read())
        with open("/proc/self/cgroup", encoding="utf-8", errors="surrogateescape") as f:
            own = _own_cgroup(f.read())
    except OSError as err:
        raise Unavailable(f"cannot read /proc: {err}") from err
    if mount is None:
        raise Unavailable("no cgroup v2 mount in /proc/self/mountinfo")
    if own is None:
        raise Unavailable("no cgroup v2 line (0::) in /proc/self/cgroup")
    point, root = mount
    if root != "/" and (own == root or own.startswith(root.rstrip("/") + "/")):
        own = own[len(root.rstrip("/")):] or "/"  # a mount of a subtree (no cgroup namespace)
    return os.path.normpath(point + "/" + own.lstrip("/"))


def unusable_reason(parent: str) -> Optional[str]:
    """Why runs under ``parent`` cannot have a cgroup of their own, if that is known."""
    return _unusable.get(parent)


def mark_unusable(parent: str, why: str) -> bool:
    """Remember that ``parent`` cannot be used; return True the first time (log it then)."""
    with _lock:
        if parent in _unusable:
            return False
        _unusable[parent] = why
        return True


def create(parent: str, limits: Limits) -> str:
    """Make this run's cgroup under ``parent`` with ``limits``; return its path.

    Raise Unavailable (and remember it for ``parent``) when no child cgroup can be made there.
    A limit whose controller is not enabled for ``parent`` is skipped with one warning.
    """
    return take(parent, limits)[0]


def take(parent: str, limits: Limits) -> tuple[str, bool]:
    """As ``create``; also say whether the cgroup served an earlier run (its ``cpu.stat``
    counters then run on from there, and the shepherd must take a baseline)."""
    known = _unusable.get(parent)
    if known is not None:
        raise Unavailable(known)
    path, reused = _take_spare(parent)
    if path is None:
        path = _make(parent)
    if limits is not NO_LIMITS:
        for name, value, setting in limits.items():
            _apply_limit(path, name, value, setting, parent)
    return path, reused


def _take_spare(parent: str) -> tuple[Optional[str], bool]:
    while True:
        with _lock:
            waiting = _spares.get(parent)
            path = waiting.pop() if waiting else None
            reused = path in _used
            _used.discard(path or "")
        # A made-ahead spare may have been swept by a process that took us for dead. A kept
        # one is not looked at (a stat on cgroupfs, ~10-30 us): the shepherd finds it gone
        # or taken over and fails the start with ESTALE before anything ran (proc_group).
        if path is None or reused or os.path.isdir(path):
            return path, reused


def _make(parent: str) -> str:
    """mkdir a new run cgroup under ``parent`` now; raise Unavailable (and remember it)."""
    if parent not in _swept:
        _sweep_stale(parent)
    path = os.path.join(parent, f"retest-{os.getpid()}-{next(_names)}")
    try:
        os.mkdir(path)
    except OSError as err:
        why = f"cannot create a cgroup in {parent}: {os.strerror(err.errno or 0)}"
        if err.errno in (errno.EEXIST,):  # a stale one of a dead caller with our pid: once more
            return _make(parent)
        mark_unusable(parent, why)
        raise Unavailable(why) from err
    if not os.path.exists(os.path.join(path, "cgroup.events")):
        os.rmdir(path)
        why = f"{parent} is not a cgroup v2 directory"
        mark_unusable(parent, why)
        raise Unavailable(why)
    return path


def next_name(parent: str, keep: bool = False) -> Optional[str]:
    """A path for a cgroup to be made ahead under ``parent`` (the runner makes it while its
    command starts), or None when enough wait already or ``parent`` is not usable. ``keep``:
    the run asks to keep its own cgroup; when the last run under ``parent`` could, that one
    will serve the next run and none is made ahead."""
    with _lock:
        if parent in _unusable or len(_spares.get(parent, ())) >= SPARES_MAX:
            return None
        if keep and _kept_last.get(parent):
            return None
    return os.path.join(parent, f"retest-{os.getpid()}-{next(_names)}")


def add_spare(parent: str, path: str) -> None:
    """Keep ``path``, made ahead under ``parent``, for a later run of this process."""
    with _lock:
        _spares.setdefault(parent, []).append(path)
    _register_exit_hook()


def give_back(parent: str, path: str, kept: bool) -> None:
    """After a run that asked to keep its cgroup: ``kept``, the shepherd left ``path`` empty
    and as made, for a later run (removed here if enough wait already)."""
    with _lock:
        _kept_last[parent] = kept
        if not kept:
            return
        waiting = _spares.get(parent, [])
        room = len(waiting) < SPARES_MAX
        if room:
            waiting.append(path)
            _spares[parent] = waiting
            _used.add(path)
    if not room:
        _remove_empty(path)
        return
    _register_exit_hook()


def _register_exit_hook() -> None:
    global _exit_hook
    with _lock:
        if not _exit_hook:
            _exit_hook = True
            atexit.register(remove_spares)


def _remove_empty(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass


def remove_spares() -> None:
    """Remove the cgroups made ahead or kept that no run took (at exit; tests)."""
    with _lock:
        waiting = [p for paths in _spares.values() for p in paths]
        _spares.clear()
        _used.clear()
        _kept_last.clear()
    for path in waiting:
        _remove_empty(path)


def _forget_spares_in_child() -> None:
    """A forked child's runs make their own: the parent's spares are the parent's to use."""
    global _lock, _exit_hook
    _lock = threading.Lock()
    _spares.clear()
    _used.clear()
    _kept_last.clear()
    _exit_hook = False


os.register_at_fork(after_in_child=_forget_spares_in_child)


def _sweep_stale(parent: str) -> None:
    """Remove the empty run cgroups (``retest-<pid>-<n>``) that a dead caller left under
    ``parent`` (its spares, when it was SIGKILLed). Only empty ones go (rmdir refuses the
    rest), and never those of a live process."""
    _swept.add(parent)
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        fields = name.split("-")
        if len(fields) != 3 or fields[0] != "retest" or not fields[1].isdigit():
            continue
        pid = int(fields[1])
        if pid == os.getpid() or os.path.exists(f"/proc/{pid}"):
            continue
        try:
            os.rmdir(os.path.join(parent, name))
        except OSError:
            pass


def _apply_limit(path: str, name: str, value: str, setting: str, parent: str) -> None:
    """Write one limit; warn once per setting when its controller is absent."""
    try:
        with open(os.path.join(path, name), "w", encoding="ascii") as f:
            f.write(value)
    except OSError as err:
        with _lock:
            first = setting not in _warned
            _warned.add(setting)
        if first:
            why = ("the controller is not enabled for " + parent) if err.errno == errno.ENOENT \
                else os.strerror(err.errno or 0)
            log.warning("retest: %s=%s not applied: %s (%s)", setting, value, why, name)
