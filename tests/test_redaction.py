"""Redaction masks untrusted text, never the fixed vocabulary (issue 9, item 5).

With ``SECRET_KEY=test`` or ``API_TOKEN=passed`` in the environment, or a long secret that
equals a rule id, a stage or a JSON key, every document retest writes keeps its verdicts,
rule ids, actions, stages and keys: the same run with and without the secrets says the same.
A long secret that the suite prints, or that a branch name holds, is still masked in the
output tail, the reason, the alert, the ledger and ``GET /queue``. A value too short to mask
is reported once by name, never by value. Every check drives real processes: ``python -m
retest``, real git repositories (``tests/gitrepo.py``), a real ``retest serve``.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gitrepo import FAILING_TEST, Repo, make_repo
from retest import redact
from retest.ledger import Ledger
from retest.merge_gate import GateMetrics, retest_branch
from test_status_server import fetch, serving

#: A long secret: what the suite prints and a branch name holds.
LONG = "ghp_Zq8vK2mN4xR7tW1y"

#: Secrets that collide with the vocabulary: short ones (not masked, reported) and long
#: ones equal to a rule id's part, an action, a stage, a JSON key (masked, but only in text).
VOCABULARY_SECRETS = {
    "short-test": {"SECRET_KEY": "test"},
    "short-passed": {"API_TOKEN": "passed"},
    "long-vocabulary": {"GATE_SECRET": "tests-failed", "ROLLBACK_KEY": "rollback",
                        "DEPLOY_TOKEN": "deploy-staging", "KEY_PASSWORD": "output_tail",
                        "EXIT_SECRET": "exit_status"},
}

#: Quoted as the lock-busy reason, after 3000 characters that push it out of no tail.
LOCKED_PRINTING_LONG = ("import os; print('x' * 3000); "
                        "print('token ' + os.environ['LEAK_TOKEN'] + ': database is locked'); "
                        "raise SystemExit(1)")

ALERT_SINK = "import sys; open(sys.argv[1], 'a').write(sys.stdin.read() + '\\n')"

#: Test that prints the long secret and fails.
LEAKY_TEST = ("import os\n\n\ndef test_prints_the_token():\n"
              "    print('token', os.environ['LEAK_TOKEN'])\n    assert False\n")


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    return make_repo(tmp_path)


def retest_cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "retest", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def _timeless(text: str) -> str:
    """A reason without its durations (two runs never take the same time)."""
    return re.sub(r"\d+(\.\d+)?s\b", "Ns", text)


def run_vocabulary(doc: dict[str, Any]) -> dict[str, Any]:
    """What ``retest run --json`` says that no secret may change."""
    return {"keys": sorted(doc), "verdict": doc["verdict"], "rule": doc["rule"],
            "reason": _timeless(doc["reason"]), "exit_status": doc["exit_status"],
            "backend": doc["backend"]}


def decision_vocabulary(doc: dict[str, Any]) -> dict[str, Any]:
    """What a gate decision says that no secret may change."""
    return {"keys": sorted(doc), "evidence_keys": sorted(doc["evidence"]),
            **{k: doc[k] for k in ("action", "stage", "verdict", "rule", "infra", "skipped")},
            "reason": _timeless(doc["reason"]), "backend": doc["evidence"].get("backend")}


def short_warning(name: str, length: int) -> str:
    return (f"retest: the value of {name} is too short to mask safely ({length} characters); "
            f"it is not masked")


# --------------------------------------------------------------------------- retest run


@pytest.mark.parametrize("secrets", VOCABULARY_SECRETS.values(), ids=VOCABULARY_SECRETS.keys())
@pytest.mark.parametrize("code", ["import sys; sys.exit(1)", "pass"], ids=["fails", "passes"])
def test_retest_run_json_keeps_its_vocabulary(repo: Repo, secrets: dict[str, str], code: str) -> None:
    command = ("run", "--json", "--", sys.executable, "-c", code)
    clean = retest_cli(*command, env=repo.env, cwd=repo.path)
    masked = retest_cli(*command, env=dict(repo.env, **secrets), cwd=repo.path)
    assert masked.returncode == clean.returncode
    assert run_vocabulary(json.loads(masked.stdout)) == run_vocabulary(json.loads(clean.stdout))
    # The verdict line on stderr too.
    verdict_line = [line for line in masked.stderr.splitlines() if line.startswith("retest: ")][-1]
    assert "***" not in verdict_line.split(":")[1], verdict_line
    for name, value in secrets.items():
        if len(value) < redact.MIN_SECRET_CHARS:
            assert masked.stderr.count(short_warning(name, len(value))) == 1


def test_retest_run_masks_a_long_secret_in_its_output_reason_and_argv(repo: Repo) -> None:
    env = dict(repo.env, LEAK_TOKEN=LONG)
    ran = retest_cli("run", "--json", "--", sys.executable, "-c", LOCKED_PRINTING_LONG, LONG,
                     env=env, cwd=repo.path)
    doc = json.loads(ran.stdout)
    assert (doc["verdict"], doc["rule"]) == ("lock-busy", "lock-busy.sqlite")
    assert "token ***: database is locked" in doc["reason"]  # built from masked output
    assert doc["args"][-1] == "***"
    assert LONG not in ran.stdout and LONG not in ran.stderr


# --------------------------------------------------------------------------- retest gate


@pytest.mark.parametrize("secrets", VOCABULARY_SECRETS.values(), ids=VOCABULARY_SECRETS.keys())
def test_retest_gate_json_keeps_its_vocabulary(repo: Repo, tmp_path: Path,
                                               secrets: dict[str, str]) -> None:
    repo.branch("bad", {"tests/test_bad.py": FAILING_TEST})
    repo.branch("good", {"README": "fine\n"})
    for branch, action in (("bad", "rollback"), ("good", "merge")):
        docs = []
        for label, extra in (("clean", {}), ("secrets", secrets)):
            env = dict(repo.env, RETEST_LEDGER_PATH=str(tmp_path / f"{branch}-{label}.sqlite3"), **extra)
            gated = retest_cli("gate", "--repo", str(repo.path), "--branch", branch, "--json",
                               env=env, cwd=repo.path)
            assert gated.stdout, gated.stderr
            docs.append(json.loads(gated.stdout))
        assert docs[0]["action"] == action
        assert decision_vocabulary(docs[1]) == decision_vocabulary(docs[0])


def test_a_secret_in_a_branch_name_and_the_output_is_masked_in_gate_json(repo: Repo) -> None:
    branch = f"feature-{LONG}"
    repo.branch(branch, {"tests/test_leaky.py": LEAKY_TEST})
    env = dict(repo.env, LEAK_TOKEN=LONG, GATE_SECRET="tests-failed")
    gated = retest_cli("--log-level", "DEBUG", "gate", "--repo", str(repo.path), "--branch", branch,
                       "--json", env=env, cwd=repo.path)
    doc = json.loads(gated.stdout)
    assert (doc["action"], doc["rule"]) == ("rollback", "red.tests-failed")
    assert doc["branch"] == doc["task_id"] == "feature-***"
    assert "token ***" in doc["evidence"]["output_tail"]
    assert LONG not in gated.stdout and LONG not in gated.stderr
    # The verdict's log line keeps its rule id (a Clean argument), the task id is masked.
    assert "merge gate: feature-*** " in gated.stderr
    assert "-> rollback (red: red.tests-failed)" in gated.stderr


def test_alert_ledger_and_queue_keep_the_vocabulary_and_mask_the_secrets(
        repo: Repo, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    branch = f"leak-{LONG}"
    repo.branch(branch, {"locked.py": "VALUE = 1\n"})
    alerts_file = tmp_path / "alerts.jsonl"
    env = dict(repo.env, LEAK_TOKEN=LONG, SECRET_KEY="test", DEPLOY_TOKEN="deploy-staging",
               BUSY_SECRET="lock-busy.sqlite", KEY_SECRET="infra_attempt",
               MERGE_GATE_INFRA_RETRY_MAX="0",
               MERGE_GATE_ALERT_COMMAND=f"{sys.executable} -c \"{ALERT_SINK}\" {alerts_file}")
    hook: list[dict[str, Any]] = []
    with caplog.at_level(logging.INFO, logger="retest"):
        decision = retest_branch(repo.path, branch, env=env, alert_hook=hook.append,
                                 metrics=GateMetrics(),
                                 command=[sys.executable, "-c", LOCKED_PRINTING_LONG])
    assert (decision.action, decision.stage, decision.rule, decision.alert) == \
        ("hold", "deploy-staging", "lock-busy.sqlite", True)
    assert "token ***: database is locked" in decision.reason
    assert LONG not in decision.evidence["output_tail"] and "***" in decision.evidence["output_tail"]

    def assert_vocabulary_kept(doc: dict[str, Any]) -> None:
        assert (doc["action"], doc["stage"], doc["verdict"], doc["rule"]) == \
            ("hold", "deploy-staging", "lock-busy", "lock-busy.sqlite"), doc
        assert "infra_attempt" in doc and doc["infra_attempt"] == 1
        assert "token ***: database is locked" in doc["reason"]
        assert doc["branch"] == "leak-***"
        assert LONG not in json.dumps(doc)

    # The alert: the hook's payload and the alert command's stdin.
    assert len(hook) == 1
    assert_vocabulary_kept(hook[0])
    assert hook[0]["task_id"] == "leak-***"
    sent = [json.loads(line) for line in alerts_file.read_text().splitlines()]
    assert sent == hook
    # The log: the ALERT line and the verdict line keep their vocabulary.
    assert '"rule": "lock-busy.sqlite"' in caplog.text and '"stage": "deploy-staging"' in caplog.text
    assert "-> hold (lock-busy: lock-busy.sqlite)" in caplog.text
    assert LONG not in caplog.text

    # The ledger: the recent decisions and the alert rows.
    ledger = Ledger(env["RETEST_LEDGER_PATH"])
    recent = ledger.recent_decisions(10)
    assert len(recent) == 1
    assert_vocabulary_kept(recent[0])
    assert recent[0]["task_id"] == "leak-***" and "output_tail" not in recent[0]["evidence"]
    assert all(LONG not in row["reason"] for row in ledger.alerts())

    # GET /queue, from a server with and without the secrets in its own environment.
    for serve_env in (repo.env, env):
        with serving(serve_env, tmp_path) as base:
            code, _, body = fetch(base + "/queue")
        assert code == 200 and LONG.encode() not in body
        block = json.loads(body)["merge_gate"]
        assert block["counters"]["verdict_lock_busy"] == 1 and block["counters"]["holds"] == 1
        assert_vocabulary_kept(block["recent"][0])


# --------------------------------------------------------------------------- short values


def test_a_short_value_is_reported_once_by_name_and_not_masked(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(redact, "_reported", set())
    monkeypatch.setenv("API_TOKEN", "s3cr3t")
    monkeypatch.setenv("FEATURE_KEY_ENABLED", "true")  # a switch: neither masked nor reported
    monkeypatch.setenv("EMPTY_SECRET", "")
    logger = logging.getLogger("retest.test_redaction")
    redact.install(logger)
    try:
        with caplog.at_level(logging.DEBUG, logger="retest"):
            for _ in range(3):
                assert "s3cr3t" not in redact.secret_values()
                assert "s3cr3t" not in redact.FILTER.secrets()
            logger.info("the value is %s", "s3cr3t")
    finally:
        logger.removeFilter(redact.FILTER)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [short_warning("API_TOKEN", 6)]
    assert "the value is s3cr3t" in caplog.text  # not masked: it is reported instead
    assert "s3cr3t" not in warnings[0].getMessage()


def test_a_gate_reports_a_short_value_once_in_its_log(repo: Repo) -> None:
    repo.branch("bad", {"tests/test_bad.py": FAILING_TEST})
    env = dict(repo.env, API_TOKEN="s3cr3t")
    gated = retest_cli("--log-level", "DEBUG", "gate", "--repo", str(repo.path), "--branch", "bad",
                       "--json", env=env, cwd=repo.path)
    assert json.loads(gated.stdout)["rule"] == "red.tests-failed"
    assert gated.stderr.count("too short to mask safely") == 1
    assert short_warning("API_TOKEN", 6) in gated.stderr
    assert "s3cr3t" not in gated.stderr


# --------------------------------------------------------------------------- the log filter


def test_the_log_filter_leaves_clean_arguments_whole(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("retest.test_redaction")
    redact.install(logger)
    try:
        with caplog.at_level(logging.INFO, logger="retest.test_redaction"), \
                redact.FILTER.covering({"tests-failed"}):
            logger.info("rule %s, %r; text %s", redact.Clean("red.tests-failed"),
                        redact.Clean("red.tests-failed"), "quoting tests-failed")
            logger.info("mapping %(rule)s %(text)s",
                        {"rule": redact.Clean("red.tests-failed"), "text": "tests-failed"})
            logger.info("format string tests-failed")
    finally:
        logger.removeFilter(redact.FILTER)
    assert caplog.messages == [
        "rule red.tests-failed, 'red.tests-failed'; text quoting ***",
        "mapping red.tests-failed ***",
        "format string ***",
    ]
