"""retest's pytest probe: the suite reports its own facts to the runner as JSON lines.

Loaded by the runner as ``-p retest_probe`` with this file's directory (which holds nothing
else) on ``PYTHONPATH``. It never imports ``retest``, needs nothing but pytest >= 7 (xdist
optional), and never changes the suite's outcome: every hook swallows its own errors and the
probe writes nothing on stdout or stderr.

The channel is a file the runner owns, named by ``RETEST_PROBE_EVENTS`` (removed from the
environment as soon as the probe has read it, so a nested pytest does not write into it);
xdist workers receive it through ``workerinput``. Each event is one JSON object on one line,
written with a single ``write()`` on an ``O_APPEND`` descriptor, so lines of the controller
and of the workers never interleave and a reader can follow the file live. Keys:

* ``ev``: ``session_start`` | ``collected`` | ``collect_error`` | ``test_start`` |
  ``report`` | ``imports`` | ``internal_error`` | ``startup_error`` | ``session_end``; ``t``: wall-clock seconds;
  ``pid``; ``worker`` (the xdist worker id, or ``null``).
* ``imports`` carries ``modules`` (each named package's origin) and ``outside`` (module ->
  file, for modules loaded from under ``RETEST_PROBE_OUTSIDE``'s first directory).
* ``report`` carries ``nodeid``, ``when`` (setup/call/teardown), ``outcome`` (passed, failed,
  skipped, xfailed, xpassed, error, rerun), ``duration``, ``subtest`` and, on failure, a
  bounded ``message`` (the crash line) and ``longrepr`` head.
* ``startup_error``: an exception that ended pytest before its session started, as the
  exception itself says it (never scraped from text): ``stage`` (``conftest``: loading an
  initial ``conftest.py``; ``plugin``: importing a plugin, ``-p`` or an entry point;
  ``configure``: a ``pytest_configure`` raised; ``uncaught``: it escaped pytest), ``type``, ``category`` (``syntax`` | ``import`` | ``name`` | ``other``, by
  the exception's class), ``message``, ``file`` and ``line`` where it was raised (a syntax
  error's own file), ``module`` and ``module_file`` (an ``ImportError``'s name and path),
  ``frames`` (the traceback's files, innermost last), ``conftest`` and ``plugin``.

Bounded: one line is at most ``LINE_MAX`` bytes and the probe stops writing test events past
``RETEST_PROBE_MAX_BYTES`` (default 8 MiB) per process, counting what it left out; the
session's last events (``session_end``) are always written.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Optional

import pytest

ENV_EVENTS = "RETEST_PROBE_EVENTS"
ENV_PACKAGES = "RETEST_PROBE_PACKAGES"
ENV_MAX_BYTES = "RETEST_PROBE_MAX_BYTES"
#: Directories no module should be imported from (the merge gate: the developer's checkout)
#: and the one allowed inside them (the gate's worktree, if it lies there), ``os.pathsep``
#: separated: ``imports`` names every module loaded from the first but not the second.
ENV_OUTSIDE = "RETEST_PROBE_OUTSIDE"
#: Modules from outside named per process, at most.
OUTSIDE_MAX = 20
WORKERINPUT_KEY = "retest_probe"
PROTOCOL = 1

LINE_MAX = 16 * 1024
MESSAGE_MAX = 500
LONGREPR_MAX = 2000
NODEID_MAX = 1000
#: Bytes kept for the events that end the session, whatever the suite wrote before.
RESERVE = 64 * 1024
DEFAULT_MAX_BYTES = 8 * 1024 * 1024
#: One encoder for every event: ``json.dumps`` with options builds a new one per call.
_ENCODE = json.JSONEncoder(separators=(",", ":"), default=str).encode


class _Channel:
    """One process's writer: a single O_APPEND descriptor, bounded, never raising."""

    def __init__(self, path: str, max_bytes: int, worker: Optional[str]) -> None:
        self.worker = worker
        self.max_bytes = max_bytes
        self.written = 0
        self.dropped = 0
        self.fd = -1
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            self.fd = -1

    def emit(self, ev: str, *, final: bool = False, **fields: Any) -> None:
        """Write one event; test events past the budget are counted, not written."""
        if self.fd < 0:
            return
        doc = {"ev": ev, "t": round(time.time(), 6), "pid": os.getpid(), "worker": self.worker}
        doc.update(fields)
        try:
            line = _ENCODE(doc).encode("utf-8", "replace")
        except (TypeError, ValueError):
            return
        if len(line) >= LINE_MAX:
            return
        budget = self.max_bytes + (RESERVE if final else 0)
        if self.written + len(line) + 1 > budget:
            self.dropped += 1
            return
        data = line + b"\n"
        try:
            while data:
                n = os.write(self.fd, data)
                data = data[n:]
        except InterruptedError:
            pass
        except OSError:
            self.fd = -1
            return
        self.written += len(line) + 1


