"""The gate's embedded ledger: retry budgets, sent alerts and decisions, in one SQLite file.

Why SQLite: the retry bound and the one-alert rule must hold across gate processes and
restarts, with nothing to install. Each operation opens its own connection (safe across
threads and forks), runs in one ``BEGIN IMMEDIATE`` transaction (the write lock is taken up
front, so two gates never both read "no alert yet" and both send one), and closes it.
WAL lets ``retest serve`` read while a gate writes; ``busy_timeout`` makes a writer wait
for another rather than fail at once.

Who sends an alert is decided by one row: ``alerts`` has a primary key on
``(task, sha, verdict)`` and ``INSERT OR IGNORE`` reports whether *this* call inserted it.
A claim made with ``confirm_delivery=True`` also leaves an ``alert_pending`` row naming the
claimant's pid until ``alert_delivered()`` removes it: if the claimant dies first (SIGKILL
between the claim and the send), the next claimant for that key takes the claim over, so a
killed gate cannot swallow the only alert. A live claimant is never overtaken.

Every failure surfaces as ``LedgerError`` (``LedgerBusy`` when SQLite says the database is
locked beyond the busy timeout): the gate turns it into a decision, never a crash.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
import urllib.parse
from dataclasses import dataclass
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Optional

from . import config, redact

log = logging.getLogger(__name__)

__all__ = ["Ledger", "LedgerError", "LedgerBusy", "InfraAttempt", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    task TEXT NOT NULL, sha TEXT NOT NULL, runs INTEGER NOT NULL, last_at REAL NOT NULL,
    PRIMARY KEY (task, sha));
CREATE TABLE IF NOT EXISTS infra_attempts (
    task TEXT NOT NULL, sha TEXT NOT NULL, verdict TEXT NOT NULL,
    attempts INTEGER NOT NULL, first_at REAL NOT NULL, last_at REAL NOT NULL,
    PRIMARY KEY (task, sha, verdict));
CREATE TABLE IF NOT EXISTS alerts (
    task TEXT NOT NULL, sha TEXT NOT NULL, verdict TEXT NOT NULL,
    sent_at REAL NOT NULL, pid INTEGER NOT NULL, reason TEXT NOT NULL,
    PRIMARY KEY (task, sha, verdict));
CREATE TABLE IF NOT EXISTS alert_pending (
    task TEXT NOT NULL, sha TEXT NOT NULL, verdict TEXT NOT NULL,
    pid INTEGER NOT NULL, claimed_at REAL NOT NULL,
    PRIMARY KEY (task, sha, verdict));
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, doc TEXT NOT NULL);
"""

#: Decisions kept for ``recent_decisions()``; the totals live in ``counters`` and never shrink.
DECISIONS_KEPT = 1000


