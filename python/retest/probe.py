"""The runner's side of the pytest probe: inject it, follow its events, sum them up.

When the command runs pytest (``pytest ...``, ``python -m pytest ...``, ``coverage run -m
pytest ...``) and ``RETEST_PROBE_ENABLED`` is on, ``proc_group.run`` adds ``-p retest_probe``
after pytest's name, puts the probe's own directory (it holds nothing else) on ``PYTHONPATH``
and names an events file in a private directory of the run (``RETEST_PROBE_EVENTS``). The
probe (``retest/_probe/retest_probe.py``) writes JSON lines there; ``ProbeReport.from_events``
turns them into the facts the verdict rests on (``retest.facts``): did the session start and
finish, what pytest counted, which tests failed, which were running at the end, and where the
repository's own packages were imported from.

Readers ignore event kinds and keys they do not know, and a torn last line (the suite was
killed mid-write) is left unread.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import shutil
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Literal, Mapping, Optional, Sequence

log = logging.getLogger(__name__)

__all__ = [
    "PROBE_DIR",
    "ProbeReport",
    "TestFailure",
    "RunningTest",
    "TestInterval",
    "StartupError",
    "startup_error_from_traceback",
    "Channel",
    "EventCallback",
    "is_pytest_argv",
    "pytest_position",
    "inject",
]

#: The directory that holds ``retest_probe.py`` and nothing else (put on the suite's PYTHONPATH).
PROBE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_probe")
PLUGIN_NAME = "retest_probe"
ENV_EVENTS = "RETEST_PROBE_EVENTS"
ENV_PACKAGES = "RETEST_PROBE_PACKAGES"
ENV_MAX_BYTES = "RETEST_PROBE_MAX_BYTES"
#: What the probe reports modules imported from (retest_probe.ENV_OUTSIDE).
ENV_OUTSIDE = "RETEST_PROBE_OUTSIDE"

#: Failing tests kept in a report (the count says how many there were).
FAILURES_MAX = 300
#: Running tests and collection errors kept.
LIST_MAX = 100
#: Finished tests whose interval a report keeps (the last ones: a timeout's story is at the end).
INTERVALS_MAX = 2000

#: Failures whose traceback head a decision's evidence keeps (all are named).
EVIDENCE_TRACEBACKS = 5
#: pytest's summary order (``terminal.KNOWN_TYPES``); other words follow.
_SUMMARY_ORDER = ("failed", "passed", "skipped", "deselected", "xfailed", "xpassed", "warnings",
                  "error", "subtests passed", "subtests failed", "subtests skipped")

#: ``on_event(event)``: one decoded event dict, as the probe wrote it.
EventCallback = Callable[[dict[str, Any]], None]

_PYTHON_NAME = re.compile(r"^(?:python|pypy)(?:[0-9]+(?:\.[0-9]+)*)?(?:[dmut]|-dbg)?(?:\.exe)?$")
_PYTEST_NAME = re.compile(r"^(?:pytest|py\.test)(?:-?[0-9.]+)?$")
#: How every name that ``pytest_position`` looks further at starts (the two above, "coverage").
_PYTEST_OR_PYTHON_START = ("py", "coverage")
#: Long interpreter options that take a value, and those that only print and exit.
_PYTHON_LONG_WITH_ARG = frozenset({"--check-hash-based-pycs"})
_PYTHON_PRINT_ONLY = frozenset({"--help", "--version", "--help-env", "--help-xoptions",
                                "--help-all"})


def _base(arg: str) -> str:
    # posixpath.basename of a str, without its three calls (every run asks, issue 15)
    return arg.rstrip("/").rpartition("/")[2] if os.path is posixpath else os.path.basename(arg.rstrip("/"))


def _after_dash_m(argv: Sequence[str], start: int) -> Optional[int]:
    """Index just past ``-m pytest`` among an interpreter's options from ``start``, or None.

    Short options may be clustered (``-Bm pytest``, ``-mpytest``); ``-W``/``-X`` take a
    value; a script, ``-c``, ``-`` or an option that only prints (``-V``, ``--help``) is not pytest.
    """
    i = start
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-") or arg in ("-", "--"):
            return None
        if arg.startswith("--"):
            if arg in _PYTHON_PRINT_ONLY:
                return None
            i += 2 if arg in _PYTHON_LONG_WITH_ARG else 1
            continue
        step = 1
        for j, flag in enumerate(arg[1:], start=1):
            rest = arg[j + 1:]
            if flag == "m":
                if rest:
                    return i + 1 if rest == "pytest" else None
                return i + 2 if i + 1 < len(argv) and argv[i + 1] == "pytest" else None
            if flag in "chV?":
                return None
            if flag in "WX":
                step = 1 if rest else 2
                break
        i += step
    return None


def pytest_position(argv: Sequence[str]) -> Optional[int]:
    """Where pytest's own arguments start in ``argv`` (``-p`` goes there), or None."""
    if not argv:
        return None
    name = _base(argv[0])
    if not name.startswith(_PYTEST_OR_PYTHON_START):  # most commands: no regular expression run
        return None
    if _PYTEST_NAME.match(name):
        return 1
    if _PYTHON_NAME.match(name):
        pos = _after_dash_m(argv, 1)
        if pos is not None:
            return pos
        # python -m coverage run [opts] -m pytest (argv may be a tuple: compare items, not
        # a slice with a list, which never equals a tuple's)
        if len(argv) > 3 and argv[1] == "-m" and argv[2] == "coverage" and argv[3] == "run":
            return _after_coverage_run(argv, 4)
        return None
    if name == "coverage" and len(argv) > 1 and argv[1] == "run":
        return _after_coverage_run(argv, 2)
    return None


