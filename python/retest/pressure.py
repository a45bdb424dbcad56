"""Machine-pressure evidence for every run: PSI, the tree's CPU share, the foreign CPU hogs.

``Watch`` reads the machine around one run, from the caller: four small reads at the start
(PSI, ``/proc/stat``), then one process-wide sampler thread adds a ``Sample`` to the run's
timeline each interval (the run's cgroup's ``cpu.stat``/``cpu.pressure`` in cgroup mode, its
processes' CPU otherwise, the machine's PSI and busy cores), and the table of every process
is read at the first sample and at the end (so a run shorter than one sample names no foreign
process but still measures their CPU from ``/proc/stat``):

* PSI (``/proc/pressure/{cpu,memory,io}``): ``some``/``full`` ``avg10`` at the end, and the
  ``total`` stall microseconds accumulated during the run, as a share of its wall time; in
  cgroup mode also the run's own ``cpu.pressure``, read until the last sample before the
  runner removes the cgroup (docs/internals.md, "Pressure evidence").
* the tree's CPU share: its user + system CPU / (wall x the cores this process may use);
* the processes outside the tree that used the most CPU during the run (a process alive at
  both ends, or started during the run and alive at its end), each with its pid, the head of
  its command line, its CPU seconds and whether it looks like an orphan of an earlier run: its
  parent is init or a subreaper-like supervisor and its command line is pytest / xdist, or its
  environment carries the probe's marker (``RETEST_PROBE_EVENTS``).

Every read is best effort and never raises: a run must not fail because /proc cannot be read.
"""

from __future__ import annotations

import functools
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from . import _frozen

__all__ = ["Pressure", "Psi", "ForeignProcess", "Sample", "Watch", "read_psi", "cores", "current"]

PSI_DIR = "/proc/pressure"
PSI_RESOURCES = ("cpu", "memory", "io")
#: Foreign processes named in the evidence, and the least CPU that gets one named.
FOREIGN_MAX = 5
FOREIGN_MIN_CPU_S = 0.05
CMDLINE_MAX = 160
#: The timeline: the first sample after this long, then one each ``SAMPLE_S``, at most
#: ``SAMPLES_MAX`` (past that, pairs are merged and the interval doubles).
FIRST_SAMPLE_S = 0.25
SAMPLE_S = 0.5
SAMPLES_MAX = 240
#: Processes of the tree walked per sample in subreaper mode (the cgroup mode reads one file).
TREE_WALK_MAX = 512
#: The sampler's thread ends after this long with no run in flight.
IDLE_EXIT_S = 30.0
#: The probe's marker in a process's environment (``retest.probe.ENV_EVENTS``).
PROBE_MARKER = b"RETEST_PROBE_EVENTS="
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_TEST_RUNNER = re.compile(r"pytest|py\.test|xdist|execnet")
#: Parents that adopt orphans: init, and the supervisors that act as a subreaper.
_ADOPTERS = frozenset({"systemd", "init", "tini", "dumb-init", "catatonit",
                       "containerd-shim", "docker-init", "s6-svscan", "runit"})


def cores() -> int:
    """The CPUs this process may run on (its affinity), at least 1."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):
        return max(os.cpu_count() or 1, 1)


def _read(path: str, limit: int = 4096) -> Optional[bytes]:
    try:
        with open(path, "rb", buffering=0) as f:
            return f.read(limit)
    except OSError:
        return None


def read_psi(base: str = PSI_DIR) -> dict[str, dict[str, dict[str, float]]]:
    """``{"cpu": {"some": {"avg10": .., "total": ..}, "full": {...}}, ...}``; {} without PSI."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for resource in PSI_RESOURCES:
        data = _read(os.path.join(base, resource))
        if data is None:
            continue
        lines: dict[str, dict[str, float]] = {}
        for line in data.decode("ascii", "replace").splitlines():
            kind, _, rest = line.partition(" ")
            try:
                lines[kind] = {k: float(v) for k, v in (p.split("=", 1) for p in rest.split())}
            except ValueError:
                continue
        out[resource] = lines
    return out


