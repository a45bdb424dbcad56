#!/usr/bin/env python3
"""Benchmarks of retest's runner against subprocess.run, GNU timeout and the posix_spawn floor.

Usage::

    python bench/run.py                  # the full benchmark (several minutes), writes bench/results.md
    python bench/run.py --smoke --out /tmp/r.md   # a few iterations of everything (CI, < 60 s)
    python bench/run.py --items 1,4      # only some items (profiling)

Stdlib only. The items are those of issue 5:

1. per-run cost of ``/bin/true``: retest (native) against ``subprocess.run(capture_output=True,
   start_new_session=True, timeout=...)``, the ``os.posix_spawn`` + ``waitpid`` floor, and
   ``subprocess.run(['timeout', '-k', '1', '10', '/bin/true'], capture_output=True)``;
2. the same from a caller holding 1 GiB of touched memory (plus a fork+exec control, which
   shows that the memory is really there: fork copies page tables, vfork-class spawns do not);
3. the caller's CPU (RUSAGE_SELF user + sys) while the child sleeps 3 s;
4. kill latency, deadline -> ``run()`` returns with the whole tree gone, for a tree that obeys
   SIGTERM and for one that ignores it (about ``grace``);
5. orphans left after a timed-out pytest-xdist suite: retest, ``subprocess.run``, ``timeout -k``;
6. capturing 1 GiB of output: wall time, throughput, and the peak RSS of a fresh caller process;
7. classification of a 50 MB pytest log: the C classifier against its pure-Python twin;
8. runs/s with 8 threads running ``/bin/true``: retest against ``subprocess.run``.

How it measures: the variants of an item run alternately in one process (A, B, C, A, B, C...,
the starting variant rotated every iteration) so that the machine's noise hits each of them
alike; a row reports medians with [min-max] and the ratio of the medians measured in the same
loop. Goals are judged on the medians (orphans on the worst run). In ``--smoke`` mode sizes
and iteration counts are small and goals are not judged: a timed test is not a benchmark.

Processes: the benchmark makes itself a child subreaper, so anything a measured command leaves
behind is re-parented to it. Every tree records its pids in files; survivors are killed by
those pids, and only while they are still live descendants of this process (a recycled pid
belongs to someone else). A final sweep in ``finally`` does the same for anything left.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent

try:  # an installed retest (CI) first, else the checkout's in-place build
    import retest  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO / "python"))
    import retest  # noqa: F401
from retest import proc_group  # noqa: E402
from retest.proc_group import run  # noqa: E402

PY = sys.executable
#: Directory holding the ``retest`` package in use, for the fresh child processes of item 6.
PACKAGE_ROOT = str(Path(retest.__file__).resolve().parent.parent)
PR_SET_CHILD_SUBREAPER = 36
MiB = 1 << 20
GiB = 1 << 30


# --------------------------------------------------------------------------- sizes and counts


@dataclass(frozen=True)
class Plan:
    """Iteration counts and sizes of one mode (full or smoke)."""

    smoke: bool
    spawn_iterations: int
    spawn_warmup: int
    ballast_bytes: int
    big_spawn_iterations: int
    sleep_s: float
    sleep_iterations: int
    kill_timeout_s: float
    kill_grace_s: float
    kill_iterations: int
    xdist_timeout_s: float
    xdist_iterations: int
    capture_bytes: int
    capture_iterations: int
    big_limit_bytes: int
    log_bytes: int
    classify_iterations: int
    threads: int
    runs_per_thread: int
    thread_trials: int


FULL = Plan(
    smoke=False, spawn_iterations=1000, spawn_warmup=50, ballast_bytes=GiB, big_spawn_iterations=400,
    sleep_s=3.0, sleep_iterations=5, kill_timeout_s=0.5, kill_grace_s=1.0, kill_iterations=10,
    xdist_timeout_s=6.0, xdist_iterations=3, capture_bytes=GiB, capture_iterations=5,
    big_limit_bytes=64 * MiB, log_bytes=50 * 1000 * 1000, classify_iterations=15, threads=8,
    runs_per_thread=50, thread_trials=7,
)
SMOKE = Plan(
    smoke=True, spawn_iterations=30, spawn_warmup=5, ballast_bytes=64 * MiB, big_spawn_iterations=20,
    sleep_s=1.0, sleep_iterations=2, kill_timeout_s=0.3, kill_grace_s=0.5, kill_iterations=2,
    xdist_timeout_s=4.0, xdist_iterations=1, capture_bytes=20 * 1000 * 1000, capture_iterations=2,
    big_limit_bytes=16 * MiB, log_bytes=5 * 1000 * 1000, classify_iterations=3, threads=8,
    runs_per_thread=5, thread_trials=2,
)


# --------------------------------------------------------------------------- processes


def set_subreaper() -> bool:
    """Make this process a child subreaper (Linux): orphans of measured trees come to us."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (all of its threads), from /proc."""
    kids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tasks:
        try:
            kids.extend(int(x) for x in Path(f"/proc/{pid}/task/{tid}/children").read_text().split())
        except OSError:
            continue
    return kids


def descendants() -> set[int]:
    """Every descendant of this process, zombies included."""
    seen: set[int] = set()
    stack = children_of(os.getpid())
    while stack:
        pid = stack.pop()
        if pid not in seen:
            seen.add(pid)
            stack.extend(children_of(pid))
    return seen


def is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not is_zombie(pid)


def reap_own_zombies() -> None:
    """Reap zombies re-parented to us (only called while no run of ours is in flight)."""
    for child in children_of(os.getpid()):
        if is_zombie(child):
            try:
                os.waitpid(child, os.WNOHANG)
            except ChildProcessError:
                pass


def recorded_pids(directory: Path) -> set[int]:
    """The pids a tree recorded in ``directory`` (files named ``PID`` or ``TAG-PID``)."""
    pids: set[int] = set()
    for name in os.listdir(directory):
        tail = name.rsplit("-", 1)[-1]
        if tail.isdigit():
            pids.add(int(tail))
    return pids


