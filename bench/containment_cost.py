#!/usr/bin/env python3
"""Per-run cost of each containment mode of retest's native runner (issue 10, item 1).

Usage::

    python bench/containment_cost.py                    # full (about a minute), prints the table
    python bench/containment_cost.py --smoke --out /tmp/c.md   # CI: a few iterations, < 20 s

Four variants run alternately in one loop (the first rotated every iteration), so the
machine's noise hits each alike: ``retest`` in cgroup mode, ``retest`` in subreaper mode,
``subprocess.run(capture_output=True, start_new_session=True, timeout=...)`` and the
``os.posix_spawn`` + ``waitpid`` floor, each running ``/bin/true``; then the same for a
command that leaves one ``setsid sleep`` behind (the sweep, where the modes differ most:
signal the leftovers, wait for them, name them). Medians with [min-max]; ratios of medians.
cgroup mode needs a place to make cgroups (root, or a delegated subtree): without one its
rows say why and the rest is still measured.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
try:
    import retest  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO / "python"))
from retest import proc_group  # noqa: E402

TRUE = ["/bin/true"]
LEAVES_ONE = ["sh", "-c", "setsid sleep 30 &"]


def floor() -> None:
    pid = os.posix_spawn(TRUE[0], TRUE, os.environ)
    os.waitpid(pid, 0)


def retest(mode: str, argv: list[str]) -> Callable[[], None]:
    def go() -> None:
        result = proc_group.run(argv, timeout=30, grace=1, backend="native", containment=mode)
        if result.containment != mode or result.returncode != 0:
            raise RuntimeError(f"{mode}: {result.containment} {result.returncode} {result.spawn_error}")
    return go


def subprocess_run(argv: list[str]) -> Callable[[], None]:
    def go() -> None:
        subprocess.run(argv, capture_output=True, start_new_session=True, timeout=30, check=True)
    return go


def paired(variants: dict[str, Callable[[], None]], iterations: int) -> dict[str, list[float]]:
    """Run the variants alternately, rotating the first; return each one's wall times (s)."""
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(iterations):
        for name in names[i % len(names):] + names[:i % len(names)]:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return times


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e6:,.0f} µs [{min(values) * 1e6:,.0f}–{max(values) * 1e6:,.0f}]"


def table(title: str, times: dict[str, list[float]], baselines: list[str]) -> list[str]:
    lines = [f"### {title}", "", "| variant | median [min–max] | " +
             " | ".join(f"/ {b}" for b in baselines) + " |",
             "|---|---|" + "---|" * len(baselines)]
    for name, values in times.items():
        ratios = [f"{statistics.median(values) / statistics.median(times[b]):.2f}x" for b in baselines]
        lines.append(f"| {name} | {fmt(values)} | " + " | ".join(ratios) + " |")
    return lines + [""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few iterations (CI)")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    if proc_group.backend_status()[0] != "native":
        print(f"native backend unavailable: {proc_group.backend_status()[1]}", file=sys.stderr)
        return 1
    probe = proc_group.run(TRUE, containment="cgroup", backend="native")
    modes = ["subreaper"] if probe.containment != "cgroup" else ["cgroup", "subreaper"]
    started = time.monotonic()
    n_true, n_sweep = (30, 5) if args.smoke else (1000, 100)

    variants = {f"retest {m}": retest(m, TRUE) for m in modes}
    variants.update({"subprocess.run": subprocess_run(TRUE), "posix_spawn floor": floor})
    lines = [f"## Containment cost per run ({'smoke' if args.smoke else 'full'}; {os.uname().release}, "
             f"nproc {os.cpu_count()})", ""]
    if "cgroup" not in modes:
        lines += [f"cgroup mode unavailable here: {probe.spawn_error}", ""]
    lines += table(f"`/bin/true`, {n_true} runs each", paired(variants, n_true),
                   ["posix_spawn floor", "subprocess.run"])
    sweep = {f"retest {m}": retest(m, LEAVES_ONE) for m in modes}
    lines += table(f"`sh -c 'setsid sleep 30 &'` (one leftover swept), {n_sweep} runs each",
                   paired(sweep, n_sweep), [f"retest {modes[-1]}"])
    lines.append(f"Took {time.monotonic() - started:.1f} s.")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