@dataclass(frozen=True)
class _Stat:
    ppid: int
    comm: str
    cpu_ticks: int
    start_ticks: int


def _stat(pid: int) -> Optional[_Stat]:
    """One /proc/PID/stat, parsed after the last ')' (a comm may hold spaces and parens)."""
    data = _read(f"/proc/{pid}/stat", 1024)
    if not data:
        return None
    close = data.rfind(b")")
    fields = data[close + 2:].split()
    if close < 0 or len(fields) < 20:
        return None
    try:
        return _Stat(ppid=int(fields[1]), comm=data[data.find(b"(") + 1:close].decode("utf-8", "replace"),
                     cpu_ticks=int(fields[11]) + int(fields[12]), start_ticks=int(fields[19]))
    except ValueError:
        return None


def _proc_table() -> dict[int, _Stat]:
    table: dict[int, _Stat] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return table
    for name in names:
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                table[int(name)] = st
    return table


def _uptime_ticks() -> Optional[int]:
    """Now, in the clock ticks since boot that /proc/PID/stat's ``starttime`` counts."""
    data = _read("/proc/uptime", 128)
    try:
        return int(float(data.split()[0]) * _TICKS) if data else None
    except (ValueError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    data = _read(f"/proc/{pid}/cmdline", CMDLINE_MAX * 2) or b""
    return data.replace(b"\0", b" ").strip().decode("utf-8", "replace")[:CMDLINE_MAX]


@dataclass(frozen=True)
class ForeignProcess:
    """A process outside the run's tree that used CPU while the run ran."""

    pid: int
    cmdline: str
    cpu_s: float
    #: It looks like an orphan of an earlier run (``orphan_why`` says what showed it).
    orphan: bool = False
    orphan_why: str = ""

    def text(self) -> str:
        tag = f", orphan: {self.orphan_why}" if self.orphan else ""
        return f"pid {self.pid} {self.cmdline!r} {self.cpu_s:.1f} CPU-s{tag}"

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "cmdline": self.cmdline, "cpu_s": round(self.cpu_s, 3),
                "orphan": self.orphan, "orphan_why": self.orphan_why}


@dataclass(frozen=True)
class Psi:
    """One PSI resource over the run: ``avg10`` at the end, stall share of the run's wall."""

    some_avg10: Optional[float] = None
    full_avg10: Optional[float] = None
    #: Stall during the run (the ``total`` delta) / the run's wall time, 0..1.
    some_share: Optional[float] = None
    full_share: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if v is None else round(v, 4)) for k, v in
                (("some_avg10", self.some_avg10), ("full_avg10", self.full_avg10),
                 ("some_share", self.some_share), ("full_share", self.full_share))}