class Ledger:
    """The pids this benchmark's trees recorded, and their clean-up."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.recorded: set[int] = set()
        self.dirs: list[Path] = []
        self.killed_total = 0

    def new_dir(self) -> Path:
        path = self.root / f"pids-{len(self.dirs) + 1}"
        path.mkdir()
        self.dirs.append(path)
        return path

    def collect_all(self) -> None:
        """Read every pid directory, including that of a run interrupted before it was read."""
        for path in self.dirs:
            try:
                self.collect(path)
            except OSError:
                pass

    def collect(self, directory: Path) -> set[int]:
        pids = recorded_pids(directory)
        self.recorded |= pids
        return pids

    def kill(self, pids: Optional[set[int]] = None) -> int:
        """SIGKILL the recorded pids (all, or ``pids``) still alive as our descendants; reap."""
        wanted = set(self.recorded if pids is None else pids)
        killed: set[int] = set()
        for _ in range(100):
            reap_own_zombies()
            targets = [p for p in wanted & descendants() if pid_alive(p)]
            if not targets:
                break
            for pid in targets:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)
        reap_own_zombies()
        self.killed_total += len(killed)
        return len(killed)


def count_alive(pids: set[int]) -> int:
    return sum(1 for p in pids if pid_alive(p))


# --------------------------------------------------------------------------- measuring


Metrics = dict[str, float]


def paired(variants: Sequence[tuple[str, Callable[[], Metrics]]], iterations: int,
           warmup: int = 0, between: Optional[Callable[[], None]] = None) -> dict[str, dict[str, list[float]]]:
    """Run the variants alternately, rotating which goes first; return name -> metric -> values.

    ``between`` runs after every single measurement, outside of it (clean-up of survivors).
    """
    out: dict[str, dict[str, list[float]]] = {name: {} for name, _ in variants}
    n = len(variants)
    gc.collect()
    gc.disable()  # as timeit does: a collection lands on whichever variant is unlucky
    try:
        for i in range(warmup + iterations):
            for j in range(n):
                name, fn = variants[(i + j) % n]
                metrics = fn()
                if between is not None:
                    between()
                if i >= warmup:
                    for key, value in metrics.items():
                        out[name].setdefault(key, []).append(value)
    finally:
        gc.enable()
    return out


def wall(fn: Callable[[], Any]) -> Metrics:
    start = time.perf_counter_ns()
    fn()
    return {"s": (time.perf_counter_ns() - start) / 1e9}


@dataclass
class Stats:
    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)


UNITS: dict[str, tuple[float, str, int]] = {
    # unit: (scale from the raw value, suffix, decimals)
    "us": (1e6, " µs", 0),
    "ms": (1e3, " ms", 1),
    "s": (1.0, " s", 2),
    "GB/s": (1.0, " GB/s", 2),
    "MiB": (1.0, " MiB", 1),
    "n": (1.0, "", 0),
    "runs/s": (1.0, " runs/s", 0),
}


def fmt_value(value: float, unit: str) -> str:
    scale, suffix, decimals = UNITS[unit]
    return f"{value * scale:,.{decimals}f}{suffix}"


def fmt_stats(stats: Optional[Stats], unit: str) -> str:
    if stats is None or not stats.values:
        return "—"
    scale, suffix, decimals = UNITS[unit]
    return (f"{stats.median * scale:,.{decimals}f}{suffix} "
            f"[{stats.low * scale:,.{decimals}f}–{stats.high * scale:,.{decimals}f}]")


@dataclass
class Row:
    item: str
    a_label: str
    a: Optional[Stats]
    b_label: str
    b: Optional[Stats]
    unit: str
    goal: str = "—"
    #: Judges the row from (A median, B median, ratio); None: no goal.
    judge: Optional[Callable[[Stats, Optional[Stats], Optional[float]], bool]] = None
    note: str = ""
    met: Optional[bool] = field(default=None, init=False)

    @property
    def ratio(self) -> Optional[float]:
        if self.a is None or self.b is None or not self.a.values or not self.b.values:
            return None
        if self.b.median == 0 or self.unit == "n":
            return None  # a ratio of process counts means nothing: 0 vs 6 is the figure
        return self.a.median / self.b.median

    def evaluate(self, smoke: bool) -> None:
        if self.judge is None or smoke or self.a is None or not self.a.values:
            self.met = None
            return
        self.met = bool(self.judge(self.a, self.b, self.ratio))


def ratio_at_most(limit: float) -> Callable[[Stats, Optional[Stats], Optional[float]], bool]:
    return lambda a, b, r: r is not None and r <= limit


def ratio_at_least(limit: float) -> Callable[[Stats, Optional[Stats], Optional[float]], bool]:
    return lambda a, b, r: r is not None and r >= limit


# --------------------------------------------------------------------------- item 1 and 2: spawn cost


def check_ok(result: subprocess.CompletedProcess | proc_group.RunResult) -> None:
    if result.returncode != 0:
        raise RuntimeError(f"/bin/true failed: {result!r}")


def runner_only(argv: list[str]) -> proc_group.RunResult:
    """The native runner without ``run()``'s per-run evidence (pressure and OOM readings,
    issue 11): containment choice, the extension, the shepherd, ``RunResult``. Issue 15's
    targets are about this part; the rows that use it say so."""
    return proc_group._run_native([os.fsencode(a) for a in argv], tuple(argv), None, None, None,
                                  10.0, 1.0, 8 * MiB, None, -1)


def spawn_variants(with_fork: bool) -> list[tuple[str, Callable[[], Metrics]]]:
    true = ["/bin/true"]

    def retest_native() -> None:
        check_ok(run(true, timeout=10, grace=1, backend="native"))

    def retest_runner() -> None:
        check_ok(runner_only(true))

    def subprocess_run() -> None:
        check_ok(subprocess.run(true, capture_output=True, start_new_session=True, timeout=10))

    def floor() -> None:
        pid = os.posix_spawn(true[0], true, os.environ)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            raise RuntimeError(f"/bin/true: wait status {status}")

    def gnu_timeout() -> None:
        check_ok(subprocess.run(["timeout", "-k", "1", "10", *true], capture_output=True))

    def fork_exec() -> None:
        pid = os.fork()
        if pid == 0:
            try:
                os.execv(true[0], true)
            finally:
                os._exit(127)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            raise RuntimeError(f"/bin/true: wait status {status}")

    variants = [("retest", retest_native), ("runner", retest_runner), ("subprocess", subprocess_run),
                ("floor", floor),
                ("timeout", gnu_timeout)]
    if with_fork:
        variants.append(("fork", fork_exec))
    return [(name, (lambda f=f: wall(f))) for name, f in variants]


def item_spawn(plan: Plan, rows: list[Row], context: dict[str, Any]) -> None:
    res = paired(spawn_variants(False), plan.spawn_iterations, plan.spawn_warmup)
    s = {name: Stats(m["s"]) for name, m in res.items()}
    n = f"{plan.spawn_iterations} runs each"
    rows.append(Row("1a. `/bin/true`, per run: retest vs subprocess.run(capture, session, timeout)",
                    "retest", s["retest"], "subprocess.run", s["subprocess"], "us", "≤ 1.2x",
                    ratio_at_most(1.2), n))
    rows.append(Row("1b. `/bin/true`, per run: retest vs subprocess.run(`timeout -k 1 10`)",
                    "retest", s["retest"], "timeout -k", s["timeout"], "us", "≤ 0.8x",
                    ratio_at_most(0.8), n))
    rows.append(Row("1c. `/bin/true`, per run: retest vs the os.posix_spawn + waitpid floor",
                    "retest", s["retest"], "posix_spawn", s["floor"], "us",
                    "≤ 1.3x (issue 15; stretch 1.15x)", ratio_at_most(1.3), n))
    rows.append(Row("1d. `/bin/true`, per run: the native runner alone (no pressure/OOM evidence) "
                    "vs the floor", "runner", s["runner"], "posix_spawn", s["floor"], "us",
                    "≤ 1.3x (issue 15; stretch 1.15x)", ratio_at_most(1.3),
                    f"{n}; proc_group._run_native: containment, extension, shepherd, RunResult"))


# A small Python that runs retest on request and reports the elapsed time: the "empty caller" that
# alternates with the 1 GiB benchmark process, so that flatness is measured in one loop.
SMALL_CALLER = """
import gc, sys, time
from retest.proc_group import run
gc.disable()
for _ in sys.stdin:
    t0 = time.perf_counter_ns()
    result = run(["/bin/true"], timeout=10, grace=1, backend="native")
    elapsed = time.perf_counter_ns() - t0
    print(elapsed if result.returncode == 0 else -1, flush=True)
