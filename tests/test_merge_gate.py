"""The merge gate on real git repositories with real pytest suites (issue 3).

Each test builds a repository in ``tmp_path`` (``tests/gitrepo.py``), runs ``retest_branch``
on it and asserts what happened: the decision, the ledger's rows, the user's checkout, and
(through the autouse guard) that no process was left behind. Deadlines are scaled down
(1 s suites, 0.5 s grace), never the logic.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import descendants, pid_alive
from gitrepo import FAILING_TEST, Repo, make_repo, sleeping_test
from retest import config, gitops, merge_gate, proc_group
from retest.ledger import Ledger
from retest.merge_gate import GateDecision, GateMetrics, retest_branch

REPO_ROOT = Path(__file__).resolve().parents[1]
SUITE_TIMEOUT = 1.0


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    return make_repo(tmp_path)


def gate(repo: Repo, branch: str, *, env: dict[str, str] | None = None, **kw: Any) -> GateDecision:
    """``retest_branch`` with the repository's deterministic environment and own counters."""
    kw.setdefault("metrics", GateMetrics())
    return retest_branch(repo.path, branch, env=env or repo.env, **kw)


def with_env(repo: Repo, **extra: str) -> dict[str, str]:
    env = dict(repo.env)
    env.update(extra)
    return env


def ledger_of(env: dict[str, str]) -> Ledger:
    return Ledger(env["RETEST_LEDGER_PATH"], busy_timeout_s=2)


def assert_no_gate_worktree(repo: Repo, decision: GateDecision) -> None:
    """No temporary worktree is left; the kept one (issue 12) is consistent: no rebase in progress."""
    assert repo.gate_worktrees() == []
    path = decision.evidence.get("worktree")
    if path and gitops.KEPT_WORKTREE_PREFIX not in path:
        assert not os.path.exists(os.path.dirname(path))
    elif path and os.path.exists(path):
        kept = gitops.KeptWorktree(str(repo.path), str(repo.path / ".git"), repo.env, 30,
                                   os.path.dirname(os.path.dirname(path)))
        assert kept.suspect() is None


# --------------------------------------------------------------------------- the routing table


def test_passing_branch_merges_and_leaves_the_checkout_alone(repo: Repo) -> None:
    sha = repo.branch("feature", {"calc_extra.py": "def double(x):\n    return 2 * x\n"})
    repo.write({"scratch.txt": "uncommitted work\n"})  # the user's untracked file stays put
    before = repo.snapshot()

    decision = gate(repo, "feature", task_id="T-1")

    assert (decision.action, decision.stage, decision.verdict) == ("merge", "main", "passed")
    assert decision.rule == "passed.exit-0"
    assert "1 passed" in decision.reason
    assert decision.sha == sha and decision.task_id == "T-1" and decision.attempt == 1
    assert not decision.alert and not decision.skipped and decision.proof is None
    assert decision.evidence["suite_ran"] is True
    assert decision.evidence["backend"] == proc_group.backend_status(repo.env)[0]
    assert repo.snapshot() == before
    assert_no_gate_worktree(repo, decision)
    doc = json.loads(json.dumps(decision.to_dict()))
    assert {"action", "verdict", "attempt", "alert", "skipped", "reason", "next_attempt_at"} <= set(doc)


def test_failing_test_rolls_back_with_the_pytest_summary(repo: Repo) -> None:
    repo.branch("broken", {"tests/test_broken.py": FAILING_TEST})
    before = repo.snapshot()

    decision = gate(repo, "broken")

    assert (decision.action, decision.stage, decision.verdict) == ("rollback", "development", "red")
    assert decision.rule == "red.tests-failed"
    assert "1 failed, 1 passed" in decision.reason
    assert "assert 4 == 5" in decision.evidence["output_tail"]
    assert not decision.alert
    assert repo.snapshot() == before


