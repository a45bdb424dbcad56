"""Both ledger backends for the tests: SQLite in the test's tmp folder, PostgreSQL in a fresh schema.

The PostgreSQL server is the one ``RETEST_TEST_POSTGRES_URL`` names (``.ci/run`` starts a
throw-away cluster and exports it). Without it the PostgreSQL cases skip, unless
``RETEST_REQUIRE_POSTGRES=1`` (set by ``.ci/run``): then they fail, so CI cannot go green
having tested one backend.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import quote

import pytest

BACKENDS = ("sqlite", "postgresql")
SERVER_URL = os.environ.get("RETEST_TEST_POSTGRES_URL", "").strip()
REQUIRED = os.environ.get("RETEST_REQUIRE_POSTGRES", "").strip() == "1"


def require_server() -> str:
    """The server URL, or skip (fail under ``RETEST_REQUIRE_POSTGRES=1``)."""
    if not SERVER_URL:
        message = "no PostgreSQL server: set RETEST_TEST_POSTGRES_URL (bash .ci/postgres start)"
        if REQUIRED:
            pytest.fail(f"RETEST_REQUIRE_POSTGRES=1 but {message}", pytrace=False)
        pytest.skip(message)
    try:
        import psycopg  # noqa: F401
    except ImportError:
        if REQUIRED:
            pytest.fail("RETEST_REQUIRE_POSTGRES=1 but psycopg is not installed", pytrace=False)
        pytest.skip("psycopg is not installed (pip install 'retest[postgres]')")
    return SERVER_URL


def with_schema(url: str, schema: str) -> str:
    """``url`` whose sessions use ``schema`` (libpq ``options=-c search_path=...``)."""
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote(f'-c search_path={schema}')}"


def admin(sql: str, url: Optional[str] = None) -> None:
    import psycopg

    with psycopg.connect(url or SERVER_URL, autocommit=True) as conn:
        conn.execute(sql)  # type: ignore[call-overload]


def scalar(url: str, sql: str) -> object:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(sql).fetchone()  # type: ignore[call-overload]
        return None if row is None else row[0]


class LedgerPlace:
    """Where one test's ledger lives: ``env`` selects it (for ``open_ledger`` and gate children)."""

    def __init__(self, backend: str, tmp_path: Path) -> None:
        self.backend = backend
        self.schema = ""
        if backend == "sqlite":
            self.path = str(tmp_path / "state" / "ledger.sqlite3")
            self.env = {"RETEST_LEDGER_PATH": self.path, "RETEST_LEDGER_URL": ""}
            self.url = ""
        else:
            server = require_server()
            self.schema = f"t_{uuid.uuid4().hex[:16]}"
            admin(f"CREATE SCHEMA {self.schema}")
            self.url = with_schema(server, self.schema)
            self.path = str(tmp_path / "unused.sqlite3")
            self.env = {"RETEST_LEDGER_URL": self.url, "RETEST_LEDGER_PATH": self.path}

    def count(self, sql: str) -> int:
        """One integer from the ledger's own tables (either engine)."""
        if self.backend == "sqlite":
            import sqlite3

            conn = sqlite3.connect(self.path)
            try:
                return int(conn.execute(sql).fetchone()[0])
            finally:
                conn.close()
        return int(scalar(self.url, sql))  # type: ignore[arg-type]

    def drop(self) -> None:
        if self.schema:
            admin(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")


def place(backend: str, tmp_path: Path) -> Iterator[LedgerPlace]:
    where = LedgerPlace(backend, tmp_path)
    try:
        yield where
    finally:
        where.drop()


THROWAWAY_DIR = os.environ.get("PG_THROWAWAY_DIR", "").strip()
CONTROL = Path(__file__).resolve().parents[1] / ".ci" / "postgres"


def require_throwaway() -> str:
    """The cluster ``.ci/postgres start`` made (a test may stop and restart it), or skip/fail."""
    require_server()
    if not THROWAWAY_DIR or not CONTROL.exists():
        message = "no throw-away cluster to restart (PG_THROWAWAY_DIR from .ci/postgres start)"
        if REQUIRED:
            pytest.fail(f"RETEST_REQUIRE_POSTGRES=1 but {message}", pytrace=False)
        pytest.skip(message)
    return THROWAWAY_DIR


def server(action: str) -> None:
    """``halt``, ``resume`` or ``restart`` the throw-away server.

    The server is no child of this test run: while ``pg_ctl`` daemonizes it, pytest stops
    being a subreaper, so the new postmaster is re-parented to init, not to us (the guard in
    conftest would rightly call it a leftover otherwise).
    """
    import subprocess

    from conftest import set_subreaper

    set_subreaper(False)
    try:
        subprocess.run(["bash", str(CONTROL), action, require_throwaway()], check=True, timeout=120,
                       stdin=subprocess.DEVNULL)
    finally:
        set_subreaper(True)
