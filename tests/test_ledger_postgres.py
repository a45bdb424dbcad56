"""The PostgreSQL ledger when its connection breaks or its server restarts (issue 12).

Against the real throw-away server of ``.ci/postgres``: sessions terminated by the server,
a real ``pg_ctl restart`` while a gate runs its suite, and a server that stays down through
the decision. What must hold: the gate decides (never crashes), an attempt is counted once or
not at all, and there is exactly one alert.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from gitrepo import Repo, make_repo
from ledgers import LedgerPlace, place, require_throwaway, server
from retest.ledger import LedgerBackend, LedgerError, open_ledger
from retest.merge_gate import GateMetrics, retest_branch

#: An infra failure after ``seconds``: the suite reports SQLite's lock message (lock-busy).
def locked_after(seconds: float) -> str:
    return (f"{sys.executable} -c \"import time; time.sleep({seconds}); "
            f"print('sqlite3.OperationalError: database is locked'); raise SystemExit(1)\"")


@pytest.fixture
def pg(tmp_path: Path) -> Iterator[LedgerPlace]:
    yield from place("postgresql", tmp_path)


def terminate_sessions(pg: LedgerPlace) -> int:
    """What a server restart does to every client: their sessions are cut (57P01)."""
    import psycopg

    with psycopg.connect(pg.url, autocommit=True) as conn:
        rows = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE application_name = 'retest' AND pid <> pg_backend_pid()").fetchall()
    return len(rows)


def test_a_terminated_session_is_replaced_and_nothing_counts_twice(pg: LedgerPlace) -> None:
    ledger = open_ledger(pg.env)
    assert ledger.record_infra_failure("T", "s", "timeout", 1).attempt == 1
    assert terminate_sessions(pg) == 1
    outcome = ledger.record_infra_failure("T", "s", "timeout", 1, confirm_delivery=True)
    assert (outcome.attempt, outcome.exhausted, outcome.alert_claimed) == (2, True, True)
    assert ledger.infra_attempts("T", "s", "timeout") == 2
    assert pg.count("SELECT COUNT(*) FROM alerts") == 1


def test_an_unreachable_server_is_a_ledger_error_within_the_reconnect_window(tmp_path: Path) -> None:
    from ledgers import require_server
    require_server()
    env = {"RETEST_LEDGER_URL": "postgresql://retest:x@127.0.0.1:1/none",  # nothing listens
           "RETEST_LEDGER_RECONNECT_S": "1", "RETEST_LEDGER_CONNECT_TIMEOUT_S": "2"}
    ledger = open_ledger(env)
    started = time.monotonic()
    with pytest.raises(LedgerError, match="connection lost and not back"):
        ledger.next_run("T", "s")
    assert time.monotonic() - started < 5


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    return make_repo(tmp_path)


def gate_env(repo: Repo, pg: LedgerPlace, **extra: str) -> dict[str, str]:
    return dict(repo.env, **pg.env, MERGE_GATE_INFRA_RETRY_MAX="0", **extra)


def test_a_server_restart_while_the_suite_runs_changes_nothing(repo: Repo, pg: LedgerPlace) -> None:
    require_throwaway()
    sha = repo.branch("feature", {"feature.py": "VALUE = 1\n"})
    env = gate_env(repo, pg, MERGE_RETEST_COMMAND=locked_after(2.0))
    ledger: LedgerBackend = open_ledger(env)
    ledger.totals()   # the gate's connection is open before the restart
    restarter = threading.Thread(target=lambda: (time.sleep(0.5), server("restart")))
    alerts: list[dict[str, Any]] = []
    restarter.start()
    try:
        decision = retest_branch(repo.path, "feature", task_id="T-restart", env=env, ledger=ledger,
                                 alert_hook=alerts.append, metrics=GateMetrics())
    finally:
        restarter.join()
    assert (decision.action, decision.rule, decision.infra_attempt, decision.alert) == \
        ("hold", "lock-busy.sqlite", 1, True), decision.reason
    assert len(alerts) == 1 and decision.attempt == 1
    fresh = open_ledger(env)
    assert fresh.infra_attempts("T-restart", sha, "lock-busy") == 1
    assert fresh.pending_alerts() == [] and len(fresh.alerts("T-restart")) == 1


def test_a_server_down_through_the_decision_holds_with_one_alert(repo: Repo, pg: LedgerPlace) -> None:
    require_throwaway()
    sha = repo.branch("feature", {"feature.py": "VALUE = 1\n"})
    env = gate_env(repo, pg, MERGE_RETEST_COMMAND=locked_after(1.0), RETEST_LEDGER_RECONNECT_S="1")
    ledger = open_ledger(env)
    ledger.totals()
    alerts: list[dict[str, Any]] = []
    halter = threading.Thread(target=lambda: server("halt"))
    halter.start()   # the server goes down while the suite runs, and stays down
    try:
        decision = retest_branch(repo.path, "feature", task_id="T-down", env=env, ledger=ledger,
                                 alert_hook=alerts.append, metrics=GateMetrics())
    finally:
        halter.join()
        server("resume")
    assert (decision.action, decision.verdict, decision.rule) == ("hold", "other", "other.ledger-error")
    assert decision.alert and len(alerts) == 1 and alerts[0]["rule"] == "other.ledger-error"
    assert decision.infra_attempt is None and decision.attempt == 0
    # Nothing reached the server, so nothing is counted; the next gate starts at attempt 1.
    after = open_ledger(env)
    assert after.infra_attempts("T-down", sha, "lock-busy") == 0 and after.alerts() == []
    again = retest_branch(repo.path, "feature", task_id="T-down", env=env, ledger=after,
                          alert_hook=alerts.append, metrics=GateMetrics())
    assert (again.action, again.infra_attempt, again.alert) == ("hold", 1, True)
    assert len(alerts) == 2 and alerts[1]["rule"] == "lock-busy.sqlite"


def test_retest_serve_reads_the_postgresql_ledger(repo: Repo, pg: LedgerPlace) -> None:
    import json
    import urllib.request

    from retest import config, status

    repo.branch("feature", {"feature.py": "VALUE = 1\n"})
    env = gate_env(repo, pg)
    decision = retest_branch(repo.path, "feature", task_id="T-serve", env=env, metrics=GateMetrics())
    assert decision.action == "merge"
    srv = status.make_server("127.0.0.1", 0, ledger=open_ledger(env),
                             settings=config.GateSettings.from_env(env))
    worker = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    worker.start()
    try:
        port = srv.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/queue", timeout=10) as answer:
            block = json.load(answer)["merge_gate"]
    finally:
        srv.shutdown()
        srv.server_close()
        worker.join(timeout=5)
    assert block["ledger_backend"] == "postgresql" and block["counters"]["merges"] == 1
    assert [d["task_id"] for d in block["recent"]] == ["T-serve"]
    password = pg.url.split("@")[0].rsplit(":", 1)[-1]
    assert password not in json.dumps(block)
