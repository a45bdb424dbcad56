"""Evidence a person can act on: failing ids in decisions, JSON and alerts; live progress on a TTY."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from gitrepo import make_repo
from retest.merge_gate import GateMetrics, retest_branch
from retest.progress import Progress, format_elapsed

PY = sys.executable

MANY_FAILING = textwrap.dedent("""\
    import pytest


    @pytest.mark.parametrize("i", range(40))
    def test_case(i):
        assert i % 4, f"case {i} is wrong"
""")


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RETEST_", "PYTEST_"))}
    env.update(PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


def test_every_failing_id_reaches_the_decision_and_the_alert(tmp_path: Path) -> None:
    """Ten failures among forty tests: all named, though the output tail cannot hold them."""
    repo = make_repo(tmp_path)
    repo.branch("many", {"tests/test_many.py": MANY_FAILING})
    alerts: list[dict[str, Any]] = []
    decision = retest_branch(repo.path, "many", env=repo.env, metrics=GateMetrics(), timeout=120,
                             alert_hook=alerts.append)
    assert (decision.action, decision.rule) == ("rollback", "red.tests-failed")
    tests = decision.evidence["tests"]
    expected = sorted(f"tests/test_many.py::test_case[{i}]" for i in range(0, 40, 4))
    assert sorted(f["nodeid"] for f in tests["failures"]) == expected
    assert tests["failure_count"] == 10 and tests["counts"]["passed"] == 31
    assert "and 7 more" in decision.reason
    assert alerts == []  # a rollback sends no alert


def test_the_alert_of_a_hold_carries_the_tests(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    repo.branch("sleepy", {"tests/test_slow.py": "import time\n\ndef test_slow():\n    time.sleep(60)\n"})
    alerts: list[dict[str, Any]] = []
    env = dict(repo.env, MERGE_GATE_INFRA_RETRY_MAX="0")
    decision = retest_branch(repo.path, "sleepy", env=env, metrics=GateMetrics(), timeout=4,
                             alert_hook=alerts.append)
    assert (decision.action, decision.verdict) == ("hold", "timeout")
    assert len(alerts) == 1
    tests = alerts[0]["tests"]
    assert [r["nodeid"] for r in tests["running"]] == ["tests/test_slow.py::test_slow"]
    assert tests["running"][0]["running_s"] >= 1.0
    assert tests["collected"] == 2 and tests["done"] == 1
    assert "tests/test_slow.py::test_slow" in decision.reason
    assert alerts[0]["tree"] == "proven"


def test_retest_run_json_has_the_tests(tmp_path: Path) -> None:
    (tmp_path / "test_a.py").write_text(MANY_FAILING)
    done = subprocess.run([PY, "-m", "retest", "run", "--json", "--", PY, "-m", "pytest", "-q",
                           "-p", "no:cacheprovider"], cwd=tmp_path, env=cli_env(),
                          capture_output=True, timeout=120)
    doc = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert (doc["verdict"], doc["rule"], doc["evidence"]) == ("red", "red.tests-failed", "events")
    assert doc["tests"]["failure_count"] == 10
    assert len(doc["tests"]["failures"]) == 10


def _read_pty(fd: int, proc: subprocess.Popen[bytes], limit_s: float = 120) -> bytes:
    out = b""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    return out


def test_progress_is_drawn_on_a_terminal_and_not_in_a_pipe(tmp_path: Path) -> None:
    suite = "import time\nimport pytest\n\n@pytest.mark.parametrize('i', range(6))\n" \
            "def test_t(i):\n    time.sleep(0.3)\n    assert i != 3\n"
    (tmp_path / "test_p.py").write_text(suite)
    argv = [PY, "-m", "retest", "run", "--", PY, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(argv, cwd=tmp_path, env=cli_env(TERM="xterm"), stdout=subprocess.DEVNULL,
                                stderr=slave, stdin=subprocess.DEVNULL)
        os.close(slave)
        seen = _read_pty(master, proc)
        proc.wait(timeout=60)
    finally:
        os.close(master)
    text = seen.decode("utf-8", "replace")
    assert "[retest] " in text and "/6 done" in text and "1 failed" in text
    assert "\x1b[K" in text
    last = text.rstrip().splitlines()[-1].split("\x1b[K")[-1]
    assert last.startswith("retest: red (red.tests-failed)")
    piped = subprocess.run(argv, cwd=tmp_path, env=cli_env(), capture_output=True, timeout=120)
    assert b"[retest] " not in piped.stderr and b"\x1b[K" not in piped.stderr


def test_progress_line_reads_as_a_person_expects() -> None:
    now = [100.0]
    live = Progress(open(os.devnull, "w"), clock=lambda: now[0])
    live.on_event({"ev": "collected", "count": 20})
    live.on_event({"ev": "test_start", "worker": "gw0", "nodeid": "t.py::slow"})
    live.on_event({"ev": "test_start", "worker": "gw1", "nodeid": "t.py::b"})
    live.on_event({"ev": "report", "worker": "gw1", "nodeid": "t.py::b", "when": "call",
                   "outcome": "failed"})
    now[0] = 172.0
    assert live.line() == "[retest] 1/20 done, 1 failed, running t.py::slow (1m12s), 1m12s"
    assert format_elapsed(3725) == "1h02m"
