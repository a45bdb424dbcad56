"""``retest serve``: a read-only HTTP status endpoint for the merge gate.

* ``GET /queue``   -> ``{"merge_gate": queue_block()}`` as JSON.
* ``GET /metrics`` -> the counters in the Prometheus text format (``retest_merge_gate_*_total``).
* ``HEAD`` of either: the same headers, no body. Any other method: 405 with ``Allow: GET, HEAD``.
  Any other path: 404.

Where the numbers come from: gates usually run in other processes (``retest gate``, the
orchestrator), so the server reads the shared ledger (``RETEST_LEDGER_URL``'s PostgreSQL
database, else the SQLite file ``RETEST_LEDGER_PATH``) on every request: totals and the last decisions of every gate process that had metrics on. Nothing the
server answers contains environment values: switches, numbers and decisions only.

Hardening: binds 127.0.0.1 unless told otherwise; request line and headers are bounded
(``MAX_REQUEST_LINE``, ``MAX_HEADERS``, ``MAX_HEADER_BYTES``); a request with a body is
refused (413); an idle connection is dropped after ``REQUEST_TIMEOUT_S``; the Server header
names no versions; secret values of the environment are masked (``retest.redact``).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

from . import config, merge_gate, redact
from .ledger import LedgerBackend, open_ledger

log = logging.getLogger(__name__)

__all__ = ["StatusServer", "make_server", "render_metrics", "serve_forever"]

MAX_REQUEST_LINE = 8192
MAX_HEADERS = 64
#: All header lines together (http.client alone allows 100 lines of 64 KiB each).
MAX_HEADER_BYTES = 16384
REQUEST_TIMEOUT_S = 10.0
ALLOWED = "GET, HEAD"

#: (counter name in the block, metric suffix, help text).
_METRICS: tuple[tuple[str, str, str], ...] = (
    ("decisions", "decisions", "Gate decisions made."),
    ("retests_run", "retests", "Re-tests run (the suite was started)."),
    ("retests_skipped", "retests_skipped", "Re-tests skipped with proof (skip-when-current)."),
    ("requeues", "requeues", "Tasks requeued on deploy-staging after an infra failure."),
    ("holds", "holds", "Tasks held for a human."),
    ("rollbacks", "rollbacks", "Tasks rolled back to development."),
    ("merges", "merges", "Tasks sent to merge (merge and skip-merge)."),
    ("alerts", "alerts", "Alerts sent."),
    ("processes_killed", "processes_killed", "Processes of re-test trees killed at the deadline or swept."),
)


def render_metrics(block: dict[str, Any]) -> str:
    """The ``merge_gate`` block as Prometheus text exposition format 0.0.4."""
    lines: list[str] = [
        "# HELP retest_merge_gate_metrics_enabled 1 if MERGE_GATE_METRICS_ENABLED is on.",
        "# TYPE retest_merge_gate_metrics_enabled gauge",
        f"retest_merge_gate_metrics_enabled {1 if block.get('enabled') else 0}",
    ]
    if not block.get("enabled"):
        return "\n".join(lines) + "\n"
    counters: dict[str, int] = block.get("counters", {})
    for key, suffix, help_text in _METRICS:
        name = f"retest_merge_gate_{suffix}_total"
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter",
                  f"{name} {int(counters.get(key, 0))}"]
    name = "retest_merge_gate_verdicts_total"
    lines += [f"# HELP {name} Gate decisions by verdict (skipped re-tests have none).",
              f"# TYPE {name} counter"]
    for verdict in merge_gate.VERDICTS:
        value = int(counters.get(f"verdict_{verdict.replace('-', '_')}", 0))
        lines.append(f'{name}{{verdict="{verdict}"}} {value}')
    return "\n".join(lines) + "\n"


class _Handler(BaseHTTPRequestHandler):
    server: "StatusServer"
    raw_requestline: bytes
    server_version = "retest"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = REQUEST_TIMEOUT_S

    # -- parsing: bounded, and every method but GET/HEAD is 405 (not http.server's 501)

    def parse_request(self) -> bool:
        if len(self.raw_requestline) > MAX_REQUEST_LINE:
            # Refused before parsing: set what send_response() reads.
            self.command, self.request_version, self.requestline = "", "HTTP/1.1", ""
            self.close_connection = True
            self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
            return False
        if not super().parse_request():
            return False
        if len(self.headers) > MAX_HEADERS or \
                sum(len(k) + len(v) + 4 for k, v in self.headers.items()) > MAX_HEADER_BYTES:
            self.close_connection = True
            self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
            return False
        if self.command not in ("GET", "HEAD"):
            self.close_connection = True
            self._send(HTTPStatus.METHOD_NOT_ALLOWED, b'{"error": "method not allowed"}\n',
                       "application/json", extra={"Allow": ALLOWED})
            return False
        length = self.headers.get("Content-Length", "0").strip() or "0"
        if self.headers.get("Transfer-Encoding") or not length.isdigit() or int(length) != 0:
            self.close_connection = True
            self._send(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, b'{"error": "no body allowed"}\n',
                       "application/json")
            return False
        return True

    def do_GET(self) -> None:
        self._answer(with_body=True)

    def do_HEAD(self) -> None:
        self._answer(with_body=False)

    def _answer(self, *, with_body: bool) -> None:
        path = urlsplit(self.path).path
        route = self.server.routes.get(path)
        if route is None:
            self._send(HTTPStatus.NOT_FOUND, b'{"error": "not found"}\n', "application/json",
                       with_body=with_body)
            return
        try:
            body, content_type = route()
        except Exception:
            log.exception("retest serve: %s failed", path)
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b'{"error": "internal error"}\n',
                       "application/json", with_body=with_body)
            return
        self._send(HTTPStatus.OK, body, content_type, with_body=with_body)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, *,
              with_body: bool = True, extra: Optional[dict[str, str]] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        # http.server's own errors (400, 414, 431, 505): small JSON, no echo of the request.
        try:
            status = HTTPStatus(code)
        except ValueError:
            status = HTTPStatus.BAD_REQUEST
        self.close_connection = True
        body = json.dumps({"error": status.phrase.lower()}).encode() + b"\n"
        self._send(status, body, "application/json", with_body=self.command != "HEAD")

    def version_string(self) -> str:
        return "retest"  # no Python or library versions for a scanner to match

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)


class StatusServer(ThreadingHTTPServer):
    """The status server; ``routes`` maps a path to a function returning (body, content type)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], ledger: Optional[LedgerBackend],
                 settings: Optional[config.GateSettings] = None) -> None:
        super().__init__(address, _Handler)
        self.ledger = ledger
        self.settings = settings
        self.routes: dict[str, Callable[[], tuple[bytes, str]]] = {
            "/queue": self._queue,
            "/metrics": self._metrics,
        }

    def _block(self) -> dict[str, Any]:
        # Settings are re-read per request unless fixed: a switch flipped in the environment
        # of a restarted server shows at once. Gates mask secrets before they record a
        # decision; masking this server's own again covers ledgers written by older versions.
        # Only the decisions' untrusted fields: counters, settings and vocabulary stay whole.
        block = merge_gate.queue_block(ledger=self.ledger, settings=self.settings)
        if "recent" in block:
            secrets = redact.FILTER.secrets()
            block["recent"] = [redact.redact_decision(doc, secrets) for doc in block["recent"]]
        return block

    def _queue(self) -> tuple[bytes, str]:
        body = json.dumps({"merge_gate": self._block()}, sort_keys=True, default=str).encode() + b"\n"
        return body, "application/json"

    def _metrics(self) -> tuple[bytes, str]:
        return render_metrics(self._block()).encode(), "text/plain; version=0.0.4; charset=utf-8"


def make_server(host: str = "127.0.0.1", port: int = 0, *, ledger: Optional[LedgerBackend] = None,
                settings: Optional[config.GateSettings] = None) -> StatusServer:
    """Bind a status server (``port`` 0: an ephemeral port, see ``server_address``)."""
    settings = settings or config.GateSettings.from_env()
    if ledger is None:
        ledger = open_ledger(path=settings.ledger_path)
    return StatusServer((host, port), ledger, settings)


def serve_forever(server: StatusServer) -> None:
    """Serve until SIGTERM or SIGINT, then close the socket (call from the main thread)."""
    stop = threading.Event()

    def _stop(signum: int, frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    worker = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                              name="retest-serve", daemon=True)
    worker.start()
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.shutdown()
        server.server_close()
        worker.join(timeout=5)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
