#!/usr/bin/env python3
"""The caller's CPU for the pressure evidence of one run (issue 11, item 1).

Usage::

    python bench/pressure_cost.py            # 5 rounds of a 3 s child, prints the table
    python bench/pressure_cost.py --smoke    # CI: 1 round of a 0.5 s child

Goal: the caller's CPU while a 3 s child runs (``proc_group.run``, native backend, no probe)
stays under 20 ms, the pressure evidence included: the start and end reads, the sampler
thread's samples of the timeline (every 0.5 s) and the two passes over ``/proc/*/stat`` that
name the foreign CPU users. Measured as this process's user + system CPU
(``resource.getrusage(RUSAGE_SELF)``, every thread) around each call; the machine's process
count is printed, since the process table is linear in it. Also shown: what a run shorter
than the first sample pays (``Watch()`` + ``finish``, no process table).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
try:
    import retest  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO / "python"))
from retest import pressure, proc_group  # noqa: E402


def _cpu_ms() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return (ru.ru_utime + ru.ru_stime) * 1000


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    rounds, seconds = (1, 0.5) if args.smoke else (5, 3.0)
    run_ms, watch_ms = [], []
    for _ in range(rounds):
        before = _cpu_ms()
        proc_group.run(["sleep", str(seconds)], timeout=seconds + 10, probe=False)
        run_ms.append(_cpu_ms() - before)
        before = _cpu_ms()
        for _ in range(100):
            pressure.Watch().finish(tree_cpu_s=0.0)
        watch_ms.append((_cpu_ms() - before) / 100)
    procs = sum(1 for n in os.listdir("/proc") if n.isdigit())
    print(f"| what | median ms | max ms | rounds |\n|---|---|---|---|")
    print(f"| caller CPU, run() of a {seconds:g} s child (sampling included) | "
          f"{statistics.median(run_ms):.1f} | {max(run_ms):.1f} | {rounds} |")
    print(f"| a run shorter than the first sample: Watch() + finish | "
          f"{statistics.median(watch_ms):.3f} | {max(watch_ms):.3f} | {rounds} x 100 |")
    print(f"\n{procs} processes on the machine, {pressure.cores()} cores")
    return 0 if args.smoke or statistics.median(run_ms) < 20 else 1


if __name__ == "__main__":
    sys.exit(main())