def test_timeout_requeues_within_the_budget_then_holds_with_exactly_one_alert(repo: Repo) -> None:
    sha = repo.branch("slow", {"tests/test_slow.py": sleeping_test(60)})
    env = with_env(repo, MERGE_GATE_INFRA_RETRY_MAX="2")
    alerts: list[dict[str, Any]] = []
    before = repo.snapshot()

    decisions = [gate(repo, "slow", env=env, task_id="T-9", timeout=SUITE_TIMEOUT,
                      alert_hook=alerts.append) for _ in range(4)]

    assert [d.action for d in decisions] == ["requeue", "requeue", "hold", "hold"]
    assert {d.stage for d in decisions} == {"deploy-staging"}
    assert {d.verdict for d in decisions} == {"timeout"}
    assert {d.rule for d in decisions} <= {"timeout.deadline", "timeout.hung", "timeout.starved"}
    assert [d.alert for d in decisions] == [False, False, True, False]
    assert [d.attempt for d in decisions] == [1, 2, 3, 4]
    assert [d.infra_attempt for d in decisions] == [1, 2, 3, 4]
    # Backoff: 1 s then 2 s after each requeue; a hold has no next attempt.
    first, second = decisions[0], decisions[1]
    assert first.next_attempt_at is not None and second.next_attempt_at is not None
    assert 0.5 < first.next_attempt_at - first.decided_at <= 1.5
    assert 1.5 < second.next_attempt_at - second.decided_at <= 2.5
    assert decisions[2].next_attempt_at is None
    assert all(d.evidence["timed_out"] for d in decisions)
    # Exactly one alert: one hook call, one ledger row, for (task, sha, verdict).
    assert len(alerts) == 1
    assert (alerts[0]["task_id"], alerts[0]["sha"], alerts[0]["verdict"]) == ("T-9", sha, "timeout")
    # Issue 11: the alert and the decision's evidence carry the machine's load during the run.
    # the samples are the decision's timeline (retest serve draws it), not its evidence
    assert "samples" not in decisions[2].evidence["pressure"]
    assert alerts[0]["pressure"] == decisions[2].evidence["pressure"]
    assert alerts[0]["pressure"]["cores"] >= 1 and "foreign" in alerts[0]["pressure"]
    rows = ledger_of(env).alerts("T-9")
    assert [(r["task"], r["sha"], r["verdict"]) for r in rows] == [("T-9", sha, "timeout")]
    # Nothing of the suites is left, and the checkout never moved.
    assert not [p for p in descendants() if pid_alive(p)]
    assert repo.snapshot() == before


def test_merge_conflict_rolls_back_and_leaves_no_rebase_behind(repo: Repo) -> None:
    repo.branch("conflicting", {"calc.py": "def add(a, b):\n    return b + a\n"})
    repo.commit({"calc.py": "def add(a, b):\n    return a + b + 0\n"}, "main changes add too")
    before = repo.snapshot()

    decision = gate(repo, "conflicting")

    assert (decision.action, decision.stage, decision.verdict) == ("rollback", "development", "conflict")
    assert decision.rule == "conflict.rebase"
    assert "calc.py" in decision.reason
    assert "suite_ran" not in decision.evidence
    assert repo.snapshot() == before
    assert not (repo.path / ".git" / "rebase-merge").exists()
    assert_no_gate_worktree(repo, decision)


def test_rebase_onto_a_moved_main_tests_the_rebased_commit(repo: Repo) -> None:
    sha = repo.branch("feature", {"feature.py": "VALUE = 1\n"})
    main_sha = repo.commit({"other.py": "OTHER = 2\n"}, "main moves on")

    decision = gate(repo, "feature")

    assert decision.action == "merge"
    assert decision.onto_sha == main_sha
    assert decision.tested_sha not in (None, sha, main_sha)
    assert repo.head("feature") == sha  # the user's branch was not rebased


def test_other_verdict_holds_with_one_alert_and_is_never_retried(repo: Repo) -> None:
    repo.branch("feature", {"feature.py": "VALUE = 1\n"})
    command = ["retest-no-such-command-xyz"]

    first = gate(repo, "feature", command=command)
    second = gate(repo, "feature", command=command)

    assert (first.action, first.stage, first.verdict, first.rule) == \
        ("hold", "deploy-staging", "other", "other.spawn-error")
    assert first.alert and not second.alert
    assert second.action == "hold" and second.next_attempt_at is None
    assert len(ledger_of(repo.env).alerts()) == 1


def test_other_action_setting_restores_the_rollback(repo: Repo) -> None:
    repo.branch("feature", {"feature.py": "VALUE = 1\n"})
    env = with_env(repo, MERGE_GATE_OTHER_ACTION="rollback")

    decision = gate(repo, "feature", env=env, command=["retest-no-such-command-xyz"])

    assert (decision.action, decision.stage, decision.verdict) == ("rollback", "development", "other")
    assert not decision.alert