@dataclass(frozen=True)
class Pressure:
    """How loaded the machine was while one run ran (``RunResult.pressure``)."""

    wall_s: float
    cores: int
    #: The tree's user + system CPU seconds and its share of (wall x cores).
    tree_cpu_s: float
    tree_share: float
    #: PSI per resource (``cpu``, ``memory``, ``io``); empty where the kernel has no PSI.
    psi: dict[str, Psi] = field(default_factory=dict)
    #: Where PSI was read: ``"machine"`` (/proc/pressure) or ``"none"``.
    psi_source: str = "none"
    #: The top foreign CPU users, most first, at most ``FOREIGN_MAX``.
    foreign: tuple[ForeignProcess, ...] = ()
    #: CPU seconds of every process outside the tree alive at the end, and its share.
    foreign_cpu_s: float = 0.0
    foreign_share: float = 0.0
    #: The run's own cgroup's ``cpu.pressure`` over the run (cgroup mode), read until its
    #: last sample; ``None`` in subreaper mode, without PSI, or for a run shorter than a sample.
    run_cpu: Optional[Psi] = None
    #: The timeline: one sample each interval (``Sample``), at most ``SAMPLES_MAX``.
    samples: tuple["Sample", ...] = ()

    @property
    def tree_cores(self) -> float:
        """The tree's CPU in cores (CPU seconds / wall seconds)."""
        return self.tree_cpu_s / self.wall_s if self.wall_s > 0 else 0.0

    def cpu_some_share(self) -> Optional[float]:
        """The machine's PSI cpu ``some`` share of the run."""
        cpu = self.psi.get("cpu")
        return cpu.some_share if cpu is not None else None

    def text(self) -> str:
        """``PSI cpu some 71% of the run (avg10 68.2); tree 0.31 of 2 cores; foreign 1.6 ...``."""
        parts = []
        share = self.cpu_some_share()
        if share is not None:
            cpu = self.psi["cpu"]
            parts.append(f"PSI cpu some {share:.0%} of the run (avg10 {cpu.some_avg10:.1f})")
        else:
            parts.append("no PSI on this kernel")
        if self.run_cpu is not None and self.run_cpu.some_share is not None:
            parts.append(f"the run's own cgroup waited for a CPU {self.run_cpu.some_share:.0%} of it")
        parts.append(f"the tree used {self.tree_cores:.2f} of {self.cores} cores "
                     f"({self.tree_cpu_s:.1f} CPU-s in {self.wall_s:.1f} s)")
        parts.append(f"processes outside it used {self.foreign_cpu_s / self.wall_s if self.wall_s else 0:.2f}"
                     f" cores")
        return "; ".join(parts)

    def hogs_text(self, n: int = 3) -> str:
        return ", ".join(p.text() for p in self.foreign[:n]) or "none"

    def to_dict(self) -> dict[str, Any]:
        return {
            "wall_s": round(self.wall_s, 3), "cores": self.cores,
            "tree_cpu_s": round(self.tree_cpu_s, 3), "tree_share": round(self.tree_share, 4),
            "psi_source": self.psi_source, "psi": {k: v.to_dict() for k, v in self.psi.items()},
            "foreign_cpu_s": round(self.foreign_cpu_s, 3),
            "foreign_share": round(self.foreign_share, 4),
            "foreign": [p.to_dict() for p in self.foreign],
            "run_cpu": self.run_cpu.to_dict() if self.run_cpu is not None else None,
            "samples": [x.to_dict() for x in self.samples],
        }


#: ``Pressure(**values)`` in one step (``retest._frozen``), every run. (A ``Psi``'s four fields
#: are made as fast by its own ``__init__``.)
_new_pressure = _frozen.maker(Pressure)


def _orphan_why(pid: int, st: _Stat, table: dict[int, _Stat]) -> str:
    """Why ``pid`` looks like an orphan of an earlier run, or "".

    Re-parented (to init or a supervisor that adopts orphans; a live run's pytest has its
    shepherd or its xdist controller as parent) and a test runner: the probe's marker in its
    environment, or pytest / xdist in its command line.
    """
    parent = table.get(st.ppid)
    if not (st.ppid == 1 or (parent is not None and parent.comm in _ADOPTERS)):
        return ""
    if PROBE_MARKER in (_read(f"/proc/{pid}/environ", 256 * 1024) or b""):
        return f"re-parented to pid {st.ppid}, the probe's marker in its environment"
    if _TEST_RUNNER.search(_cmdline(pid)):
        return f"a pytest process re-parented to pid {st.ppid}"
    return ""


@dataclass(frozen=True)
class Sample:
    """One interval of the run's timeline (``Pressure.samples``)."""

    #: Seconds since the run's start, at the interval's end.
    t: float
    #: Share of the interval in which some task waited for a CPU: the run's own cgroup's
    #: ``cpu.pressure`` in cgroup mode, else the machine's; ``None`` without PSI.
    cpu_some: Optional[float]
    #: Cores busy on the CPUs this process may use (``/proc/stat``), the tree included.
    busy_cores: Optional[float]
    #: Cores used by the run's tree (its cgroup's ``cpu.stat``, else its processes).
    tree_cores: Optional[float]

    def to_dict(self) -> dict[str, Any]:
        return {"t": round(self.t, 3), "cpu_some": _round(self.cpu_some),
                "busy_cores": _round(self.busy_cores), "tree_cores": _round(self.tree_cores)}


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 4)