#: ``coverage run`` options that take a value as the next argument (``--opt=value`` too).
_COVERAGE_WITH_ARG = frozenset({"--rcfile", "--source", "--include", "--omit", "--context",
                                "--concurrency", "--data-file", "--debug"})


def _after_coverage_run(argv: Sequence[str], start: int) -> Optional[int]:
    """Index just past ``-m pytest`` among ``coverage run``'s options from ``start``, or None
    (a script, or a module that is not pytest)."""
    i = start
    while i < len(argv):
        arg = argv[i]
        if arg == "-m":
            return i + 2 if i + 1 < len(argv) and argv[i + 1] in ("pytest", "py.test") else None
        if not arg.startswith("-") or arg in ("-", "--"):
            return None
        i += 2 if arg in _COVERAGE_WITH_ARG else 1
    return None


def is_pytest_argv(argv: Sequence[str]) -> bool:
    """True if ``argv`` runs pytest (directly, ``python -m pytest`` or ``coverage run -m pytest``)."""
    return pytest_position(argv) is not None


def inject(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``-p retest_probe`` as pytest's first arguments (unchanged if not pytest)."""
    pos = pytest_position(argv)
    if pos is None:
        return list(argv)
    return [*argv[:pos], "-p", PLUGIN_NAME, *argv[pos:]]


# --------------------------------------------------------------------------- the channel


class Channel:
    """The run's private directory and its events file; follows the file as it grows."""

    def __init__(self, *, packages: Sequence[str] = (), max_bytes: int = 8 * 1024 * 1024) -> None:
        self.dir = tempfile.mkdtemp(prefix="retest-run-")
        self.path = os.path.join(self.dir, "events.jsonl")
        # Created now, so that a reader never mistakes "not yet" for "missing".
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.close(fd)
        self.packages = [p for p in packages if p and "," not in p]
        self.max_bytes = max_bytes
        self._offset = 0
        self._partial = b""
        self._lock = threading.Lock()
        self.events: list[dict[str, Any]] = []

    def environ(self, base: Mapping[str, str]) -> dict[str, str]:
        """``base`` plus what the probe needs: PYTHONPATH, the events file, the packages."""
        env = dict(base)
        existing = env.get("PYTHONPATH", "")
        env["PYTHONPATH"] = PROBE_DIR + (os.pathsep + existing if existing else "")
        env[ENV_EVENTS] = self.path
        env[ENV_MAX_BYTES] = str(self.max_bytes)
        if self.packages:
            env[ENV_PACKAGES] = ",".join(self.packages)
        else:
            env.pop(ENV_PACKAGES, None)
        return env

    def poll(self) -> list[dict[str, Any]]:
        """The events written since the last poll (complete lines only)."""
        with self._lock:
            try:
                with open(self.path, "rb") as f:
                    f.seek(self._offset)
                    data = f.read()
            except OSError:
                return []
            self._offset += len(data)
            data = self._partial + data
            lines = data.split(b"\n")
            self._partial = lines.pop()
            new = [e for e in (_decode(line) for line in lines) if e is not None]
            self.events.extend(new)
            return new

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _decode(line: bytes) -> Optional[dict[str, Any]]:
    if not line.strip():
        return None
    try:
        doc = json.loads(line)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("ev"), str) else None