"""


def child_env() -> dict[str, str]:
    """The environment of a child Python that must import the retest under test."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([PACKAGE_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


class SmallCaller:
    """The SMALL_CALLER process; ``measure()`` asks it for one timed run."""

    def __init__(self, ledger: "Ledger") -> None:
        self.proc = subprocess.Popen([PY, "-c", SMALL_CALLER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=child_env(), text=True, bufsize=1)
        ledger.recorded.add(self.proc.pid)

    def measure(self) -> Metrics:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line or int(line) < 0:
            raise RuntimeError(f"small caller failed (exit {self.proc.poll()})")
        return {"s": int(line) / 1e9}

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def vm_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def item_big_caller(plan: Plan, rows: list[Row], ledger: "Ledger", context: dict[str, Any]) -> None:
    size = plan.ballast_bytes
    pages = size // 4096
    ballast = bytearray(size)
    ballast[::4096] = b"\x01" * pages  # touch every page: it must be resident, not just mapped
    rss_mib = vm_rss_kib() / 1024
    label = f"{size // MiB:,} MiB" if size < GiB else f"{size / GiB:g} GiB"
    small = SmallCaller(ledger)
    try:
        res = paired(spawn_variants(True) + [("small", small.measure)], plan.big_spawn_iterations,
                     plan.spawn_warmup)
        small_rss_mib = small.rss_kib() / 1024
    finally:
        small.close()
        del ballast
        gc.collect()
    s = {name: Stats(m["s"]) for name, m in res.items()}
    n = f"{plan.big_spawn_iterations} runs each; caller RSS {rss_mib:,.0f} MiB"
    rows.append(Row(f"2a. `/bin/true` from a caller with {label} touched: retest vs subprocess.run",
                    "retest", s["retest"], "subprocess.run", s["subprocess"], "us", "≤ 1.2x",
                    ratio_at_most(1.2), n))
    rows.append(Row(f"2b. `/bin/true` from a {label} caller: retest vs the posix_spawn floor",
                    "retest", s["retest"], "posix_spawn", s["floor"], "us", "≤ 1.3x, as 1c",
                    ratio_at_most(1.3), n))
    rows.append(Row(f"2e. `/bin/true` from a {label} caller: the native runner alone vs the floor",
                    "runner", s["runner"], "posix_spawn", s["floor"], "us", "≤ 1.3x, as 1d",
                    ratio_at_most(1.3), n))
    rows.append(Row(f"2c. retest per run: from the {label} caller vs from a small Python (flat?)",
                    f"retest, {label} caller", s["retest"], "retest, small caller", s["small"], "us",
                    "≈ 1.0x (≤ 1.2x)", ratio_at_most(1.2),
                    f"the small caller is a separate Python process (RSS {small_rss_mib:.0f} MiB) "
                    "that runs retest on request, alternated with the others; it times its own run()"))
    rows.append(Row(f"2d. control: fork+exec vs posix_spawn, both from the {label} caller",
                    "os.fork+execv", s["fork"], "posix_spawn", s["floor"], "us", "(control, no goal)",
                    None, "fork copies the page tables of the caller; a vfork-class spawn does not"))


# --------------------------------------------------------------------------- item 3: caller CPU


def self_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def item_caller_cpu(plan: Plan, rows: list[Row], context: dict[str, Any]) -> None:
    cmd = ["sleep", f"{plan.sleep_s:g}"]

    def measured(fn: Callable[[], None]) -> Callable[[], Metrics]:
        def go() -> Metrics:
            cpu0, kids0, t0 = self_cpu_s(), children_cpu_s(), time.perf_counter()
            fn()
            t1, cpu1, kids1 = time.perf_counter(), self_cpu_s(), children_cpu_s()
            return {"self": cpu1 - cpu0, "all": (cpu1 - cpu0) + (kids1 - kids0), "wall": t1 - t0}
        return go

    def retest_native() -> None:
        check_ok(run(cmd, timeout=plan.sleep_s + 30, grace=1, backend="native"))

    def subprocess_run() -> None:
        check_ok(subprocess.run(cmd, capture_output=True, start_new_session=True,
                                timeout=plan.sleep_s + 30))

    res = paired([("retest", measured(retest_native)), ("subprocess", measured(subprocess_run))],
                 plan.sleep_iterations)
    n = f"{plan.sleep_iterations} runs each; sleep {plan.sleep_s:g} s"
    rows.append(Row(f"3a. caller CPU (RUSAGE_SELF user+sys) while the child sleeps {plan.sleep_s:g} s",
                    "retest", Stats(res["retest"]["self"]), "subprocess.run",
                    Stats(res["subprocess"]["self"]), "ms", "< 20 ms",
                    lambda a, b, r: a.median < 0.020, n))
    rows.append(Row("3b. the same, plus reaped children (shepherd + sleep; sleep)",
                    "retest", Stats(res["retest"]["all"]), "subprocess.run",
                    Stats(res["subprocess"]["all"]), "ms", "(no goal)", None,
                    "RUSAGE_SELF + RUSAGE_CHILDREN deltas: what the whole run costs the machine"))


# --------------------------------------------------------------------------- item 4: kill latency

# sh records its own pid and its two sleeps' pids, then waits; with TRAP it ignores SIGTERM,
# and the sleeps inherit the ignored disposition. Every process of the tree holds stdout.
# The pid files are made by redirections, not touch: no extra process, so the tree is
# recorded within a millisecond of starting even on a loaded CI machine.
TREE_SH = 'TRAP : >"$0/sh-$$"; sleep 60 & : >"$0/sleep-$!"; sleep 60 & : >"$0/sleep-$!"; wait'
TREE_SIZE = 3
KILL_SETTLE_S = 0.1


def item_kill_latency(plan: Plan, rows: list[Row], ledger: Ledger, context: dict[str, Any]) -> None:
    timeout_s, grace_s = plan.kill_timeout_s, plan.kill_grace_s

    def variants(ignore_term: bool) -> list[tuple[str, Callable[[], Metrics]]]:
        script = TREE_SH.replace("TRAP", "trap '' TERM;" if ignore_term else "")

        def measure(start: Callable[[list[str]], Any]) -> Callable[[], Metrics]:
            def go() -> Metrics:
                pid_dir = ledger.new_dir()
                argv = ["sh", "-c", script, str(pid_dir)]
                t0 = time.perf_counter()
                start(argv)
                t1 = time.perf_counter()
                pids = ledger.collect(pid_dir)
                if len(pids) != TREE_SIZE:
                    raise RuntimeError(f"kill latency: tree recorded {len(pids)} of {TREE_SIZE} pids "
                                       f"before the {timeout_s:g} s deadline")
                # A SIGKILLed process closes its pipes before it turns zombie: give one that is
                # merely still exiting a moment, so that only real survivors are counted.
                time.sleep(KILL_SETTLE_S)
                survivors = count_alive(pids)
                ledger.kill(pids)
                return {"latency": t1 - t0 - timeout_s, "survivors": survivors}
            return go

        def retest_native(argv: list[str]) -> None:
            result = run(argv, timeout=timeout_s, grace=grace_s, backend="native")
            if not result.timed_out:
                raise RuntimeError(f"retest: the deadline did not fire: {result!r}")

        def gnu_timeout(argv: list[str]) -> None:
            subprocess.run(["timeout", "-k", f"{grace_s:g}", f"{timeout_s:g}", *argv],
                           capture_output=True, timeout=timeout_s + grace_s + 30)

        def subprocess_run(argv: list[str]) -> None:
            try:
                subprocess.run(argv, capture_output=True, start_new_session=True, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                return
            raise RuntimeError("subprocess.run: the deadline did not fire")

        return [("retest", measure(retest_native)), ("timeout", measure(gnu_timeout)),
                ("subprocess", measure(subprocess_run))]

    n = f"{plan.kill_iterations} runs each; timeout {timeout_s:g} s"
    for ignore_term in (False, True):
        res = paired(variants(ignore_term), plan.kill_iterations)
        lat = {name: Stats(m["latency"]) for name, m in res.items()}
        alive = {name: Stats(m["survivors"]) for name, m in res.items()}
        if not ignore_term:
            rows.append(Row("4a. kill latency, deadline → returned with the tree gone; tree obeys SIGTERM "
                            "(sh + 2 sleep)", "retest", lat["retest"], "timeout -k", lat["timeout"], "ms",
                            "< 50 ms", lambda a, b, r: a.median < 0.050,
                            f"{n}; alive {KILL_SETTLE_S * 1000:g} ms after return: retest {alive['retest'].high:g}, "
                            f"timeout -k {alive['timeout'].high:g} (max)"))
        else:
            rows.append(Row(f"4c. kill latency, tree ignores SIGTERM, grace {grace_s:g} s",
                            "retest", lat["retest"], "timeout -k", lat["timeout"], "ms",
                            f"≈ grace ({grace_s * 1000:g}–{grace_s * 1000 + 50:g} ms)",
                            lambda a, b, r, g=grace_s: g <= a.median < g + 0.050,
                            f"{n}; alive {KILL_SETTLE_S * 1000:g} ms after return: retest {alive['retest'].high:g}, "
                            f"timeout -k {alive['timeout'].high:g} (max)"))
        rows.append(Row(f"4{'b' if not ignore_term else 'd'}. processes of the {TREE_SIZE}-process tree "
                        f"alive {KILL_SETTLE_S * 1000:g} ms after the call returned ({'ignores' if ignore_term else 'obeys'} SIGTERM)",
                        "retest", alive["retest"], "subprocess.run(timeout=)", alive["subprocess"], "n",
                        "0", lambda a, b, r: a.high == 0,
                        f"subprocess.run returned {lat['subprocess'].median * 1000:.1f} ms after the "
                        "deadline, having killed only the direct child"))


# --------------------------------------------------------------------------- item 5: orphans of xdist

XDIST_CONFTEST = '''
import os
PID_DIR = os.environ["BENCH_PID_DIR"]

def pytest_configure(config):
    # the main process and every xdist worker record themselves
    open(os.path.join(PID_DIR, "pytest-%d" % os.getpid()), "w").close()
'''

XDIST_TEST = '''
import os, subprocess, time

PID_DIR = os.environ["BENCH_PID_DIR"]

def helper(tag, **kw):
    # a server the test starts and would stop in a teardown that never runs (stdio closed,
    # as a daemon does, so that it holds no pipe of the runner)
    return subprocess.Popen(["sh", "-c", ': >"$0/%s-$$"; exec sleep 120' % tag, PID_DIR],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, **kw)

def test_quick():
    assert 1 + 1 == 2

def test_hangs_0():
    helper("server")
    helper("daemon", start_new_session=True)
    time.sleep(120)

def test_hangs_1():
    helper("server")
    helper("daemon", start_new_session=True)
    time.sleep(120)
'''

XDIST_WORKERS = 2
#: main + workers + (server + daemon) per hanging test
XDIST_EXPECTED = 1 + XDIST_WORKERS + 2 * 2


def item_orphans(plan: Plan, rows: list[Row], ledger: Ledger, context: dict[str, Any]) -> None:
    suite = ledger.root / "xdist-suite"
    suite.mkdir()
    (suite / "pytest.ini").write_text("[pytest]\n")
    (suite / "conftest.py").write_text(XDIST_CONFTEST)
    (suite / "test_hang.py").write_text(XDIST_TEST)
    argv = [PY, "-m", "pytest", "-q", "-p", "xdist.plugin", "-p", "no:cacheprovider",
            "-n", str(XDIST_WORKERS), "test_hang.py"]
    timeout_s = plan.xdist_timeout_s
    settle_s = 1.0

    def measure(start: Callable[[dict[str, str]], Any]) -> Callable[[], Metrics]:
        def go() -> Metrics:
            pid_dir = ledger.new_dir()
            env = dict(os.environ, BENCH_PID_DIR=str(pid_dir), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
            env.pop("PYTEST_ADDOPTS", None)
            t0 = time.perf_counter()
            start(env)
            t1 = time.perf_counter()
            time.sleep(settle_s)  # an orphan that is merely slow to notice is not counted
            pids = ledger.collect(pid_dir)
            orphans = count_alive(pids)
            ledger.kill(pids)
            return {"orphans": orphans, "recorded": len(pids), "returned": t1 - t0}
        return go

    def retest_native(env: dict[str, str]) -> None:
        result = run(argv, timeout=timeout_s, grace=2, cwd=suite, env=env, backend="native")
        if not result.timed_out:
            raise RuntimeError(f"xdist suite under retest did not time out: {result!r}")

    def subprocess_run(env: dict[str, str]) -> None:
        try:
            subprocess.run(argv, capture_output=True, timeout=timeout_s, cwd=suite, env=env)
        except subprocess.TimeoutExpired:
            return
        raise RuntimeError("xdist suite under subprocess.run did not time out")

    def gnu_timeout(env: dict[str, str]) -> None:
        subprocess.run(["timeout", "-k", "2", f"{timeout_s:g}", *argv], capture_output=True,
                       timeout=timeout_s + 60, cwd=suite, env=env)

    res = paired([("retest", measure(retest_native)), ("subprocess", measure(subprocess_run)),
                  ("timeout", measure(gnu_timeout))], plan.xdist_iterations)
    orphans = {name: Stats(m["orphans"]) for name, m in res.items()}
    recorded = {name: Stats(m["recorded"]) for name, m in res.items()}
    short = [name for name, s in recorded.items() if s.low < XDIST_EXPECTED]
    note = (f"{plan.xdist_iterations} runs each; timeout {timeout_s:g} s; pytest -n {XDIST_WORKERS}, "
            f"{XDIST_EXPECTED} processes recorded per run (main, workers, a server and a setsid daemon "
            f"per hanging test); counted {settle_s:g} s after return")
    if short:
        note += f"; WARNING: fewer than {XDIST_EXPECTED} recorded for {', '.join(short)}"
    rows.append(Row("5a. orphans after a timed-out pytest-xdist suite: retest vs subprocess.run",
                    "retest", orphans["retest"], "subprocess.run", orphans["subprocess"], "n", "0",
                    lambda a, b, r: a.high == 0, note))
    rows.append(Row("5b. orphans after a timed-out pytest-xdist suite: retest vs `timeout -k 2`",
                    "retest", orphans["retest"], "timeout -k", orphans["timeout"], "n", "0",
                    lambda a, b, r: a.high == 0, "same runs as 5a"))


# --------------------------------------------------------------------------- item 6: capture

WRITER = """
import os, sys
left = int(sys.argv[1])
view = memoryview(bytes(1 << 20))
while left:
    left -= os.write(1, view[: min(left, len(view))])
"""

# Runs in a fresh Python per measurement, so that one variant's peak RSS cannot hide another's.
# The peak is VmHWM (the high-water RSS of this process's own address space), not ru_maxrss:
# Linux carries ru_maxrss across execve, and a vfork-class spawn (subprocess, posix_spawn) runs
# the child in the parent's address space until exec, so a fresh Python started by a 1 GiB
# benchmark process would begin life with ru_maxrss >= 1 GiB and every growth would read 0.
CAPTURE_CHILD = """
import json, os, subprocess, sys, time
variant, size, limit, writer = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
argv = [sys.executable, "-c", writer, str(size)]
from retest.proc_group import run, OMITTED_MARKER

def hwm_kib():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")

before = hwm_kib()
t0 = time.perf_counter()
if variant == "retest":
    r = run(argv, timeout=600, grace=1, capture_limit=limit, backend="native")
    seen = len(r.stdout) + r.stdout_dropped - (len(OMITTED_MARKER % r.stdout_dropped) if r.stdout_dropped else 0)
else:
    r = subprocess.run(argv, capture_output=True, timeout=600)
    seen = len(r.stdout)
t1 = time.perf_counter()
after = hwm_kib()
print(json.dumps({"wall": t1 - t0, "seen": seen, "rc": r.returncode,
                  "before_kib": before, "after_kib": after}))
"""


def capture_in_fresh_python(variant: str, size: int, limit: int) -> Metrics:
    done = subprocess.run([PY, "-c", CAPTURE_CHILD, variant, str(size), str(limit), WRITER],
                          capture_output=True, env=child_env(), timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"capture child ({variant}) failed: {done.stderr.decode(errors='replace')}")
    got = json.loads(done.stdout)
    if got["rc"] != 0 or got["seen"] != size:
        raise RuntimeError(f"capture child ({variant}) saw {got['seen']} of {size} bytes, rc {got['rc']}")
    return {"wall": got["wall"], "gbps": size / got["wall"] / 1e9,
            "growth": (got["after_kib"] - got["before_kib"]) / 1024}


def item_capture(plan: Plan, rows: list[Row], context: dict[str, Any]) -> None:
    size = plan.capture_bytes
    limit = proc_group.config.RunnerSettings.from_env().capture_limit_bytes
    big = plan.big_limit_bytes
    res = paired([("retest", lambda: capture_in_fresh_python("retest", size, limit)),
                  ("subprocess", lambda: capture_in_fresh_python("subprocess", size, limit))],
                 plan.capture_iterations)
    what = f"{size / GiB:g} GiB" if size >= GiB else f"{size / 1e6:g} MB"
    n = (f"{plan.capture_iterations} runs each, each in a fresh Python; writer: a Python child writing "
         f"1 MiB chunks; GB = 10^9 bytes")
    a, b = res["retest"], res["subprocess"]
    rows.append(Row(f"6a. capture {what} of stdout: wall time", "retest", Stats(a["wall"]),
                    "subprocess.run", Stats(b["wall"]), "s", "(no goal)", None, n))
    rows.append(Row(f"6b. capture {what}: throughput", "retest", Stats(a["gbps"]), "subprocess.run",
                    Stats(b["gbps"]), "GB/s", "≥ 2.5 GB/s (issue 15)",
                    lambda a_, b_, r: a_.median >= 2.5, n))
    rows.append(Row(f"6c. capture {what}: caller peak RSS growth, capture_limit {limit / MiB:g} MiB",
                    "retest", Stats(a["growth"]), "subprocess.run", Stats(b["growth"]), "MiB",
                    f"≤ limit + 2 MiB = {limit / MiB + 2:g} MiB",
                    lambda a_, b_, r, lim=limit: a_.median <= lim / MiB + 2,
                    "peak RSS (VmHWM) after the run minus before it, in a fresh caller process"))
    res_big = paired([("big", lambda: capture_in_fresh_python("retest", size, big)),
                      ("default", lambda: capture_in_fresh_python("retest", size, limit))],
                     max(2, plan.capture_iterations - 2))
    rows.append(Row(f"6d. capture {what}: retest peak RSS growth, capture_limit {big / MiB:g} MiB vs "
                    f"{limit / MiB:g} MiB", f"limit {big / MiB:g} MiB", Stats(res_big["big"]["growth"]),
                    f"limit {limit / MiB:g} MiB", Stats(res_big["default"]["growth"]), "MiB",
                    f"≤ limit + 2 MiB = {big / MiB + 2:g} MiB",
                    lambda a_, b_, r, lim=big: a_.median <= lim / MiB + 2,
                    "does the growth scale as 1x the limit or more?"))


# --------------------------------------------------------------------------- item 7: classify


def synthetic_pytest_log(size: int) -> tuple[bytes, bytes]:
    """A pytest -v log of about ``size`` bytes: (log ending in its summary, the same log cut off)."""
    header = (b"============================= test session starts ==============================\n"
              b"platform linux -- Python 3.11.7, pytest-8.3.2, pluggy-1.5.0\n"
              b"rootdir: /srv/app\nplugins: xdist-3.6.1, timeout-2.3.1\ncollected 250000 items\n\n")
    parts = [header]
    failures: list[bytes] = []
    total = len(header)
    i = failed = 0
    while total < size:
        module, case = i // 200, i % 200
        status = b"FAILED" if i % 97 == 13 else b"PASSED"
        line = (b"tests/unit/test_mod_%04d.py::test_case_%05d %s%s[%3d%%]\n"
                % (module, case, status, b" " * 20, (i * 100 // 250000) % 100))
        parts.append(line)
        total += len(line)
        if status == b"FAILED":
            failed += 1
            block = (b"____________________________ test_case_%05d ____________________________\n\n"
                     b"    def test_case_%05d():\n>       assert compute(%d) == %d\n"
                     b"E       assert %d == %d\nE        +  where %d = compute(%d)\n\n"
                     b"tests/unit/test_mod_%04d.py:88: AssertionError\n"
                     b"----------------------------- Captured log call ------------------------------\n"
                     b"INFO     app.worker:worker.py:120 request handled in 12ms\n"
                     b"WARNING  app.db:db.py:44 retry 2 in 3 seconds\n"
                     b'  File "/srv/app/app/db.py", line 44, in connect\n'
                     % (case, case, i, i + 1, i, i + 1, i, i, module))
            failures.append(block)
            total += len(block)
        i += 1
    body = b"".join(parts) + (b"=================================== FAILURES ===================================\n"
                              + b"".join(failures))
    summary = (b"=========== %d failed, %d passed, 3 warnings in 1234.56s (0:20:34) ===========\n"
               % (failed, i - failed))
    return body + summary, body


def item_classify(plan: Plan, rows: list[Row], context: dict[str, Any]) -> None:
    try:
        from retest import _proc_group

        native = _proc_group.classify
    except (ImportError, AttributeError) as err:
        rows.append(Row("7. classify a pytest log: native vs pure Python", "native", None, "python",
                        None, "ms", "(no goal)", None, f"skipped: native classifier unavailable ({err})"))
        return
    try:
        from retest import _classify_py

        pure = _classify_py.classify
    except ImportError as err:
        rows.append(Row("7. classify a pytest log: native vs pure Python", "native", None, "python",
                        None, "ms", "(no goal)", None, f"skipped: retest._classify_py unavailable ({err})"))
        return
    with_summary, cut_off = synthetic_pytest_log(plan.log_bytes)
    what = f"{len(with_summary) / 1e6:.0f} MB"
    for tag, log, title in (("a", with_summary, "log ends in its summary"),
                            ("b", cut_off, "log without a summary: every search scans it all")):
        call = (log, b"", 1, False, None, False, 0, True)
        verdict_c, verdict_py = native(*call), pure(*call)
        if verdict_c != verdict_py:
            raise RuntimeError(f"classifiers disagree on the {tag} log: {verdict_c!r} != {verdict_py!r}")
        res = paired([("native", lambda c=call: wall(lambda: native(*c))),
                      ("python", lambda c=call: wall(lambda: pure(*c)))],
                     plan.classify_iterations, warmup=1)
        rows.append(Row(f"7{tag}. classify a {what} pytest log (exit 1), {title}", "native",
                        Stats(res["native"]["s"]), "pure Python", Stats(res["python"]["s"]), "us",
                        "(no goal)", None,
                        f"{plan.classify_iterations} runs each; verdict {verdict_c[1]} from both"))


# --------------------------------------------------------------------------- item 8: concurrency


def item_concurrency(plan: Plan, rows: list[Row], context: dict[str, Any]) -> None:
    true = ["/bin/true"]
    threads, per_thread = plan.threads, plan.runs_per_thread

    def retest_native() -> None:
        check_ok(run(true, timeout=10, grace=1, backend="native"))

    def retest_runner() -> None:
        check_ok(runner_only(true))

    def subprocess_run() -> None:
        check_ok(subprocess.run(true, capture_output=True, start_new_session=True, timeout=10))

    def trial(one: Callable[[], None]) -> Callable[[], Metrics]:
        def go() -> Metrics:
            barrier = threading.Barrier(threads + 1)
            errors: list[BaseException] = []

            def worker() -> None:
                try:
                    barrier.wait()
                    for _ in range(per_thread):
                        one()
                except BaseException as err:  # re-raised in the main thread
                    errors.append(err)

            pool = [threading.Thread(target=worker) for _ in range(threads)]
            for t in pool:
                t.start()
            barrier.wait()
            t0, cpu0 = time.perf_counter(), self_cpu_s() + children_cpu_s()
            for t in pool:
                t.join()
            elapsed = time.perf_counter() - t0
            # Idle shepherds are reaped only when let go: before that, neither their CPU nor
            # that of the commands they reaped is in RUSAGE_CHILDREN.
            proc_group.close_shepherds()
            cpu = self_cpu_s() + children_cpu_s() - cpu0
            if errors:
                raise errors[0]
            return {"rate": threads * per_thread / elapsed, "cpu": cpu / (threads * per_thread)}
        return go

    res = paired([("retest", trial(retest_native)), ("runner", trial(retest_runner)),
                  ("subprocess", trial(subprocess_run))], plan.thread_trials, warmup=1)
    rows.append(Row(f"8. runs/s, {threads} threads running `/bin/true`: retest vs subprocess.run",
                    "retest", Stats(res["retest"]["rate"]), "subprocess.run",
                    Stats(res["subprocess"]["rate"]), "runs/s",
                    "≥ 1.0x (issue 15)", ratio_at_least(1.0),
                    f"{plan.thread_trials} trials each of {threads} x {per_thread} runs; CPU per run "
                    f"(caller + reaped children): retest {statistics.median(res['retest']['cpu']) * 1e6:.0f} µs, "
                    f"subprocess.run {statistics.median(res['subprocess']['cpu']) * 1e6:.0f} µs"))
    rows.append(Row(f"8b. runs/s, {threads} threads: the native runner alone vs subprocess.run",
                    "runner", Stats(res["runner"]["rate"]), "subprocess.run",
                    Stats(res["subprocess"]["rate"]), "runs/s", "≥ 1.0x (issue 15)",
                    ratio_at_least(1.0),
                    f"same trials as 8; CPU per run: runner "
                    f"{statistics.median(res['runner']['cpu']) * 1e6:.0f} µs"))


# --------------------------------------------------------------------------- report


def command_output(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def machine() -> dict[str, str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = command_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    return {
        "uname -a": command_output(["uname", "-a"]),
        "CPU": cpu,
        "nproc": str(os.cpu_count()),
        "Python": f"{platform.python_implementation()} {platform.python_version()} ({PY})",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "retest": f"{PACKAGE_ROOT}/retest, commit {commit}, backend {proc_group.backend_status()[0]}",
    }


def met_text(row: Row, smoke: bool) -> str:
    if row.judge is None:
        return "—"
    if smoke:
        return "not judged (smoke)"
    return "yes" if row.met else "**NO**"


def ratio_text(row: Row) -> str:
    r = row.ratio
    return "—" if r is None else f"{r:.2f}x"


def table(rows: list[Row], smoke: bool) -> str:
    lines = ["| item | A: median [min–max] | B: median [min–max] | ratio A/B | goal | met? |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        a = f"{row.a_label}: {fmt_stats(row.a, row.unit)}"
        b = f"{row.b_label}: {fmt_stats(row.b, row.unit)}" if row.b_label else "—"
        lines.append(f"| {row.item} | {a} | {b} | {ratio_text(row)} | {row.goal} | {met_text(row, smoke)} |")
    return "\n".join(lines)


def report(rows: list[Row], plan: Plan, argv: list[str], elapsed_s: float, killed: int,
           load_before: str) -> str:
    info = machine()
    info["load average (1, 5, 15 min) before / after"] = f"{load_before} / {load_average()}"
    mode = "smoke (small sizes, few iterations; goals not judged)" if plan.smoke else "full"
    cmd = "PYTHONPATH=python python bench/run.py" + ("" if not argv else " " + shlex.join(argv))
    out = [
        "# retest runner benchmarks",
        "",
        f"Mode: {mode}. Took {elapsed_s:.0f} s.",
        "",
        "Reproduce (from the repository root, after `python setup.py build_ext --inplace`, or with "
        "retest installed and without the `PYTHONPATH`):",
        "",
        f"    {cmd}",
        "",
        "Machine:",
        "",
    ]
    out += [f"- {key}: `{value}`" for key, value in info.items()]
    out += [
        "",
        "A and B of each row ran alternately in one process (A, B, A, B, ..., the first variant "
        "rotated every iteration), so the machine's noise hits both alike. Figures are medians "
        "with [min–max]; the ratio is of the medians. Goals are judged on the medians, orphans on "
        "the worst run. retest runs with full containment on (native backend: shepherd, subreaper, "
        "new session, deadline, grace).",
        "",
        table(rows, plan.smoke),
        "",
        "Notes:",
        "",
    ]
    out += [f"- {row.item.split('.', 1)[0]}: {row.note}" for row in rows if row.note]
    out += ["", f"Processes left by measured trees and killed by the benchmark afterwards (by "
                f"recorded pid): {killed}."]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- main


ITEMS = ("1", "2", "3", "4", "5", "6", "7", "8")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few iterations, small sizes (CI)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results.md"),
                        help="markdown report to write (default: bench/results.md)")
    parser.add_argument("--items", default=",".join(ITEMS), help="comma-separated items to run (1-8)")
    args = parser.parse_args(argv)
    items = [i.strip() for i in args.items.split(",") if i.strip()]
    unknown = [i for i in items if i not in ITEMS]
    if unknown:
        parser.error(f"unknown items: {', '.join(unknown)}")
    plan = SMOKE if args.smoke else FULL

    backend, why = proc_group.backend_status()
    if backend != "native":
        print(f"bench: the native backend is unavailable ({why}); nothing to measure", file=sys.stderr)
        return 2

    # SIGTERM (CI cancelling the job) unwinds through the finally below like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    subreaper = set_subreaper()
    root = Path(tempfile.mkdtemp(prefix="retest-bench-"))
    ledger = Ledger(root)
    rows: list[Row] = []
    context: dict[str, Any] = {}
    started = time.monotonic()
    load_before = load_average()
    steps: list[tuple[str, str, Callable[[], None]]] = [
        ("1", "per-run cost of /bin/true", lambda: item_spawn(plan, rows, context)),
        ("2", "the same from a big caller", lambda: item_big_caller(plan, rows, ledger, context)),
        ("3", "caller CPU while the child sleeps", lambda: item_caller_cpu(plan, rows, context)),
        ("4", "kill latency", lambda: item_kill_latency(plan, rows, ledger, context)),
        ("5", "orphans of a timed-out xdist suite", lambda: item_orphans(plan, rows, ledger, context)),
        ("6", "capturing big output", lambda: item_capture(plan, rows, context)),
        ("7", "classifying a big log", lambda: item_classify(plan, rows, context)),
        ("8", "throughput under concurrency", lambda: item_concurrency(plan, rows, context)),
    ]
    if not subreaper:
        print("bench: could not become a child subreaper; orphans go to init and are not counted",
              file=sys.stderr)
    try:
        for number, title, step in steps:
            if number not in items:
                continue
            t0 = time.monotonic()
            print(f"[{time.monotonic() - started:6.1f} s] item {number}: {title} ...", flush=True)
            first_row, load_at_start = len(rows), load_average().split()[0]
            step()
            for row in rows[first_row:]:  # which items ran on a busy machine
                row.note += ("; " if row.note else "") + f"1-min load average {load_at_start} → {load_average().split()[0]}"
            print(f"[{time.monotonic() - started:6.1f} s] item {number} done in "
                  f"{time.monotonic() - t0:.1f} s", flush=True)
    finally:
        ledger.collect_all()
        ledger.kill()
        leftovers = [p for p in descendants() if pid_alive(p)]
        if leftovers:  # descendants of a subreaper: started by this benchmark, so ours to kill
            print(f"bench: killing {len(leftovers)} leftover descendant(s): {leftovers}", file=sys.stderr)
            ledger.recorded |= set(leftovers)
            ledger.kill(set(leftovers))
        shutil.rmtree(root, ignore_errors=True)

    for row in rows:
        row.evaluate(plan.smoke)
    elapsed = time.monotonic() - started
    text = report(rows, plan, sys.argv[1:] if argv is None else argv, elapsed, ledger.killed_total,
                  load_before)
    print()
    print(table(rows, plan.smoke))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"\nwrote {out} ({elapsed:.0f} s)")
    if not plan.smoke:
        missed = [row.item for row in rows if row.met is False]
        print(f"goals missed: {len(missed)}" + "".join(f"\n  - {m}" for m in missed))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        traceback.print_exc()
        sys.exit(130)