def _cpu_busy_ticks(cpus: frozenset[int]) -> Optional[int]:
    """Busy clock ticks (all but idle and iowait) of the CPUs in ``cpus``, from /proc/stat."""
    data = _read("/proc/stat", 64 * 1024)
    if not data:
        return None
    busy, seen = 0, False
    for line in data.split(b"\n"):
        name, _, rest = line.partition(b" ")
        if not name.startswith(b"cpu"):
            if seen:
                break  # the cpuN lines come first, together
            continue
        if not name[3:].isdigit() or int(name[3:]) not in cpus:
            continue  # the "cpu" total, or a CPU this process may not use
        seen = True
        fields = [int(f) for f in rest.split() if f.isdigit()]
        if len(fields) >= 8:  # user nice system idle iowait irq softirq steal
            busy += sum(fields[:8]) - fields[3] - fields[4]
    return busy if seen else None


#: The native runner's shepherd serving a thread's run now (``retest.proc_group`` sets it:
#: ``_proc_group.running_shepherd``), or None. An idle shepherd kept for later runs is no new
#: child of the calling thread, so the run's tree is walked from it.
running_shepherd: Callable[[int], Optional[int]] = lambda tid: None


def _run_tree_ticks(watch: "Watch") -> Optional[int]:
    """CPU ticks of the run's tree: the shepherd serving it and its descendants, or, without
    one (the subprocess backend), the calling thread's children new since the run began."""
    shepherd = running_shepherd(watch.tid)
    if shepherd is not None:
        return _tree_ticks(watch.tid, frozenset(), root=shepherd)
    return _tree_ticks(watch.tid, watch.children_before())


def _tree_ticks(root_tid: int, skip: frozenset[int], limit: int = TREE_WALK_MAX,
                root: Optional[int] = None) -> Optional[int]:
    """CPU ticks of the live descendants of thread ``root_tid`` of this process (their own and
    those of the children they reaped), but for its children in ``skip`` (there before the
    run): the run's tree, walked through ``task/*/children``. With ``root``: that process (a
    child of ours) and its descendants instead."""
    total, seen, todo = 0, 0, [(os.getpid(), root_tid)]
    if root is not None:
        todo = [(os.getpid(), -1)]
    while todo and seen < limit:
        pid, tid = todo.pop()
        children = [root] if tid == -1 and root is not None else _children(pid, tid)
        if children is None:
            return None if pid == os.getpid() else total
        for child in children:
            if pid == os.getpid() and child in skip:
                continue
            data = _read(f"/proc/{child}/stat", 1024)
            if not data:
                continue
            fields = data[data.rfind(b")") + 2:].split()
            try:
                total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
            except ValueError:
                continue
            seen += 1
            todo.append((child, 0))
    return total


def _children(pid: int, tid: int) -> Optional[list[int]]:
    """Children of one thread (``tid``), or of every thread of ``pid`` (``tid`` 0)."""
    tids = [tid] if tid else [int(t) for t in _listdir(f"/proc/{pid}/task") if t.isdigit()]
    out: list[int] = []
    for t in tids:
        data = _read(f"/proc/{pid}/task/{t}/children", 64 * 1024)
        if data is None:
            if tid:
                return None
            continue
        out.extend(int(c) for c in data.split())
    return out


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _cgroup_values(path: str) -> tuple[Optional[int], Optional[float]]:
    """``(cpu.stat usage_usec, cpu.pressure some total us)`` of a cgroup (``None`` each where absent)."""
    usage: Optional[int] = None
    for line in (_read(os.path.join(path, "cpu.stat")) or b"").splitlines():
        if line.startswith(b"usage_usec "):
            usage = int(line.split()[1])
    return usage, _cgroup_some(path)


def _cgroup_some(path: str) -> Optional[float]:
    """A cgroup's ``cpu.pressure`` some total (us), or ``None`` where absent."""
    for line in (_read(os.path.join(path, "cpu.pressure")) or b"").splitlines():
        if line.startswith(b"some "):
            return next((float(p[6:]) for p in line.split() if p.startswith(b"total=")), None)
    return None


