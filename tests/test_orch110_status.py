"""ORCH-110 regression case TC-10: counters and the read-only ``merge_gate`` block of ``GET /queue``.

Real gate decisions (in this process and in a separate ``retest gate`` process) are recorded
in one ledger; a real ``retest serve`` process then answers over a real socket. The test reads
the HTTP bodies and checks them against the decisions and against the raw ledger rows, and
checks that the endpoint is read-only (other methods are refused and nothing in the ledger
changes).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from gitrepo import FAILING_TEST, Repo, make_repo, sleeping_test
from orch110_helpers import PY, counters, gate, ledger_rows, with_env
from retest import proc_group
from test_status_server import fetch, serving  # reuse: start `retest serve` as a real process

SECRET = "orch110-secret-token-must-not-leak"


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    return make_repo(tmp_path)


def ledger_state(env: dict[str, str]) -> tuple[object, ...]:
    return (ledger_rows(env, "counters"), ledger_rows(env, "decisions"), ledger_rows(env, "runs"),
            ledger_rows(env, "infra_attempts"), ledger_rows(env, "alerts"))


def test_tc10_queue_block_and_metrics_over_a_real_socket(repo: Repo, tmp_path: Path) -> None:
    """TC-10: five kinds of decisions from two processes, served read-only by a third."""
    validated = repo.branch("feature", {"feature.py": "VALUE = 1\n"})
    repo.branch("broken", {"tests/test_broken.py": FAILING_TEST})
    repo.branch("slow", {"tests/test_slow.py": sleeping_test(60)})
    env = with_env(repo.env, RETEST_SECRET_TOKEN=SECRET,
                   MERGE_GATE_ALERT_COMMAND=f"{PY} -c pass --token={SECRET}")

    merged = gate(repo, "feature", env=env, task_id="T-merge")
    # The red one is decided by a separate `retest gate` process, into the same ledger.
    cli = proc_group.run([sys.executable, "-m", "retest", "gate", "--repo", str(repo.path), "--branch",
                          "broken", "--task", "T-red", "--json"], env=env, cwd=repo.path, timeout=60)
    assert cli.returncode == 1, cli.stderr
    rolled = json.loads(cli.stdout)
    requeued = gate(repo, "slow", env=env, task_id="T-slow", timeout=1.0)
    held = gate(repo, "feature", env=env, task_id="T-hold", command=["retest-no-such-command-orch110"])
    skipped = gate(repo, "feature", env=env, task_id="T-skip", validated_sha=validated)
    assert [merged.action, rolled["action"], requeued.action, held.action, skipped.action] == \
        ["merge", "rollback", "requeue", "hold", "skip-merge"]
    assert requeued.processes_killed >= 1 and held.alert

    expected = {
        "decisions": 5, "retests_run": 3, "retests_skipped": 1,
        "merges": 2, "rollbacks": 1, "requeues": 1, "holds": 1, "alerts": 1,
        "processes_killed": requeued.processes_killed,
        "verdict_passed": 1, "verdict_red": 1, "verdict_timeout": 1, "verdict_other": 1,
        "verdict_lock_busy": 0, "verdict_conflict": 0,
    }
    assert {k: counters(env).get(k, 0) for k in expected} == expected  # the raw ledger agrees
    state = ledger_state(env)

    with serving(env, tmp_path) as base:
        code, headers, body = fetch(base + "/queue")
        assert code == 200 and headers["Content-Type"] == "application/json"
        block = json.loads(body)["merge_gate"]
        assert block["enabled"] is True and block["source"] == "ledger"
        assert block["counters"] == expected
        recent = block["recent"]
        assert [d["action"] for d in recent] == ["skip-merge", "hold", "requeue", "rollback", "merge"]
        assert [d["task_id"] for d in recent] == ["T-skip", "T-hold", "T-slow", "T-red", "T-merge"]
        assert [d["stage"] for d in recent] == ["main", "deploy-staging", "deploy-staging", "development", "main"]
        by_task = {d["task_id"]: d for d in recent}
        assert by_task["T-skip"]["proof"] == skipped.proof
        assert by_task["T-slow"]["infra_attempt"] == 1 and by_task["T-slow"]["next_attempt_at"]
        assert by_task["T-slow"]["evidence"]["timed_out"] is True
        assert by_task["T-hold"]["alert"] is True and by_task["T-hold"]["rule"] == "other.spawn-error"
        assert by_task["T-red"]["sha"] == rolled["sha"] and by_task["T-merge"]["sha"] == merged.sha
        assert all("output_tail" not in d["evidence"] for d in recent)
        settings = block["settings"]
        assert settings["retest_timeout_s"] == 900.0 and settings["infra_retry_max"] == 3
        assert settings["other_action"] == "hold"
        assert all(settings[k] is True for k in ("classify_enabled", "infra_retry_enabled",
                                                  "skip_when_current_enabled", "metrics_enabled",
                                                  "tree_kill_enabled"))
        # No environment values: not the secret, not the alert command, not the ledger path.
        for leak in (SECRET.encode(), b"--token", env["RETEST_LEDGER_PATH"].encode()):
            assert leak not in body

        code, headers, body = fetch(base + "/metrics")
        assert code == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = body.decode()
        for line in ("retest_merge_gate_metrics_enabled 1", "retest_merge_gate_decisions_total 5",
                     "retest_merge_gate_retests_total 3", "retest_merge_gate_retests_skipped_total 1",
                     "retest_merge_gate_requeues_total 1", "retest_merge_gate_holds_total 1",
                     "retest_merge_gate_rollbacks_total 1", "retest_merge_gate_merges_total 2",
                     "retest_merge_gate_alerts_total 1",
                     f"retest_merge_gate_processes_killed_total {requeued.processes_killed}",
                     'retest_merge_gate_verdicts_total{verdict="timeout"} 1',
                     'retest_merge_gate_verdicts_total{verdict="lock-busy"} 0'):
            assert line + "\n" in text, line
        assert SECRET not in text

        # Read-only: every other method is refused, and nothing in the ledger changed.
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            code, headers, body = fetch(base + "/queue", method=method)
            assert code == 405, method
            assert headers["Allow"] == "GET, HEAD"
            assert json.loads(body) == {"error": "method not allowed"}
        code, _, body = fetch(base + "/queue", method="HEAD")
        assert code == 200 and body == b""
        code, _, body = fetch(base + "/queue")
        assert json.loads(body)["merge_gate"]["counters"] == expected
    assert ledger_state(env) == state
