"""``retest serve``: a read-only HTTP status endpoint for the merge gate, fit for scrape load.

* ``GET /queue``   -> ``{"merge_gate": queue_block()}`` as JSON.
* ``GET /metrics`` -> the counters in the Prometheus text format (``retest_merge_gate_*_total``).
* ``GET /``        -> the queue as a page for a person (``retest.pages``), ``?verdict=V`` to
  filter; ``GET /decision/<id>`` one decision's page with its timeline, ``.json`` the same
  data as JSON; 400 for a malformed id or filter, 404 for an id the ledger does not have.
  Pages carry a strict ``Content-Security-Policy`` (no script, nothing external).
* ``HEAD`` of either: the same status and headers, no body. Any other method: 405 with
  ``Allow: GET, HEAD``. Any other path: 404. The ledger cannot be read: 503 (never zeros a
  scraper would read as a counter reset).

Where the numbers come from: gates usually run in other processes (``retest gate``, the
orchestrator), so the server reads the shared ledger (``RETEST_LEDGER_URL``'s PostgreSQL
database, else the SQLite file ``RETEST_LEDGER_PATH``) on every request: ``ledger.totals()``
(``/metrics`` reads nothing else) and ``ledger.recent_decisions(n)`` (``/queue``). Concurrent
requests for one route share one read in flight, so a scrape storm costs one ledger read per
read time, not one per request. Nothing the server answers contains environment values.

Why asyncio rather than ``http.server``'s thread per connection (issue 13.3): a client that
sends one byte every few seconds costs a thread there, forever (3,000 slow connections made
2,599 threads); here it costs a few hundred bytes and is dropped when the whole request head
has not arrived within ``HEAD_DEADLINE_S``. The bounds, all per connection unless noted:

* listen backlog ``BACKLOG``; at most ``MAX_CONNECTIONS`` open at once (the next is answered
  503 and closed at once);
* the whole request head within ``HEAD_DEADLINE_S`` (not per read: a trickle cannot extend
  it) and ``MAX_HEAD_BYTES``; a request line over ``MAX_REQUEST_LINE`` is 414, more than
  ``MAX_HEADERS`` header lines or ``MAX_HEADER_BYTES`` is 431; a body is 413;
* one response per connection, always with ``Connection: close`` (HTTP/1.0 and 1.1 alike):
  nothing is held open waiting for a second request; the response must drain within
  ``WRITE_DEADLINE_S``.

Errors go through ``logging`` (``retest.status``, masked by ``retest.redact``); a client that
goes away early is a DEBUG line, never a traceback on stderr. The exposition format is
written here rather than with ``prometheus_client``: it is twenty lines of fixed counters,
and the package has no runtime dependency to keep in step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import re
import signal
import socket
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Awaitable, Callable, Optional
from urllib.parse import parse_qs, urlsplit

from . import config, merge_gate, pages, redact
from .ledger import LedgerBackend, LedgerError, open_ledger

log = logging.getLogger(__name__)
redact.install(log)

__all__ = ["StatusServer", "make_server", "render_metrics", "serve_forever"]

MAX_REQUEST_LINE = 8192
MAX_HEADERS = 64
#: All header lines together (http.client alone allows 100 lines of 64 KiB each).
MAX_HEADER_BYTES = 16384
#: Bytes read while looking for the end of the head; past it the request is refused.
MAX_HEAD_BYTES = 65536
#: The whole request head must arrive within this, however it trickles in.
HEAD_DEADLINE_S = 5.0
#: Kept for callers of the threaded server: the head deadline is the idle bound now.
REQUEST_TIMEOUT_S = HEAD_DEADLINE_S
WRITE_DEADLINE_S = 10.0
BACKLOG = 1024
MAX_CONNECTIONS = 1024
#: Threads that read the ledger (each read is a short SQLite transaction).
LEDGER_THREADS = 2
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

#: Decisions the queue page reads (then filters by verdict).
PAGE_DECISIONS = 200
_DECISION_PATH = re.compile(r"/decision/([0-9]{1,18})(\.json)?")
#: Headers of every page: nothing but the page itself may load or run (pages.CSP).
_PAGE_HEADERS = (("Content-Security-Policy", pages.CSP), ("X-Frame-Options", "DENY"),
                 ("Referrer-Policy", "no-referrer"))

JSON = "application/json"
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


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


@dataclass(frozen=True)
class Response:
    status: HTTPStatus
    body: bytes
    content_type: str = JSON
    extra: tuple[tuple[str, str], ...] = ()


def _error(status: HTTPStatus, **extra: str) -> Response:
    body = json.dumps({"error": status.phrase.lower()}).encode() + b"\n"
    return Response(status, body, JSON, tuple(extra.items()))


def _page_error(status: HTTPStatus, detail: str, as_json: bool) -> Response:
    """An error of a page route: JSON for ``.json``, else a small page (with the CSP)."""
    if as_json:
        body = json.dumps({"error": status.phrase.lower(), "detail": detail}).encode() + b"\n"
        return Response(status, body, JSON, _PAGE_HEADERS)
    return Response(status, pages.error_page(status.value, status.phrase, detail).encode(),
                    pages.HTML_TYPE, _PAGE_HEADERS)


def _constant(response: Response) -> Callable[[], Awaitable[Response]]:
    async def route() -> Response:
        return response
    return route


class _Refused(Exception):
    """The request head is refused with ``response`` (the connection then closes)."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status.phrase)
        self.response = response


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    version: str
    query: str = ""