def _psi_cpu_some_total() -> Optional[float]:
    for line in (_read(os.path.join(PSI_DIR, "cpu")) or b"").splitlines():
        if line.startswith(b"some "):
            return next((float(p[6:]) for p in line.split() if p.startswith(b"total=")), None)
    return None


class _Counters:
    """The cumulative counters one sample is the delta of."""

    def __init__(self, watch: "Watch") -> None:
        self.at = time.monotonic()
        self.busy = _cpu_busy_ticks(watch.cpus)
        cgroup = watch.cgroup
        self.run_usage, self.run_some = _cgroup_values(cgroup) if cgroup else (None, None)
        self.machine_some = _psi_cpu_some_total()
        self.tree = None if cgroup else _run_tree_ticks(watch)


class Watch:
    """Read the machine at a run's start; the process-wide sampler (one thread for every run in
    flight) adds a sample each interval; ``finish`` reads it again and sums up.

    Cheap at the start (PSI and ``/proc/stat``: four small reads) so that a short run pays
    little: the table of every process, which names the foreign CPU users, is read at the
    first sample (``FIRST_SAMPLE_S``) and at the end, so a run shorter than that has its
    foreign CPU measured (``/proc/stat`` less the tree's) but no process named.
    """

    def __init__(self, *, read: bool = True) -> None:
        """``read=False``: the caller reads the start itself (the native runner does, in C,
        while the shepherd starts the command) and hands both readings to ``finish``."""
        self.started = time.monotonic()
        self.tid = threading.get_native_id()
        #: When the run started, on the clock of /proc/PID/stat's ``starttime`` (boot time).
        self.started_boot = _BOOTTIME()
        self.earlier_children: Optional[frozenset[int]] = None
        self.cpus = _affinity()
        self.cgroup: Optional[str] = None
        self.psi = read_psi() if read else {}
        self.busy0 = _cpu_busy_ticks(self.cpus) if read else None
        self.self_cpu0 = _self_cpu_s() if read else 0.0

        self.procs: Optional[dict[int, _Stat]] = None
        self.uptime_ticks: Optional[int] = None
        self.samples: list[Sample] = []
        self.interval = SAMPLE_S
        self.run_some0: Optional[float] = None
        self.last: Optional[_Counters] = None
        self.next_due = self.started + FIRST_SAMPLE_S
        _SAMPLER.add(self)
        _CURRENT.watch = self

    def children_before(self) -> frozenset[int]:
        """This thread's children that were there before the run (the samples of a run without
        a cgroup walk the children of this thread but these), found at the first sample by
        their start time rather than read at every run's start (most runs never get one): a
        child started less than a clock tick before the run counts as the run's."""
        if self.earlier_children is None:
            earlier = set()
            for child in _children(os.getpid(), self.tid) or ():
                st = _stat(child)
                if st is not None and st.start_ticks / _TICKS < self.started_boot - 1 / _TICKS:
                    earlier.add(child)
            self.earlier_children = frozenset(earlier)
        return self.earlier_children

    def attach_cgroup(self, path: str, *, fresh: bool = False) -> None:
        """The run's own cgroup (cgroup mode): its ``cpu.stat`` and ``cpu.pressure`` are read
        while it lives (the runner removes or keeps it before ``run()`` returns). ``fresh``:
        made for this run and still empty, so its stall counter starts at 0; else it is a kept
        cgroup whose counter rests while it is empty: the runner reads it as the command
        starts (``run_some0``, set after the run; unknown until then)."""
        self.cgroup = path
        self.run_some0 = 0.0 if fresh else None

    def _tick(self) -> None:
        """One sample (the sampler's thread)."""
        if self.procs is None:
            self.procs = _proc_table()
            self.uptime_ticks = _uptime_ticks()
        now = _Counters(self)
        prev, self.last = self.last, now
        if prev is None:
            self.next_due = now.at + self.interval
            return
        span = max(now.at - prev.at, 1e-6)
        some = _delta(now.run_some, prev.run_some, 1e6 * span)
        if some is None:
            some = _delta(now.machine_some, prev.machine_some, 1e6 * span)
        tree = (_delta(now.run_usage, prev.run_usage, 1e6 * span) if self.cgroup
                else _delta(now.tree, prev.tree, _TICKS * span))
        self.samples.append(Sample(now.at - self.started, None if some is None else min(some, 1.0),
                                   _delta(now.busy, prev.busy, _TICKS * span), tree))
        if len(self.samples) >= SAMPLES_MAX:  # keep the bound: halve the resolution
            self.samples = [_merge(a, b) for a, b in zip(self.samples[::2], self.samples[1::2])]
            self.interval *= 2
        self.next_due = now.at + self.interval

    def finish(self, *, tree_cpu_s: float, tree_pids: Iterable[int] = (),
               wall_s: Optional[float] = None,
               readings: Optional[tuple[Reading, Reading]] = None) -> Pressure:
        """Sum the run up. ``readings``: the machine at the start and at the end as the native
        runner read them (``Reading``); without them this reads the end now."""
        self.close()
        samples, procs, run_some = tuple(self.samples), self.procs, self.last
        wall = wall_s if wall_s is not None else time.monotonic() - self.started
        wall = max(wall, 1e-6)
        ncores = max(len(self.cpus), 1)
        if readings is not None:
            psi = _psi_between(readings[0], readings[1], wall)
            foreign_cpu = _foreign_between(readings[0], readings[1], tree_cpu_s)
        else:
            psi_end = read_psi()
            psi = {r: _psi_delta(self.psi.get(r, {}), psi_end[r], wall) for r in psi_end}
            foreign_cpu = self._foreign_cpu(tree_cpu_s)
        foreign: tuple[ForeignProcess, ...] = ()
        if procs is not None:
            table_cpu, foreign = _foreign_named(procs, self.uptime_ticks, set(tree_pids))
            if foreign_cpu is None:
                foreign_cpu = table_cpu
        run_psi = None
        if self.run_some0 is not None and run_some is not None and run_some.run_some is not None:
            run_psi = Psi(some_share=_stall_share(run_some.run_some - self.run_some0, wall))
        return _new_pressure({
            "wall_s": wall, "cores": ncores, "tree_cpu_s": tree_cpu_s,
            "tree_share": tree_cpu_s / (wall * ncores), "psi": psi,
            "psi_source": "machine" if psi else "none", "foreign": foreign,
            "foreign_cpu_s": foreign_cpu or 0.0,
            "foreign_share": (foreign_cpu or 0.0) / (wall * ncores),
            "run_cpu": run_psi, "samples": samples})

    def close(self) -> None:
        """Stop sampling (``finish`` does; call it when the run raised instead)."""
        _SAMPLER.remove(self)  # waits for a tick in flight
        if getattr(_CURRENT, "watch", None) is self:  # current(), one call fewer
            _CURRENT.watch = None

    def _foreign_cpu(self, tree_cpu_s: float) -> Optional[float]:
        """CPU seconds on this process's CPUs that were neither the tree's nor this process's."""
        busy = _cpu_busy_ticks(self.cpus)
        if busy is None or self.busy0 is None:
            return None
        return _foreign_s(busy - self.busy0, _self_cpu_s() - self.self_cpu0, tree_cpu_s)