class Follower:
    """A thread that polls a channel and hands each new event to ``on_event``."""

    def __init__(self, channel: Channel, on_event: EventCallback, interval_s: float = 0.2) -> None:
        self.channel = channel
        self.on_event = on_event
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="retest-probe-follower", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _deliver(self) -> None:
        for event in self.channel.poll():
            try:
                self.on_event(event)
            except Exception:
                log.exception("retest: the on_event callback raised")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._deliver()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._deliver()


# --------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class TestFailure:
    """A failed or errored test (or subtest), or a collection error."""

    nodeid: str
    #: ``setup | call | teardown | collect``.
    when: str
    #: ``failed | error``.
    outcome: str
    message: Optional[str] = None
    worker: Optional[str] = None
    subtest: bool = False
    longrepr: Optional[str] = None
    #: The fixture a set-up error found no definition of (pytest's ``FixtureLookupError``).
    missing_fixture: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, False)}

    def redacted(self, mask: Callable[[str], str]) -> "TestFailure":
        return replace(self, nodeid=mask(self.nodeid), message=_opt(mask, self.message),
                       longrepr=_opt(mask, self.longrepr))


def _opt(mask: Callable[[str], str], text: Optional[str]) -> Optional[str]:
    return None if text is None else mask(text)


@dataclass(frozen=True)
class RunningTest:
    """A test that had started and not finished when the run ended."""

    nodeid: str
    worker: Optional[str]
    running_s: float

    def to_dict(self) -> dict[str, Any]:
        return {"nodeid": self.nodeid, "worker": self.worker, "running_s": round(self.running_s, 3)}


@dataclass(frozen=True)
class TestInterval:
    """When one test ran: from its start event to the report that ended it (issue 16)."""

    __test__ = False  # not a pytest test class, whatever its name

    nodeid: str
    worker: Optional[str]
    #: Wall-clock time (epoch seconds, the probe's clock) of the test's start event.
    started_at: float
    duration_s: float
    #: The outcome of the report that ended it (``passed | failed | skipped | error``).
    outcome: str

    def to_dict(self) -> dict[str, Any]:
        return {"nodeid": self.nodeid, "worker": self.worker, "started_at": round(self.started_at, 6),
                "duration_s": round(self.duration_s, 6), "outcome": self.outcome}


#: How an exception that ended pytest before its session is sorted, by its class.
StartupCategory = Literal["syntax", "import", "name", "other"]
_CATEGORIES: dict[str, StartupCategory] = {
    "SyntaxError": "syntax", "IndentationError": "syntax", "TabError": "syntax",
    "ImportError": "import", "ModuleNotFoundError": "import",
    "NameError": "name", "UnboundLocalError": "name",
}