def parse_head(head: bytes) -> Request:
    """The request in ``head`` (request line and headers, CRLF or LF); raise ``_Refused``."""
    lines = head.split(b"\n")
    while lines and lines[-1].strip() == b"":
        lines.pop()
    if not lines:
        raise _Refused(_error(HTTPStatus.BAD_REQUEST))
    request_line = lines[0].rstrip(b"\r")
    if len(request_line) > MAX_REQUEST_LINE:
        raise _Refused(_error(HTTPStatus.REQUEST_URI_TOO_LONG))
    headers = [line.rstrip(b"\r") for line in lines[1:]]
    if len(headers) > MAX_HEADERS or sum(len(h) + 2 for h in headers) > MAX_HEADER_BYTES:
        raise _Refused(_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE))
    parts = request_line.split()
    if len(parts) != 3:
        raise _Refused(_error(HTTPStatus.BAD_REQUEST))
    try:
        method, target, version = (p.decode("ascii") for p in parts)
    except UnicodeDecodeError:
        raise _Refused(_error(HTTPStatus.BAD_REQUEST)) from None
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise _Refused(_error(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED))
    fields: dict[str, str] = {}
    for line in headers:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise _Refused(_error(HTTPStatus.BAD_REQUEST))
        fields[name.decode("latin-1").lower()] = value.decode("latin-1").strip()
    if method not in ("GET", "HEAD"):
        raise _Refused(Response(HTTPStatus.METHOD_NOT_ALLOWED, b'{"error": "method not allowed"}\n',
                                JSON, (("Allow", ALLOWED),)))
    length = fields.get("content-length", "0") or "0"
    if "transfer-encoding" in fields or not length.isdigit() or int(length) != 0:
        raise _Refused(Response(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, b'{"error": "no body allowed"}\n'))
    parts_of_target = urlsplit(target)
    return Request(method, parts_of_target.path, version, parts_of_target.query)


def _encode(response: Response, with_body: bool) -> bytes:
    head = [f"HTTP/1.1 {response.status.value} {response.status.phrase}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}",
            "Cache-Control: no-store",
            "X-Content-Type-Options: nosniff",
            "Server: retest",  # no Python or library versions for a scanner to match
            "Connection: close"]
    head += [f"{key}: {value}" for key, value in response.extra]
    data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
    return data + response.body if with_body else data


class _SingleFlight:
    """Concurrent callers of one key share the read in flight (it started after they were
    waiting or while they arrived: never older than that read)."""

    def __init__(self, pool: concurrent.futures.Executor) -> None:
        self._pool = pool
        self._flights: dict[str, asyncio.Future[Any]] = {}

    async def get(self, key: str, read: Callable[[], Any]) -> Any:
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.get_running_loop().run_in_executor(self._pool, read)
            self._flights[key] = flight
            flight.add_done_callback(lambda _: self._flights.pop(key, None))
        return await asyncio.shield(flight)