def _foreign_named(before: dict[int, _Stat], uptime_ticks: Optional[int],
                   excluded: set[int]) -> tuple[float, tuple[ForeignProcess, ...]]:
    """The CPU of the processes outside the tree between the first sample and now, and the
    top ones named (``FOREIGN_MAX``)."""
    end = _proc_table()
    excluded = excluded | {os.getpid()}
    used: list[tuple[float, int, _Stat]] = []
    total = 0.0
    for pid, st in end.items():
        if pid in excluded:
            continue
        prior = before.get(pid)
        if prior is not None and prior.start_ticks == st.start_ticks:
            ticks = st.cpu_ticks - prior.cpu_ticks
        elif prior is None and uptime_ticks is not None and st.start_ticks >= uptime_ticks:
            ticks = st.cpu_ticks  # started since
        else:
            continue
        if ticks > 0:
            total += ticks / _TICKS
            used.append((ticks / _TICKS, pid, st))
    used.sort(key=lambda u: -u[0])
    return total, tuple(
        ForeignProcess(pid, _cmdline(pid) or f"[{st.comm}]", cpu_s, bool(why), why)
        for cpu_s, pid, st in used[:FOREIGN_MAX] if cpu_s >= FOREIGN_MIN_CPU_S
        for why in (_orphan_why(pid, st, end),))