@dataclass(frozen=True)
class StartupError:
    """An exception that ended pytest before its session started (a ``conftest.py`` that
    failed to import, a ``pytest_configure`` that raised, an import pytest itself made)."""

    #: ``conftest | plugin | configure | uncaught`` (the probe saw it), ``traceback`` (read
    #: from a Python traceback on stderr: pytest failed before the probe could load).
    stage: str
    type: str
    category: StartupCategory
    message: str = ""
    #: Where it was raised (a syntax error: the file that does not parse) and the line.
    file: Optional[str] = None
    line: Optional[int] = None
    #: An ``ImportError``'s module name and, for ``cannot import name``, that module's file.
    module: Optional[str] = None
    module_file: Optional[str] = None
    #: The traceback's files, innermost last.
    frames: tuple[str, ...] = ()
    conftest: Optional[str] = None
    #: The plugin being imported (``plugin`` stage): its name as pytest says it.
    plugin: Optional[str] = None

    @property
    def source(self) -> str:
        """The verdict's evidence: ``events`` (the probe's), ``output`` (a traceback read)."""
        return "output" if self.stage == "traceback" else "events"

    def text(self) -> str:
        """``loading conftest /w/tests/conftest.py raised SyntaxError at /w/src/m.py:3: ...``."""
        where = {"conftest": f"loading conftest {self.conftest} raised ",
                 "plugin": f"loading {self.plugin_text()} raised ",
                 "configure": "pytest_configure raised ",
                 "uncaught": "pytest crashed on ", "traceback": "pytest crashed on "}
        at = f" at {self.file}:{self.line}" if self.file and self.line else (
            f" at {self.file}" if self.file else "")
        message = f": {self.message}" if self.message else ""
        return f"{where.get(self.stage, '')}{self.type}{at}{message}"

    def plugin_text(self) -> str:
        """``plugin pkg.plugin``; pytest names entry points by their group: ``pytest11``."""
        if self.plugin == "pytest11":
            return "the plugins of the pytest11 entry points"
        return f"plugin {self.plugin}"

    def to_dict(self) -> dict[str, Any]:
        doc = {k: v for k, v in self.__dict__.items() if v not in (None, "", ())}
        doc["frames"] = list(self.frames)
        doc["source"] = self.source
        return doc

    def redacted(self, mask: Callable[[str], str]) -> "StartupError":
        return replace(self, message=mask(self.message), file=_opt(mask, self.file),
                       module_file=_opt(mask, self.module_file),
                       frames=tuple(mask(f) for f in self.frames),
                       conftest=_opt(mask, self.conftest))

    @classmethod
    def from_event(cls, e: Mapping[str, Any]) -> "StartupError":
        kind = str(e.get("type") or "Exception")
        category = e.get("category")
        line = e.get("line")
        return cls(
            stage=str(e.get("stage") or "uncaught"), type=kind,
            category=category if category in ("syntax", "import", "name", "other")
            else _CATEGORIES.get(kind.rpartition(".")[2], "other"),
            message=str(e.get("message") or ""), file=_str_or_none(e.get("file")),
            line=line if isinstance(line, int) and not isinstance(line, bool) else None,
            module=_str_or_none(e.get("module")), module_file=_str_or_none(e.get("module_file")),
            frames=tuple(str(f) for f in e.get("frames") or () if f)[-FRAMES_MAX:],
            conftest=_str_or_none(e.get("conftest")), plugin=_str_or_none(e.get("plugin")))


def _str_or_none(value: Any) -> Optional[str]:
    return str(value) if value not in (None, "") else None


#: Frames a startup error keeps.
FRAMES_MAX = 30
_TRACEBACK_START = "Traceback (most recent call last):"
#: Lines an interpreter's last traceback may be followed by (the message's own, atexit's).
_AFTER_MAX = 20
_FRAME = re.compile(r'^  File "(?P<file>.+)", line (?P<line>[0-9]+)(?P<in>, in .*)?$')
_EXCEPTION_LINE = re.compile(r"^(?P<type>[A-Za-z_][A-Za-z0-9_.]*)(?:: ?(?P<message>.*))?$")
_NO_MODULE = re.compile(r"^No module named '(?P<module>[^']+)'")
_CANNOT_IMPORT = re.compile(r"^cannot import name '[^']+' from (?:partially initialized module )?"
                            r"'(?P<module>[^']+)'"
                            r"(?: \((?P<file>[^()]+)\))?")