def test_no_tests_collected_is_other_not_red(repo: Repo) -> None:
    repo.branch("feature", {"feature.py": "VALUE = 1\n"})

    decision = gate(repo, "feature", command=[sys.executable, "-m", "pytest", "-q", "-k", "nothing_matches"])

    assert decision.verdict == "other" and decision.action == "hold"


# --------------------------------------------------------------------------- locks


def test_gate_lock_held_is_lock_busy_and_requeues(repo: Repo) -> None:
    repo.branch("feature", {"feature.py": "VALUE = 1\n"})
    lock = gitops.GateLock(str(repo.path / ".git"))
    assert lock.acquire(0)
    try:
        started = time.monotonic()
        decision = gate(repo, "feature", env=with_env(repo, MERGE_GATE_LOCK_WAIT_S="0.3"))
        waited = time.monotonic() - started
    finally:
        lock.release()

    assert (decision.action, decision.stage, decision.verdict) == ("requeue", "deploy-staging", "lock-busy")
    assert decision.rule == "lock-busy.gate-lock"
    assert proc_group.LOCK_BUSY_MESSAGE in decision.reason
    # Issue 11: the holder is named (this test process holds the flock).
    assert f"is held by pid {os.getpid()} " in decision.reason
    assert decision.evidence["lock"]["pid"] == os.getpid()
    assert decision.infra and decision.infra_attempt == 1
    assert 0.3 <= waited < 5
    assert "suite_ran" not in decision.evidence


def test_a_second_gate_on_the_same_repository_waits_then_reports_lock_busy(repo: Repo) -> None:
    repo.branch("slowish", {"tests/test_slowish.py": sleeping_test(2.5)})
    repo.branch("feature", {"feature.py": "VALUE = 1\n"})
    results: dict[str, GateDecision] = {}
    first = threading.Thread(target=lambda: results.__setitem__("first", gate(repo, "slowish", timeout=30)))
    first.start()
    try:
        probe = gitops.GateLock(str(repo.path / ".git"))

        def held() -> bool:
            if probe.acquire(0):
                probe.release()
                return False
            return True

        deadline = time.monotonic() + 10
        while not held() and time.monotonic() < deadline:
            time.sleep(0.02)
        second = gate(repo, "feature", env=with_env(repo, MERGE_GATE_LOCK_WAIT_S="0.2"))
    finally:
        first.join(60)
    assert second.verdict == "lock-busy" and second.action == "requeue"
    assert results["first"].action == "merge"


