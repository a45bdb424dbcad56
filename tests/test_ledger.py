"""The ledger contract on both backends: retry budgets and the one-alert rule across processes,
hosts and restarts; schema versions; and, for PostgreSQL, connection loss."""

from __future__ import annotations

import json
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from gitrepo import PYTHON_DIR
from ledgers import LedgerPlace
from retest import config, proc_group
from retest.ledger import (DECISIONS_KEPT, SCHEMA_VERSION, Ledger, LedgerBackend, LedgerBusy,
                           LedgerError, open_ledger)


@pytest.fixture
def ledger(ledger_place: LedgerPlace) -> Iterator[LedgerBackend]:
    """The ledger of this test, on each backend in turn (one parametrized fixture)."""
    opened = open_ledger({**ledger_place.env, "RETEST_LEDGER_BUSY_TIMEOUT_S": "2"})
    assert opened.backend == ledger_place.backend
    yield opened
    opened.close()


@pytest.fixture
def sqlite_ledger(tmp_path: Path) -> Ledger:
    return Ledger(str(tmp_path / "state" / "ledger.sqlite3"), busy_timeout_s=2)


def test_budget_counts_per_task_sha_verdict_and_claims_one_alert(ledger: LedgerBackend) -> None:
    outcomes = [ledger.record_infra_failure("T", "s1", "timeout", 2) for _ in range(4)]
    assert [(o.attempt, o.exhausted, o.alert_claimed) for o in outcomes] == \
        [(1, False, False), (2, False, False), (3, True, True), (4, True, False)]
    # Another verdict, sha or task has a budget of its own.
    assert ledger.record_infra_failure("T", "s1", "lock-busy", 2).attempt == 1
    assert ledger.record_infra_failure("T", "s2", "timeout", 2).attempt == 1
    assert ledger.record_infra_failure("U", "s1", "timeout", 2).attempt == 1
    assert [(a["task"], a["sha"], a["verdict"]) for a in ledger.alerts()] == [("T", "s1", "timeout")]


def test_zero_retries_holds_on_the_first_failure(ledger: LedgerBackend) -> None:
    first = ledger.record_infra_failure("T", "s", "timeout", 0)
    assert first.exhausted and first.alert_claimed


def test_state_survives_a_restart(ledger_place: LedgerPlace) -> None:
    for _ in range(2):
        first = open_ledger(ledger_place.env)
        first.record_infra_failure("T", "s", "timeout", 3)
        first.close()
    again = open_ledger(ledger_place.env)
    assert again.infra_attempts("T", "s", "timeout") == 2
    assert again.next_run("T", "s") == 1 and again.next_run("T", "s") == 2


def test_claim_alert_is_true_once(ledger: LedgerBackend) -> None:
    assert [ledger.claim_alert("T", "s", "other") for _ in range(3)] == [True, False, False]


RACER = """
import sys, time
from retest.ledger import open_ledger
start = float(sys.argv[1])
ledger = open_ledger()
ledger.totals()
while time.time() < start:
    time.sleep(0.001)
outcome = ledger.record_infra_failure("T-race", "abc", "timeout", 0, "spent")
print("CLAIMED" if outcome.alert_claimed else "LOST")
"""


@pytest.mark.parametrize("racers", [2, 6])
def test_processes_racing_to_alert_send_exactly_one(ledger_place: LedgerPlace, racers: int) -> None:
    open_ledger(ledger_place.env).totals()
    start = time.time() + 1.0
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": PYTHON_DIR, "RETEST_LEDGER_BUSY_TIMEOUT_S": "10",
           **ledger_place.env}
    results: list[proc_group.RunResult] = []
    lock = threading.Lock()

    def race() -> None:
        result = proc_group.run([sys.executable, "-c", RACER, str(start)], env=env, timeout=30)
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
    assert ledger_place.count("SELECT COUNT(*) FROM alerts") == 1
    assert open_ledger(ledger_place.env).infra_attempts("T-race", "abc", "timeout") == racers


def test_locked_beyond_the_busy_timeout_is_ledger_busy(sqlite_ledger: Ledger) -> None:
    ledger = sqlite_ledger
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