def startup_error_from_traceback(text: str) -> Optional[StartupError]:
    """The last Python traceback in ``text`` (a crashed interpreter's stderr), or None.

    For a run the probe could not see: pytest failed before loading it (the branch is one of
    pytest's own dependencies). Python's format: ``  File "f", line N, in fn`` frames, a syntax
    error's ``  File "f", line N`` without ``in``, then ``Type: message`` at column 0.
    """
    start = text.rfind(_TRACEBACK_START)
    if start < 0:
        return None
    frames: list[tuple[str, int, bool]] = []
    lines = text[start + len(_TRACEBACK_START):].splitlines()[1:]
    for i, line in enumerate(lines):
        m = _FRAME.match(line)
        if m:
            frames.append((m["file"], int(m["line"]), m["in"] is not None))
            continue
        if line.startswith(" ") or not line:
            continue
        exc = _EXCEPTION_LINE.match(line.rstrip())
        if exc is None or sum(1 for rest in lines[i + 1:] if rest.strip()) > _AFTER_MAX:
            return None  # not a traceback, or one the process printed and lived on after
        return _from_traceback(exc["type"], (exc["message"] or "").strip(), frames)
    return None


def _from_traceback(kind: str, message: str, frames: list[tuple[str, int, bool]]) -> StartupError:
    category = _CATEGORIES.get(kind.rpartition(".")[2], "other")
    inner = [(f, n) for f, n, _ in frames if not f.startswith("<frozen ")]
    file, line = inner[-1] if inner else (None, None)
    module = module_file = None
    if category == "import":
        m = _NO_MODULE.match(message) or _CANNOT_IMPORT.match(message)
        if m:
            module = m["module"]
            module_file = m.groupdict().get("file")
    return StartupError(stage="traceback", type=kind, category=category, message=message[:500],
                        file=file, line=line, module=module, module_file=module_file,
                        frames=tuple(f for f, _ in inner)[-FRAMES_MAX:])


