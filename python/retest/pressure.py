"""Machine-pressure evidence for every run: PSI, the tree's CPU share, the foreign CPU hogs.

``Watch`` reads the machine around one run, from the caller, and costs two passes over
``/proc/*/stat`` and two reads of ``/proc/pressure/*`` (nothing while the run waits):

* PSI (``/proc/pressure/{cpu,memory,io}``): ``some``/``full`` ``avg10`` at the end, and the
  ``total`` stall microseconds accumulated during the run, as a share of its wall time. These
  are the machine-wide files: the run's own ``cpu.pressure`` lives in its cgroup, which the
  native runner removes before ``run()`` returns (docs/internals.md, "Pressure evidence").
* the tree's CPU share: its user + system CPU / (wall x the cores this process may use);
* the processes outside the tree that used the most CPU during the run (a process alive at
  both ends, or started during the run and alive at its end), each with its pid, the head of
  its command line, its CPU seconds and whether it looks like an orphan of an earlier run: its
  parent is init or a subreaper-like supervisor and its command line is pytest / xdist, or its
  environment carries the probe's marker (``RETEST_PROBE_EVENTS``).

Every read is best effort and never raises: a run must not fail because /proc cannot be read.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

__all__ = ["Pressure", "Psi", "ForeignProcess", "Watch", "read_psi", "cores"]

PSI_DIR = "/proc/pressure"
PSI_RESOURCES = ("cpu", "memory", "io")
#: Foreign processes named in the evidence, and the least CPU that gets one named.
FOREIGN_MAX = 5
FOREIGN_MIN_CPU_S = 0.05
CMDLINE_MAX = 160
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

    @property
    def tree_cores(self) -> float:
        """The tree's CPU in cores (CPU seconds / wall seconds)."""
        return self.tree_cpu_s / self.wall_s if self.wall_s > 0 else 0.0

    def cpu_some_share(self) -> Optional[float]:
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
        }


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


class Watch:
    """Read the machine at a run's start; ``finish`` reads it again and sums up."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.psi = read_psi()
        self.procs = _proc_table()
        self.uptime_ticks = _uptime_ticks()

    def finish(self, *, tree_cpu_s: float, tree_pids: Iterable[int] = (),
               wall_s: Optional[float] = None) -> Pressure:
        wall = wall_s if wall_s is not None else time.monotonic() - self.started
        wall = max(wall, 1e-6)
        ncores = cores()
        psi_end = read_psi()
        end = _proc_table()
        excluded = set(tree_pids) | {os.getpid()}
        used: list[tuple[float, int, _Stat]] = []
        total = 0.0
        for pid, st in end.items():
            if pid in excluded:
                continue
            before = self.procs.get(pid)
            if before is not None and before.start_ticks == st.start_ticks:
                ticks = st.cpu_ticks - before.cpu_ticks
            elif before is None and self.uptime_ticks is not None \
                    and st.start_ticks >= self.uptime_ticks:
                ticks = st.cpu_ticks  # started during the run
            else:
                continue
            if ticks > 0:
                cpu_s = ticks / _TICKS
                total += cpu_s
                used.append((cpu_s, pid, st))
        used.sort(key=lambda u: -u[0])
        foreign = tuple(
            ForeignProcess(pid, _cmdline(pid) or f"[{st.comm}]", cpu_s, bool(why), why)
            for cpu_s, pid, st in used[:FOREIGN_MAX] if cpu_s >= FOREIGN_MIN_CPU_S
            for why in (_orphan_why(pid, st, end),))
        psi = {r: _psi_delta(self.psi.get(r, {}), psi_end[r], wall) for r in psi_end}
        return Pressure(wall_s=wall, cores=ncores, tree_cpu_s=tree_cpu_s,
                        tree_share=tree_cpu_s / (wall * ncores), psi=psi,
                        psi_source="machine" if psi else "none", foreign=foreign,
                        foreign_cpu_s=total, foreign_share=total / (wall * ncores))


def _psi_delta(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]],
               wall_s: float) -> Psi:
    def share(kind: str) -> Optional[float]:
        if kind not in after or kind not in before or "total" not in after[kind]:
            return None
        return min(max((after[kind]["total"] - before[kind]["total"]) / 1e6 / wall_s, 0.0), 1.0)

    return Psi(some_avg10=after.get("some", {}).get("avg10"),
               full_avg10=after.get("full", {}).get("avg10"),
               some_share=share("some"), full_share=share("full"))