def _process_alive(pid: int) -> bool:
    """True unless ``pid`` is gone or a zombie (the ledger is shared on one host only)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


class LedgerError(Exception):
    """The ledger could not be read or written."""


class LedgerBusy(LedgerError):
    """SQLite reported ``database is locked`` after waiting ``busy_timeout``."""


@dataclass(frozen=True)
class InfraAttempt:
    """One infra failure recorded against a retry budget."""

    #: 1-based number of this infra failure for (task, sha, verdict).
    attempt: int
    #: The budget is spent: hold instead of requeue.
    exhausted: bool
    #: This call inserted the alert row: it, and only it, sends the alert.
    alert_claimed: bool


class Ledger:
    """The SQLite ledger at ``path`` (default: ``GateSettings.ledger_path``)."""

    def __init__(self, path: Optional[str] = None, *, busy_timeout_s: Optional[float] = None,
                 environ: Optional[Mapping[str, str]] = None) -> None:
        if path is None or busy_timeout_s is None:
            settings = config.GateSettings.from_env(environ)
            path = settings.ledger_path if path is None else path
            busy_timeout_s = settings.ledger_busy_timeout_s if busy_timeout_s is None else busy_timeout_s
        self.path: str = os.fspath(path)
        self.busy_timeout_s: float = float(busy_timeout_s)
        self._ready = False

    # ----------------------------------------------------------------- connection

    def _read_only(self) -> bool:
        """A ledger that exists where this process cannot write (a read-only mount or folder):
        it can still be read, with SQLite's ``mode=ro`` (``retest serve`` on a replica)."""
        if self.path == ":memory:" or not os.path.exists(self.path):
            return False
        folder = os.path.dirname(os.path.abspath(self.path))
        return not (os.access(folder, os.W_OK) and os.access(self.path, os.W_OK))

    def _connect_read_only(self) -> sqlite3.Connection:
        """``mode=ro``; if SQLite cannot open the WAL index either (no ``-shm`` and none can
        be created: a read-only folder nobody writes), ``immutable=1``, which needs none."""
        base = "file:" + urllib.parse.quote(os.path.abspath(self.path))
        for query in ("?mode=ro", "?mode=ro&immutable=1"):
            conn = sqlite3.connect(base + query, uri=True, timeout=self.busy_timeout_s,
                                   isolation_level=None)
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
                conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
                return conn
            except sqlite3.OperationalError:
                conn.close()
                if "immutable" in query:
                    raise
        raise AssertionError("unreachable")

    def _connect(self, write: bool = True) -> sqlite3.Connection:
        if not write and self._read_only():
            return self._connect_read_only()
        if self.path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o700, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        if not self._ready:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.executescript(_SCHEMA)
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                         (str(SCHEMA_VERSION),))
            self._ready = True
        return conn

    @contextmanager
    def _transaction(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction (``BEGIN IMMEDIATE`` to write); SQLite failures become ``LedgerError``."""
        conn: Optional[sqlite3.Connection] = None
        try:
            conn = self._connect(write)
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.OperationalError as err:
            if "locked" in str(err) or "busy" in str(err):
                raise LedgerBusy(f"ledger {self.path}: database is locked ({err})") from err
            raise LedgerError(f"ledger {self.path}: {err}") from err
        except (sqlite3.Error, OSError) as err:
            raise LedgerError(f"ledger {self.path}: {err}") from err
        finally:
            if conn is not None:
                conn.close()

    # ----------------------------------------------------------------- retry budget and alerts

    def next_run(self, task: str, sha: str) -> int:
        """Count one more gate run for (task, sha); return its 1-based number."""
        now = time.time()
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO runs (task, sha, runs, last_at) VALUES (?, ?, 1, ?) "
                "ON CONFLICT (task, sha) DO UPDATE SET runs = runs + 1, last_at = excluded.last_at",
                (task, sha, now),
            )
            (runs,) = conn.execute("SELECT runs FROM runs WHERE task = ? AND sha = ?",
                                   (task, sha)).fetchone()
        return int(runs)

    def record_infra_failure(self, task: str, sha: str, verdict: str, retry_max: int,
                             reason: str = "", *, confirm_delivery: bool = False) -> InfraAttempt:
        """Count an infra failure; past ``retry_max`` the budget is spent and the alert is claimed.

        One transaction, so the count, the bound and the alert row agree across processes.
        ``confirm_delivery``: see ``claim_alert``.
        """
        now = time.time()
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO infra_attempts (task, sha, verdict, attempts, first_at, last_at) "
                "VALUES (?, ?, ?, 1, ?, ?) ON CONFLICT (task, sha, verdict) "
                "DO UPDATE SET attempts = attempts + 1, last_at = excluded.last_at",
                (task, sha, verdict, now, now),
            )
            (attempts,) = conn.execute(
                "SELECT attempts FROM infra_attempts WHERE task = ? AND sha = ? AND verdict = ?",
                (task, sha, verdict),
            ).fetchone()
            exhausted = attempts > retry_max
            claimed = exhausted and self._claim(conn, task, sha, verdict, reason, now,
                                                confirm_delivery)
        return InfraAttempt(int(attempts), exhausted, claimed)

    def claim_alert(self, task: str, sha: str, verdict: str, reason: str = "", *,
                    confirm_delivery: bool = False) -> bool:
        """``True`` for exactly one caller per (task, sha, verdict), across all processes.

        With ``confirm_delivery=True`` the caller promises to call ``alert_delivered()`` once
        the alert is out; until then, should the claimant process die, the next claimant with
        ``confirm_delivery=True`` gets ``True`` instead (at-least-once across crashes).
        """
        with self._transaction() as conn:
            return self._claim(conn, task, sha, verdict, reason, time.time(), confirm_delivery)

    @staticmethod
    def _claim(conn: sqlite3.Connection, task: str, sha: str, verdict: str, reason: str,
               now: float, confirm_delivery: bool) -> bool:
        key = (task, sha, verdict)
        me = os.getpid()
        cursor = conn.execute(
            "INSERT OR IGNORE INTO alerts (task, sha, verdict, sent_at, pid, reason) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (*key, now, me, reason[:2000]),
        )
        if cursor.rowcount == 1:
            if confirm_delivery:
                conn.execute("INSERT OR REPLACE INTO alert_pending (task, sha, verdict, pid, claimed_at) "
                             "VALUES (?, ?, ?, ?, ?)", (*key, me, now))
            return True
        if not confirm_delivery:
            return False
        row = conn.execute("SELECT pid FROM alert_pending WHERE task = ? AND sha = ? AND verdict = ?",
                           key).fetchone()
        if row is None or _process_alive(int(row[0])):
            return False
        # Issue 6: the claimant died (SIGKILL) between its claim and the send.
        log.warning("alert for %s was claimed by pid %d, which died before confirming it; "
                    "sending it again", key, row[0])
        conn.execute("UPDATE alert_pending SET pid = ?, claimed_at = ? "
                     "WHERE task = ? AND sha = ? AND verdict = ?", (me, now, *key))
        conn.execute("UPDATE alerts SET pid = ? WHERE task = ? AND sha = ? AND verdict = ?", (me, *key))
        return True

    def alert_delivered(self, task: str, sha: str, verdict: str) -> None:
        """Confirm the alert this process claimed with ``confirm_delivery=True`` is out."""
        with self._transaction() as conn:
            conn.execute("DELETE FROM alert_pending WHERE task = ? AND sha = ? AND verdict = ? "
                         "AND pid = ?", (task, sha, verdict, os.getpid()))

    def pending_alerts(self) -> list[dict[str, Any]]:
        """Claims not yet confirmed delivered: ``task``, ``sha``, ``verdict``, ``pid``."""
        with self._transaction(write=False) as conn:
            rows = conn.execute("SELECT task, sha, verdict, pid FROM alert_pending").fetchall()
        return [dict(zip(("task", "sha", "verdict", "pid"), row)) for row in rows]

    def alerts(self, task: Optional[str] = None) -> list[dict[str, Any]]:
        """The alert rows (all, or one task's), oldest first."""
        with self._transaction(write=False) as conn:
            query = "SELECT task, sha, verdict, sent_at, pid, reason FROM alerts"
            rows = conn.execute(query + (" WHERE task = ?" if task else "") + " ORDER BY sent_at",
                                (task,) if task else ()).fetchall()
        keys = ("task", "sha", "verdict", "sent_at", "pid", "reason")
        return [dict(zip(keys, row)) for row in rows]

    def infra_attempts(self, task: str, sha: str, verdict: str) -> int:
        with self._transaction(write=False) as conn:
            row = conn.execute(
                "SELECT attempts FROM infra_attempts WHERE task = ? AND sha = ? AND verdict = ?",
                (task, sha, verdict),
            ).fetchone()
        return int(row[0]) if row else 0

    # ----------------------------------------------------------------- decisions and totals

    def record_decision(self, doc: Mapping[str, Any], counter_increments: Mapping[str, int],
                        keep: int = DECISIONS_KEPT) -> None:
        """Append a decision and add to the totals, in one transaction.

        The decision is stored with its untrusted fields masked (branch, task id, reason...,
        ``redact.redact_decision``), whoever records it: ``retest serve`` shows these rows.
        """
        now = time.time()
        stored = redact.redact_decision(doc, redact.FILTER.secrets())
        with self._transaction() as conn:
            conn.execute("INSERT INTO decisions (at, doc) VALUES (?, ?)",
                         (now, json.dumps(stored, sort_keys=True, default=str)))
            for name, delta in counter_increments.items():
                if delta:
                    conn.execute(
                        "INSERT INTO counters (name, value) VALUES (?, ?) "
                        "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                        (name, int(delta)),
                    )
            conn.execute("DELETE FROM decisions WHERE id <= (SELECT MAX(id) FROM decisions) - ?",
                         (max(keep, 1),))

    def totals(self) -> dict[str, int]:
        with self._transaction(write=False) as conn:
            return {name: int(value) for name, value in conn.execute("SELECT name, value FROM counters")}

    def recent_decisions(self, limit: int) -> list[dict[str, Any]]:
        """The last ``limit`` decisions, newest first."""
        with self._transaction(write=False) as conn:
            rows = conn.execute("SELECT doc FROM decisions ORDER BY id DESC LIMIT ?",
                                (max(limit, 0),)).fetchall()
        out: list[dict[str, Any]] = []
        for (doc,) in rows:
            try:
                out.append(json.loads(doc))
            except ValueError:
                continue
        return out