@dataclass(frozen=True)
class ProbeReport:
    """What the suite itself reported through the probe."""

    #: The pytest session started (the suite's interpreter imported pytest and the probe).
    session_started: bool = False
    #: The session ended normally (``session_end`` was written).
    session_finished: bool = False
    pytest_version: Optional[str] = None
    python: Optional[str] = None
    rootdir: Optional[str] = None
    #: pytest's own exit status, as the session reported it.
    exitstatus: Optional[int] = None
    #: Items collected (after deselection), when collection finished.
    collected: Optional[int] = None
    deselected: int = 0
    #: Every count pytest's summary shows (``passed``, ``failed``, ``subtests passed``...).
    counts: dict[str, int] = field(default_factory=dict)
    #: Tests whose call phase (or set-up skip) was reported.
    done: int = 0
    failures: tuple[TestFailure, ...] = ()
    failure_count: int = 0
    error_count: int = 0
    collection_errors: tuple[TestFailure, ...] = ()
    running: tuple[RunningTest, ...] = ()
    #: Top-level package -> the files and directories it was imported from (every process).
    imports: dict[str, list[str]] = field(default_factory=dict)
    #: Top-level package -> the compiled (extension) modules of it that were loaded.
    compiled: dict[str, list[str]] = field(default_factory=dict)
    #: Module -> file, for modules loaded from under ``RETEST_PROBE_OUTSIDE`` (the merge gate:
    #: the developer's checkout, outside the worktree), whatever package they belong to.
    imported_outside: dict[str, str] = field(default_factory=dict)
    workers: int = 0
    internal_error: Optional[str] = None
    dropped_events: int = 0
    events: int = 0
    started_at: Optional[float] = None
    #: Seconds from the session's start to its end (``None`` if it did not end).
    session_s: Optional[float] = None
    #: Every pid that wrote an event (controller, xdist workers): the run's own processes,
    #: which an OOM kill's victim is matched against (``retest.oom``).
    pids: frozenset[int] = frozenset()
    #: The last ``INTERVALS_MAX`` finished tests, in the order they finished (the timeline).
    intervals: tuple[TestInterval, ...] = ()
    #: Finished tests left out of ``intervals``.
    intervals_dropped: int = 0
    #: The time the report was summed up to (the deadline for a run that timed out): a
    #: running test's start is ``ended_at - running_s``.
    ended_at: Optional[float] = None
    #: What ended pytest before its session started, as the exception said it.
    startup_error: Optional[StartupError] = None
    #: The registered plugins that run ``async def`` tests (pytest-asyncio, anyio...);
    #: ``None`` from a probe that did not say (an older protocol, no session).
    async_plugins: Optional[tuple[str, ...]] = None

    def redacted(self, mask: Callable[[str], str]) -> "ProbeReport":
        """A copy with every string the suite wrote passed through ``mask`` (never the keys,
        counts or vocabulary): test ids, messages, tracebacks, paths."""
        return replace(
            self,
            python=_opt(mask, self.python), rootdir=_opt(mask, self.rootdir),
            internal_error=_opt(mask, self.internal_error),
            failures=tuple(f.redacted(mask) for f in self.failures),
            collection_errors=tuple(f.redacted(mask) for f in self.collection_errors),
            running=tuple(replace(r, nodeid=mask(r.nodeid)) for r in self.running),
            intervals=tuple(replace(i, nodeid=mask(i.nodeid)) for i in self.intervals),
            imports={name: [mask(p) for p in places] for name, places in self.imports.items()},
            compiled={name: [mask(p) for p in files] for name, files in self.compiled.items()},
            imported_outside={name: mask(p) for name, p in self.imported_outside.items()},
            startup_error=self.startup_error.redacted(mask) if self.startup_error else None,
        )

    @property
    def failed_ids(self) -> list[str]:
        return [f.nodeid for f in self.failures]

    def counts_text(self) -> str:
        """The counts in pytest's words and order: ``1 failed, 39 passed, 2 subtests passed``."""
        if not self.counts:
            return "no tests ran"
        order = {word: i for i, word in enumerate(_SUMMARY_ORDER)}
        words = sorted(self.counts, key=lambda w: order.get(w, len(order)))
        return ", ".join(f"{self.counts[w]} {w}" for w in words)

    def summary_text(self) -> str:
        """``counts_text`` with the session's duration, as pytest's last line has it."""
        if self.session_s is None:
            return self.counts_text()
        return f"{self.counts_text()} in {self.session_s:.2f}s"

    def evidence(self) -> dict[str, Any]:
        """``to_dict`` for a decision's evidence: every failure named, few tracebacks kept."""
        doc = self.to_dict()
        doc["failures"] = [
            {k: v for k, v in f.to_dict().items() if k != "longrepr" or i < EVIDENCE_TRACEBACKS}
            for i, f in enumerate(self.failures)
        ]
        doc["collection_errors"] = [
            {k: v for k, v in f.to_dict().items() if k != "longrepr" or i < EVIDENCE_TRACEBACKS}
            for i, f in enumerate(self.collection_errors)
        ]
        return doc

    @classmethod
    def from_events(cls, events: Iterable[Mapping[str, Any]], *, ended_at: Optional[float] = None) -> "ProbeReport":
        return _Tally(ended_at if ended_at is not None else time.time()).feed(events).report()

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": "probe",
            "session_started": self.session_started,
            "session_finished": self.session_finished,
            "pytest_version": self.pytest_version,
            "python": self.python,
            "rootdir": self.rootdir,
            "exitstatus": self.exitstatus,
            "collected": self.collected,
            "deselected": self.deselected,
            "done": self.done,
            "counts": dict(self.counts),
            "failure_count": self.failure_count,
            "error_count": self.error_count,
            "failures": [f.to_dict() for f in self.failures],
            "collection_errors": [f.to_dict() for f in self.collection_errors],
            "running": [r.to_dict() for r in self.running],
            "imports": {k: list(v) for k, v in self.imports.items()},
            "compiled": {k: list(v) for k, v in self.compiled.items()},
            "imported_outside": dict(self.imported_outside),
            "workers": self.workers,
            "internal_error": self.internal_error,
            "dropped_events": self.dropped_events,
            "session_s": self.session_s,
            "startup_error": self.startup_error.to_dict() if self.startup_error else None,
            "async_plugins": list(self.async_plugins) if self.async_plugins is not None else None,
        }