def _cut(text: Optional[str], limit: int) -> Optional[str]:
    if text is None:
        return None
    return text if len(text) <= limit else text[:limit] + "..."


def _read_settings(config: pytest.Config) -> Optional[dict[str, Any]]:
    """The channel's settings: from workerinput on an xdist worker, else from the environment."""
    workerinput = getattr(config, "workerinput", None)
    if isinstance(workerinput, dict):
        settings = workerinput.get(WORKERINPUT_KEY)
        if isinstance(settings, dict):
            return dict(settings, worker=workerinput.get("workerid"))
        return None
    path = os.environ.pop(ENV_EVENTS, None)
    if not path:
        return None
    try:
        max_bytes = int(os.environ.get(ENV_MAX_BYTES, "") or DEFAULT_MAX_BYTES)
    except ValueError:
        max_bytes = DEFAULT_MAX_BYTES
    packages = [p for p in os.environ.get(ENV_PACKAGES, "").split(",") if p]
    outside = [p for p in os.environ.pop(ENV_OUTSIDE, "").split(os.pathsep) if p]
    return {"path": path, "max_bytes": max(max_bytes, 4096), "packages": packages,
            "outside": outside[:2], "worker": None}


def _loaded_from_outside(outside: list[str]) -> dict[str, str]:
    """Modules whose file lies under ``outside[0]`` but not under ``outside[1]`` (if given)."""
    if not outside:
        return {}
    forbidden = outside[0].rstrip(os.sep) + os.sep
    allowed = outside[1].rstrip(os.sep) + os.sep if len(outside) > 1 else None
    # A venv inside the checkout (.venv, .tox/...) is the suite's interpreter, not its code.
    interpreter = tuple({p.rstrip(os.sep) + os.sep for p in (sys.prefix, sys.exec_prefix,
                                                                 sys.base_prefix) if p})
    packages_dirs = (os.sep + "site-packages" + os.sep, os.sep + "dist-packages" + os.sep)
    found: dict[str, str] = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if (isinstance(path, str) and path.startswith(forbidden)
                and not (allowed and path.startswith(allowed)) and name != __name__
                and not path.startswith(interpreter)
                and not any(d in path for d in packages_dirs)):
            found[name] = _cut(path, NODEID_MAX) or path
            if len(found) >= OUTSIDE_MAX:
                break
    return found


def _outcome(report: Any) -> str:
    """The outcome as pytest's summary counts it (xfail, xpass and setup errors told apart)."""
    outcome = str(getattr(report, "outcome", ""))
    if hasattr(report, "wasxfail"):
        return "xfailed" if outcome == "skipped" else "xpassed"
    # As pytest's own teststatus: only set-up and tear-down failures are errors; xdist reports a
    # worker that crashed in a test with when="???", and pytest counts that test as failed.
    if outcome == "failed" and getattr(report, "when", "call") in ("setup", "teardown"):
        return "error"
    return outcome


