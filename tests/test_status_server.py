"""``retest serve`` as a real process, queried over a real socket with urllib."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from gitrepo import Repo, gate_env, make_repo
from retest import config, merge_gate, status
from retest.ledger import Ledger
from retest.merge_gate import GateMetrics, retest_branch

SECRET = "hunter2-do-not-leak"


@contextmanager
def serving(env: dict[str, str], tmp_path: Path, *extra: str) -> Iterator[str]:
    """Start ``retest serve --port 0``; yield its base URL; stop and reap it, whatever happens."""
    port_file = tmp_path / "serve.json"
    port_file.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "retest", "serve", "--port", "0", "--port-file", str(port_file), *extra],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while not port_file.exists():
            if proc.poll() is not None:
                raise AssertionError(f"retest serve exited {proc.returncode}: {proc.stderr.read()!r}")
            if time.monotonic() > deadline:
                raise AssertionError("retest serve did not start within 20 s")
            time.sleep(0.02)
        info = json.loads(port_file.read_text())
        assert info["host"] == "127.0.0.1" and info["pid"] == proc.pid
        yield f"http://{info['host']}:{info['port']}"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def fetch(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        body = err.read()
        return err.code, dict(err.headers), body


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    return make_repo(tmp_path)


def test_serve_shows_what_gate_processes_decided(repo: Repo, tmp_path: Path) -> None:
    env = dict(repo.env, RETEST_SECRET_TOKEN=SECRET, ALERT_WEBHOOK_KEY=SECRET)
    repo.branch("feature", {"feature.py": "VALUE = 1\n"})
    decision = retest_branch(repo.path, "feature", env=env, metrics=GateMetrics())
    assert decision.action == "merge"

    with serving(env, tmp_path) as base:
        code, headers, body = fetch(base + "/queue")
        assert code == 200 and headers["Content-Type"] == "application/json"
        block = json.loads(body)["merge_gate"]
        assert block["enabled"] is True and block["source"] == "ledger"
        assert block["counters"]["merges"] == 1 and block["counters"]["retests_run"] == 1
        assert block["recent"][0]["action"] == "merge"
        assert block["recent"][0]["sha"] == decision.sha
        assert SECRET.encode() not in body

        code, headers, body = fetch(base + "/metrics")
        assert code == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = body.decode()
        assert "# TYPE retest_merge_gate_merges_total counter" in text
        assert "retest_merge_gate_merges_total 1\n" in text
        assert 'retest_merge_gate_verdicts_total{verdict="passed"} 1\n' in text
        assert SECRET not in text

        code, _, body = fetch(base + "/queue", method="HEAD")
        assert code == 200 and body == b""

        for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "BREW"):
            code, headers, _ = fetch(base + "/queue", method=method)
            assert code == 405, method
            assert headers["Allow"] == "GET, HEAD"

        for path in ("/nope", "/queue/x", "/../etc/passwd", "/decisions"):
            code, _, body = fetch(base + path)
            assert code == 404, path
            assert SECRET.encode() not in body

        # The pages (issue 16) mask what they show as /queue does.
        code, headers, body = fetch(base + "/")
        assert code == 200 and headers["Content-Type"].startswith("text/html")
        assert SECRET.encode() not in body

        code, _, _ = fetch(base + "/queue?x=1")
        assert code == 200


def test_serve_bounds_requests(repo: Repo, tmp_path: Path) -> None:
    with serving(repo.env, tmp_path) as base:
        host, port = base[len("http://"):].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", "/queue?" + "x" * 10_000)
        assert conn.getresponse().status == 414
        conn.close()

        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", "/queue", body=b"x" * 100)
        assert conn.getresponse().status == 413
        conn.close()

        with socket.create_connection((host, int(port)), timeout=10) as raw:
            raw.sendall(b"GET /queue HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n")
            assert b" 431 " in raw.recv(200).split(b"\r\n")[0] + b" "


def test_serve_with_metrics_off_says_so(repo: Repo, tmp_path: Path) -> None:
    env = dict(repo.env, MERGE_GATE_METRICS_ENABLED="false")
    with serving(env, tmp_path) as base:
        _, _, body = fetch(base + "/queue")
        assert json.loads(body) == {"merge_gate": {"enabled": False}}
        _, _, body = fetch(base + "/metrics")
        assert "retest_merge_gate_metrics_enabled 0" in body.decode()


def test_in_process_server_serves_the_block(tmp_path: Path) -> None:
    env = gate_env(tmp_path / "home")
    settings = config.GateSettings.from_env(env)
    ledger = Ledger(env["RETEST_LEDGER_PATH"], busy_timeout_s=1)
    server = status.make_server("127.0.0.1", 0, ledger=ledger, settings=settings)
    import threading

    worker = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    worker.start()
    try:
        host, port = server.server_address[:2]
        code, _, body = fetch(f"http://{host}:{port}/queue")
        assert code == 200 and json.loads(body)["merge_gate"]["counters"]["decisions"] == 0
    finally:
        server.shutdown()
        server.server_close()
        worker.join(5)


def test_render_metrics_is_valid_exposition_text() -> None:
    block = merge_gate.queue_block(settings=config.GateSettings.from_env({}), metrics=GateMetrics())
    text = status.render_metrics(block)
    assert text.endswith("\n")
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge")
            names.add(name)
        elif not line.startswith("#"):
            metric, value = line.rsplit(" ", 1)
            int(value)
            assert metric.split("{")[0] in names
    assert all(n.endswith("_total") for n in names if n != "retest_merge_gate_metrics_enabled")


def test_serve_refuses_a_port_in_use(repo: Repo, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "retest", "serve", "--port", str(port)],
                              env=repo.env, capture_output=True, timeout=30)
    assert proc.returncode == 125 and b"cannot listen" in proc.stderr