_FAILED_OUTCOMES = ("failed", "error")


class _Tally:
    """Folds events, in file order, into a ``ProbeReport``."""

    def __init__(self, ended_at: float) -> None:
        self.ended_at = ended_at
        self.fields: dict[str, Any] = {}
        self.failures: list[TestFailure] = []
        self.failure_count = 0
        self.error_count = 0
        self.collection_errors: list[TestFailure] = []
        self.running: dict[tuple[Optional[str], str], float] = {}
        self.done = 0
        self.imports: dict[str, list[str]] = {}
        self.compiled: dict[str, list[str]] = {}
        self.outside: dict[str, str] = {}
        self.workers: set[str] = set()
        self.pids: set[int] = set()
        self.events = 0
        self.intervals: deque[TestInterval] = deque(maxlen=INTERVALS_MAX)
        self.intervals_seen = 0

    def feed(self, events: Iterable[Mapping[str, Any]]) -> "_Tally":
        for event in events:
            self.events += 1
            pid = event.get("pid")
            if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0:
                self.pids.add(pid)
            handler = getattr(self, "_on_" + str(event.get("ev")), None)
            if handler is not None:
                try:
                    handler(event)
                except (TypeError, ValueError, KeyError, AttributeError):
                    log.debug("retest: probe event not understood: %r", event)
        return self

    def _on_session_start(self, e: Mapping[str, Any]) -> None:
        plugins = e.get("async_plugins")
        self.fields.update(session_started=True, pytest_version=e.get("pytest"),
                           python=e.get("python"), rootdir=e.get("rootdir"),
                           started_at=e.get("t"),
                           async_plugins=tuple(str(p) for p in plugins)
                           if isinstance(plugins, list) else None)

    def _on_worker_start(self, e: Mapping[str, Any]) -> None:
        if e.get("worker"):
            self.workers.add(str(e["worker"]))

    def _on_collected(self, e: Mapping[str, Any]) -> None:
        self.fields["collected"] = int(e["count"])
        self.fields["deselected"] = int(e.get("deselected") or 0)

    def _on_collect_error(self, e: Mapping[str, Any]) -> None:
        if len(self.collection_errors) < LIST_MAX:
            self.collection_errors.append(TestFailure(
                nodeid=str(e.get("nodeid")), when="collect", outcome="error",
                message=e.get("message"), longrepr=e.get("longrepr")))
        else:
            self.fields["more_collection_errors"] = True

    def _on_test_start(self, e: Mapping[str, Any]) -> None:
        worker = e.get("worker")
        self.running[(worker, str(e["nodeid"]))] = float(e.get("t") or self.ended_at)

    def _finish(self, worker: Optional[str], nodeid: str, e: Mapping[str, Any]) -> None:
        started = self.running.pop((worker, nodeid), None)
        if started is None:
            # A controller-side report can lack the worker its start named (or vice versa).
            for key in [k for k in self.running if k[1] == nodeid]:
                started = self.running.pop(key)
                worker = worker or key[0]
                break
        if started is None:
            return
        ended = e.get("t")
        if not isinstance(ended, (int, float)) or isinstance(ended, bool):
            ended = started + float(e.get("duration") or 0.0)
        self.intervals_seen += 1
        self.intervals.append(TestInterval(nodeid, worker, started, max(float(ended) - started, 0.0),
                                           str(e.get("outcome"))))

    def _on_report(self, e: Mapping[str, Any]) -> None:
        nodeid, when, outcome = str(e["nodeid"]), str(e.get("when")), str(e.get("outcome"))
        worker = e.get("worker")
        subtest = bool(e.get("subtest"))
        label = e.get("subtest")
        shown = f"{nodeid} {label}" if isinstance(label, str) and label else nodeid
        # Any phase but set-up and tear-down ends the test: "call", and xdist's "???" for a
        # test whose worker crashed (which never sends the test's own call report).
        call = when not in ("setup", "teardown")
        if (call and not subtest and outcome != "rerun") or (
            when == "setup" and outcome in ("skipped", "error")
        ):
            self.done += 1
        if (call or when == "setup") and outcome != "rerun" and not subtest:
            if call or outcome != "passed":
                self._finish(worker, nodeid, e)
        if when == "teardown":
            self._finish(worker, nodeid, e)
        if outcome not in _FAILED_OUTCOMES:
            return
        if outcome == "error":
            self.error_count += 1
        else:
            self.failure_count += 1
        if len(self.failures) < FAILURES_MAX:
            self.failures.append(TestFailure(  # a subtest by pytest's name for it
                nodeid=shown, when=when, outcome=outcome, message=e.get("message"),
                worker=worker, subtest=subtest, longrepr=e.get("longrepr"),
                missing_fixture=e.get("missing_fixture") if isinstance(e.get("missing_fixture"), str)
                else None))

    def _on_imports(self, e: Mapping[str, Any]) -> None:
        for name, place in dict(e.get("outside") or {}).items():
            if len(self.outside) < LIST_MAX:
                self.outside.setdefault(str(name), str(place))
        for name, origin in dict(e.get("modules") or {}).items():
            places = self.imports.setdefault(str(name), [])
            origin = origin or {}
            compiled = [str(f) for f in origin.get("compiled") or []]
            for place in [origin.get("file"), *(origin.get("path") or []), *compiled]:
                if place and place not in places:
                    places.append(str(place))
            if compiled:
                known = self.compiled.setdefault(str(name), [])
                known.extend(f for f in compiled if f not in known)

    def _on_internal_error(self, e: Mapping[str, Any]) -> None:
        self.fields["internal_error"] = e.get("message")

    def _on_startup_error(self, e: Mapping[str, Any]) -> None:
        self.fields.setdefault("startup_error", StartupError.from_event(e))

    def _on_session_end(self, e: Mapping[str, Any]) -> None:
        self.fields["session_finished"] = True
        if e.get("exitstatus") is not None:
            self.fields["exitstatus"] = int(e["exitstatus"])
        counts = e.get("counts")
        if isinstance(counts, dict):
            self.fields["counts"] = {str(k): int(v) for k, v in counts.items()}
        self.fields["dropped_events"] = int(e.get("dropped_events") or 0)
        start, end = self.fields.get("started_at"), e.get("t")
        if isinstance(start, (int, float)) and isinstance(end, (int, float)):
            self.fields["session_s"] = round(max(end - start, 0.0), 3)

    def report(self) -> ProbeReport:
        fields = dict(self.fields)
        fields.pop("more_collection_errors", None)
        if "counts" not in fields:
            fields["counts"] = self._own_counts()
        running = sorted(
            (RunningTest(nodeid, worker, max(self.ended_at - started, 0.0))
             for (worker, nodeid), started in self.running.items()),
            key=lambda r: -r.running_s,
        )
        return ProbeReport(
            done=self.done, failures=tuple(self.failures), failure_count=self.failure_count,
            error_count=self.error_count, collection_errors=tuple(self.collection_errors),
            running=tuple(running[:LIST_MAX]), imports=self.imports, compiled=self.compiled,
            imported_outside=self.outside,
            workers=len(self.workers),
            events=self.events, pids=frozenset(self.pids), intervals=tuple(self.intervals),
            intervals_dropped=self.intervals_seen - len(self.intervals), ended_at=self.ended_at,
            **fields,
        )

    def _own_counts(self) -> dict[str, int]:
        """Counts from the reports, when the session did not live to give pytest's own."""
        counts: dict[str, int] = {}
        if self.failure_count:
            counts["failed"] = self.failure_count
        if self.error_count:
            counts["error"] = self.error_count
        return counts