def _subtest_label(report: Any) -> str:
    """How pytest names a subtest in its summary: ``[msg]``, ``(key=value, ...)`` or both
    (``SUBFAILED[escapes] tests/t.py::test_x``); "" if it has neither."""
    context = getattr(report, "context", None)
    msg, kwargs = getattr(context, "msg", None), getattr(context, "kwargs", None) or {}
    parts = [f"[{msg}]"] if msg is not None else []
    if isinstance(kwargs, dict) and kwargs:
        parts.append("(" + ", ".join(f"{k}={v}" for k, v in kwargs.items()) + ")")
    return _cut(" ".join(parts), NODEID_MAX) or ""


def _failure_fields(report: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    longrepr = getattr(report, "longrepr", None)
    crash = getattr(longrepr, "reprcrash", None)
    message = getattr(crash, "message", None)
    if isinstance(message, str):
        fields["message"] = _cut(message.splitlines()[0] if message else message, MESSAGE_MAX)
    argname, error = getattr(longrepr, "argname", None), getattr(longrepr, "errorstring", None)
    if isinstance(argname, str) and isinstance(error, str):
        # FixtureLookupErrorRepr, which has no crash line: "fixture 'mocker' not found"
        fields["missing_fixture"] = _cut(argname, NODEID_MAX)
        fields["message"] = _cut(error.strip().splitlines()[0] if error.strip() else error, MESSAGE_MAX)
    try:
        text = report.longreprtext
    except Exception:
        text = None
    if text:
        fields["longrepr"] = _cut(text, LONGREPR_MAX)
        if "message" not in fields:
            lines = [line for line in text.splitlines() if line.strip()]
            fields["message"] = _cut(lines[-1] if lines else None, MESSAGE_MAX)
    return fields


def _compiled_modules(name: str) -> list[str]:
    """Files of the compiled (extension) modules of package ``name`` loaded so far."""
    import importlib.machinery

    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    prefix = name + "."
    found = []
    for key, module in list(sys.modules.items()):
        if key == name or key.startswith(prefix):
            path = getattr(module, "__file__", None)
            if isinstance(path, str) and path.endswith(suffixes):
                found.append(path)
    return sorted(found)[:20]


def _module_origin(name: str) -> Optional[dict[str, Any]]:
    module = sys.modules.get(name)
    if module is None:
        return None
    path = getattr(module, "__path__", None)
    return {
        "file": getattr(module, "__file__", None),
        "path": [str(p) for p in list(path)[:8]] if path is not None else None,
        "compiled": _compiled_modules(name),
    }


#: The signal at which the probe dumps every thread's Python stack (the runner's diagnostic
#: stage at the deadline, issue 11): SIGPWR, which pytest, xdist, execnet and test suites do
#: not use (SIGUSR1/2 are commonly taken by servers under test). Linux only.
DUMP_SIGNAL_NAME = "SIGPWR"
#: The dump file, in the run's private directory: ``stacks-<pid>.txt``.
STACK_FILE = "stacks-{pid}.txt"


#: Traceback frames a ``startup_error`` keeps (the innermost).
FRAMES_MAX = 30


def _category(exc: BaseException) -> str:
    if isinstance(exc, SyntaxError):  # IndentationError, TabError
        return "syntax"
    if isinstance(exc, ImportError):  # ModuleNotFoundError
        return "import"
    if isinstance(exc, NameError):  # UnboundLocalError
        return "name"
    return "other"


def _startup_fields(exc: BaseException, stage: str, conftest: Any = None,
                    plugin: Optional[str] = None) -> dict[str, Any]:
    """What ``exc`` says of itself: its class, where it was raised, what it could not import."""
    import traceback

    frames = [(f.filename, f.lineno) for f in traceback.extract_tb(exc.__traceback__)]
    frames = [f for f in frames if not f[0].startswith("<frozen ")][-FRAMES_MAX:]
    file, line = frames[-1] if frames else (None, None)
    if isinstance(exc, SyntaxError) and exc.filename:
        file, line = exc.filename, exc.lineno
    fields: dict[str, Any] = {
        "stage": stage, "type": type(exc).__qualname__, "category": _category(exc),
        "message": _cut(str(exc), MESSAGE_MAX), "file": _cut(file, NODEID_MAX), "line": line,
        "frames": [_cut(f, NODEID_MAX) for f, _ in frames],
        "conftest": _cut(str(conftest), NODEID_MAX) if conftest is not None else None,
        "plugin": _cut(plugin, NODEID_MAX),
    }
    if isinstance(exc, ImportError):
        fields["module"] = _cut(exc.name, NODEID_MAX)
        fields["module_file"] = _cut(exc.path, NODEID_MAX)
    return fields


#: The events file as the environment named it when this module was imported: before
#: ``pytest_configure`` (where the plugin takes it), for the errors that end pytest first.
_EARLY_PATH = os.environ.get(ENV_EVENTS) or None
_startup_reported = False
#: Until the session starts: after it, pytest reports its own errors.
_before_session = True


def _report_startup_error(exc: BaseException, stage: str, conftest: Any = None,
                          plugin: Optional[str] = None) -> None:
    """Write one ``startup_error`` event (the first error only) on a channel of its own."""
    global _startup_reported
    if _startup_reported or _EARLY_PATH is None:
        return
    _startup_reported = True
    try:
        _Channel(_EARLY_PATH, DEFAULT_MAX_BYTES, None).emit(
            "startup_error", final=True, **_startup_fields(exc, stage, conftest, plugin))
    except Exception:
        pass


@pytest.hookimpl(hookwrapper=True)
def pytest_load_initial_conftests(early_config: Any, parser: Any, args: Any) -> Any:
    """A ``conftest.py`` that fails to import ends pytest (exit 4) before ``pytest_configure``:
    what it raised is reported here, from the exception pytest wraps it in."""
    outcome = yield
    try:
        error = outcome.excinfo[1] if outcome.excinfo else None
        if error is not None and getattr(early_config, "workerinput", None) is None:
            # pytest >= 8: .cause; pytest 7: .excinfo, a sys.exc_info() triple.
            cause = getattr(error, "cause", None)
            if cause is None:
                cause = (getattr(error, "excinfo", None) or (None, None))[1]
            if isinstance(cause, BaseException):
                _report_startup_error(cause, "conftest", getattr(error, "path", None))
    except Exception:
        pass


def pytest_internalerror(excrepr: Any, excinfo: Any) -> None:
    """A ``pytest_configure`` that raised (a conftest's may run before the plugin exists):
    pytest reports an internal error and exits 3, the session never started."""
    value = getattr(excinfo, "value", None)
    if _before_session and isinstance(value, BaseException):
        _report_startup_error(value, "configure")


_previous_excepthook = sys.excepthook


def _excepthook(kind: Any, value: Any, tb: Any) -> None:
    """An exception that escaped pytest before its session: reported, then handed on."""
    if isinstance(value, BaseException) and not isinstance(value, (KeyboardInterrupt, SystemExit)):
        _report_startup_error(value, "uncaught")
    _previous_excepthook(kind, value, tb)


def _restore_excepthook() -> None:
    if sys.excepthook is _excepthook:
        sys.excepthook = _previous_excepthook


#: Words in the name (or module) of a plugin that runs ``async def`` tests.
_ASYNC_RUNNERS = ("asyncio", "anyio", "trio", "tornasync", "tornado", "twisted", "aiohttp", "curio")


def _async_plugins(config: pytest.Config) -> list[str]:
    """The registered plugins that run ``async def`` tests (pytest-asyncio, anyio, ...):
    without one, pytest fails every async test as unsupported, which is the environment's
    fault; with one, an async test it does not take (strict mode, no marker) is the suite's."""
    found: set[str] = set()
    for name, plugin in config.pluginmanager.list_name_plugin():
        label = f"{name} {getattr(plugin, '__name__', '')}".lower()
        if any(word in label for word in _ASYNC_RUNNERS):
            found.add(str(name)[:100])
    return sorted(found)[:20]


def _watch_plugin_import_errors() -> None:
    """pytest >= 9 catches a plugin that raised while imported (``-p name``, an entry point:
    exit 3, ``Error while loading plugin``) before any hook runs; the function that prints it
    is the one place that holds the exception. It is wrapped to report it, then print as
    before; a pytest without it (older ones let the error escape: the excepthook) is left be."""
    try:
        from _pytest import config as _config

        original = getattr(_config, "print_plugin_import_error")
    except (ImportError, AttributeError):
        return

    def print_plugin_import_error(e: Any, *args: Any, **kwargs: Any) -> Any:
        cause = getattr(e, "__cause__", None)
        if isinstance(cause, BaseException):
            try:
                _report_startup_error(cause, "plugin", plugin=str(e))
            except Exception:
                pass
        return original(e, *args, **kwargs)

    setattr(_config, "print_plugin_import_error", print_plugin_import_error)


if _EARLY_PATH is not None:
    sys.excepthook = _excepthook
    _watch_plugin_import_errors()


def _register_stack_dump(events_path: str) -> Any:
    """Have ``faulthandler`` write all threads' stacks to this process's file in the run's
    private directory at ``DUMP_SIGNAL_NAME``; return the open file (kept for the process's
    life: faulthandler writes to its descriptor) or None."""
    import faulthandler
    import signal

    signum = getattr(signal, DUMP_SIGNAL_NAME, None)
    if signum is None:
        return None
    try:
        path = os.path.join(os.path.dirname(events_path), STACK_FILE.format(pid=os.getpid()))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        f = os.fdopen(fd, "w")
        faulthandler.register(signum, file=f, all_threads=True, chain=False)
        return f
    except (OSError, ValueError, RuntimeError):
        return None


class RetestProbe:
    """The plugin object: one per pytest process (controller, plain run or xdist worker)."""

    def __init__(self, config: pytest.Config, settings: dict[str, Any]) -> None:
        self.config = config
        self.settings = settings
        self.worker: Optional[str] = settings.get("worker")
        self.channel = _Channel(str(settings["path"]), int(settings["max_bytes"]), self.worker)
        self.packages: list[str] = [str(p) for p in settings.get("packages") or []]
        self.reported_imports: dict[str, Any] = {}
        self.exitstatus: Optional[int] = None
        self.counts: Optional[dict[str, int]] = None
        self.started = False
        #: xdist's controller: decided once the session starts (xdist registers ``dsession`` in
        #: ``pytest_configure``), read on every test.
        self.distributing = False
        self.stack_file = _register_stack_dump(str(settings["path"]))

    # -- which process writes what: workers report their own starts and imports; the
    #    controller (or a plain run) owns the session, collection and every report.

    @property
    def is_worker(self) -> bool:
        return self.worker is not None

    def _distributing(self) -> bool:
        return not self.is_worker and self.config.pluginmanager.has_plugin("dsession")

    def _guard(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            pass  # the probe never changes the suite's outcome

    # -- hooks

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self._guard(self._session_start, session)

    def _session_start(self, session: pytest.Session) -> None:
        global _before_session
        self.started = True
        _before_session = False
        _restore_excepthook()  # from here on pytest reports its own errors
        if self.is_worker:
            self.channel.emit("worker_start")
            return
        self.distributing = self._distributing()
        self.channel.emit(
            "session_start",
            protocol=PROTOCOL,
            pytest=getattr(pytest, "__version__", None),
            python=sys.executable,
            # platform.python_version() without importing platform (3-13 ms per run, issue 9).
            python_version=sys.version.split()[0],
            rootdir=str(self.config.rootpath),
            invocation_dir=str(self.config.invocation_params.dir),
            args=[_cut(str(a), 200) for a in list(self.config.invocation_params.args)[:50]],
            xdist=self.distributing,
            packages=self.packages,
            async_plugins=_async_plugins(self.config),
        )

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        """xdist: hand the channel to each worker (the environment no longer has it)."""
        try:
            node.workerinput[WORKERINPUT_KEY] = {
                "path": self.settings["path"],
                "max_bytes": self.settings["max_bytes"],
                "packages": self.packages,
                "outside": self.settings.get("outside") or [],
            }
        except Exception:
            pass

    @pytest.hookimpl(trylast=True)
    def pytest_collectreport(self, report: Any) -> None:
        if self.is_worker or not getattr(report, "failed", False):
            return
        self._guard(self._collect_error, report)

    def _collect_error(self, report: Any) -> None:
        self.channel.emit("collect_error", nodeid=_cut(report.nodeid, NODEID_MAX),
                          **_failure_fields(report))

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self._guard(self._collection_finish, session)

    def _collection_finish(self, session: pytest.Session) -> None:
        if not self.is_worker and not self.distributing:
            self.channel.emit("collected", count=len(session.items),
                              deselected=self._deselected())
        self._report_imports()

    def _deselected(self) -> int:
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        stats = getattr(reporter, "stats", None) or {}
        return len(stats.get("deselected", []))

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node: Any, ids: Any) -> None:
        if not getattr(self, "_dist_collected", False):
            self._dist_collected = True
            self._guard(lambda: self.channel.emit(
                "collected", count=len(ids), deselected=self._deselected(),
                worker=node.gateway.id))

    def pytest_runtest_logstart(self, nodeid: str, location: Any) -> None:
        if self.distributing:
            return  # the worker said it first, with its id and its own clock
        self._guard(lambda: self.channel.emit("test_start", nodeid=_cut(nodeid, NODEID_MAX)))

    def pytest_runtest_logreport(self, report: Any) -> None:
        if self.is_worker:
            return
        self._guard(self._report, report)

    def _report(self, report: Any) -> None:
        outcome = _outcome(report)
        when = str(getattr(report, "when", "call"))
        if when != "call" and outcome in ("passed", "skipped") and not (
            when == "setup" and outcome == "skipped"
        ):
            return  # a passing set-up or tear-down adds nothing a reader needs
        node = getattr(report, "node", None)
        fields: dict[str, Any] = {
            "nodeid": _cut(report.nodeid, NODEID_MAX),
            "when": when,
            "outcome": outcome,
            "duration": round(float(getattr(report, "duration", 0.0) or 0.0), 6),
        }
        if type(report).__name__.lower().startswith("subtest"):
            fields["subtest"] = _subtest_label(report) or True
        if node is not None:
            fields["worker"] = getattr(getattr(node, "gateway", None), "id", None)
        if outcome in ("failed", "error"):
            fields.update(_failure_fields(report))
        self.channel.emit("report", **fields)

    def pytest_internalerror(self, excrepr: Any, excinfo: Any) -> None:
        self._guard(lambda: self.channel.emit(
            "internal_error", final=True, message=_cut(str(excrepr), LONGREPR_MAX)))


    @pytest.hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        self._guard(self._summary_counts, terminalreporter)

    def _summary_counts(self, reporter: Any) -> None:
        counts: dict[str, int] = {}
        for key, reports in reporter.stats.items():
            if not key:
                continue
            shown = [r for r in reports if getattr(r, "count_towards_summary", True)]
            if shown:
                counts[str(key)] = len(shown)
        self.counts = counts

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: Any) -> None:
        try:
            self.exitstatus = int(exitstatus)
        except (TypeError, ValueError):
            self.exitstatus = None
        self._guard(self._report_imports)

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        self._guard(self._session_end)

    def _session_end(self) -> None:
        if self.is_worker or not self.started:
            return
        self.channel.emit("session_end", final=True, exitstatus=self.exitstatus,
                          counts=self.counts, dropped_events=self.channel.dropped)

    def _report_imports(self) -> None:
        origins = {}
        for name in self.packages:
            origin = _module_origin(name)
            if origin is not None and self.reported_imports.get(name) != origin:
                origins[name] = origin
                self.reported_imports[name] = origin
        outside = _loaded_from_outside([str(p) for p in self.settings.get("outside") or []])
        if origins or outside:
            self.channel.emit("imports", final=True, modules=origins, outside=outside)


def pytest_configure(config: pytest.Config) -> None:
    try:
        settings = _read_settings(config)
        if settings is not None:
            config.pluginmanager.register(RetestProbe(config, settings), "retest_probe_plugin")
    except Exception:
        pass
