"""Issue 13.3: ``retest serve`` under a dashboard's scrape load, slow clients and a bad ledger."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

from gitrepo import gate_env
from retest import config, status
from retest.ledger import Ledger

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import status_load  # noqa: E402  (bench/status_load.py: the load generator)

SECRET = "hunter2-do-not-leak"


@contextmanager
def in_process(tmp_path: Path, ledger: Ledger | None = None, **extra: str) -> Iterator[tuple[str, int]]:
    env = gate_env(tmp_path / "home", **extra)
    settings = config.GateSettings.from_env(env)
    ledger = ledger or Ledger(env["RETEST_LEDGER_PATH"], busy_timeout_s=1)
    server = status.make_server("127.0.0.1", 0, ledger=ledger, settings=settings)
    worker = threading.Thread(target=server.serve_forever)
    worker.start()
    try:
        yield server.server_address[0], server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        worker.join(10)
        assert not worker.is_alive()


def exchange(address: tuple[str, int], payload: bytes, timeout: float = 10) -> tuple[bytes, float]:
    """Send ``payload``, read until the server closes; the answer and how long it took."""
    started = time.monotonic()
    with socket.create_connection(address, timeout=timeout) as conn:
        conn.sendall(payload)
        chunks = []
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks), time.monotonic() - started


def headers_of(answer: bytes) -> dict[str, str]:
    head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
    return {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in head)}


def test_http_1_0_keep_alive_gets_one_response_and_the_connection_closes(tmp_path: Path) -> None:
    with in_process(tmp_path) as address:
        for request in (b"GET /metrics HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
                        b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
                        b"GET /queue HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"):
            answer, took = exchange(address, request)
            assert answer.startswith(b"HTTP/1.1 200 ")
            assert headers_of(answer)["connection"] == "close"
            assert took < 2.0, (request, took)  # not held for a second request


def test_the_whole_request_head_has_a_deadline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(status, "HEAD_DEADLINE_S", 1.0)
    with in_process(tmp_path) as address:
        started = time.monotonic()
        with socket.create_connection(address, timeout=10) as conn:
            closed = False
            for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\n":  # one byte every 0.2 s
                try:
                    conn.sendall(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
                time.sleep(0.2)
                conn.setblocking(False)
                try:
                    if conn.recv(1) == b"":
                        closed = True
                        break
                except BlockingIOError:
                    pass
                except ConnectionResetError:
                    closed = True
                    break
                finally:
                    conn.setblocking(True)
        assert closed, "a trickling client kept its connection past the head deadline"
        assert time.monotonic() - started < 2.5


def test_connections_past_the_cap_are_refused_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(status, "MAX_CONNECTIONS", 3)
    with in_process(tmp_path) as address:
        idle = [socket.create_connection(address, timeout=10) for _ in range(3)]
        try:
            time.sleep(0.2)
            answer, took = exchange(address, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 503 ") and took < 2.0
        finally:
            for conn in idle:
                conn.close()
        time.sleep(0.2)
        answer, _ = exchange(address, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 ")


def test_metrics_is_503_when_the_ledger_cannot_be_read(tmp_path: Path) -> None:
    broken = tmp_path / "not-a-ledger.sqlite3"
    broken.write_bytes(b"this is not a database" * 100)
    with in_process(tmp_path, Ledger(str(broken), busy_timeout_s=0.5)) as address:
        answer, _ = exchange(address, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503 ")
        assert b"retest_merge_gate_decisions_total" not in answer  # no zeros: no counter reset
        answer, _ = exchange(address, b"GET /queue HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503 ")
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["merge_gate"]["error"] == "ledger unavailable"
        # The pages (issue 16) say so too, never an empty queue with a 200.
        answer, _ = exchange(address, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503 ") and b"The ledger cannot be read" in answer
        answer, _ = exchange(address, b"GET /decision/1.json HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503 ")


class CountingLedger(Ledger):
    def __init__(self, path: str) -> None:
        super().__init__(path, busy_timeout_s=1)
        self.calls: list[str] = []

    def totals(self) -> dict[str, int]:
        self.calls.append("totals")
        return super().totals()

    def recent_decisions(self, limit: int) -> list[dict[str, Any]]:
        self.calls.append("recent_decisions")
        return super().recent_decisions(limit)


def test_metrics_reads_only_the_counters(tmp_path: Path) -> None:
    ledger = CountingLedger(str(tmp_path / "ledger.sqlite3"))
    ledger.record_decision({"action": "merge"}, {"decisions": 1, "merges": 1})
    with in_process(tmp_path, ledger) as address:
        answer, _ = exchange(address, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"retest_merge_gate_merges_total 1\n" in answer
        assert ledger.calls == ["totals"]
        head, _ = exchange(address, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert head.endswith(b"\r\n\r\n")
        assert headers_of(head)["content-length"] == headers_of(answer)["content-length"]


def test_a_read_only_ledger_is_readable(tmp_path: Path) -> None:
    """A valid ledger in a folder this process cannot write (a read-only mount) is served."""
    folder = tmp_path / "ro"
    folder.mkdir()
    path = folder / "ledger.sqlite3"
    Ledger(str(path), busy_timeout_s=1).record_decision({"action": "merge"}, {"decisions": 1, "merges": 1})
    probe = [sys.executable, "-c",
             "import json, sys; from retest.ledger import Ledger; "
             "print(json.dumps(Ledger(sys.argv[1], busy_timeout_s=1).totals()))", str(path)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    if os.geteuid() == 0:  # permissions do not bind root: a read-only bind mount of its own
        unshare = shutil.which("unshare")
        if unshare is None:
            pytest.skip("needs unshare(1) to make a read-only mount as root")
        argv = [unshare, "--mount", "--propagation", "private", "sh", "-c",
                f'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"',
                str(folder), *probe]
    else:
        folder.chmod(0o555)
        argv = probe
    try:
        proc = subprocess.run(argv, env=env, capture_output=True, timeout=60)
    finally:
        folder.chmod(0o755)
    if proc.returncode != 0 and b"mount" in proc.stderr:
        pytest.skip(f"cannot make a read-only mount here: {proc.stderr[-200:]!r}")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"decisions": 1, "merges": 1}


def test_errors_go_through_logging_masked(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETEST_API_TOKEN", SECRET)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"boom {SECRET}")

    monkeypatch.setattr(status.merge_gate, "queue_block", broken)
    with caplog.at_level(logging.INFO, logger="retest.status"), in_process(tmp_path) as address:
        answer, _ = exchange(address, b"GET /queue HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 500 ")
    assert "RuntimeError: boom ***" in caplog.text and SECRET not in caplog.text


def test_clients_that_reset_early_leave_no_traceback(tmp_path: Path) -> None:
    env = gate_env(tmp_path / "home", RETEST_API_TOKEN=SECRET)
    Ledger(env["RETEST_LEDGER_PATH"], busy_timeout_s=1).record_decision(
        {"action": "hold", "reason": "x" * 5000}, {"decisions": 1})
    proc, port, stderr_path = status_load.start_server(Path(env["RETEST_LEDGER_PATH"]), tmp_path)
    try:
        for _ in range(30):
            conn = socket.create_connection(("127.0.0.1", port), timeout=10)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.sendall(b"GET /queue HTTP/1.1\r\nHost: x\r\n\r\n")
            conn.close()  # RST before the answer
        answer, _ = exchange(("127.0.0.1", port), b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert status_load.threads_of(proc.pid) < 10  # no thread per connection
    finally:
        status_load.stop_server(proc)
    assert proc.returncode == 0
    assert "Traceback" not in stderr_path.read_text()


def test_scrape_load_with_slow_clients_holding_connections(tmp_path: Path) -> None:
    """The benchmark's smoke run: every GET answered, none near the head deadline."""
    figures = status_load.measure(requests=400, concurrency=50, slow_clients=100,
                                  ledger_dir=tmp_path, slow_interval_s=0.5)
    assert figures["errors"] == 0, figures
    assert figures["slow_still_open_at_end"] >= 90, figures  # held while the load ran
    assert figures["p99_ms"] < 1000, figures  # the goal (100 ms) is judged by the benchmark