def test_a_locked_ledger_holds_instead_of_crashing(repo: Repo) -> None:
    repo.branch("slow", {"tests/test_slow.py": sleeping_test(60)})
    env = with_env(repo, RETEST_LEDGER_BUSY_TIMEOUT_S="0.2")
    ledger_of(env).totals()  # create the file and its schema
    blocker = sqlite3.connect(env["RETEST_LEDGER_PATH"], isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        decision = gate(repo, "slow", env=env, timeout=SUITE_TIMEOUT)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()

    assert (decision.action, decision.stage) == ("hold", "deploy-staging")
    assert (decision.verdict, decision.rule) == ("lock-busy", "lock-busy.sqlite")
    assert "database is locked" in decision.reason
    assert decision.alert


# --------------------------------------------------------------------------- skip when current


def test_skip_only_with_proof_and_the_proof_is_recorded(repo: Repo) -> None:
    # The branch's suite fails: if the gate skipped without cause, it would merge red code.
    sha = repo.branch("validated", {"tests/test_broken.py": FAILING_TEST})
    main_sha = repo.head("main")

    decision = gate(repo, "validated", validated_sha=sha)

    assert (decision.action, decision.stage, decision.verdict) == ("skip-merge", "main", "passed")
    assert decision.skipped and decision.rule == "passed.skip-when-current"
    assert decision.proof == {"branch_head": sha, "onto_tip": main_sha, "merge_base": main_sha,
                              "validated_sha": sha, "rebased_head": sha}
    assert "suite_ran" not in decision.evidence


@pytest.mark.parametrize("doubt", ["no-sha", "other-sha", "short-sha", "main-moved", "garbage"])
def test_any_doubt_runs_the_retest(repo: Repo, doubt: str) -> None:
    sha = repo.branch("validated", {"tests/test_broken.py": FAILING_TEST})
    validated: str | None = {
        "no-sha": None,
        "other-sha": repo.head("main"),
        "short-sha": sha[:12],
        "main-moved": sha,
        "garbage": "--upload-pack=touch /tmp/x",
    }[doubt]
    if doubt == "main-moved":
        repo.commit({"other.py": "OTHER = 2\n"}, "main moves on")

    decision = gate(repo, "validated", validated_sha=validated)

    assert not decision.skipped and decision.proof is None
    assert decision.evidence["suite_ran"] is True
    assert decision.evidence["skip"]
    assert (decision.action, decision.verdict) == ("rollback", "red")


# --------------------------------------------------------------------------- kill-switches


def test_switch_tree_kill_off_takes_the_subprocess_path(repo: Repo) -> None:
    repo.branch("slow", {"tests/test_slow.py": sleeping_test(60)})
    env = with_env(repo, SUBPROCESS_TREE_KILL_ENABLED="false")

    decision = gate(repo, "slow", env=env, timeout=SUITE_TIMEOUT)

    assert decision.evidence["backend"] == "subprocess"
    # The other switches are still on: the timeout is still infra and still requeued.
    assert (decision.verdict, decision.action) == ("timeout", "requeue")


def test_switch_classify_off_makes_every_failure_red(repo: Repo) -> None:
    repo.branch("slow", {"tests/test_slow.py": sleeping_test(60)})
    env = with_env(repo, MERGE_GATE_CLASSIFY_ENABLED="false")

    decision = gate(repo, "slow", env=env, timeout=SUITE_TIMEOUT)

    assert (decision.verdict, decision.rule, decision.action, decision.stage) == \
        ("red", "red.classify-disabled", "rollback", "development")
    assert "runner: timeout" in decision.reason


def test_classify_retest_failure_on_real_runs(tmp_path: Path) -> None:
    (tmp_path / "test_fails.py").write_text("def test_fails():\n    assert False\n")
    passed = proc_group.run([sys.executable, "-c", "pass"], timeout=10)
    timed_out = proc_group.run([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.3, grace=0.2)
    # A failing test of a real pytest run: red (a bare `exit 1` of a non-pytest command proves
    # nothing about the code and is "other", see test_classify.py).
    failed = proc_group.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "-c", os.devnull, "--rootdir", str(tmp_path), str(tmp_path)],
                            timeout=60)
    locked = proc_group.run([sys.executable, "-c", "import sys; sys.stderr.write(\"fatal: Unable to "
                             "create '/r/.git/index.lock': File exists.\\n\"); sys.exit(128)"], timeout=10)
    missing = proc_group.run(["retest-no-such-command-xyz"], timeout=10)

    on = {"MERGE_GATE_CLASSIFY_ENABLED": "true"}
    off = {"MERGE_GATE_CLASSIFY_ENABLED": "false"}
    assert [merge_gate.classify_retest_failure(r, environ=on)
            for r in (passed, timed_out, failed, locked, missing)] == [None, "timeout", "red", "lock-busy", "other"]
    assert [merge_gate.classify_retest_failure(r, environ=off)
            for r in (passed, timed_out, failed, locked, missing)] == [None, "red", "red", "red", "red"]


def test_switch_infra_retry_off_rolls_an_infra_failure_back(repo: Repo) -> None:
    repo.branch("slow", {"tests/test_slow.py": sleeping_test(60)})
    env = with_env(repo, MERGE_GATE_INFRA_RETRY_ENABLED="false")

    decision = gate(repo, "slow", env=env, timeout=SUITE_TIMEOUT)

    assert (decision.verdict, decision.action, decision.stage) == ("timeout", "rollback", "development")
    assert not decision.alert
    assert ledger_of(env).infra_attempts("slow", decision.sha or "", "timeout") == 0


