"""The embedded ledger backend: one SQLite file, nothing to install (the default).

Why SQLite: the retry bound and the one-alert rule must hold across gate processes and
restarts on one host. Each operation opens its own connection (safe across threads and
forks), runs in one ``BEGIN IMMEDIATE`` transaction (the write lock is taken up front, so two
gates never both read "no alert yet" and both send one), and closes it. WAL lets
``retest serve`` read while a gate writes; ``busy_timeout`` makes a writer wait for another
rather than fail at once. The policy itself is ``ledger_base``'s, shared with PostgreSQL.
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
import time
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar

from . import config
from .ledger_base import LedgerBackend, LedgerBusy, LedgerError, Tx, migrate

__all__ = ["SqliteLedger", "MIGRATIONS"]

T = TypeVar("T")

#: Schema history. Version 1 is the ledger of retest 0.1 (created with IF NOT EXISTS, so a
#: ledger written before ``meta`` existed is adopted as it is); 2 adds the claimant's host and
#: lease (claims taken over across hosts), write tokens and the duration history; 3 keys
#: durations by (repository, suite command); 4 keeps each run's timeline (issue 16).
MIGRATIONS: Mapping[int, Sequence[str]] = {
    1: (
        "CREATE TABLE IF NOT EXISTS runs (task TEXT NOT NULL, sha TEXT NOT NULL, "
        "runs INTEGER NOT NULL, last_at REAL NOT NULL, PRIMARY KEY (task, sha))",
        "CREATE TABLE IF NOT EXISTS infra_attempts (task TEXT NOT NULL, sha TEXT NOT NULL, "
        "verdict TEXT NOT NULL, attempts INTEGER NOT NULL, first_at REAL NOT NULL, "
        "last_at REAL NOT NULL, PRIMARY KEY (task, sha, verdict))",
        "CREATE TABLE IF NOT EXISTS alerts (task TEXT NOT NULL, sha TEXT NOT NULL, "
        "verdict TEXT NOT NULL, sent_at REAL NOT NULL, pid INTEGER NOT NULL, reason TEXT NOT NULL, "
        "PRIMARY KEY (task, sha, verdict))",
        "CREATE TABLE IF NOT EXISTS alert_pending (task TEXT NOT NULL, sha TEXT NOT NULL, "
        "verdict TEXT NOT NULL, pid INTEGER NOT NULL, claimed_at REAL NOT NULL, "
        "PRIMARY KEY (task, sha, verdict))",
        "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
        "CREATE TABLE IF NOT EXISTS decisions (id INTEGER PRIMARY KEY AUTOINCREMENT, "
        "at REAL NOT NULL, doc TEXT NOT NULL)",
    ),
    2: (
        "ALTER TABLE alert_pending ADD COLUMN host TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE alert_pending ADD COLUMN lease_until REAL NOT NULL DEFAULT 0",
        "CREATE TABLE IF NOT EXISTS ops (token TEXT PRIMARY KEY, at REAL NOT NULL, "
        "result TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS durations (id INTEGER PRIMARY KEY AUTOINCREMENT, "
        "at REAL NOT NULL, task TEXT NOT NULL, sha TEXT NOT NULL, action TEXT NOT NULL, "
        "verdict TEXT NOT NULL, gate_s REAL NOT NULL, suite_s REAL)",
        "CREATE INDEX IF NOT EXISTS durations_task ON durations (task, id)",
    ),
    # 3 (issue 11): the duration history per (repository, suite command), for timeouts.
    3: (
        "ALTER TABLE durations ADD COLUMN suite_key TEXT NOT NULL DEFAULT ''",
        "CREATE INDEX IF NOT EXISTS durations_suite ON durations (suite_key, id)",
    ),
    # 4 (issue 16): each run's timeline, for retest serve's decision pages (bounded in size
    # by RETEST_TIMELINE_MAX_BYTES, in number by RETEST_TIMELINES_KEPT).
    4: (
        "CREATE TABLE IF NOT EXISTS timelines (decision_id INTEGER PRIMARY KEY, "
        "at REAL NOT NULL, doc TEXT NOT NULL)",
    ),
}


class _SqliteTx:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self._conn.execute(sql, tuple(params))

    def now(self) -> float:
        return time.time()  # one host: its clock is the ledger's


class SqliteLedger(LedgerBackend):
    """The SQLite ledger at ``path`` (default: ``GateSettings.ledger_path``)."""

    backend = "sqlite"

    def __init__(self, path: Optional[str] = None, *, busy_timeout_s: Optional[float] = None,
                 environ: Optional[Mapping[str, str]] = None, host_id: Optional[str] = None,
                 claim_lease_s: Optional[float] = None) -> None:
        if path is None or busy_timeout_s is None or claim_lease_s is None:
            settings = config.GateSettings.from_env(environ)
            ledger_settings = config.LedgerSettings.from_env(environ)
            path = settings.ledger_path if path is None else path
            busy_timeout_s = settings.ledger_busy_timeout_s if busy_timeout_s is None else busy_timeout_s
            claim_lease_s = ledger_settings.claim_lease_s if claim_lease_s is None else claim_lease_s
            host_id = host_id or ledger_settings.host_id
        super().__init__(host_id=host_id, claim_lease_s=claim_lease_s)
        self.path: str = os.fspath(path)
        self.busy_timeout_s: float = float(busy_timeout_s)
        self._ready = False

    def describe(self) -> str:
        return f"sqlite:{self.path}"

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
            conn.execute("BEGIN IMMEDIATE")
            try:
                migrate(_SqliteTx(conn), MIGRATIONS, self.path)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            self._ready = True
        return conn

    def _run(self, fn: Callable[[Tx], T], *, write: bool = True) -> T:
        """One transaction (``BEGIN IMMEDIATE`` to write); SQLite failures become ``LedgerError``."""
        conn: Optional[sqlite3.Connection] = None
        try:
            conn = self._connect(write)
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                result = fn(_SqliteTx(conn))
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result
        except sqlite3.OperationalError as err:
            if "locked" in str(err) or "busy" in str(err):
                raise LedgerBusy(f"ledger {self.path}: database is locked ({err})") from err
            raise LedgerError(f"ledger {self.path}: {err}") from err
        except (sqlite3.Error, OSError) as err:
            raise LedgerError(f"ledger {self.path}: {err}") from err
        finally:
            if conn is not None:
                conn.close()