def test_decisions_totals_and_durations(ledger: LedgerBackend) -> None:
    for i in range(5):
        ledger.record_decision({"n": i, "task_id": f"T{i % 2}", "action": "merge", "verdict": "passed",
                                "duration_s": 1.0 + i, "evidence": {"run_duration_s": 0.5 + i}},
                               {"merges": 1, "alerts": 0}, keep=3)
    assert ledger.totals() == {"merges": 5}
    assert [d["n"] for d in ledger.recent_decisions(10)] == [4, 3, 2]
    assert DECISIONS_KEPT >= 100
    history = ledger.durations()
    assert [(d["task"], d["gate_s"], d["suite_s"]) for d in history] == \
        [("T0", 5.0, 4.5), ("T1", 4.0, 3.5), ("T0", 3.0, 2.5), ("T1", 2.0, 1.5), ("T0", 1.0, 0.5)]
    assert [d["gate_s"] for d in ledger.durations("T1", limit=1)] == [4.0]


def test_default_path_follows_xdg_state_home(tmp_path: Path) -> None:
    assert config.default_ledger_path({"XDG_STATE_HOME": str(tmp_path)}) == \
        str(tmp_path / "retest" / "ledger.sqlite3")
    assert config.default_ledger_path({"HOME": "/home/u"}) == "/home/u/.local/state/retest/ledger.sqlite3"
    assert config.default_ledger_path({"HOME": "/home/u", "XDG_STATE_HOME": "relative"}) == \
        "/home/u/.local/state/retest/ledger.sqlite3"
    env = {"RETEST_LEDGER_PATH": str(tmp_path / "x.db")}
    assert Ledger(environ=env).path == str(tmp_path / "x.db")
    assert open_ledger(env).backend == "sqlite"
    assert json.dumps(config.GateSettings.from_env(env).ledger_path)


# --------------------------------------------------------------------------- schema versions


def test_a_new_ledger_is_at_the_current_schema_version(ledger: LedgerBackend) -> None:
    assert ledger.schema_version() == SCHEMA_VERSION == 4


def test_a_ledger_from_a_newer_retest_is_refused(ledger_place: LedgerPlace) -> None:
    open_ledger(ledger_place.env).totals()
    bump = f"UPDATE meta SET value = '{SCHEMA_VERSION + 1}' WHERE key = 'schema_version'"
    if ledger_place.backend == "sqlite":
        conn = sqlite3.connect(ledger_place.path)
        conn.execute(bump)
        conn.commit()
        conn.close()
    else:
        from ledgers import admin
        admin(bump, ledger_place.url)
    with pytest.raises(LedgerError, match="newer than this retest"):
        open_ledger(ledger_place.env).next_run("T", "s")


def test_a_version_1_ledger_is_migrated_and_keeps_its_rows(ledger_place: LedgerPlace) -> None:
    """Written as retest 0.1 wrote it (its DDL, verbatim), then opened by this one."""
    from retest import ledger_postgres, ledger_sqlite

    v1 = (ledger_sqlite if ledger_place.backend == "sqlite" else ledger_postgres).MIGRATIONS[1]
    rows = ["CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)", *v1,
            "INSERT INTO meta VALUES ('schema_version', '1')",
            "INSERT INTO infra_attempts VALUES ('T', 's', 'timeout', 3, 1.0, 2.0)",
            "INSERT INTO alerts VALUES ('T', 's', 'timeout', 2.0, 1, 'spent')",
            "INSERT INTO alert_pending VALUES ('T', 's', 'timeout', 999999999, 2.0)"]
    if ledger_place.backend == "sqlite":
        Path(ledger_place.path).parent.mkdir(parents=True)
        conn = sqlite3.connect(ledger_place.path)
        for sql in rows:
            conn.execute(sql)
        conn.commit()
        conn.close()
    else:
        from ledgers import admin
        for sql in rows:
            admin(sql, ledger_place.url)
    ledger = open_ledger(ledger_place.env)
    assert ledger.infra_attempts("T", "s", "timeout") == 3
    assert ledger.schema_version() == SCHEMA_VERSION
    # A pending claim of 0.1 has no host: it was this host's, and its pid is long dead.
    assert ledger.pending_alerts() == [{"task": "T", "sha": "s", "verdict": "timeout",
                                        "pid": 999999999, "host": ""}]
    assert ledger.claim_alert("T", "s", "timeout", confirm_delivery=True)
    assert ledger.record_infra_failure("T", "s", "timeout", 3).attempt == 4


# --------------------------------------------------------------------------- across hosts


