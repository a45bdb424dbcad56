"""The gate's ledger: retry budgets, sent alerts, decisions and durations, on one of two backends.

* SQLite (``ledger_sqlite.SqliteLedger``, the default): one file on this host, nothing to
  install; the bound and the one-alert rule hold across the gate processes of one machine.
* PostgreSQL (``ledger_postgres.PostgresLedger``, ``RETEST_LEDGER_URL=postgresql://...``,
  ``pip install 'retest[postgres]'``): one database for every gate host of a fleet.

Both keep one contract (``ledger_base.LedgerBackend``): the policy is written once there. The
choice is made in one place, ``open_ledger()``, and logged once per process and backend.
``Ledger`` stays the SQLite ledger, as before, for code that names it.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Mapping, Optional, TypeVar

from . import config
from .ledger_base import (DECISIONS_KEPT, DURATIONS_KEPT, SCHEMA_VERSION, TIMELINES_KEPT, InfraAttempt,
                          LedgerBackend, LedgerBusy, LedgerError, Tx, host_identity)
from .ledger_sqlite import SqliteLedger

log = logging.getLogger("retest.ledger")

__all__ = ["Ledger", "LedgerBackend", "SqliteLedger", "LedgerError", "LedgerBusy", "InfraAttempt",
           "SCHEMA_VERSION", "DECISIONS_KEPT", "DURATIONS_KEPT", "TIMELINES_KEPT", "open_ledger", "host_identity",
           "BACKENDS", "UnavailableLedger"]

#: The backend names ``open_ledger`` can return (``LedgerBackend.backend``).
BACKENDS = ("sqlite", "postgresql")

#: The SQLite ledger, under the name the gate, the CLI and people's scripts have used.
Ledger = SqliteLedger

T = TypeVar("T")


class UnavailableLedger(LedgerBackend):
    """A ledger that could not even be set up (e.g. psycopg missing): every call raises its error,
    so the gate decides as for a server that is down (hold + alert ``other.ledger-error``)."""

    def __init__(self, backend: str, where: str, error: LedgerError) -> None:
        super().__init__(host_id="unavailable", claim_lease_s=0.0)
        self.backend = backend
        self._where = where
        self.error = error

    def describe(self) -> str:
        return self._where

    def _run(self, fn: Callable[[Tx], T], *, write: bool = True) -> T:
        raise self.error


_announced: set[str] = set()
_announced_lock = threading.Lock()


def _announce(ledger: LedgerBackend) -> None:
    with _announced_lock:
        where = ledger.describe()
        if where in _announced:
            return
        _announced.add(where)
    log.info("retest ledger: backend=%s at %s (host id %s)", ledger.backend, where, ledger.host_id)


def open_ledger(environ: Optional[Mapping[str, str]] = None, *, path: Optional[str] = None,
                url: Optional[str] = None) -> LedgerBackend:
    """The ledger the settings name: PostgreSQL when ``RETEST_LEDGER_URL`` (or ``url``) is set,
    else SQLite at ``path`` (default ``RETEST_LEDGER_PATH``). Never raises: an unreachable
    server fails the first operation (``LedgerError``); a backend that cannot be set up at all
    (psycopg missing) gives an ``UnavailableLedger`` whose every operation fails so."""
    gate = config.GateSettings.from_env(environ)
    settings = config.LedgerSettings.from_env(environ)
    chosen_url = settings.url if url is None else url
    ledger: LedgerBackend
    if chosen_url:
        from .ledger_postgres import PostgresLedger, redact_url

        try:
            ledger = PostgresLedger(chosen_url, busy_timeout_s=gate.ledger_busy_timeout_s,
                                    connect_timeout_s=settings.connect_timeout_s,
                                    reconnect_s=settings.reconnect_s,
                                    claim_lease_s=settings.claim_lease_s, host_id=settings.host_id)
        except LedgerError as err:
            log.error("retest ledger: %s", err)
            return UnavailableLedger("postgresql", redact_url(chosen_url), err)
    else:
        ledger = SqliteLedger(path or gate.ledger_path, busy_timeout_s=gate.ledger_busy_timeout_s,
                              claim_lease_s=settings.claim_lease_s, host_id=settings.host_id)
    _announce(ledger)
    return ledger
