"""The ledger's one contract: budgets, the one-alert rule, decisions, durations, for every backend.

A backend (``ledger_sqlite``, ``ledger_postgres``) supplies only a transaction runner
(``_run``), its DDL and how it reads the clock; the policy lives here, written once in the SQL
both engines accept (``INSERT ... ON CONFLICT``), so the semantics cannot drift apart:

* ``infra_attempts`` counts per (task, sha, verdict) in the same transaction that decides
  whether the budget is spent and claims the alert;
* ``alerts`` has a primary key on (task, sha, verdict): the one insert that lands is the one
  caller that alerts, whichever host or process it runs in;
* ``alert_pending`` names the claimant (host id and pid) until ``alert_delivered()``. A claim
  is taken over when its claimant is provably gone: on the same host when its pid is dead (a
  kernel fact, at once), from another host when the claim's lease (``claim_lease_s``, longer
  than an alert command may run) has run out on the ledger's own clock;
* a backend whose connection can drop (PostgreSQL) retries a write whose outcome it could not
  learn; each write carries a token recorded in ``ops`` in the same transaction, so a retried
  write returns what the first one did instead of counting twice (no lost, no doubled attempt).

Every failure surfaces as ``LedgerError`` (``LedgerBusy`` for a lock held beyond the wait):
the gate turns it into a decision, never a crash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence, TypeVar

from . import config, redact

log = logging.getLogger("retest.ledger")

__all__ = ["LedgerBackend", "LedgerError", "LedgerBusy", "InfraAttempt", "SCHEMA_VERSION",
           "DECISIONS_KEPT", "DURATIONS_KEPT", "TIMELINES_KEPT", "host_identity"]

#: The schema this package writes; each backend migrates older ledgers up to it (``meta``).
SCHEMA_VERSION = 4

#: Decisions kept for ``recent_decisions()``; the totals live in ``counters`` and never shrink.
DECISIONS_KEPT = 1000
#: Duration rows kept for ``durations()``.
DURATIONS_KEPT = 10000
#: Run timelines kept (``RETEST_TIMELINES_KEPT``'s default): the newest, for ``retest serve``.
TIMELINES_KEPT = config.DEFAULT_TIMELINES_KEPT
#: Write tokens kept (seconds): far longer than any retry of the write they protect.
OPS_KEPT_S = 86400.0

T = TypeVar("T")


class LedgerError(Exception):
    """The ledger could not be read or written."""


class LedgerBusy(LedgerError):
    """The ledger stayed locked beyond the configured wait."""


@dataclass(frozen=True)
class InfraAttempt:
    """One infra failure recorded against a retry budget."""

    #: 1-based number of this infra failure for (task, sha, verdict).
    attempt: int
    #: The budget is spent: hold instead of requeue.
    exhausted: bool
    #: This call inserted the alert row: it, and only it, sends the alert.
    alert_claimed: bool


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Tx(Protocol):
    """One open transaction: SQL with ``?`` placeholders, and the ledger's clock."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor: ...

    def now(self) -> float: ...


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def host_identity() -> str:
    """Who "this host" is for pid checks: hostname + a hash of machine id, boot id, pid namespace.

    Two gates may compare pids only when all three match: a reboot (boot id) or a container
    with its own pid namespace makes the same number another process.
    """
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    fingerprint = "|".join((_read("/etc/machine-id"), _read("/proc/sys/kernel/random/boot_id"), pidns))
    return f"{socket.gethostname()[:40]}/{hashlib.sha256(fingerprint.encode()).hexdigest()[:12]}"


def process_alive(pid: int) -> bool:
    """True unless ``pid`` (on this host) is gone or a zombie."""
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