def test_a_claim_from_another_host_is_taken_over_only_after_its_lease(ledger_place: LedgerPlace) -> None:
    host_a = open_ledger({**ledger_place.env, "RETEST_HOST_ID": "host-a"})
    host_b = open_ledger({**ledger_place.env, "RETEST_HOST_ID": "host-b"})
    host_a.claim_lease_s = host_b.claim_lease_s = 1.0
    # host-a claims (this very process plays it; its pid means nothing on host-b).
    assert host_a.record_infra_failure("T", "s", "timeout", 0, confirm_delivery=True).alert_claimed
    assert not host_b.claim_alert("T", "s", "timeout", confirm_delivery=True)  # lease running
    time.sleep(1.2)
    assert host_b.claim_alert("T", "s", "timeout", confirm_delivery=True)      # lease ran out
    assert not host_a.claim_alert("T", "s", "timeout", confirm_delivery=True)  # b's lease now
    assert [p["host"] for p in host_b.pending_alerts()] == ["host-b"]
    host_a.alert_delivered("T", "s", "timeout")   # not a's claim any more: nothing removed
    assert len(host_b.pending_alerts()) == 1
    host_b.alert_delivered("T", "s", "timeout")
    assert host_b.pending_alerts() == [] and len(host_b.alerts()) == 1


def test_the_same_host_takes_a_dead_pid_over_at_once(ledger_place: LedgerPlace) -> None:
    ledger = open_ledger({**ledger_place.env, "RETEST_HOST_ID": "host-a"})
    ledger.claim_alert("T", "s", "other", confirm_delivery=True)
    if ledger_place.backend == "sqlite":
        conn = sqlite3.connect(ledger_place.path)
        conn.execute("UPDATE alert_pending SET pid = 999999999")
        conn.commit()
        conn.close()
    else:
        from ledgers import admin
        admin("UPDATE alert_pending SET pid = 999999999", ledger_place.url)
    assert ledger.claim_alert("T", "s", "other", confirm_delivery=True)  # lease or not: pid is gone


def test_a_retried_write_returns_its_first_outcome(ledger_place: LedgerPlace,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """What a write that committed before its reply was lost looks like to the retry."""
    if ledger_place.backend == "sqlite":
        pytest.skip("SQLite never retries a write (no connection to lose)")
    import uuid

    from retest import ledger_base

    ledger = open_ledger(ledger_place.env)
    fixed = uuid.UUID(int=7)
    monkeypatch.setattr(ledger_base.uuid, "uuid4", lambda: fixed)
    first = ledger.record_infra_failure("T", "s", "timeout", 0, confirm_delivery=True)
    again = ledger.record_infra_failure("T", "s", "timeout", 0, confirm_delivery=True)
    assert first == again and (first.attempt, first.alert_claimed) == (1, True)
    assert ledger.infra_attempts("T", "s", "timeout") == 1
    monkeypatch.undo()
    assert ledger.record_infra_failure("T", "s", "timeout", 0).attempt == 2


def test_a_url_that_is_not_postgresql_falls_back_to_sqlite_without_echoing_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    env = {"RETEST_LEDGER_URL": "mysql://u:hunter2hunter2@db/x",
           "RETEST_LEDGER_PATH": str(tmp_path / "l.sqlite3")}
    assert open_ledger(env).backend == "sqlite"
    assert "hunter2" not in caplog.text


def test_timelines_are_kept_beside_their_decision_bounded_in_number(ledger: LedgerBackend) -> None:
    """Issue 16.3: the newest ``timelines_kept`` timelines stay, masked, found by decision id."""
    from retest import redact

    secret = "s3cr3t-value-of-the-suite"
    ids = []
    with redact.FILTER.covering(frozenset({secret})):
        for i in range(4):
            ids.append(ledger.record_decision(
                {"action": "merge", "verdict": "passed", "branch": f"b{i}"}, {"decisions": 1},
                timeline={"version": 1, "tests": [{"nodeid": f"t.py::test_{i}[{secret}]"}]},
                timelines_kept=2))
    assert ids == sorted(ids) and len(set(ids)) == 4
    assert [d["id"] for d in ledger.recent_decisions(10)] == ids[::-1]
    kept = [ledger.decision(i) for i in ids]
    assert all(found is not None for found in kept)
    assert [found[1] is not None for found in kept if found is not None] == [False, False, True, True]
    doc, timeline = ledger.decision(ids[-1])  # type: ignore[misc]
    assert doc["branch"] == "b3" and doc["id"] == ids[-1]
    assert timeline == {"version": 1, "tests": [{"nodeid": "t.py::test_3[***]"}]}
    assert ledger.decision(ids[-1] + 1000) is None
    ledger.record_decision({"action": "merge"}, {"decisions": 1}, timeline={"version": 1}, timelines_kept=0)
    assert ledger.recent_decisions(1)[0]["id"] > ids[-1]
    assert ledger.decision(ledger.recent_decisions(1)[0]["id"])[1] is None  # type: ignore[index]
