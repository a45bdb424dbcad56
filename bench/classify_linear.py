#!/usr/bin/env python3
"""Benchmark: the classifier is linear for every byte sequence (issue 9).

Usage::

    python bench/classify_linear.py            # 8 MiB per shape, 5 runs each
    python bench/classify_linear.py --smoke    # 1 MiB, 2 runs: keeps the script from rotting

Each shape is a buffer with no ``\\n`` at all, built to hurt a line-bound search: ``\\r``-separated
progress-bar segments full of `` in 1``-like lookalike anchors, segments of nothing but anchors,
NUL bytes and invalid UTF-8, and lines longer than the 4096-byte summary limit. The native
classifier and its pure-Python twin run alternately with a baseline measured in the same loop
(``bytes.count(b"\\r")`` over the same buffer: one memory-bound pass), so the ratios say how many
"passes over the buffer" a classification costs on this machine. Goal: native < 50 ms for the
8 MiB progress-bar buffer. Before the bounded search this buffer took 9.6 s native, 10.4 s Python.
Stdlib only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

from retest import _classify_py

try:
    from retest import _proc_group
except ImportError:  # the pure-Python build: the twin is still measured
    _proc_group = None

MiB = 1024 * 1024
GOAL_NATIVE_S = 0.050


def progress_bars(size: int) -> bytes:
    """``\\r``-separated 256-byte progress-bar segments, each with real and lookalike anchors."""
    parts, total, i = [], 0, 0
    while total < size:
        body = b"\r[%-40s] %3d%% eta in 1 min, batch %d in 1s, x in y, 3 in 1 go in " % (
            b"#" * (i % 41), i % 100, i)
        segment = body + b" " * max(0, 256 - len(body))
        parts.append(segment)
        total += len(segment)
        i += 1
    return b"".join(parts)[:size]


def shapes(size: int) -> dict[str, bytes]:
    """The measured buffers, by name; each is ``size`` bytes without a summary."""
    def fill(unit: bytes) -> bytes:
        return (unit * (size // len(unit) + 1))[:size]

    return {
        "progress bars (256 B \\r segments, lookalikes)": progress_bars(size),
        "only anchors (\\r in 1)": fill(b"\r in 1"),
        "NUL + invalid UTF-8 (\\r\\x00 in 1\\xff)": fill(b"\r\x00 in 1\xff\xfe"),
        "5000-byte lines of anchors": fill(b"\r" + b" in 1" * 1000),
        "one line, no breaks, anchors (database is locked)": fill(b" in 1 database is locked"),
    }


def median_s(fn: Callable[[], object], runs: int) -> float:
    """Median wall time of ``fn`` over ``runs`` calls."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(buf: bytes, runs: int) -> dict[str, float]:
    """Median seconds of each variant, the variants alternating so noise hits them alike."""
    args = (buf, b"", 1, False, None, False, 0, True)
    variants: dict[str, Callable[[], object]] = {
        "baseline": lambda: buf.count(b"\r"),
        "python": lambda: _classify_py.classify(*args),
    }
    if _proc_group is not None:
        variants["native"] = lambda: _proc_group.classify(*args)
        if _proc_group.classify(*args) != _classify_py.classify(*args):
            raise RuntimeError("the twins disagree")
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(runs):
        for name, fn in variants.items():
            samples[name].append(median_s(fn, 1))
    return {name: statistics.median(times) for name, times in samples.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="1 MiB, 2 runs; goals not judged")
    options = parser.parse_args()
    size, runs = (MiB, 2) if options.smoke else (8 * MiB, 5)
    print(f"{size // MiB} MiB per shape, median of {runs} runs; ratios are to bytes.count(b'\\r')")
    print("| shape | native | python | baseline | native/baseline | python/baseline |")
    print("|---|---|---|---|---|---|")
    goal_met = True
    for index, (name, buf) in enumerate(shapes(size).items()):
        result = measure(buf, runs)
        base = result["baseline"]
        native = result.get("native")
        native_text = f"{native * 1e3:.1f} ms" if native is not None else "n/a"
        native_ratio = f"{native / base:.1f}x" if native is not None else "n/a"
        print(f"| {name} | {native_text} | {result['python'] * 1e3:.1f} ms | {base * 1e3:.2f} ms "
              f"| {native_ratio} | {result['python'] / base:.1f}x |")
        if index == 0 and native is not None:
            goal_met = native < GOAL_NATIVE_S
    if options.smoke or _proc_group is None:
        return 0
    print(f"goal: native < {GOAL_NATIVE_S * 1e3:.0f} ms on the progress-bar buffer: "
          f"{'met' if goal_met else 'NOT met'}")
    return 0 if goal_met else 1


if __name__ == "__main__":
    sys.exit(main())