def test_switch_skip_off_always_runs_the_retest(repo: Repo) -> None:
    sha = repo.branch("validated", {"tests/test_broken.py": FAILING_TEST})
    env = with_env(repo, MERGE_RETEST_SKIP_WHEN_CURRENT_ENABLED="false")

    decision = gate(repo, "validated", env=env, validated_sha=sha)

    assert not decision.skipped and decision.action == "rollback"
    assert decision.evidence["skip"] == "MERGE_RETEST_SKIP_WHEN_CURRENT_ENABLED=false"


def test_switch_metrics_off_freezes_the_counters(repo: Repo) -> None:
    repo.branch("feature", {"feature.py": "VALUE = 1\n"})
    env_off = with_env(repo, MERGE_GATE_METRICS_ENABLED="false")
    metrics = GateMetrics()
    ledger = ledger_of(repo.env)

    off = gate(repo, "feature", env=env_off, metrics=metrics)
    assert off.action == "merge"  # the gate itself is unchanged
    assert metrics.snapshot() == GateMetrics().snapshot()
    assert ledger.totals() == {}
    assert merge_gate.queue_block(settings=config.GateSettings.from_env(env_off), metrics=metrics) == \
        {"enabled": False}

    on = gate(repo, "feature", metrics=metrics)
    counters, recent = metrics.snapshot()
    assert on.action == "merge" and counters["merges"] == 1 and counters["retests_run"] == 1
    assert recent[0]["action"] == "merge"
    assert ledger.totals()["merges"] == 1


# --------------------------------------------------------------------------- counters and block


def test_queue_block_counts_every_kind_of_decision(repo: Repo) -> None:
    sha = repo.branch("feature", {"feature.py": "VALUE = 1\n"})
    repo.branch("broken", {"tests/test_broken.py": FAILING_TEST})
    metrics = GateMetrics()
    settings = config.GateSettings.from_env(repo.env)

    gate(repo, "feature", metrics=metrics)
    gate(repo, "feature", metrics=metrics, validated_sha=sha)
    gate(repo, "broken", metrics=metrics)

    for block in (merge_gate.queue_block(settings=settings, metrics=metrics),
                  merge_gate.queue_block(settings=settings, ledger=ledger_of(repo.env))):
        counters = block["counters"]
        assert block["enabled"] is True
        assert (counters["decisions"], counters["retests_run"], counters["retests_skipped"]) == (3, 2, 1)
        assert (counters["merges"], counters["rollbacks"], counters["verdict_red"]) == (2, 1, 1)
        assert counters["verdict_passed"] == 1 and counters["alerts"] == 0
        assert [d["action"] for d in block["recent"]] == ["rollback", "skip-merge", "merge"]
        assert block["recent"][1]["proof"]["validated_sha"] == sha
        assert block["settings"]["infra_retry_max"] == 3
        json.dumps(block)


def test_metrics_are_thread_safe() -> None:
    metrics = GateMetrics(recent=5)
    decision = GateDecision(action="requeue", stage="deploy-staging", verdict="timeout",
                            rule="timeout.deadline", reason="r", processes_killed=2)

    def work() -> None:
        for _ in range(500):
            metrics.record(decision)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counters, recent = metrics.snapshot()
    assert counters["requeues"] == 4000 and counters["verdict_timeout"] == 4000
    assert counters["processes_killed"] == 8000 and len(recent) == 5


# --------------------------------------------------------------------------- never raise, never inject


@pytest.mark.parametrize("branch", ["-x", "--upload-pack=touch pwned", "a..b", "feature~1", "", "a b"])
def test_option_like_or_invalid_names_are_refused_without_running_git(repo: Repo, branch: str) -> None:
    before = repo.snapshot()

    decision = gate(repo, branch)

    assert (decision.action, decision.verdict, decision.rule) == ("hold", "other", "other.invalid-ref")
    assert repo.snapshot() == before
    assert not (repo.path / "pwned").exists()


def test_onto_is_validated_too(repo: Repo) -> None:
    repo.branch("feature", {"feature.py": "VALUE = 1\n"})
    decision = gate(repo, "feature", onto="--output=/tmp/x")
    assert decision.rule == "other.invalid-ref" and decision.action == "hold"


def test_unknown_branch_and_not_a_repository_hold(repo: Repo, tmp_path: Path) -> None:
    missing = gate(repo, "no-such-branch")
    assert (missing.action, missing.verdict, missing.rule) == ("hold", "other", "other.git-error")

    empty = tmp_path / "not-a-repo"
    empty.mkdir()
    decision = retest_branch(empty, "feature", env=repo.env, metrics=GateMetrics())
    assert (decision.action, decision.verdict) == ("hold", "other")


