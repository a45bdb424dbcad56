"""Load on ``retest serve``: a dashboard's scrapes while slow clients hold connections.

Starts ``python -m retest serve`` on a loopback port with a ledger of recorded decisions,
opens ``--slow`` connections that each send one byte of a request head every
``--slow-interval`` seconds (reconnecting when the server drops them, as a real slow client
would), then sends ``--requests`` GETs (``--paths`` in turn: ``/metrics``, ``/queue``, the
queue page ``/`` and a decision's page with its timeline, by default) from
``--concurrency`` concurrent loopback clients, each on a new connection, and reports the
latency of each GET (connect to the last byte), the throughput, the errors, how many slow
clients were dropped and how many held a connection at the end, and the server's threads.

Bounded: everything stops after ``--max-seconds`` (default 120) whatever happens, and the
server is stopped (SIGTERM, then SIGKILL) on every path.

    python3 bench/status_load.py              # the goal: 2,000 GETs, 50 clients, 200 slow
    python3 bench/status_load.py --smoke      # a quick pass for CI
    python3 bench/status_load.py --paths /metrics,/queue   # the mix before the pages (issue 13.3)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GOAL_P99_MS = 100.0
#: The GETs of the mix, in turn: a dashboard's scrapes and a person's pages (issue 16).
DEFAULT_PATHS = ("/metrics", "/queue", "/", "/decision/200")


def make_ledger(path: Path, decisions: int = 200) -> None:
    from retest.ledger import Ledger

    ledger = Ledger(str(path), busy_timeout_s=5)
    # A timeline of an xdist run's size: 400 tests on 2 workers, 120 pressure samples.
    tests = [{"nodeid": f"tests/test_m{i // 20}.py::test_{i}", "worker": f"gw{i % 2}",
              "start_s": i * 0.1, "duration_s": 0.09, "outcome": "passed"} for i in range(400)]
    samples = [{"t": t * 0.5, "cpu_some": 0.2, "busy_cores": 1.5, "tree_cores": 1.2} for t in range(120)]
    timeline = {"version": 1, "duration_s": 41.0, "timeout_s": 60.0, "timed_out": False, "grace_s": 5.0,
                "tests": tests, "workers": ["gw0", "gw1"], "stages": [{"name": "end", "t": 41.0}],
                "pressure": {"samples": samples, "cores": 2, "foreign_share": 0.05},
                "foreign": [], "sweep": {}, "diagnostics": []}
    for i in range(decisions):
        ledger.record_decision(
            {"action": "merge", "stage": "main", "verdict": "passed", "rule": "passed.exit-0",
             "reason": f"exit 0: {i} passed", "task_id": f"T-{i}", "branch": f"feature/{i}",
             "sha": f"{i:040x}", "evidence": {"backend": "native", "returncode": 0}},
            {"decisions": 1, "merges": 1, "retests_run": 1, "verdict_passed": 1}, timeline=timeline)


def start_server(ledger: Path, workdir: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    port_file = workdir / "serve.json"
    stderr_path = workdir / "serve.stderr"
    env = dict(os.environ, RETEST_LEDGER_PATH=str(ledger))
    proc = subprocess.Popen([sys.executable, "-m", "retest", "serve", "--port", "0",
                             "--port-file", str(port_file), "--ledger", str(ledger)],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=open(stderr_path, "wb"))
    deadline = time.monotonic() + 20
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc)
            raise RuntimeError(f"retest serve did not start: {stderr_path.read_text()[-500:]}")
        time.sleep(0.02)
    return proc, int(json.loads(port_file.read_text())["port"]), stderr_path


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def threads_of(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return -1


class SlowClients:
    """``count`` connections trickling a request head, reconnecting when dropped."""

    HEAD = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 4000

    def __init__(self, port: int, count: int, interval_s: float) -> None:
        self.port, self.count, self.interval_s = port, count, interval_s
        self.open = 0
        self.dropped = 0
        #: Seconds each dropped connection was held, connect to the server's close.
        self.held_s: list[float] = []
        self.stop = asyncio.Event()

    async def one(self) -> None:
        while not self.stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(self.interval_s)
                continue
            self.open += 1
            connected = time.monotonic()
            try:
                for byte in self.HEAD:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    try:
                        if await asyncio.wait_for(reader.read(1024), self.interval_s) == b"":
                            break  # the server closed it (or answered and closed)
                    except asyncio.TimeoutError:
                        pass
                    if self.stop.is_set():
                        return
            except OSError:
                pass
            finally:
                self.open -= 1
                writer.close()
            if not self.stop.is_set():
                self.dropped += 1
                self.held_s.append(time.monotonic() - connected)

    async def started(self) -> None:
        deadline = time.monotonic() + 20
        while self.open < self.count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


async def one_get(port: int, path: str) -> tuple[float, bool]:
    started = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        answer = await reader.read()  # to EOF: the server closes after one response
        writer.close()
        ok = answer.startswith(b"HTTP/1.1 200 ")
    except OSError:
        ok = False
    return (time.perf_counter() - started) * 1000.0, ok


async def scrape(port: int, requests: int, concurrency: int,
                 paths: tuple[str, ...] = DEFAULT_PATHS) -> tuple[list[float], int, float]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(paths[i % len(paths)])
    latencies: list[float] = []
    errors = 0

    async def worker() -> None:
        nonlocal errors
        while not queue.empty():
            path = queue.get_nowait()
            took, ok = await one_get(port, path)
            latencies.append(took)
            errors += not ok

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q / 100.0 * len(ordered))) - 1))]


async def _measure(port: int, pid: int, requests: int, concurrency: int, slow_clients: int,
                   slow_interval_s: float, paths: tuple[str, ...]) -> dict[str, Any]:
    slow = SlowClients(port, slow_clients, slow_interval_s)
    tasks = [asyncio.ensure_future(slow.one()) for _ in range(slow_clients)]
    try:
        await slow.started()
        held_before = slow.open
        threads_loaded = threads_of(pid)
        latencies, errors, elapsed = await scrape(port, requests, concurrency, paths)
        held_after = slow.open
        # Then how long the server lets a trickling client hold a connection.
        deadline = time.monotonic() + 30
        while slow.dropped < slow_clients and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    finally:
        slow.stop.set()
        await asyncio.wait(tasks, timeout=slow_interval_s + 5)
        for task in tasks:
            task.cancel()
    return {
        "requests": requests, "concurrency": concurrency, "slow_clients": slow_clients,
        "paths": list(paths),
        "slow_interval_s": slow_interval_s,
        "p50_ms": round(statistics.median(latencies), 2),
        "p90_ms": round(percentile(latencies, 90), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "max_ms": round(max(latencies), 2),
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "errors": errors,
        "slow_open_before": held_before,
        "slow_still_open_at_end": held_after,
        "slow_dropped_after_load": slow.dropped,
        "slow_held_max_s": round(max(slow.held_s), 2) if slow.held_s else None,
        "server_threads": threads_loaded,
    }


def measure(requests: int = 2000, concurrency: int = 50, slow_clients: int = 200, *,
            ledger_dir: Path | None = None, slow_interval_s: float = 5.0,
            max_seconds: float = 120.0, paths: tuple[str, ...] = DEFAULT_PATHS) -> dict[str, Any]:
    """Run the load once against a fresh server; return the figures (see the module doc)."""
    with tempfile.TemporaryDirectory(prefix="retest-status-load-") as scratch:
        workdir = Path(ledger_dir or scratch)
        ledger = workdir / "ledger.sqlite3"
        make_ledger(ledger)
        proc, port, stderr_path = start_server(ledger, workdir)
        try:
            figures = asyncio.run(asyncio.wait_for(
                _measure(port, proc.pid, requests, concurrency, slow_clients, slow_interval_s, paths),
                max_seconds))
        finally:
            stop_server(proc)
        stderr = stderr_path.read_text(errors="replace")
        figures["server_tracebacks"] = stderr.count("Traceback")
        return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a quick pass (200 GETs, 20 slow)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--slow", type=int, default=200)
    parser.add_argument("--slow-interval", type=float, default=5.0)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument("--paths", default=",".join(DEFAULT_PATHS),
                        help="the GETs of the mix, comma-separated, in turn (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.requests, args.concurrency, args.slow, args.slow_interval = 200, 20, 20, 1.0
    paths = tuple(p for p in args.paths.split(",") if p)
    figures = measure(args.requests, args.concurrency, args.slow, slow_interval_s=args.slow_interval,
                      max_seconds=args.max_seconds, paths=paths)
    print(json.dumps(figures, sort_keys=True))
    met = figures["errors"] == 0 and figures["p99_ms"] < GOAL_P99_MS
    print(f"| {' '.join(paths)} | {figures['requests']} GETs, {figures['concurrency']} clients, "
          f"{figures['slow_clients']} slow | p50 {figures['p50_ms']} ms | p99 {figures['p99_ms']} ms "
          f"| max {figures['max_ms']} ms | {figures['requests_per_s']} req/s | errors "
          f"{figures['errors']} | slow held {figures['slow_still_open_at_end']}/"
          f"{figures['slow_clients']}, each dropped after {figures['slow_held_max_s']} s at most | threads "
          f"{figures['server_threads']} | goal p99 < {GOAL_P99_MS:g} ms: {'yes' if met else 'no'} |")
    return 0 if args.smoke or met else 1


if __name__ == "__main__":
    sys.exit(main())