#: One reading of the machine by the native runner (``ext/evidence.c``), a tuple of ints,
#: -1 where absent: [0] CLOCK_MONOTONIC ns; [1:4] PSI ``some`` totals (us) of cpu, memory,
#: io; [4:7] ``full`` totals; [7:10] ``some`` avg10 x 100; [10:13] ``full`` avg10 x 100;
#: [13] busy ticks of this thread's CPUs (/proc/stat); [14] this process's CPU (us);
#: [15] /proc/vmstat ``oom_kill``, [16] ``oom_group_kill`` (-1: not read).
Reading = tuple[int, ...]


def _psi_between(before: Reading, after: Reading, wall_s: float) -> dict[str, Psi]:
    """``Pressure.psi`` from two native readings (as ``_psi_delta`` from two ``read_psi``)."""
    out: dict[str, Psi] = {}
    for i, resource in enumerate(PSI_RESOURCES):
        some0, some1, full0, full1 = before[1 + i], after[1 + i], before[4 + i], after[4 + i]
        if some1 < 0 and full1 < 0:
            continue  # no such file: the kernel has no PSI (or not for this resource)
        some_avg10, full_avg10 = after[7 + i], after[10 + i]
        # _stall_share written out: six Python calls of it on every run (issue 15)
        some = (some1 - some0) / 1e6 / wall_s if some0 >= 0 and some1 >= 0 else None
        full = (full1 - full0) / 1e6 / wall_s if full0 >= 0 and full1 >= 0 else None
        out[resource] = Psi(
            some_avg10 / 100 if some_avg10 >= 0 else None,
            full_avg10 / 100 if full_avg10 >= 0 else None,
            None if some is None else 0.0 if some < 0.0 else 1.0 if some > 1.0 else some,
            None if full is None else 0.0 if full < 0.0 else 1.0 if full > 1.0 else full)
    return out


def _foreign_between(before: Reading, after: Reading, tree_cpu_s: float) -> Optional[float]:
    """As ``Watch._foreign_cpu``, from two native readings."""
    if before[13] < 0 or after[13] < 0 or before[14] < 0 or after[14] < 0:
        return None
    return _foreign_s(after[13] - before[13], (after[14] - before[14]) / 1e6, tree_cpu_s)


def _stall_share(stall_us: float, wall_s: float) -> float:
    """A PSI ``total`` delta (microseconds stalled) as a share of the run's wall time, 0..1."""
    share = stall_us / 1e6 / wall_s  # clamped as min(max(share, 0.0), 1.0), without two calls
    return 0.0 if share < 0.0 else 1.0 if share > 1.0 else share


def _foreign_s(busy_ticks: int, own_cpu_s: float, tree_cpu_s: float) -> float:
    """CPU seconds of the busy ticks on this process's CPUs that were neither the tree's nor
    this process's own."""
    return max(busy_ticks / _TICKS - tree_cpu_s - own_cpu_s, 0.0)


def _delta(now: Optional[float], prev: Optional[float], scale: float) -> Optional[float]:
    if now is None or prev is None:
        return None
    return max(now - prev, 0) / scale


def _merge(a: Sample, b: Sample) -> Sample:
    def mean(x: Optional[float], y: Optional[float]) -> Optional[float]:
        return None if x is None or y is None else (x + y) / 2

    return Sample(b.t, mean(a.cpu_some, b.cpu_some), mean(a.busy_cores, b.busy_cores),
                  mean(a.tree_cores, b.tree_cores))


