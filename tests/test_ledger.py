"""The SQLite ledger: retry budgets and the one-alert rule across processes and restarts."""

from __future__ import annotations

import json
import sqlite3
import sys
import threading
import time
from pathlib import Path

import pytest

from gitrepo import PYTHON_DIR
from retest import config, proc_group
from retest.ledger import DECISIONS_KEPT, Ledger, LedgerBusy, LedgerError


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(tmp_path / "state" / "ledger.sqlite3", busy_timeout_s=2)


def test_budget_counts_per_task_sha_verdict_and_claims_one_alert(ledger: Ledger) -> None:
    outcomes = [ledger.record_infra_failure("T", "s1", "timeout", 2) for _ in range(4)]
    assert [(o.attempt, o.exhausted, o.alert_claimed) for o in outcomes] == \
        [(1, False, False), (2, False, False), (3, True, True), (4, True, False)]
    # Another verdict, sha or task has a budget of its own.
    assert ledger.record_infra_failure("T", "s1", "lock-busy", 2).attempt == 1
    assert ledger.record_infra_failure("T", "s2", "timeout", 2).attempt == 1
    assert ledger.record_infra_failure("U", "s1", "timeout", 2).attempt == 1
    assert [(a["task"], a["sha"], a["verdict"]) for a in ledger.alerts()] == [("T", "s1", "timeout")]


def test_zero_retries_holds_on_the_first_failure(ledger: Ledger) -> None:
    first = ledger.record_infra_failure("T", "s", "timeout", 0)
    assert first.exhausted and first.alert_claimed


def test_state_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    Ledger(path, busy_timeout_s=1).record_infra_failure("T", "s", "timeout", 3)
    Ledger(path, busy_timeout_s=1).record_infra_failure("T", "s", "timeout", 3)
    again = Ledger(path, busy_timeout_s=1)
    assert again.infra_attempts("T", "s", "timeout") == 2
    assert again.next_run("T", "s") == 1 and again.next_run("T", "s") == 2


def test_claim_alert_is_true_once(ledger: Ledger) -> None:
    assert [ledger.claim_alert("T", "s", "other") for _ in range(3)] == [True, False, False]


RACER = """
import sys, time
from retest.ledger import Ledger
path, start = sys.argv[1], float(sys.argv[2])
ledger = Ledger(path, busy_timeout_s=10)
ledger.totals()
while time.time() < start:
    time.sleep(0.001)
outcome = ledger.record_infra_failure("T-race", "abc", "timeout", 0, "spent")
print("CLAIMED" if outcome.alert_claimed else "LOST")
"""


@pytest.mark.parametrize("racers", [2, 6])
def test_processes_racing_to_alert_send_exactly_one(tmp_path: Path, racers: int) -> None:
    path = str(tmp_path / "ledger.sqlite3")
    Ledger(path, busy_timeout_s=1).totals()
    start = time.time() + 1.0
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": PYTHON_DIR}
    results: list[proc_group.RunResult] = []
    lock = threading.Lock()

    def race() -> None:
        result = proc_group.run([sys.executable, "-c", RACER, path, str(start)], env=env, timeout=30)
        with lock:
            results.append(result)

    threads = [threading.Thread(target=race) for _ in range(racers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    outputs = sorted(r.stdout.decode().strip() for r in results)
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    assert outputs == ["CLAIMED"] + ["LOST"] * (racers - 1)
    rows = sqlite3.connect(path).execute("SELECT COUNT(*) FROM alerts").fetchone()
    assert rows == (1,)
    assert Ledger(path, busy_timeout_s=1).infra_attempts("T-race", "abc", "timeout") == racers


def test_locked_beyond_the_busy_timeout_is_ledger_busy(ledger: Ledger) -> None:
    ledger.totals()
    blocker = sqlite3.connect(ledger.path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        quick = Ledger(ledger.path, busy_timeout_s=0.1)
        started = time.monotonic()
        with pytest.raises(LedgerBusy, match="database is locked"):
            quick.record_infra_failure("T", "s", "timeout", 3)
        assert time.monotonic() - started < 3
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert ledger.record_infra_failure("T", "s", "timeout", 3).attempt == 1  # nothing half-written


def test_an_unusable_path_is_a_ledger_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(LedgerError):
        Ledger(blocker / "ledger.sqlite3", busy_timeout_s=0.1).next_run("T", "s")


def test_decisions_and_totals(ledger: Ledger) -> None:
    for i in range(5):
        ledger.record_decision({"n": i}, {"merges": 1, "alerts": 0}, keep=3)
    assert ledger.totals() == {"merges": 5}
    assert [d["n"] for d in ledger.recent_decisions(10)] == [4, 3, 2]
    assert DECISIONS_KEPT >= 100


def test_default_path_follows_xdg_state_home(tmp_path: Path) -> None:
    assert config.default_ledger_path({"XDG_STATE_HOME": str(tmp_path)}) == \
        str(tmp_path / "retest" / "ledger.sqlite3")
    assert config.default_ledger_path({"HOME": "/home/u"}) == "/home/u/.local/state/retest/ledger.sqlite3"
    assert config.default_ledger_path({"HOME": "/home/u", "XDG_STATE_HOME": "relative"}) == \
        "/home/u/.local/state/retest/ledger.sqlite3"
    env = {"RETEST_LEDGER_PATH": str(tmp_path / "x.db")}
    assert Ledger(environ=env).path == str(tmp_path / "x.db")
    assert json.dumps(config.GateSettings.from_env(env).ledger_path)