class StatusServer:
    """The status server: bound at construction (``server_address``), served by
    ``serve_forever()`` until ``shutdown()`` (from another thread), closed by ``server_close()``.
    ``routes`` maps a path to a coroutine function returning a ``Response``."""

    def __init__(self, address: tuple[str, int], ledger: Optional[LedgerBackend],
                 settings: Optional[config.GateSettings] = None) -> None:
        self.ledger = ledger
        self.settings = settings
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.socket = socket.create_server(address, family=family, backlog=BACKLOG)
        self.server_address = self.socket.getsockname()
        self.routes: dict[str, Callable[[], Awaitable[Response]]] = {
            "/queue": self._queue,
            "/metrics": self._metrics,
        }
        self.connections = 0
        self._pool = concurrent.futures.ThreadPoolExecutor(LEDGER_THREADS, "retest-serve-ledger")
        self._flights = _SingleFlight(self._pool)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stop: Optional[asyncio.Event] = None
        self._stopped = threading.Event()
        self._stopped.set()
        self._shutdown_request = threading.Event()

    # ----------------------------------------------------------------- routes

    def _settings(self) -> config.GateSettings:
        return self.settings or config.GateSettings.from_env()

    def _read_block(self, recent: Optional[int] = None) -> dict[str, Any]:
        # Gates mask secrets before they record a decision; masking this server's own again
        # covers ledgers written by older versions. Only the decisions' untrusted fields.
        block = merge_gate.queue_block(ledger=self.ledger, settings=self._settings(), recent=recent)
        if "recent" in block:
            secrets = redact.FILTER.secrets()
            block["recent"] = [redact.redact_decision(doc, secrets) for doc in block["recent"]]
        return block

    def _read_counters(self) -> dict[str, Any]:
        """What ``/metrics`` shows: the switch and the totals, nothing else from the ledger."""
        settings = self._settings()
        if not settings.metrics_enabled:
            return {"enabled": False}
        if self.ledger is None:
            return merge_gate.queue_block(settings=settings, recent=0)
        try:
            return {"enabled": True, "counters": self.ledger.totals()}
        except LedgerError as err:
            return {"enabled": True, "error": str(err)}

    def _queue_response(self) -> Response:
        block = self._read_block()
        body = json.dumps({"merge_gate": block}, sort_keys=True, default=str).encode() + b"\n"
        return Response(HTTPStatus.SERVICE_UNAVAILABLE if "error" in block else HTTPStatus.OK, body)

    def _metrics_response(self) -> Response:
        block = self._read_counters()
        if "error" in block:
            log.warning("retest serve: /metrics: the ledger cannot be read: %s", block["error"])
            return Response(HTTPStatus.SERVICE_UNAVAILABLE,
                            b"# the ledger cannot be read: no counters (not zeros)\n", METRICS_TYPE)
        return Response(HTTPStatus.OK, render_metrics(block).encode(), METRICS_TYPE)

    def _index_response(self, verdict: Optional[str]) -> Response:
        block = self._read_block(PAGE_DECISIONS)
        body = pages.index(block, verdict=verdict, now=time.time()).encode()
        status = HTTPStatus.SERVICE_UNAVAILABLE if "error" in block else HTTPStatus.OK
        return Response(status, body, pages.HTML_TYPE, _PAGE_HEADERS)

    def _decision_response(self, decision_id: int, as_json: bool) -> Response:
        try:
            found = self.ledger.decision(decision_id) if self.ledger is not None else None
        except LedgerError as err:
            log.warning("retest serve: decision %d: the ledger cannot be read: %s", decision_id, err)
            return _page_error(HTTPStatus.SERVICE_UNAVAILABLE, "the ledger cannot be read", as_json)
        if found is None:
            return _page_error(HTTPStatus.NOT_FOUND, f"no decision {decision_id} in the ledger "
                               "(never recorded, or older than it keeps)", as_json)
        secrets = redact.FILTER.secrets()
        doc = redact.redact_decision(found[0], secrets)
        timeline = redact.redact_obj(found[1], secrets) if found[1] is not None else None
        if as_json:
            body = json.dumps({"decision": doc, "timeline": timeline}, sort_keys=True,
                              default=str).encode() + b"\n"
            return Response(HTTPStatus.OK, body, JSON, _PAGE_HEADERS)
        return Response(HTTPStatus.OK, pages.decision(doc, timeline).encode(), pages.HTML_TYPE,
                        _PAGE_HEADERS)

    def _page_route(self, request: Request) -> Optional[Callable[[], Awaitable[Response]]]:
        """The page ``request`` asks for (``/``, ``/decision/<id>[.json]``), or None."""
        if request.path == "/":
            query = parse_qs(request.query, keep_blank_values=True)
            verdict = (query.pop("verdict", [""]) or [""])[-1] or None
            if query or (verdict is not None and verdict not in pages.VERDICT_FILTERS):
                return _constant(_page_error(HTTPStatus.BAD_REQUEST, "the only filter is verdict="
                                             + "|".join(pages.VERDICT_FILTERS), False))

            async def index() -> Response:
                response: Response = await self._flights.get(
                    f"index:{verdict}", lambda: self._index_response(verdict))
                return response
            return index
        if not request.path.startswith("/decision/"):
            return None
        match = _DECISION_PATH.fullmatch(request.path)
        as_json = request.path.endswith(".json")
        if match is None:
            return _constant(_page_error(HTTPStatus.BAD_REQUEST, "a decision id is a number: "
                                         "/decision/<id> or /decision/<id>.json", as_json))
        decision_id = int(match.group(1))

        async def one() -> Response:
            response: Response = await self._flights.get(
                f"decision:{decision_id}:{as_json}", lambda: self._decision_response(decision_id, as_json))
            return response
        return one

    # Read, render and encode in a ledger thread, once per flight: the event loop only writes.
    async def _queue(self) -> Response:
        response: Response = await self._flights.get("queue", self._queue_response)
        return response

    async def _metrics(self) -> Response:
        response: Response = await self._flights.get("metrics", self._metrics_response)
        return response

    # ----------------------------------------------------------------- connections

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[Response, bool]:
        """Read one request head (bounded in time and size) and answer it."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_DEADLINE_S)
        except asyncio.LimitOverrunError:
            start = await reader.read(MAX_REQUEST_LINE + 2)
            status = HTTPStatus.REQUEST_URI_TOO_LONG if b"\n" not in start \
                else HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
            return _error(status), True
        try:
            request = parse_head(head)
        except _Refused as refused:
            return refused.response, True
        route = self.routes.get(request.path) or self._page_route(request)
        if route is None:
            return _error(HTTPStatus.NOT_FOUND), request.method != "HEAD"
        try:
            response = await route()
        except Exception:
            log.exception("retest serve: %s failed", request.path)
            response = _error(HTTPStatus.INTERNAL_SERVER_ERROR)
        return response, request.method != "HEAD"

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            if self.connections > MAX_CONNECTIONS:
                response, with_body = _error(HTTPStatus.SERVICE_UNAVAILABLE), True
            else:
                response, with_body = await self._answer(reader)
            writer.write(_encode(response, with_body))
            await asyncio.wait_for(writer.drain(), WRITE_DEADLINE_S)
            log.info("%s %d", writer.get_extra_info("peername"), response.status.value)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError):
            log.debug("retest serve: dropped %s: request head or response not done in time",
                      writer.get_extra_info("peername"))
        except (ConnectionError, OSError) as err:
            log.debug("retest serve: client %s went away: %s", writer.get_extra_info("peername"), err)
        except Exception:
            log.exception("retest serve: connection failed")
        finally:
            self.connections -= 1
            if writer.transport.get_write_buffer_size():
                writer.transport.abort()  # a client that does not read gets no more time
            else:
                writer.close()

    def _exception_handler(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # asyncio's default handler prints to stderr, outside logging and unmasked.
        err = context.get("exception")
        if isinstance(err, (ConnectionError, asyncio.CancelledError)):
            log.debug("retest serve: %s", context.get("message"))
            return
        log.error("retest serve: %s", context.get("message"),
                  exc_info=(type(err), err, err.__traceback__) if err else None)

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._exception_handler)
        self._loop, self._stop = loop, asyncio.Event()
        if self._shutdown_request.is_set():  # shutdown() came before the loop existed
            self._stop.set()
        server = await asyncio.start_server(self._connection, sock=self.socket,
                                            limit=MAX_HEAD_BYTES, backlog=BACKLOG)
        try:
            await self._stop.wait()
        finally:
            server.close()
            # Connections still open are closed with the loop (no wait on slow clients).

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve until ``shutdown()``; ``poll_interval`` is accepted for ``socketserver``'s API."""
        self._stopped.clear()
        try:
            asyncio.run(self._serve())
        finally:
            self._loop = None
            self._shutdown_request.clear()
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop ``serve_forever()`` (from another thread) and wait until it returned."""
        self._shutdown_request.set()
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:  # the loop closed meanwhile
                pass
        self._stopped.wait(10)

    def server_close(self) -> None:
        self.socket.close()
        self._pool.shutdown(wait=False, cancel_futures=True)


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
