#!/usr/bin/env python3
"""What one exec of a helper costs per run, by libc (issue 15, items 1 and 5).

Usage::

    python bench/shepherd_start.py                 # 1000 spawns per variant, a markdown table
    python bench/shepherd_start.py --smoke         # a few spawns (CI: keeps it from rotting)

Each variant is ``os.posix_spawn`` + ``waitpid`` of one program, alternated in one loop (A, B,
C, A, B, C...) so the machine's noise hits each alike; medians with [min-max]:

* ``/bin/true``: the floor of the runner benchmarks (a dynamic glibc program);
* the installed shepherd, run without its control socket: it exits 125 right after its
  start-up, so this is what the shepherd's own start costs each run;
* trivial programs (``int main(void) { return 0; }``) linked statically against glibc, musl
  (when ``musl-gcc`` is installed) and no libc at all, built here with ``cc``: what the
  libc's start-up alone costs.

A long-lived helper (a "zygote") would save at most the shepherd's start per run; this is the
figure bench/results.md weighs against its inherited-state risks.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
try:
    import retest  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO / "python"))
from retest import proc_group  # noqa: E402

TRIVIAL_C = "int main(void) { return 0; }\n"
NOLIBC_C = ("void _start(void) { __asm__ volatile(\"mov $60, %eax; xor %edi, %edi; syscall\"); }\n"
            if os.uname().machine == "x86_64" else None)


def build(tmp: Path) -> dict[str, list[str]]:
    """The programs to spawn: name -> argv (trivial ones only where they can be built)."""
    proc_group._load_native()
    programs = {"/bin/true (floor)": ["/bin/true"]}
    if proc_group._shepherd_path:
        programs["installed shepherd (exits 125)"] = [proc_group._shepherd_path]
    src = tmp / "trivial.c"
    src.write_text(TRIVIAL_C)
    compilers = [("static glibc", shutil.which("cc"), [src]), ("static musl", shutil.which("musl-gcc"), [src])]
    if NOLIBC_C:
        (tmp / "nolibc.c").write_text(NOLIBC_C)
        compilers.append(("no libc", shutil.which("cc"), [tmp / "nolibc.c"]))
    for name, cc, sources in compilers:
        if not cc:
            continue
        out = tmp / name.replace(" ", "_")
        extra = ["-nostdlib", "-ffreestanding"] if name == "no libc" else []
        done = subprocess.run([cc, "-O2", "-static", *extra, "-o", str(out), *map(str, sources)],
                              capture_output=True)
        if done.returncode == 0:
            programs[f"trivial, {name}"] = [str(out)]
    return programs


def spawn_ns(argv: list[str]) -> int:
    t0 = time.perf_counter_ns()
    pid = os.posix_spawn(argv[0], argv, {})
    os.waitpid(pid, 0)
    return time.perf_counter_ns() - t0


def measure(programs: dict[str, list[str]], iterations: int) -> dict[str, list[int]]:
    names = list(programs)
    times: dict[str, list[int]] = {n: [] for n in names}
    for i in range(iterations):
        for k in range(len(names)):  # rotate the first variant every iteration
            name = names[(i + k) % len(names)]
            times[name].append(spawn_ns(programs[name]))
    return times


def table(times: dict[str, list[int]]) -> str:
    floor = statistics.median(times["/bin/true (floor)"])
    lines = ["| program | median [min–max] | / floor |", "|---|---|---|"]
    for name, ns in times.items():
        med = statistics.median(ns)
        lines.append(f"| {name} | {med / 1000:,.0f} µs [{min(ns) / 1000:,.0f}–{max(ns) / 1000:,.0f}] "
                     f"| {med / floor:.2f}x |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few spawns (CI)")
    parser.add_argument("--iterations", type=int, default=1000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        programs = build(Path(tmp))
        iterations = 20 if args.smoke else args.iterations
        measure(programs, max(2, iterations // 10))  # warm-up
        times = measure(programs, iterations)
    print(f"## Helper start-up by libc ({iterations} spawns each, {os.uname().release}, "
          f"nproc {os.cpu_count()})\n")
    print(table(times))
    return 0


if __name__ == "__main__":
    sys.exit(main())
