"""Issue 13.4: every fault is a decision with a reason and the right alert, and ``retest gate``
exits 1 only when the gate decided rollback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gitrepo import Repo, make_repo
from retest import cli, merge_gate
from retest.ledger import Ledger
from retest.merge_gate import GateMetrics, retest_branch
from test_security import ALERT_SINK, git_log, ledger_bytes, logged  # noqa: F401  (git_log: fixture)

SECRET = "ghp_secretvalue123"


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    return make_repo(tmp_path)


def gate_cli(repo: Repo, *args: str, env: dict[str, str] | None = None,
             prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*prefix, sys.executable, "-m", "retest", "gate", "--repo", str(repo.path),
                           "--json", *args], env=env or repo.env, capture_output=True, timeout=120)


def read_only_prefix(folder: Path) -> tuple[str, ...]:
    """Run a command with ``folder`` read-only for it (root: a private read-only bind mount)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return ()
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("needs unshare(1) to make a read-only mount as root")
    return (unshare, "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"', str(folder))


def test_a_read_only_git_dir_is_a_hold_with_a_reason_and_one_alert(repo: Repo) -> None:
    repo.branch("feature", {"feature.py": "VALUE = 1\n"})
    git_dir = repo.path / ".git"
    try:
        proc = gate_cli(repo, "--branch", "feature", prefix=read_only_prefix(git_dir))
    finally:
        git_dir.chmod(0o755)
    if proc.returncode != 3 and b"mount:" in proc.stderr:
        pytest.skip(f"cannot make a read-only mount here: {proc.stderr[-200:]!r}")
    assert proc.returncode == 3, proc.stderr
    doc = json.loads(proc.stdout)
    assert (doc["action"], doc["verdict"], doc["rule"]) == ("hold", "other", "other.gate-lock-error")
    assert "retest-gate.lock" in doc["reason"] and doc["alert"] is True and doc["attempt"] == 1
    assert b"Traceback" not in proc.stderr


def test_different_failures_without_a_sha_alert_separately(repo: Repo, tmp_path: Path) -> None:
    """A bad repository path has no sha: alerts are keyed by the failure, not by the task alone."""
    def fail(path: Path) -> merge_gate.GateDecision:
        return retest_branch(path, "feature", task_id="T-1", env=repo.env, metrics=GateMetrics())

    first = fail(tmp_path / "no-such-repo")
    again = fail(tmp_path / "no-such-repo")
    other = fail(tmp_path / "another-missing-repo")
    assert [d.action for d in (first, again, other)] == ["hold"] * 3
    assert all(d.rule == "other.git-error" for d in (first, again, other))
    assert (first.alert, again.alert, other.alert) == (True, False, True)
    keys = [(a["task"], a["sha"]) for a in Ledger(repo.env["RETEST_LEDGER_PATH"], busy_timeout_s=2).alerts()]
    assert len(keys) == 2 and all(sha.startswith("unknown:") for _, sha in keys)


def test_the_first_alert_is_not_called_deduplicated(repo: Repo) -> None:
    alerts: list[dict[str, Any]] = []
    decision = retest_branch(repo.path, "no-such-branch", env=repo.env, metrics=GateMetrics(),
                             alert_hook=alerts.append)
    assert decision.alert and len(alerts) == 1
    assert alerts[0]["deduplicated"] is False and alerts[0]["dedup"] == "ledger"


def test_secrets_in_branch_and_task_names_reach_neither_ledger_nor_alert_stdin(repo: Repo, tmp_path: Path) -> None:
    branch = f"feature-{SECRET}"
    repo.branch(branch, {"feature.py": "VALUE = 1\n"})
    sink = tmp_path / "alerts.jsonl"
    env = dict(repo.env, GITHUB_TOKEN=SECRET,
               MERGE_GATE_ALERT_COMMAND=f"{sys.executable} -c \"{ALERT_SINK}\" {sink}")
    for task in (None, f"T-{SECRET}"):
        decision = retest_branch(repo.path, branch, task_id=task, env=env, metrics=GateMetrics(),
                                 command=["no-such-tool-13"])
        assert (decision.action, decision.rule, decision.alert) == ("hold", "other.spawn-error", True)
    assert len(sink.read_text().splitlines()) == 2
    assert SECRET not in sink.read_text() and "feature-***" in sink.read_text()
    stored = ledger_bytes(env["RETEST_LEDGER_PATH"])
    assert SECRET.encode() not in stored and b"feature-***" in stored


@pytest.mark.parametrize("level", ["", "abc", "-1", "TRUE", "debug"])
def test_a_bad_log_level_is_one_warning_never_a_crash(repo: Repo, level: str) -> None:
    repo.branch("feature", {"feature.py": "VALUE = 1\n"})
    proc = gate_cli(repo, "--branch", "feature", env=dict(repo.env, RETEST_LOG_LEVEL=level))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["action"] == "merge"
    warnings = [line for line in proc.stderr.decode().splitlines() if "RETEST_LOG_LEVEL" in line]
    assert len(warnings) == (1 if level in ("abc", "-1", "TRUE") else 0), proc.stderr


def test_an_unbalanced_command_holds_before_any_lock_or_worktree(
        repo: Repo, git_log: tuple[dict[str, str], Path]) -> None:  # noqa: F811
    env, log = git_log
    repo.branch("feature", {"feature.py": "VALUE = 1\n"})
    proc = gate_cli(repo, "--branch", "feature", env=dict(env, MERGE_RETEST_COMMAND="'unbalanced"))
    assert proc.returncode == 3, proc.stderr
    doc = json.loads(proc.stdout)
    assert (doc["action"], doc["rule"], doc["alert"]) == ("hold", "other.invalid-command", True)
    assert "MERGE_RETEST_COMMAND" in doc["reason"] and "quotation" in doc["reason"]
    # The command line's own check that the branch exists reads refs (rev-parse); nothing
    # that writes ran: no worktree, no checkout, no rebase, no lock.
    writes = {"worktree", "checkout", "rebase", "reset", "clean", "merge-file"}
    assert [argv for argv in logged(log) if writes & set(argv)] == []
    assert not (repo.path / ".git" / "retest-gate.lock").exists()


def test_a_crash_of_the_cli_exits_125_never_1(repo: Repo, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    def crash(*args: Any, **kwargs: Any) -> Any:
        raise MemoryError("simulated")

    repo.branch("feature", {"feature.py": "VALUE = 1\n"})  # else a usage error (2) comes first
    monkeypatch.setattr(merge_gate, "retest_branch", crash)
    monkeypatch.setenv("RETEST_LEDGER_PATH", repo.env["RETEST_LEDGER_PATH"])
    assert cli.main(["gate", "--repo", str(repo.path), "--branch", "feature"]) == cli.EXIT_INTERNAL
    assert cli.GATE_EXIT_STATUS["rollback"] == 1 and cli.EXIT_INTERNAL != 1