def _affinity() -> frozenset[int]:
    try:
        return frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return frozenset(range(os.cpu_count() or 1))


def _boottime() -> float:
    """Seconds since boot, as /proc/PID/stat's ``starttime`` counts them (CLOCK_BOOTTIME)."""
    try:
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    except (AttributeError, OSError):
        return time.monotonic()


def _boottime_clock() -> Callable[[], float]:
    """``_boottime`` as a call of C (no Python frame per run) where CLOCK_BOOTTIME reads."""
    try:
        time.clock_gettime(time.CLOCK_BOOTTIME)
    except (AttributeError, OSError):
        return _boottime
    return functools.partial(time.clock_gettime, time.CLOCK_BOOTTIME)


def _self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class _Sampler:
    """One daemon thread that samples every run in flight when its turn comes.

    The samples are taken without the lock (the first reads every process's stat: ~1 ms here,
    tens of ms on a machine with thousands of processes), so a run that starts or ends on
    another thread meanwhile does not wait for them; ``remove`` waits only for a sample of its
    own run in flight."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        #: Notified when the runs being sampled are done (``remove`` of one of them waits).
        self.sampled = threading.Condition(self.lock)
        self.ticking: set[Watch] = set()
        self.runs: set[Watch] = set()
        self.thread: Optional[threading.Thread] = None
        #: When the loop will look again (monotonic): an added run due later needs no wake-up,
        #: which spares a thread switch per run (most runs end before their first sample).
        self.wakes_at = float("inf")
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        """A forked child has none of the parent's threads, and maybe a lock taken by one."""
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.sampled = threading.Condition(self.lock)
        self.ticking = set()
        self.runs = set()
        self.thread = None
        self.wakes_at = float("inf")

    def add(self, watch: Watch) -> None:
        with self.lock:
            self.runs.add(watch)
            if watch.next_due < self.wakes_at:
                self.wakes_at = watch.next_due
                self.wake.notify()
            if self.thread is None:
                thread = threading.Thread(target=self._loop, name="retest-pressure", daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # no thread to be had (RLIMIT_NPROC): no timeline, the run goes on
                    return
                self.thread = thread

    def remove(self, watch: Watch) -> None:
        with self.lock:
            self.runs.discard(watch)
            while watch in self.ticking:  # its sample in flight: finish() reads what it adds
                self.sampled.wait()
        # the add of a run is also its wake-up: the loop recomputes the next due time

    def _loop(self) -> None:
        with self.lock:
            while True:
                if not self.runs:
                    self.wakes_at = time.monotonic() + IDLE_EXIT_S
                    if not self.wake.wait(IDLE_EXIT_S) and not self.runs:
                        self.thread = None  # idle: end; the next run starts another
                        self.wakes_at = float("inf")
                        return
                    continue
                now = time.monotonic()
                due = min(w.next_due for w in self.runs)
                if due > now:
                    self.wakes_at = due
                    self.wake.wait(due - now)
                    continue
                self.wakes_at = now
                self.ticking = {w for w in self.runs if w.next_due <= now}
                self.lock.release()
                try:
                    for watch in self.ticking:
                        try:
                            watch._tick()
                        except Exception:  # evidence is best effort: a run never fails for it
                            watch.next_due = now + watch.interval
                finally:
                    self.lock.acquire()
                    self.ticking = set()
                    self.sampled.notify_all()


_SAMPLER = _Sampler()
_BOOTTIME = _boottime_clock()
_CURRENT = threading.local()


def current() -> Optional[Watch]:
    """The watch of the run in flight on this thread (``attach_cgroup`` from the runner)."""
    return getattr(_CURRENT, "watch", None)


def _psi_delta(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]],
               wall_s: float) -> Psi:
    def share(kind: str) -> Optional[float]:
        if kind not in after or kind not in before or "total" not in after[kind]:
            return None
        return _stall_share(after[kind]["total"] - before[kind]["total"], wall_s)

    return Psi(some_avg10=after.get("some", {}).get("avg10"),
               full_avg10=after.get("full", {}).get("avg10"),
               some_share=share("some"), full_share=share("full"))