def test_internal_error_holds_with_one_alert_and_cleans_up(repo: Repo, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    repo.branch("feature", {"feature.py": "VALUE = 1\n"})

    def boom(self: gitops.Worktree, onto: str) -> gitops.RebaseOutcome:
        raise RuntimeError("injected fault")

    monkeypatch.setattr(gitops.Worktree, "rebase", boom)
    with caplog.at_level(logging.ERROR, logger="retest.merge_gate"):
        first = gate(repo, "feature")
        second = gate(repo, "feature")
    monkeypatch.undo()

    assert (first.action, first.stage, first.rule) == ("hold", "deploy-staging", "other.gate-internal-error")
    assert "injected fault" in first.reason
    assert first.alert and not second.alert
    assert "Traceback" in caplog.text and "RuntimeError: injected fault" in caplog.text
    assert_no_gate_worktree(repo, first)
    # The lock was released and the worktree removed: the next gate works.
    assert gate(repo, "feature").action == "merge"


def test_hooks_of_the_repository_never_run(repo: Repo) -> None:
    marker = repo.path.parent / "hook-ran"
    hooks = repo.path / ".git" / "hooks"
    for name in ("post-checkout", "pre-rebase", "post-rewrite", "pre-commit"):
        hook = hooks / name
        hook.write_text(f"#!/bin/sh\necho {name} >> {marker}\n")
        hook.chmod(0o755)
    repo.branch("feature", {"feature.py": "VALUE = 1\n"})
    marker.unlink(missing_ok=True)  # our own set-up commits may have run them
    repo.commit({"other.py": "OTHER = 2\n"}, "main moves on: the gate must really rebase")
    marker.unlink(missing_ok=True)

    decision = gate(repo, "feature")

    assert decision.action == "merge"
    assert not marker.exists()


def test_a_stale_worktree_of_a_killed_gate_is_removed(repo: Repo, tmp_path: Path) -> None:
    repo.branch("feature", {"feature.py": "VALUE = 1\n"})
    stale_parent = tmp_path / f"{gitops.WORKTREE_PREFIX}stale1"
    stale_parent.mkdir()
    repo.git("worktree", "add", "--detach", str(stale_parent / "wt"), "main")

    decision = gate(repo, "feature")

    assert decision.action == "merge"
    assert str(stale_parent) not in repo.git("worktree", "list", "--porcelain")


def test_alert_command_gets_the_alert_on_stdin(repo: Repo, tmp_path: Path) -> None:
    repo.branch("feature", {"feature.py": "VALUE = 1\n"})
    sink = tmp_path / "alerts.jsonl"
    script = tmp_path / "alert.py"
    script.write_text(f"import sys\nopen({str(sink)!r}, 'ab').write(sys.stdin.buffer.read() + b'\\n')\n")
    env = with_env(repo, MERGE_GATE_ALERT_COMMAND=f"{sys.executable} {script}")

    gate(repo, "feature", env=env, command=["retest-no-such-command-xyz"])
    gate(repo, "feature", env=env, command=["retest-no-such-command-xyz"])

    lines = sink.read_text().splitlines()
    assert len(lines) == 1
    alert = json.loads(lines[0])
    assert alert["event"] == "retest.merge_gate.alert" and alert["verdict"] == "other"


def test_a_raising_alert_hook_does_not_break_the_gate(repo: Repo) -> None:
    repo.branch("feature", {"feature.py": "VALUE = 1\n"})

    def hook(payload: dict[str, Any]) -> None:
        raise ValueError("hook is broken")

    decision = gate(repo, "feature", command=["retest-no-such-command-xyz"], alert_hook=hook)
    assert decision.action == "hold" and decision.alert


# --------------------------------------------------------------------------- timeout resolution


@pytest.mark.parametrize(
    ("value", "expected", "warns"),
    [
        (None, 900.0, False),
        ("", 900.0, False),
        ("30", 30.0, False),
        (12.5, 12.5, False),
        ("abc", 900.0, True),
        ("-5", 900.0, True),
        (0, 900.0, True),
        ("nan", 900.0, True),
        (math.inf, 900.0, True),
        (True, 900.0, True),
        ([1], 900.0, True),
        ("3594", 3594.0, False),
        ("3595", 3594.0, True),
        (10_000, 3594.0, True),
    ],
)
def test_resolve_retest_timeout(value: object, expected: float, warns: bool,
                                caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="retest.merge_gate"):
        assert merge_gate._resolve_retest_timeout(value, 5.0, 3600.0) == expected
    assert len(caplog.records) == (1 if warns else 0)


def test_resolve_retest_timeout_keeps_the_reaper_bound(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="retest.merge_gate"):
        # An invalid value whose default would also break the reaper bound: still one warning.
        assert merge_gate._resolve_retest_timeout("abc", 5.0, 600.0) == 594.0
    assert len(caplog.records) == 1
    for timeout, grace, reaper in [(900, 5, 3600), (100, 50, 120), (1e9, 0, 60)]:
        resolved = merge_gate._resolve_retest_timeout(timeout, grace, reaper)
        assert resolved + grace < reaper


# --------------------------------------------------------------------------- regression markers


def test_regression_markers_hold_in_this_checkout() -> None:
    assert ("ORCH-110", "classify_retest_failure", "python/retest/merge_gate.py") in \
        merge_gate.MAIN_REGRESSION_MARKERS
    assert merge_gate.check_regression_markers(REPO_ROOT) == []


def test_a_removed_marker_symbol_is_reported(tmp_path: Path) -> None:
    target = tmp_path / "python" / "retest"
    target.mkdir(parents=True)
    source = (REPO_ROOT / "python" / "retest" / "merge_gate.py").read_text()
    (target / "merge_gate.py").write_text(source.replace("def classify_retest_failure(", "def renamed("))
    problems = merge_gate.check_regression_markers(tmp_path)
    assert problems == ["ORCH-110: classify_retest_failure is no longer defined in python/retest/merge_gate.py"]
    shutil.rmtree(target)
    assert len(merge_gate.check_regression_markers(tmp_path)) == len(merge_gate.MAIN_REGRESSION_MARKERS)


# --------------------------------------------------------------------------- the command line


def retest_cli(*args: str, env: dict[str, str], cwd: Path) -> proc_group.RunResult:
    return proc_group.run([sys.executable, "-m", "retest", *args], env=env, cwd=cwd, timeout=60)


def test_cli_gate_json_and_exit_statuses(repo: Repo) -> None:
    repo.branch("feature", {"feature.py": "VALUE = 1\n"})
    repo.branch("broken", {"tests/test_broken.py": FAILING_TEST})

    merged = retest_cli("gate", "--repo", str(repo.path), "--branch", "feature", "--task", "T-7", "--json",
                        env=repo.env, cwd=repo.path)
    rolled = retest_cli("gate", "--repo", str(repo.path), "--branch", "broken", "--json",
                        env=repo.env, cwd=repo.path)
    held = retest_cli("gate", "--repo", str(repo.path), "--branch", "feature", "--task", "T-8",
                      "--command", "retest-no-such-command-xyz", env=repo.env, cwd=repo.path)
    refused = retest_cli("gate", "--repo", str(repo.path), "--branch=-x", env=repo.env, cwd=repo.path)

    assert merged.returncode == 0, merged.stderr
    doc = json.loads(merged.stdout)
    assert (doc["action"], doc["verdict"], doc["attempt"], doc["alert"], doc["skipped"], doc["task_id"]) == \
        ("merge", "passed", 1, False, False, "T-7")
    assert "1 passed" in doc["reason"]
    assert rolled.returncode == 1 and json.loads(rolled.stdout)["action"] == "rollback"
    assert held.returncode == 3 and held.stdout.startswith(b"retest gate: hold")
    # a ref git could take for an option is a usage error on the command line (issue 14)
    assert refused.returncode == 2 and b"starts with '-'" in refused.stderr


def test_cli_gate_requeue_exit_status(repo: Repo) -> None:
    repo.branch("slow", {"tests/test_slow.py": sleeping_test(60)})
    result = retest_cli("gate", "--repo", str(repo.path), "--branch", "slow", "--timeout", "1", "--json",
                        env=repo.env, cwd=repo.path)
    assert result.returncode == 75
    assert json.loads(result.stdout)["action"] == "requeue"
