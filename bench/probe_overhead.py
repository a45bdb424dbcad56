#!/usr/bin/env python3
"""Benchmark: what the pytest probe costs a suite (issue 9: "never slows the suite measurably").

Usage::

    python bench/probe_overhead.py            # 2,000 tests, 5 interleaved runs per variant
    python bench/probe_overhead.py --smoke    # 200 tests, 1 run each: keeps the script from rotting
    python bench/probe_overhead.py --runs 9   # more repetitions on a noisy machine

The suite is generated in a temporary directory: ten modules of 100 trivial tests, one module of
500 parametrized tests (5 functions x 100 ids) and one module of 500 tests that fail with a short
assertion (so the probe's failure path, message and longrepr head, is measured too). It runs as
``python -m pytest -q -p no:cacheprovider`` through ``retest.proc_group.run`` with
``probe=False`` (the baseline) and ``probe=True``, plain and with pytest-xdist ``-n 2`` (if
installed). The four variants run interleaved (A, B, C, D, then the start rotated each round) so
the machine's noise hits all alike; figures are medians with [min-max] and the ratio is of the
medians measured in the same loop. The events file of one untimed run per mode gives its size.
Finally ``_Channel.emit`` of a typical ``report`` event is timed in-process (the per-event cost).

Wall time and the CPU time of the whole tree are both reported; the goal, probe/baseline <= 1.03
on the medians (full mode only), is judged on CPU, because on a shared 2-core machine wall time
swings by more than 3% from run to run. One plain run under cProfile gives the share of pytest's
own time spent in the probe's hooks, a figure other load cannot move. Stdlib only (plus pytest,
and pytest-xdist for the xdist rows, in this interpreter).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent

try:  # an installed retest (CI) first, else the checkout's in-place build
    import retest  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO / "python"))
    import retest  # noqa: F401
from retest import probe as probe_mod  # noqa: E402
from retest.proc_group import run  # noqa: E402

GOAL_RATIO = 1.03
TIMEOUT_S = 600.0


# --------------------------------------------------------------------------- the suite


def write_suite(root: Path, scale: int) -> tuple[int, int]:
    """Write the suite under ``root`` (``scale`` = tests per plain module / 10).

    Returns (tests, failing tests).
    """
    plain_modules, per_module = 10, 10 * scale
    (root / "pytest.ini").write_text("[pytest]\n")  # rootdir here, no outer config
    for m in range(plain_modules):
        body = "".join(f"def test_{i}():\n    assert {i} + 1 == {i + 1}\n\n\n" for i in range(per_module))
        (root / f"test_plain_{m}.py").write_text(body)
    ids = 10 * scale
    (root / "test_param.py").write_text(
        "import pytest\n\n\n" + "".join(
            f"@pytest.mark.parametrize('n', range({ids}))\ndef test_p{f}(n):\n    assert n >= 0\n\n\n"
            for f in range(5)))
    failing = 50 * scale
    (root / "test_failing.py").write_text("".join(
        f"def test_fail_{i}():\n    assert {i} == -1\n\n\n" for i in range(failing)))
    return plain_modules * per_module + 5 * ids + failing, failing


# --------------------------------------------------------------------------- measuring


def has_xdist() -> bool:
    return importlib.util.find_spec("xdist") is not None


def argv(xdist: bool) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            *(["-n", "2"] if xdist else [])]


def timed_run(suite: Path, xdist: bool, probe: bool, expected: int) -> tuple[float, float]:
    """(wall, CPU) seconds of one run of the suite; checks it really ran every test.

    CPU is user + sys of the whole tree (the shepherd's RUSAGE_CHILDREN: pytest, its xdist
    workers) plus this process's own (it reads the events file): what the run cost the machine,
    and far less sensitive than wall time to other load on a shared machine.
    """
    before = os.times()
    start = time.perf_counter()
    result = run(argv(xdist), timeout=TIMEOUT_S, cwd=str(suite), probe=probe)
    wall = time.perf_counter() - start
    after = os.times()
    cpu = result.user_cpu_s + result.sys_cpu_s + (after.user - before.user) + \
        (after.system - before.system)
    if result.returncode != 1:  # the failing module makes every full run exit 1
        raise RuntimeError(f"unexpected exit {result.returncode}: {result.stdout[-500:]!r}")
    if probe:
        report = result.probe
        if report is None or not report.session_finished or report.done != expected:
            raise RuntimeError(f"the probe missed tests: {report and report.to_dict()}")
    return wall, cpu


def events_size(suite: Path, xdist: bool) -> tuple[int, int]:
    """(bytes, lines) of the events file of one run, outside the timed loop."""
    events_dir = Path(tempfile.mkdtemp(prefix="probe-bench-events-"))
    path = events_dir / "events.jsonl"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [probe_mod.PROBE_DIR, *filter(None, [os.environ.get("PYTHONPATH")])]))
    env[probe_mod.ENV_EVENTS] = str(path)
    try:
        subprocess.run(probe_mod.inject(argv(xdist)), cwd=suite, env=env, timeout=TIMEOUT_S,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        data = path.read_bytes()
        return len(data), data.count(b"\n")
    finally:
        shutil.rmtree(events_dir, ignore_errors=True)


def interleaved(variants: dict[str, Callable[[], tuple[float, float]]],
                runs: int) -> dict[str, list[tuple[float, float]]]:
    """Each variant ``runs`` times, alternating, the first variant rotated every round."""
    names = list(variants)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for round_no in range(runs):
        k = round_no % len(names)
        for name in names[k:] + names[:k]:
            samples[name].append(variants[name]())
    return samples


def per_event_cost(count: int) -> dict[str, float]:
    """Microseconds per ``emit`` of a passing and of a failing ``report`` event, in-process."""
    spec = importlib.util.spec_from_file_location(
        "retest_probe_bench", os.path.join(probe_mod.PROBE_DIR, "retest_probe.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="probe-bench-emit-") as tmp:
        channel = module._Channel(os.path.join(tmp, "e.jsonl"), 1 << 40, None)
        passing = {"nodeid": "tests/test_plain_3.py::test_42", "when": "call",
                   "outcome": "passed", "duration": 0.000123}
        failing = dict(passing, outcome="failed", message="assert 42 == -1",
                       longrepr="def test_fail_42():\n>       assert 42 == -1\nE       assert 42 == -1"
                                "\n\ntest_failing.py:2: AssertionError")
        for name, fields in (("report, passed", passing), ("report, failed", failing)):
            samples = []
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(count):
                    channel.emit("report", **fields)
                samples.append((time.perf_counter() - start) / count)
            out[name] = statistics.median(samples) * 1e6
        os.close(channel.fd)
    return out


def fmt_s(samples: list[float]) -> str:
    return f"{statistics.median(samples):.2f} s [{min(samples):.2f}–{max(samples):.2f}]"


def paired(probed: list[float], base: list[float]) -> str:
    """Median [min-max] of the per-round ratios (the two ran minutes apart at most)."""
    ratios = [p / b for p, b in zip(probed, base)]
    return f"{statistics.median(ratios):.3f}x [{min(ratios):.3f}–{max(ratios):.3f}]"


def profile_share(suite: Path) -> tuple[float, float]:
    """(probe's hooks, whole run) seconds of one plain run under cProfile, in a fresh Python.

    cProfile slows everything, but alike per call; the share says how much of pytest's own
    work the probe adds, whatever else the machine is doing.
    """
    code = (
        "import cProfile, pstats, sys, pytest\n"
        "profiler = cProfile.Profile()\n"
        "profiler.runcall(pytest.main, ['-q', '-p', 'no:cacheprovider', '-p', 'retest_probe'])\n"
        "stats = pstats.Stats(profiler).stats\n"
        "hooks = sum(ct for (f, _, n), (_, _, _, ct, _) in stats.items()\n"
        "            if f.endswith('retest_probe.py') and n.startswith('pytest_'))\n"
        "total = sum(tt for (_, _, tt, _, _) in stats.values())\n"
        "sys.__stderr__.write(f'{hooks} {total}\\n')\n"
    )
    events_dir = Path(tempfile.mkdtemp(prefix="probe-bench-events-"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [probe_mod.PROBE_DIR, *filter(None, [os.environ.get("PYTHONPATH")])]))
    env[probe_mod.ENV_EVENTS] = str(events_dir / "events.jsonl")
    try:
        done = subprocess.run([sys.executable, "-c", code], cwd=suite, env=env, timeout=TIMEOUT_S,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
        hooks, total = done.stderr.decode().split()[-2:]
        return float(hooks), float(total)
    finally:
        shutil.rmtree(events_dir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="200 tests, 1 run each; goal not judged")
    parser.add_argument("--runs", type=int, default=None, help="repetitions per variant (default 5)")
    options = parser.parse_args()
    scale, runs, emits = (1, 1, 2000) if options.smoke else (10, options.runs or 5, 20000)
    xdist = has_xdist()
    suite = Path(tempfile.mkdtemp(prefix="probe-bench-suite-"))
    try:
        tests, failing = write_suite(suite, scale)
        load_before = os.getloadavg()[0]
        variants: dict[str, Callable[[], tuple[float, float]]] = {}
        for mode in (False, True) if xdist else (False,):
            for probe in (False, True):
                name = f"{'xdist -n 2' if mode else 'plain'}, {'probe' if probe else 'baseline'}"
                variants[name] = (lambda m=mode, p=probe: timed_run(suite, m, p, tests))
        # The untimed runs that measure the events file warm the page cache up for both arms.
        # (Smoke mode: the plain run's file only; the xdist run is the slowest of all.)
        modes = (False, True) if xdist else (False,)
        sizes = {mode: events_size(suite, mode) if mode is False or not options.smoke else None
                 for mode in modes}
        if not options.smoke:
            for fn in variants.values():
                fn()
        samples = interleaved(variants, runs)
        load_after = os.getloadavg()[0]
        emit_us = per_event_cost(emits)
        share = None if options.smoke else profile_share(suite)
    finally:
        shutil.rmtree(suite, ignore_errors=True)

    print(f"{tests:,} tests ({failing} failing), {runs} interleaved runs per variant, "
          f"python {platform.python_version()}, nproc {os.cpu_count()}, "
          f"1-min load {load_before:.2f} -> {load_after:.2f}")
    print("| mode | what | baseline (probe=False) | probe=True | probe/baseline (medians) "
          "| per-round ratios | events file | goal | met? |")
    print("|---|---|---|---|---|---|---|---|---|")
    goal_met = True
    for mode in sizes:
        label = "xdist -n 2" if mode else "plain"
        size_lines = sizes[mode]
        size_text = f"{size_lines[0] / 1024:,.0f} KiB, {size_lines[1]:,} lines" if size_lines else "—"
        for index, what in enumerate(("wall", "CPU (tree)")):
            base = [s[index] for s in samples[f"{label}, baseline"]]
            probed = [s[index] for s in samples[f"{label}, probe"]]
            ratio = statistics.median(probed) / statistics.median(base)
            # Judged on CPU: on a shared machine the wall time of a 2-core run swings by more
            # than the 3% it is meant to resolve; the wall row is shown for what it is.
            judged = what != "wall"
            met = ratio <= GOAL_RATIO
            goal_met = goal_met and (met or not judged)
            verdict = "—" if options.smoke or not judged else ("yes" if met else "**NO**")
            print(f"| {label} | {what} | {fmt_s(base)} | {fmt_s(probed)} | {ratio:.3f}x | "
                  f"{paired(probed, base)} | {size_text if index == 0 else ''} | "
                  f"{f'≤ {GOAL_RATIO}x' if judged else '(shown)'} | {verdict} |")
    if not xdist:
        print("(pytest-xdist not installed: no xdist rows)")
    print("per event, in-process (_Channel.emit to a file): "
          + ", ".join(f"{name} {us:.1f} µs" for name, us in emit_us.items()))
    if share is not None:
        hooks, total = share
        print(f"under cProfile, plain run: the probe's hooks {hooks:.3f} s of {total:.2f} s "
              f"({100 * hooks / total:.2f}% of the pytest process)")
    if options.smoke:
        return 0
    print(f"goal: probe/baseline ≤ {GOAL_RATIO}x: {'met' if goal_met else 'NOT met'}")
    return 0 if goal_met else 1


if __name__ == "__main__":
    sys.exit(main())