def migrate(tx: Tx, migrations: Mapping[int, Sequence[str]], where: str) -> int:
    """Bring the schema up to ``SCHEMA_VERSION`` inside ``tx``; return the version found.

    The caller holds the engine's schema lock (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: an
    advisory transaction lock) so two first gates never both migrate. A ledger written by a
    newer retest is refused rather than written with rules it does not know.
    """
    tx.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    row = tx.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    found = int(row[0]) if row else 0
    if found > SCHEMA_VERSION:
        raise LedgerError(f"ledger {where} has schema version {found}, newer than this retest "
                          f"understands ({SCHEMA_VERSION}): upgrade retest")
    for version in sorted(migrations):
        if version > found:
            for statement in migrations[version]:
                tx.execute(statement)
    if found < SCHEMA_VERSION:
        tx.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
                   "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (str(SCHEMA_VERSION),))
        if found:
            log.warning("ledger %s: schema migrated from version %d to %d", where, found, SCHEMA_VERSION)
    return found


def _load(text: str) -> Optional[dict[str, Any]]:
    """A stored JSON object, or ``None`` for a row that is not one."""
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


class LedgerBackend(ABC):
    """The contract every ledger backend keeps (module docstring); subclasses supply ``_run``."""

    #: ``"sqlite"`` or ``"postgresql"``: shown in the start-up log line and in ``describe()``.
    backend: str = ""
    #: Retried writes are possible (connection loss): writes go through ``ops`` tokens.
    _idempotent_writes: bool = False

    def __init__(self, *, host_id: Optional[str], claim_lease_s: float) -> None:
        self.host_id: str = host_id or host_identity()
        self.claim_lease_s = float(claim_lease_s)

    # ----------------------------------------------------------------- what a backend supplies

    @abstractmethod
    def _run(self, fn: Callable[[Tx], T], *, write: bool = True) -> T:
        """Run ``fn`` in one transaction (retried where the backend can lose its connection)."""

    @abstractmethod
    def describe(self) -> str:
        """Where the ledger is, without secrets (no password): for logs and errors."""

    def close(self) -> None:
        """Release connections (a later call opens new ones)."""

    def schema_version(self) -> int:
        row = self._run(lambda tx: tx.execute(
            "SELECT value FROM meta WHERE key = 'schema_version'").fetchone(), write=False)
        return int(row[0]) if row else 0

    # ----------------------------------------------------------------- idempotent writes

    def _write(self, fn: Callable[[Tx], T], decode: Callable[[Any], T] = lambda v: v) -> T:
        """A write that a retry after connection loss must not repeat: keyed by a fresh token."""
        if not self._idempotent_writes:
            return self._run(fn)
        token = uuid.uuid4().hex

        def once(tx: Tx) -> T:
            row = tx.execute("SELECT result FROM ops WHERE token = ?", (token,)).fetchone()
            if row is not None:
                log.warning("ledger %s: a write committed before the connection was lost; "
                            "keeping its outcome, not repeating it", self.describe())
                return decode(json.loads(row[0]))
            result = fn(tx)
            tx.execute("INSERT INTO ops (token, at, result) VALUES (?, ?, ?)",
                       (token, tx.now(), json.dumps(result)))
            return result

        return self._run(once)

    # ----------------------------------------------------------------- retry budget and alerts

    def next_run(self, task: str, sha: str) -> int:
        """Count one more gate run for (task, sha); return its 1-based number."""
        def body(tx: Tx) -> int:
            tx.execute(
                "INSERT INTO runs (task, sha, runs, last_at) VALUES (?, ?, 1, ?) "
                "ON CONFLICT (task, sha) DO UPDATE SET runs = runs.runs + 1, last_at = excluded.last_at",
                (task, sha, tx.now()),
            )
            row = tx.execute("SELECT runs FROM runs WHERE task = ? AND sha = ?", (task, sha)).fetchone()
            assert row is not None
            return int(row[0])
        return self._write(body, int)

    def record_infra_failure(self, task: str, sha: str, verdict: str, retry_max: int,
                             reason: str = "", *, confirm_delivery: bool = False) -> InfraAttempt:
        """Count an infra failure; past ``retry_max`` the budget is spent and the alert is claimed.

        One transaction, so the count, the bound and the alert row agree across processes and
        hosts. ``confirm_delivery``: see ``claim_alert``.
        """
        def body(tx: Tx) -> list[Any]:
            now = tx.now()
            tx.execute(
                "INSERT INTO infra_attempts (task, sha, verdict, attempts, first_at, last_at) "
                "VALUES (?, ?, ?, 1, ?, ?) ON CONFLICT (task, sha, verdict) "
                "DO UPDATE SET attempts = infra_attempts.attempts + 1, last_at = excluded.last_at",
                (task, sha, verdict, now, now),
            )
            row = tx.execute("SELECT attempts FROM infra_attempts WHERE task = ? AND sha = ? "
                             "AND verdict = ?", (task, sha, verdict)).fetchone()
            assert row is not None
            attempts = int(row[0])
            exhausted = attempts > retry_max
            claimed = exhausted and self._claim(tx, task, sha, verdict, reason, confirm_delivery)
            return [attempts, exhausted, claimed]
        attempt, exhausted, claimed = self._write(body, list)
        return InfraAttempt(int(attempt), bool(exhausted), bool(claimed))

    def claim_alert(self, task: str, sha: str, verdict: str, reason: str = "", *,
                    confirm_delivery: bool = False) -> bool:
        """``True`` for exactly one caller per (task, sha, verdict), across all processes and hosts.

        With ``confirm_delivery=True`` the caller promises to call ``alert_delivered()`` once
        the alert is out; until then, should the claimant die, the next claimant with
        ``confirm_delivery=True`` gets ``True`` instead (at-least-once across crashes).
        """
        return self._write(lambda tx: self._claim(tx, task, sha, verdict, reason, confirm_delivery),
                           bool)

    def _claim(self, tx: Tx, task: str, sha: str, verdict: str, reason: str,
               confirm_delivery: bool) -> bool:
        key = (task, sha, verdict)
        me, now = os.getpid(), tx.now()
        lease_until = now + self.claim_lease_s
        inserted = tx.execute(
            "INSERT INTO alerts (task, sha, verdict, sent_at, pid, reason) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (task, sha, verdict) DO NOTHING",
            (*key, now, me, reason[:2000]),
        ).rowcount == 1
        if inserted:
            if confirm_delivery:
                tx.execute(
                    "INSERT INTO alert_pending (task, sha, verdict, pid, claimed_at, host, lease_until) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (task, sha, verdict) DO UPDATE SET "
                    "pid = excluded.pid, claimed_at = excluded.claimed_at, host = excluded.host, "
                    "lease_until = excluded.lease_until",
                    (*key, me, now, self.host_id, lease_until),
                )
            return True
        if not confirm_delivery:
            return False
        # FOR UPDATE where the engine has it: two takers of one dead claim serialize here, and
        # the second reads the first one's fresh claim.
        row = tx.execute("SELECT pid, host, lease_until FROM alert_pending WHERE task = ? AND sha = ? "
                         "AND verdict = ?" + self._for_update, key).fetchone()
        if row is None or not self._claimant_gone(int(row[0]), str(row[1]), float(row[2]), now):
            return False
        # Issue 6: the claimant died between its claim and the send; issue 12: on any host.
        log.warning("alert for %s was claimed by pid %d on %s, which is gone without confirming "
                    "it; sending it again", key, row[0], row[1] or "this host")
        tx.execute("UPDATE alert_pending SET pid = ?, host = ?, claimed_at = ?, lease_until = ? "
                   "WHERE task = ? AND sha = ? AND verdict = ?", (me, self.host_id, now, lease_until, *key))
        tx.execute("UPDATE alerts SET pid = ? WHERE task = ? AND sha = ? AND verdict = ?", (me, *key))
        return True

    #: Appended to the pending-claim read (PostgreSQL: `` FOR UPDATE``).
    _for_update = ""

    def _claimant_gone(self, pid: int, host: str, lease_until: float, now: float) -> bool:
        """Same host (or a row from before hosts were recorded): the pid decides. Elsewhere: the lease."""
        if host in ("", self.host_id):
            return not process_alive(pid)
        return now >= lease_until

    def alert_delivered(self, task: str, sha: str, verdict: str) -> None:
        """Confirm the alert this process claimed with ``confirm_delivery=True`` is out."""
        self._run(lambda tx: tx.execute(
            "DELETE FROM alert_pending WHERE task = ? AND sha = ? AND verdict = ? AND pid = ? "
            "AND host IN (?, '')", (task, sha, verdict, os.getpid(), self.host_id)))

    def pending_alerts(self) -> list[dict[str, Any]]:
        """Claims not yet confirmed delivered: ``task``, ``sha``, ``verdict``, ``pid``, ``host``."""
        rows = self._run(lambda tx: tx.execute(
            "SELECT task, sha, verdict, pid, host FROM alert_pending ORDER BY claimed_at").fetchall(),
            write=False)
        return [dict(zip(("task", "sha", "verdict", "pid", "host"), row)) for row in rows]

    def alerts(self, task: Optional[str] = None) -> list[dict[str, Any]]:
        """The alert rows (all, or one task's), oldest first."""
        query = "SELECT task, sha, verdict, sent_at, pid, reason FROM alerts"
        query += (" WHERE task = ?" if task else "") + " ORDER BY sent_at"
        rows = self._run(lambda tx: tx.execute(query, (task,) if task else ()).fetchall(), write=False)
        keys = ("task", "sha", "verdict", "sent_at", "pid", "reason")
        return [dict(zip(keys, row)) for row in rows]

    def infra_attempts(self, task: str, sha: str, verdict: str) -> int:
        row = self._run(lambda tx: tx.execute(
            "SELECT attempts FROM infra_attempts WHERE task = ? AND sha = ? AND verdict = ?",
            (task, sha, verdict)).fetchone(), write=False)
        return int(row[0]) if row else 0

    def runs(self, task: str, sha: str) -> int:
        """Gate runs counted for (task, sha)."""
        row = self._run(lambda tx: tx.execute(
            "SELECT runs FROM runs WHERE task = ? AND sha = ?", (task, sha)).fetchone(), write=False)
        return int(row[0]) if row else 0

    # ----------------------------------------------------------------- decisions, totals, durations

    def record_decision(self, doc: Mapping[str, Any], counter_increments: Mapping[str, int],
                        keep: int = DECISIONS_KEPT, *, timeline: Optional[Mapping[str, Any]] = None,
                        timelines_kept: int = TIMELINES_KEPT) -> int:
        """Append a decision, add to the totals and to the duration history, in one transaction;
        return the decision's id (``decision(id)``).

        The decision is stored with its untrusted fields masked (branch, task id, reason...,
        ``redact.redact_decision``), whoever records it: ``retest serve`` shows these rows.
        ``timeline`` (``retest.timeline``, already bounded in size) is stored beside it, every
        string masked (test ids, stacks, command lines are the suite's), and only the newest
        ``timelines_kept`` are kept (0: none is stored).
        """
        secrets = redact.FILTER.secrets()
        stored = redact.redact_decision(doc, secrets)
        text = json.dumps(stored, sort_keys=True, default=str)
        timeline_text = json.dumps(redact.redact_obj(dict(timeline), secrets), sort_keys=True,
                                   default=str) if timeline is not None and timelines_kept > 0 else None
        raw_evidence = stored.get("evidence")
        evidence: dict[str, Any] = raw_evidence if isinstance(raw_evidence, dict) else {}
        suite_s = evidence.get("run_duration_s")

        def body(tx: Tx) -> int:
            now = tx.now()
            row = tx.execute("INSERT INTO decisions (at, doc) VALUES (?, ?) RETURNING id",
                             (now, text)).fetchone()
            assert row is not None
            decision_id = int(row[0])
            if timeline_text is not None:
                tx.execute("INSERT INTO timelines (decision_id, at, doc) VALUES (?, ?, ?)",
                           (decision_id, now, timeline_text))
                tx.execute("DELETE FROM timelines WHERE decision_id NOT IN (SELECT decision_id "
                           "FROM timelines ORDER BY decision_id DESC LIMIT ?)", (timelines_kept,))
            for name, delta in counter_increments.items():
                if delta:
                    tx.execute("INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT (name) "
                               "DO UPDATE SET value = counters.value + excluded.value", (name, int(delta)))
            tx.execute("DELETE FROM decisions WHERE id <= (SELECT MAX(id) FROM decisions) - ?",
                       (max(keep, 1),))
            if isinstance(stored.get("duration_s"), (int, float)):
                tx.execute("INSERT INTO durations (at, task, sha, action, verdict, gate_s, suite_s, "
                           "suite_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           (now, str(stored.get("task_id") or ""), str(stored.get("sha") or ""),
                            str(stored.get("action") or ""), str(stored.get("verdict") or ""),
                            float(stored["duration_s"]),
                            float(suite_s) if isinstance(suite_s, (int, float)) else None,
                            str(evidence.get("suite_key") or "")))
                tx.execute("DELETE FROM durations WHERE id <= (SELECT MAX(id) FROM durations) - ?",
                           (DURATIONS_KEPT,))
            if self._idempotent_writes:
                tx.execute("DELETE FROM ops WHERE at < ?", (now - OPS_KEPT_S,))
            return decision_id
        return self._write(body, int)

    def totals(self) -> dict[str, int]:
        rows = self._run(lambda tx: tx.execute("SELECT name, value FROM counters").fetchall(), write=False)
        return {str(name): int(value) for name, value in rows}

    def recent_decisions(self, limit: int) -> list[dict[str, Any]]:
        """The last ``limit`` decisions, newest first, each with its ``id``."""
        rows = self._run(lambda tx: tx.execute(
            "SELECT id, doc FROM decisions ORDER BY id DESC LIMIT ?", (max(limit, 0),)).fetchall(),
            write=False)
        out: list[dict[str, Any]] = []
        for decision_id, doc in rows:
            loaded = _load(doc)
            if loaded is not None:
                out.append(dict(loaded, id=int(decision_id)))
        return out

    def decision(self, decision_id: int) -> Optional[tuple[dict[str, Any], Optional[dict[str, Any]]]]:
        """``(decision, timeline)`` of one recorded decision (timeline ``None`` when none was
        kept), or ``None`` when the ledger has no such decision (any more)."""
        def body(tx: Tx) -> tuple[Any, Any]:
            row = tx.execute("SELECT doc FROM decisions WHERE id = ?", (decision_id,)).fetchone()
            if row is None:
                return None, None
            kept = tx.execute("SELECT doc FROM timelines WHERE decision_id = ?",
                              (decision_id,)).fetchone()
            return row[0], kept[0] if kept is not None else None
        doc, timeline = self._run(body, write=False)
        loaded = _load(doc) if doc is not None else None
        if loaded is None:
            return None
        return dict(loaded, id=decision_id), _load(timeline) if timeline is not None else None

    def durations(self, task: Optional[str] = None, limit: int = 100) -> list[dict[str, Any]]:
        """Gate and suite wall times of the last ``limit`` decisions (one task's, or all), newest first."""
        query = "SELECT at, task, sha, action, verdict, gate_s, suite_s FROM durations"
        query += (" WHERE task = ?" if task else "") + " ORDER BY id DESC LIMIT ?"
        params: tuple[Any, ...] = ((task,) if task else ()) + (max(limit, 0),)
        rows = self._run(lambda tx: tx.execute(query, params).fetchall(), write=False)
        keys = ("at", "task", "sha", "action", "verdict", "gate_s", "suite_s")
        return [dict(zip(keys, row)) for row in rows]

    def suite_history(self, suite_key: str, limit: int = 10) -> list[tuple[str, float]]:
        """``(verdict, suite seconds)`` of the last ``limit`` runs of one (repository, suite
        command) that ran the suite, newest first (issue 11: a timeout against its history)."""
        rows = self._run(lambda tx: tx.execute(
            "SELECT verdict, suite_s FROM durations WHERE suite_key = ? AND suite_s IS NOT NULL "
            "ORDER BY id DESC LIMIT ?", (suite_key, max(limit, 0))).fetchall(), write=False)
        return [(str(v), float(s)) for v, s in rows]
