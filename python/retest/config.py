"""Every setting of retest, declared once: type, range, default and meaning (issue 13.2).

Every setting is an upper-case environment variable. ``SETTINGS`` declares each one
(``Setting``: name, kind, range or choices, default, doc); the dataclasses
(``RunnerSettings``, ``GateSettings``) are read from it, and the docs table
(``docs/settings.md``) and ``.env.example`` are generated from it
(``python -m retest.config --markdown`` / ``--env-example``; a test keeps the committed files
equal to the output). Adding a setting is one entry in ``SETTINGS`` plus the field that uses it.

An invalid value never crashes the caller and is never used as it is: a value that is not of
the setting's kind falls back to the default, a number outside the documented range is
clamped to the nearest bound, and either way one warning names the variable, what was wrong
and the value used (once per variable and value per process: settings are re-read on every
gate call). A command that cannot be split is kept, so that the gate refuses to run it and
holds (a different suite must never run in its place). Values of secret settings are never
logged: only their length.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shlex
import sys
import textwrap
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

log = logging.getLogger(__name__)

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})

#: Kill-switches: each independent, each on by default. Off restores the prior behaviour.
KILL_SWITCHES = (
    "SUBPROCESS_TREE_KILL_ENABLED",
    "MERGE_GATE_CLASSIFY_ENABLED",
    "MERGE_GATE_INFRA_RETRY_ENABLED",
    "MERGE_RETEST_SKIP_WHEN_CURRENT_ENABLED",
    "MERGE_GATE_METRICS_ENABLED",
)

DEFAULT_RETEST_TIMEOUT_S = 900.0
DEFAULT_REAPER_MAX_RUNNING_S = 3600.0
DEFAULT_KILL_GRACE_S = 5.0
#: Idle shepherds kept per process (issue 15): as many as a caller's threads are likely to run
#: at once; each is a small static process (~0.2 MiB resident) waiting on its socket.
DEFAULT_SHEPHERD_POOL = 8
DEFAULT_CAPTURE_LIMIT_BYTES = 8 * 1024 * 1024
DEFAULT_INFRA_RETRY_MAX = 3
DEFAULT_PROBE_MAX_BYTES = 8 * 1024 * 1024
DEFAULT_RETEST_COMMAND = "python -m pytest -q"
DEFAULT_COVERAGE_COMMAND = "python -m coverage run -m pytest -q"
DEFAULT_INFRA_RETRY_BACKOFF_S = 60.0
DEFAULT_INFRA_RETRY_BACKOFF_MAX_S = 3600.0
DEFAULT_GATE_LOCK_WAIT_S = 5.0
DEFAULT_GIT_TIMEOUT_S = 120.0
DEFAULT_ALERT_TIMEOUT_S = 30.0
DEFAULT_LEDGER_BUSY_TIMEOUT_S = 5.0
DEFAULT_RECENT_DECISIONS = 50
OTHER_ACTIONS = ("hold", "rollback")
CONTAINMENTS = ("auto", "cgroup", "subreaper")
DEFAULT_LEDGER_CONNECT_TIMEOUT_S = 5.0
DEFAULT_LEDGER_RECONNECT_S = 15.0
DEFAULT_LEDGER_CLAIM_LEASE_S = 90.0
#: A claim's lease must outlast the alert command it covers by at least this much.
LEDGER_CLAIM_LEASE_MARGIN_S = 5.0
LEDGER_URL_SCHEMES = ("postgresql://", "postgres://")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

KiB, MiB, GiB = 1024, 1024 ** 2, 1024 ** 3
HOUR, DAY, WEEK = 3600.0, 86400.0, 604800.0

_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


def _warn_once(name: str, raw: str, why: str, *, secret: bool = False) -> None:
    """Log one warning per (variable, value) and process."""
    with _warned_lock:
        if (name, raw) in _warned:
            return
        _warned.add((name, raw))
    shown = f"<{len(raw)} characters>" if secret else repr(raw)
    log.warning("setting %s=%s %s", name, shown, why)


def _forget_warnings() -> None:
    """For tests: warn again about values already warned about."""
    with _warned_lock:
        _warned.clear()
    _RUNNER_CACHE.clear()


def default_ledger_path(environ: Mapping[str, str] | None = None) -> str:
    """``$XDG_STATE_HOME/retest/ledger.sqlite3`` (``~/.local/state`` when unset or relative)."""
    env = os.environ if environ is None else environ
    state = env.get("XDG_STATE_HOME", "")
    if not state or not os.path.isabs(state):  # the XDG spec says: ignore a relative path
        home = env.get("HOME") or os.path.expanduser("~")
        state = os.path.join(home, ".local", "state")
    return os.path.join(state, "retest", "ledger.sqlite3")


#: Timeout forensics (issue 11): docs/verdicts.md.
DEFAULT_STARVED_PSI_SHARE = 0.5
DEFAULT_STARVED_FOREIGN_SHARE = 0.5
DEFAULT_IDLE_CORES = 0.05
DEFAULT_HUNG_RUNNING_SHARE = 0.8
DEFAULT_DIAGNOSE_S = 2.0

#: The run timelines the ledger keeps for ``retest serve``'s pages (issue 16).
DEFAULT_TIMELINE_MAX_BYTES = 256 * 1024
DEFAULT_TIMELINES_KEPT = 200


# --------------------------------------------------------------------------- the declarations


@dataclass(frozen=True)
class Setting:
    """One setting: what it is, what it may be, what it is when unset or invalid.

    ``kind``: ``bool``; ``int`` and ``float`` (``minimum``..``maximum``, out-of-range values
    clamped); ``choice`` (``choices``, any case); ``command`` (split with ``shlex``, never a
    shell; ``None`` default: unset means "none"); ``path`` (absolute; a relative path would
    name a different file from each working directory); ``str``.
    """

    name: str
    kind: str
    default: Any
    doc: str
    group: str
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    choices: tuple[str, ...] = ()
    #: Never logged nor shown (a command may carry a webhook token).
    secret: bool = False
    #: What the docs show as the default when it is computed (``default_ledger_path``).
    default_text: Optional[str] = None
    #: ``str`` settings: the syntax a value must have (a regular expression, matched whole).
    pattern: Optional[str] = None
    #: ``pattern``'s description in the docs (``range_text``).
    pattern_text: Optional[str] = None

    def parse(self, raw: Optional[str]) -> tuple[Any, Optional[str]]:
        """``(value, problem)``: the value to use for ``raw`` (``None``: unset), and what was
        wrong with ``raw`` (``None`` if nothing). Never raises."""
        if raw is None or not raw.strip():
            return self.default, None
        text = raw.strip()
        parse: Callable[[str, str], tuple[Any, Optional[str]]] = getattr(self, f"_parse_{self.kind}")
        return parse(text, raw)

    def _parse_bool(self, text: str, raw: str) -> tuple[Any, Optional[str]]:
        if text.lower() in _TRUE:
            return True, None
        if text.lower() in _FALSE:
            return False, None
        return self.default, f"is not a boolean (1/true/yes/on, 0/false/no/off); using the default {self.show(self.default)}"

    def _parse_int(self, text: str, raw: str) -> tuple[Any, Optional[str]]:
        try:
            return self._clamp(int(text))
        except ValueError:
            return self.default, f"is not an integer; using the default {self.show(self.default)}"

    def _parse_float(self, text: str, raw: str) -> tuple[Any, Optional[str]]:
        try:
            value = float(text)
        except (ValueError, OverflowError):
            return self.default, f"is not a number; using the default {self.show(self.default)}"
        if not math.isfinite(value):
            return self.default, f"is not finite; using the default {self.show(self.default)}"
        return self._clamp(value)

    def _clamp(self, value: Union[int, float]) -> tuple[Any, Optional[str]]:
        cast: Callable[[Any], Any] = int if self.kind == "int" else float
        if self.minimum is not None and value < self.minimum:
            return cast(self.minimum), f"is below the minimum {self.show(self.minimum)}; using {self.show(self.minimum)}"
        if self.maximum is not None and value > self.maximum:
            return cast(self.maximum), f"is above the maximum {self.show(self.maximum)}; using {self.show(self.maximum)}"
        return cast(value), None

    def _parse_choice(self, text: str, raw: str) -> tuple[Any, Optional[str]]:
        for choice in self.choices:
            if text.lower() == choice.lower():
                return choice, None
        return self.default, f"is not one of {', '.join(self.choices)}; using the default {self.default}"

    def _parse_command(self, text: str, raw: str) -> tuple[Any, Optional[str]]:
        try:
            words = shlex.split(raw)
        except ValueError as err:
            return raw, f"is not a valid command ({err}); it is refused: every gate holds until it is fixed"
        if not words or not words[0]:
            return raw, "names no program; it is refused: every gate holds until it is fixed"
        return raw, None

    def _parse_path(self, text: str, raw: str) -> tuple[Any, Optional[str]]:
        if os.path.isabs(raw):
            return raw, None
        return self.default, "is not an absolute path; using the default"

    def _parse_str(self, text: str, raw: str) -> tuple[Any, Optional[str]]:
        if self.pattern is not None and not re.fullmatch(self.pattern, text):
            return self.default, f"is not {self.pattern_text or 'valid'}; using the default {self.show(self.default)}"
        return (text if self.pattern is not None else raw), None

    def show(self, value: Any) -> str:
        """A value as the docs and the warnings write it."""
        if value is None:
            return "unset"
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float):
            return f"{value:g}" if value < 1e6 else str(int(value))
        return str(value)

    def range_text(self) -> str:
        if self.kind == "bool":
            return "true / false"
        if self.kind == "choice":
            return " / ".join(self.choices)
        if self.kind in ("int", "float"):
            return f"{self.show(self.minimum)} .. {self.show(self.maximum)}"
        if self.pattern_text is not None:
            return self.pattern_text
        return {"command": "a command line (shlex, no shell)", "path": "an absolute path"}.get(self.kind, "any text")

    def read(self, environ: Optional[Mapping[str, str]] = None) -> Any:
        """The value from ``environ`` (default ``os.environ``), warning once if it was invalid."""
        raw = (os.environ if environ is None else environ).get(self.name)
        value, problem = self.parse(raw)
        if problem is not None and raw is not None:
            _warn_once(self.name, raw, problem, secret=self.secret)
        if self.name == "RETEST_LEDGER_PATH" and value is None:
            value = default_ledger_path(environ)
        return value


def _switch(name: str, doc: str) -> Setting:
    return Setting(name, "bool", True, doc, "kill-switches (each independent, default on)")


SETTINGS: tuple[Setting, ...] = (
    _switch("SUBPROCESS_TREE_KILL_ENABLED",
            "Off: the prior subprocess.run(timeout=...) path, which kills only the direct child."),
    _switch("MERGE_GATE_CLASSIFY_ENABLED",
            "Off: every failed re-test is red and rolls back (no timeout / lock-busy / other verdicts)."),
    _switch("MERGE_GATE_INFRA_RETRY_ENABLED",
            "Off: an infrastructure failure (timeout, lock-busy) rolls the task back, no re-queue."),
    _switch("MERGE_RETEST_SKIP_WHEN_CURRENT_ENABLED",
            "Off: the suite always runs, even when the rebase was a no-op on the validated sha."),
    _switch("MERGE_GATE_METRICS_ENABLED",
            "Off: counters do not move and GET /queue shows {\"enabled\": false}."),
    Setting("RETEST_KILL_GRACE_S", "float", DEFAULT_KILL_GRACE_S,
            "Seconds between SIGTERM (+SIGCONT) to the whole tree and SIGKILL; 0: SIGKILL at once.",
            "runner", 0.0, 600.0),
    Setting("RETEST_CAPTURE_LIMIT_BYTES", "int", DEFAULT_CAPTURE_LIMIT_BYTES,
            "Bytes of stdout and of stderr kept per run: half head, half tail; the middle is counted.",
            "runner", KiB, GiB),
    Setting("RETEST_PROBE_ENABLED", "bool", True,
            "Inject the pytest probe into pytest commands: verdicts on the suite's own events. "
            "Off: output rules only.", "runner"),
    Setting("RETEST_PROBE_MAX_BYTES", "int", DEFAULT_PROBE_MAX_BYTES,
            "Bytes of events one pytest process may write; past it test events are counted, not written.",
            "runner", 64 * KiB, GiB),
    Setting("RETEST_CONTAINMENT", "choice", "auto",
            "auto: each run in a cgroup v2 of its own where one can be made (root, a delegated "
            "subtree), else the subreaper (the choice and why logged once); cgroup: required (a run "
            "that cannot have one reports a spawn error); subreaper: never a cgroup.",
            "runner", choices=CONTAINMENTS),
    Setting("RETEST_CGROUP_PARENT", "path", None,
            "The cgroup v2 directory under which each run's retest-<pid>-<n> cgroup is made.",
            "runner", default_text="the caller's own cgroup"),
    Setting("RETEST_CGROUP_MEMORY_MAX", "str", "",
            "memory.max of each run's cgroup (applied where the memory controller is enabled for "
            "the parent, else one warning); empty: no limit.", "runner",
            pattern=r"max|[0-9]+[KMG]?", pattern_text="max, or bytes with an optional K/M/G"),
    Setting("RETEST_CGROUP_PIDS_MAX", "str", "",
            "pids.max of each run's cgroup (where the pids controller is enabled); empty: no limit.",
            "runner", pattern=r"max|[0-9]+", pattern_text="max, or a number of processes"),
    Setting("RETEST_CGROUP_CPU_MAX", "str", "",
            "cpu.max of each run's cgroup (\"QUOTA PERIOD\" in microseconds, where the cpu "
            "controller is enabled); empty: no limit.", "runner",
            pattern=r"(max|[0-9]+)( [0-9]+)?", pattern_text="max or QUOTA, and an optional PERIOD"),
    Setting("RETEST_FAIL_ON_LEAK", "bool", False,
            "A run that passed but left processes behind (killed by the sweep, named in "
            "RunResult.leaks) is other.leaked-processes (retest run --fail-on-leak).", "runner"),
    Setting("RETEST_SHEPHERD_POOL", "int", DEFAULT_SHEPHERD_POOL,
            "Idle shepherds the native runner keeps for later runs (each serves run after run, "
            "and is used only by a run whose caller's inherited state equals the one it was "
            "started from); 0: a new shepherd per run.", "runner", 0, 64),
    Setting("RETEST_DIAGNOSE_S", "float", DEFAULT_DIAGNOSE_S,
            "Seconds of the diagnostic stage at the deadline (every Python process's stacks), "
            "taken out of RETEST_KILL_GRACE_S and never more than half of it; 0: none.",
            "timeout forensics", 0.0, 60.0),
    Setting("RETEST_STARVED_PSI_SHARE", "float", DEFAULT_STARVED_PSI_SHARE,
            "timeout.starved: share of the run in which some task of the machine waited for a CPU "
            "(PSI cpu some) at or above this, with the tree not idle; timeout.test-starved: the "
            "same over the span of a test that pytest-timeout stopped (where PSI is read, only "
            "this share decides).", "timeout forensics", 0.01, 1.0),
    Setting("RETEST_STARVED_FOREIGN_SHARE", "float", DEFAULT_STARVED_FOREIGN_SHARE,
            "timeout.starved: CPU used outside the tree / (wall x cores) at or above this "
            "(either this or the PSI share suffices).", "timeout forensics", 0.01, 1.0),
    Setting("RETEST_IDLE_CORES", "float", DEFAULT_IDLE_CORES,
            "Below this many cores of CPU (tree CPU / wall) the tree was idle: hung material, "
            "never starved.", "timeout forensics", 0.0, 1024.0),
    Setting("RETEST_HUNG_RUNNING_SHARE", "float", DEFAULT_HUNG_RUNNING_SHARE,
            "timeout.hung: a test had been running for at least this share of the budget while "
            "the tree was idle (half this share when the machine was starved by others).",
            "timeout forensics", 0.01, 1.0),
    Setting("RETEST_LOG_LEVEL", "choice", "WARNING", "Log level of the retest command line.",
            "runner", choices=LOG_LEVELS),
    Setting("MERGE_RETEST_COMMAND", "command", DEFAULT_RETEST_COMMAND,
            "The suite, split with shlex, never given to a shell. Unset: \"python -m pytest -q\" run "
            "by the gate's own interpreter; a value is used as written.", "merge gate"),
    Setting("MERGE_RETEST_SETUP_COMMAND", "command", None,
            "Run in the gate's worktree before the suite (shlex, no shell), e.g. \"python setup.py "
            "build_ext --inplace\" to build the branch's extensions; its failure holds "
            "(other.setup-failed). Unset: none.", "merge gate"),
    Setting("MERGE_RETEST_TIMEOUT_S", "float", DEFAULT_RETEST_TIMEOUT_S,
            "Deadline of the suite; also kept below REAPER_MAX_RUNNING_S minus the grace (clamped, "
            "one warning per gate).", "merge gate", 0.01, WEEK),
    Setting("REAPER_MAX_RUNNING_S", "float", DEFAULT_REAPER_MAX_RUNNING_S,
            "The orchestrator's reaper bound: timeout + grace must stay below it.",
            "merge gate", 1.0, WEEK),
    Setting("MERGE_GATE_INFRA_RETRY_MAX", "int", DEFAULT_INFRA_RETRY_MAX,
            "Infra re-queues per (task, sha, verdict) before the task is held and one alert is sent.",
            "merge gate", 0, 100),
    Setting("MERGE_GATE_INFRA_RETRY_BACKOFF_S", "float", DEFAULT_INFRA_RETRY_BACKOFF_S,
            "First back-off before a re-queued task is tried again; doubles per retry, capped.",
            "merge gate", 0.0, DAY),
    Setting("MERGE_GATE_INFRA_RETRY_BACKOFF_MAX_S", "float", DEFAULT_INFRA_RETRY_BACKOFF_MAX_S,
            "The back-off cap.", "merge gate", 0.0, WEEK),
    Setting("MERGE_GATE_OTHER_ACTION", "choice", "hold",
            "What an \"other\" verdict does: hold (+ one alert) or rollback (the prior behaviour).",
            "merge gate", choices=OTHER_ACTIONS),
    Setting("MERGE_GATE_ALERT_COMMAND", "command", None,
            "A command run once per alert, the alert as JSON on stdin (no shell). Unset: log only. "
            "Never logged (it may carry a token).", "merge gate", secret=True),
    Setting("MERGE_GATE_ALERT_TIMEOUT_S", "float", DEFAULT_ALERT_TIMEOUT_S,
            "Deadline of the alert command.", "merge gate", 0.01, HOUR),
    Setting("MERGE_GATE_LOCK_WAIT_S", "float", DEFAULT_GATE_LOCK_WAIT_S,
            "How long a second gate on the same repository waits for its lock before lock-busy; "
            "0: not at all.", "merge gate", 0.0, HOUR),
    Setting("MERGE_GATE_GIT_TIMEOUT_S", "float", DEFAULT_GIT_TIMEOUT_S,
            "Deadline of each git command the gate runs.", "merge gate", 0.1, HOUR),
    Setting("MERGE_GATE_RECENT_DECISIONS", "int", DEFAULT_RECENT_DECISIONS,
            "Decisions listed in the \"recent\" part of GET /queue (the ledger keeps 1000).",
            "merge gate", 1, 1000),
    Setting("RETEST_TIMELINE_MAX_BYTES", "int", DEFAULT_TIMELINE_MAX_BYTES,
            "Largest run timeline (tests per worker, pressure, kill stages, stacks; JSON bytes) "
            "kept in the ledger per decision for retest serve's pages; larger ones are cut down "
            "(passing tests first, then stack text) and say so.", "merge gate", 4096, 16 * MiB),
    Setting("RETEST_TIMELINES_KEPT", "int", DEFAULT_TIMELINES_KEPT,
            "Run timelines kept in the ledger (the newest); 0: none recorded.",
            "merge gate", 0, 1000),
    Setting("RETEST_LEDGER_PATH", "path", None,
            "The ledger (retry budgets, alerts, decisions); shared by every gate, so absolute.",
            "merge gate", default_text="$XDG_STATE_HOME/retest/ledger.sqlite3 (~/.local/state/...)"),
    Setting("RETEST_LEDGER_BUSY_TIMEOUT_S", "float", DEFAULT_LEDGER_BUSY_TIMEOUT_S,
            "How long a ledger write waits for another (SQLite busy timeout; SQLite itself turns "
            "values past about 2147483 s into no wait at all).", "merge gate", 0.01, HOUR),
    Setting("RETEST_LEDGER_URL", "str", "",
            "postgresql://user:password@host:port/db: the PostgreSQL ledger shared by gates on many "
            "hosts (needs the postgres extra); empty: the SQLite file of RETEST_LEDGER_PATH. Never "
            "logged (it may carry a password).", "merge gate", secret=True,
            pattern=r"postgres(ql)?://.*", pattern_text="a postgresql:// URL"),
    Setting("RETEST_LEDGER_CONNECT_TIMEOUT_S", "float", DEFAULT_LEDGER_CONNECT_TIMEOUT_S,
            "PostgreSQL: seconds to connect to the server.", "merge gate", 0.1, HOUR),
    Setting("RETEST_LEDGER_RECONNECT_S", "float", DEFAULT_LEDGER_RECONNECT_S,
            "PostgreSQL: how long a ledger write keeps retrying over a lost connection before the "
            "gate holds with other.ledger-error; 0: no retry.", "merge gate", 0.0, HOUR),
    Setting("RETEST_LEDGER_CLAIM_LEASE_S", "float", DEFAULT_LEDGER_CLAIM_LEASE_S,
            "PostgreSQL: after how long another host may take over an alert claim whose gate went "
            "silent (at least MERGE_GATE_ALERT_TIMEOUT_S + 5).", "merge gate", 1.0, DAY),
    Setting("RETEST_HOST_ID", "str", "",
            "This gate host's name in the ledger's claims; empty: derived from the machine id, "
            "boot id and pid namespace.", "merge gate"),
    Setting("MERGE_GATE_KEEP_WORKTREE_ENABLED", "bool", True,
            "Kill-switch: keep one worktree per repository and move it to each new commit (fast on "
            "large repositories). Off: a fresh temporary worktree per attempt, the prior behaviour.",
            "merge gate"),
    Setting("MERGE_GATE_WORKTREE_DIR", "path", None,
            "Parent folder of the gate's worktrees.", "merge gate",
            default_text="the system's temporary folder"),
    Setting("COVERAGE_GATE_COMMAND", "command", DEFAULT_COVERAGE_COMMAND,
            "The coverage gate's suite. Unset: \"python -m coverage run -m pytest -q\" with the "
            "gate's own interpreter.", "coverage gate"),
    Setting("COVERAGE_GATE_MIN_PERCENT", "float", 0.0, "The coverage threshold, in percent.",
            "coverage gate", 0.0, 100.0),
    Setting("RETEST_PURE_PYTHON", "bool", False,
            "Install without the native runner (the subprocess backend is used; logged at ERROR).",
            "build time only"),
    Setting("RETEST_WERROR", "bool", False, "Developers: compiler warnings are errors.",
            "build time only"),
    Setting("RETEST_SANITIZE", "str", "",
            "Developers: e.g. \"address,undefined\" builds the C code with sanitizers (.ci/sanitize).",
            "build time only"),
    Setting("RETEST_STRIP", "bool", True,
            "The extension and the shepherd are linked stripped (-s); 0 keeps their symbols for a "
            "debugger (sanitizer builds always keep them).", "build time only"),
    Setting("RETEST_SHEPHERD_LIBC", "choice", "none",
            "How the shepherd is linked: none (default) gives it its own start-up and system-call "
            "layer, no libc (fastest start; x86_64 and aarch64, else musl or glibc); musl links "
            "it statically against musl when musl-gcc is installed; glibc against glibc. "
            "Sanitizer builds always use glibc.", "build time only",
            choices=("none", "musl", "glibc")),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}

#: Declared here (type, range, default, docs) but validated where its range is known: the
#: deadline must also stay below ``REAPER_MAX_RUNNING_S`` minus the grace, so
#: ``merge_gate._resolve_retest_timeout`` checks it on each gate call (one warning per call).
RESOLVED_PER_GATE = frozenset({"MERGE_RETEST_TIMEOUT_S"})


def read(name: str, environ: Optional[Mapping[str, str]] = None) -> Any:
    """The value of the declared setting ``name`` (see ``Setting.read``)."""
    return BY_NAME[name].read(environ)


# --------------------------------------------------------------------------- lower-level readers


def env_bool(name: str, default: bool, environ: Mapping[str, str] | None = None) -> bool:
    """Read a boolean: 1/true/yes/on or 0/false/no/off, any case (declared or not)."""
    setting = BY_NAME.get(name)
    if setting is None or setting.default is not default:
        setting = Setting(name, "bool", default, "", "")
    return bool(setting.read(environ))


# --------------------------------------------------------------------------- generated docs

_GROUPS = ("kill-switches (each independent, default on)", "runner", "timeout forensics", "merge gate",
           "coverage gate", "build time only")


def markdown_table() -> str:
    """``docs/settings.md``: every setting's type, range, default and meaning."""
    out = ["# Settings", "",
           "<!-- Generated from retest.config.SETTINGS by `python3 tools/settings_docs.py --write`;",
           "     edit the declarations, not this file (tests/test_settings.py checks it). -->", "",
           "Every setting is an environment variable. A value that is not of the setting's type",
           "falls back to the default, a number outside its range is clamped to the nearest bound,",
           "and either way one warning names the variable and the value used; nothing crashes. A",
           "command that cannot be split is refused (the gate holds) rather than replaced.", ""]
    for group in _GROUPS:
        out += [f"## {group[0].upper()}{group[1:]}", "",
                "| setting | type | range | default | meaning |", "|---|---|---|---|---|"]
        for setting in SETTINGS:
            if setting.group != group:
                continue
            default = setting.default_text or setting.show(setting.default)
            doc = setting.doc.replace("|", "\\|")
            out.append(f"| `{setting.name}` | {setting.kind} | {setting.range_text()} | "
                       f"`{default}` | {doc} |")
        out.append("")
    return "\n".join(out)


def env_example() -> str:
    """``.env.example``: every setting with its default (commented out where unset)."""
    out = ["# retest settings: each is an environment variable; the values below are the defaults.",
           "# Generated from retest.config.SETTINGS (python3 tools/settings_docs.py --write); types",
           "# and ranges: docs/settings.md. An invalid value falls back to the default (a number out",
           "# of range is clamped) with one warning naming the variable; nothing crashes.",
           "# Secret values: a variable whose name contains TOKEN, SECRET, PASSWORD or KEY holds a",
           "# secret; its value is masked as *** in untrusted text wherever retest writes it. A value",
           "# shorter than 8 characters is not masked: it is reported once by name."]
    for group in _GROUPS:
        out += ["", f"# --- {group} ---"]
        for setting in SETTINGS:
            if setting.group != group:
                continue
            out += [f"# {line}" for line in
                    textwrap.wrap(f"{setting.doc} [{setting.kind}: {setting.range_text()}]", 94)]
            if setting.default is None or setting.kind == "path":
                out.append(f"# {setting.name}=")
            elif setting.kind == "command":
                out.append(f"# {setting.name}={setting.default}")
            else:
                out.append(f"{setting.name}={setting.show(setting.default)}")
    return "\n".join(out) + "\n"


@dataclass(frozen=True)
class RunnerSettings:
    """Settings of the process-group runner (``retest.proc_group``)."""

    tree_kill_enabled: bool = True
    grace_s: float = DEFAULT_KILL_GRACE_S
    capture_limit_bytes: int = DEFAULT_CAPTURE_LIMIT_BYTES
    #: Inject the pytest probe into pytest commands (``RETEST_PROBE_ENABLED``).
    probe_enabled: bool = True
    #: Bytes of events one pytest process may write (``RETEST_PROBE_MAX_BYTES``).
    probe_max_bytes: int = DEFAULT_PROBE_MAX_BYTES
    #: ``auto`` (a cgroup of its own per run where one can be made, else the subreaper),
    #: ``cgroup`` (required: a run that cannot have one reports it) or ``subreaper``.
    containment: str = "auto"
    #: The cgroup v2 directory under which each run's cgroup is made; empty: the caller's own.
    cgroup_parent: str = ""
    #: Limits of each run's cgroup (``memory.max``, ``pids.max``, ``cpu.max`` syntax); empty:
    #: none. Applied only where the controller is enabled for the parent (else one warning).
    cgroup_memory_max: str = ""
    cgroup_pids_max: str = ""
    cgroup_cpu_max: str = ""
    #: Processes left after the command exited fail an otherwise passing run
    #: (``other.leaked-processes``).
    fail_on_leak: bool = False
    #: Idle shepherds kept for later runs (``RETEST_SHEPHERD_POOL``); 0: one per run.
    shepherd_pool: int = DEFAULT_SHEPHERD_POOL

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "RunnerSettings":
        """The settings of ``environ`` (default ``os.environ``). ``run()`` asks several times per
        run: the last answer is kept for as long as the variables it was read from are the same
        (11 lookups instead of parsing 11 settings)."""
        if environ is None and _ENVIRON_DATA is not None:  # bytes lookups: no encode/decode
            key: tuple[object, ...] = tuple(map(_ENVIRON_DATA.get, _RUNNER_NAMES_B))
        else:
            env = os.environ if environ is None else environ
            key = tuple(env.get(name) for name in _RUNNER_NAMES)
        cached = _RUNNER_CACHE.get("last")
        if cached is not None and cached[0] == key:
            return cached[1]
        settings = cls._read(environ)
        _RUNNER_CACHE["last"] = (key, settings)
        return settings

    @classmethod
    def _read(cls, environ: Mapping[str, str] | None) -> "RunnerSettings":
        return cls(
            tree_kill_enabled=read("SUBPROCESS_TREE_KILL_ENABLED", environ),
            grace_s=read("RETEST_KILL_GRACE_S", environ),
            capture_limit_bytes=read("RETEST_CAPTURE_LIMIT_BYTES", environ),
            probe_enabled=read("RETEST_PROBE_ENABLED", environ),
            probe_max_bytes=read("RETEST_PROBE_MAX_BYTES", environ),
            containment=read("RETEST_CONTAINMENT", environ),
            cgroup_parent=read("RETEST_CGROUP_PARENT", environ) or "",
            cgroup_memory_max=read("RETEST_CGROUP_MEMORY_MAX", environ),
            cgroup_pids_max=read("RETEST_CGROUP_PIDS_MAX", environ),
            cgroup_cpu_max=read("RETEST_CGROUP_CPU_MAX", environ),
            fail_on_leak=read("RETEST_FAIL_ON_LEAK", environ),
            shepherd_pool=read("RETEST_SHEPHERD_POOL", environ),
        )


_RUNNER_NAMES = ("SUBPROCESS_TREE_KILL_ENABLED", "RETEST_KILL_GRACE_S", "RETEST_CAPTURE_LIMIT_BYTES",
                 "RETEST_PROBE_ENABLED", "RETEST_PROBE_MAX_BYTES", "RETEST_CONTAINMENT",
                 "RETEST_CGROUP_PARENT", "RETEST_CGROUP_MEMORY_MAX", "RETEST_CGROUP_PIDS_MAX",
                 "RETEST_CGROUP_CPU_MAX", "RETEST_FAIL_ON_LEAK", "RETEST_SHEPHERD_POOL")
#: The last ``RunnerSettings`` read, with the values it was read from (a dict: one atomic
#: store, safe to share between threads).
_RUNNER_CACHE: dict[str, tuple[tuple[object, ...], "RunnerSettings"]] = {}
#: os.environ's own store (CPython on POSIX: bytes keys and values), read directly by
#: ``RunnerSettings.from_env`` to compare the variables at ~0.1 us each instead of ~2 us.
_ENVIRON_DATA: Optional[Mapping[bytes, bytes]] = (
    getattr(os.environ, "_data", None) if os.name == "posix" else None)
_RUNNER_NAMES_B = tuple(os.fsencode(name) for name in _RUNNER_NAMES)


# --------------------------------------------------------------------------- merge gate


@dataclass(frozen=True)
class GateSettings:
    """Settings of the merge gate and the coverage gate (``retest.merge_gate``, ``retest.coverage_gate``).

    ``retest_timeout_raw`` is kept as given: ``merge_gate._resolve_retest_timeout`` turns it into
    seconds, because the safe range also depends on the grace and on ``REAPER_MAX_RUNNING_S``
    (``RESOLVED_PER_GATE``).
    """

    classify_enabled: bool = True
    infra_retry_enabled: bool = True
    skip_when_current_enabled: bool = True
    metrics_enabled: bool = True
    tree_kill_enabled: bool = True
    #: Inject the pytest probe (``RETEST_PROBE_ENABLED``): verdicts from the suite's own events.
    probe_enabled: bool = True
    retest_command: str = DEFAULT_RETEST_COMMAND
    #: Run in the worktree before the suite (``MERGE_RETEST_SETUP_COMMAND``): e.g. build the
    #: branch's extension modules. ``None``: no set-up step.
    retest_setup_command: str | None = None
    #: ``True`` when MERGE_RETEST_COMMAND was not set (the default runs this interpreter).
    retest_command_is_default: bool = True
    retest_timeout_raw: str | None = None
    reaper_max_running_s: float = DEFAULT_REAPER_MAX_RUNNING_S
    grace_s: float = DEFAULT_KILL_GRACE_S
    infra_retry_max: int = DEFAULT_INFRA_RETRY_MAX
    infra_retry_backoff_s: float = DEFAULT_INFRA_RETRY_BACKOFF_S
    infra_retry_backoff_max_s: float = DEFAULT_INFRA_RETRY_BACKOFF_MAX_S
    other_action: str = "hold"
    #: Kept out of repr(): a command line may carry a webhook token.
    alert_command: str | None = field(default=None, repr=False)
    alert_timeout_s: float = DEFAULT_ALERT_TIMEOUT_S
    ledger_path: str = ""
    ledger_busy_timeout_s: float = DEFAULT_LEDGER_BUSY_TIMEOUT_S
    gate_lock_wait_s: float = DEFAULT_GATE_LOCK_WAIT_S
    git_timeout_s: float = DEFAULT_GIT_TIMEOUT_S
    recent_decisions: int = DEFAULT_RECENT_DECISIONS
    coverage_command: str = DEFAULT_COVERAGE_COMMAND
    coverage_command_is_default: bool = True
    coverage_min_percent: float = 0.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "GateSettings":
        env = os.environ if environ is None else environ
        runner = RunnerSettings.from_env(env)

        def is_set(name: str) -> bool:
            return bool(env.get(name, "").strip())

        values = {name: read(variable, env) for name, variable in _GATE_FIELDS.items()}
        return cls(
            tree_kill_enabled=runner.tree_kill_enabled,
            probe_enabled=runner.probe_enabled,
            grace_s=runner.grace_s,
            retest_command_is_default=not is_set("MERGE_RETEST_COMMAND"),
            coverage_command_is_default=not is_set("COVERAGE_GATE_COMMAND"),
            # Validated per gate call, with the grace and the reaper bound (see RESOLVED_PER_GATE).
            retest_timeout_raw=env.get("MERGE_RETEST_TIMEOUT_S") if is_set("MERGE_RETEST_TIMEOUT_S") else None,
            **values,
        )


#: ``GateSettings`` field -> the setting it is read from (the runner's come from RunnerSettings).
_GATE_FIELDS = {
    "classify_enabled": "MERGE_GATE_CLASSIFY_ENABLED",
    "infra_retry_enabled": "MERGE_GATE_INFRA_RETRY_ENABLED",
    "skip_when_current_enabled": "MERGE_RETEST_SKIP_WHEN_CURRENT_ENABLED",
    "metrics_enabled": "MERGE_GATE_METRICS_ENABLED",
    "retest_command": "MERGE_RETEST_COMMAND",
    "retest_setup_command": "MERGE_RETEST_SETUP_COMMAND",
    "reaper_max_running_s": "REAPER_MAX_RUNNING_S",
    "infra_retry_max": "MERGE_GATE_INFRA_RETRY_MAX",
    "infra_retry_backoff_s": "MERGE_GATE_INFRA_RETRY_BACKOFF_S",
    "infra_retry_backoff_max_s": "MERGE_GATE_INFRA_RETRY_BACKOFF_MAX_S",
    "other_action": "MERGE_GATE_OTHER_ACTION",
    "alert_command": "MERGE_GATE_ALERT_COMMAND",
    "alert_timeout_s": "MERGE_GATE_ALERT_TIMEOUT_S",
    "ledger_path": "RETEST_LEDGER_PATH",
    "ledger_busy_timeout_s": "RETEST_LEDGER_BUSY_TIMEOUT_S",
    "gate_lock_wait_s": "MERGE_GATE_LOCK_WAIT_S",
    "git_timeout_s": "MERGE_GATE_GIT_TIMEOUT_S",
    "recent_decisions": "MERGE_GATE_RECENT_DECISIONS",
    "coverage_command": "COVERAGE_GATE_COMMAND",
    "coverage_min_percent": "COVERAGE_GATE_MIN_PERCENT",
}


def log_level(environ: Mapping[str, str] | None = None) -> str:
    """``RETEST_LOG_LEVEL``: one of ``LOG_LEVELS`` (any case); else WARNING, one warning."""
    return str(read("RETEST_LOG_LEVEL", environ))


def command_argv(command: Union[str, Sequence[str], None], configured: str,
                 configured_is_default: bool) -> list[str]:
    """The argv of a suite command: never a shell; ``ValueError`` if it cannot be split
    (unbalanced quotes) or names no program.

    ``command`` (a string, split with ``shlex``, or an argv) wins over the ``configured``
    setting. The built-in default's ``python`` is this very interpreter, so the suite runs with
    the packages the gate runs with; a command someone configured is used as written.
    """
    if command is None:
        argv = shlex.split(configured)
        if configured_is_default and argv and argv[0] == "python":
            argv[0] = sys.executable
    elif isinstance(command, str):
        argv = shlex.split(command)
    else:
        argv = [os.fspath(part) for part in command]
    if not argv or not argv[0]:
        raise ValueError("no command to run")
    return argv


# --------------------------------------------------------------------------- fleet: ledger backends, kept worktrees (issue 12)


@dataclass(frozen=True)
class LedgerSettings:
    """Which ledger backend, and how it behaves across hosts and connection loss (``retest.ledger``).

    ``url`` empty: the SQLite file of ``GateSettings.ledger_path``. Kept out of repr(): a URL
    may carry a password.
    """

    url: str = field(default="", repr=False)
    connect_timeout_s: float = DEFAULT_LEDGER_CONNECT_TIMEOUT_S
    reconnect_s: float = DEFAULT_LEDGER_RECONNECT_S
    claim_lease_s: float = DEFAULT_LEDGER_CLAIM_LEASE_S
    #: Empty: derived from the machine id, boot id and pid namespace (``ledger.host_identity``).
    host_id: str = ""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "LedgerSettings":
        env = os.environ if environ is None else environ
        alert_timeout = float(read("MERGE_GATE_ALERT_TIMEOUT_S", env))
        lease = float(read("RETEST_LEDGER_CLAIM_LEASE_S", env))
        floor = alert_timeout + LEDGER_CLAIM_LEASE_MARGIN_S
        if lease < floor:
            # A lease shorter than the alert command may run would let another host take a
            # claim over while its claimant is still sending: a double alert.
            _warn_once("RETEST_LEDGER_CLAIM_LEASE_S", str(lease),
                       f"is shorter than MERGE_GATE_ALERT_TIMEOUT_S + {LEDGER_CLAIM_LEASE_MARGIN_S:g}; "
                       f"using {floor:g}")
            lease = floor
        return cls(
            url=str(read("RETEST_LEDGER_URL", env)).strip(),
            connect_timeout_s=read("RETEST_LEDGER_CONNECT_TIMEOUT_S", env),
            reconnect_s=read("RETEST_LEDGER_RECONNECT_S", env),
            claim_lease_s=lease,
            host_id=str(read("RETEST_HOST_ID", env)).strip()[:200],
        )


@dataclass(frozen=True)
class WorktreeSettings:
    """Where and how the gate keeps its per-repository worktree (``retest.gitops``)."""

    #: ``MERGE_GATE_KEEP_WORKTREE_ENABLED`` (kill-switch, default on; off: a fresh temporary
    #: worktree per attempt, the prior behaviour).
    keep_enabled: bool = True
    #: Parent folder of gate worktrees; empty: the system's temporary folder.
    root: str = ""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "WorktreeSettings":
        return cls(keep_enabled=read("MERGE_GATE_KEEP_WORKTREE_ENABLED", environ),
                   root=read("MERGE_GATE_WORKTREE_DIR", environ) or "")


# --------------------------------------------------------------------------- forensics (issue 11)



@dataclass(frozen=True)
class ForensicsSettings:
    """Thresholds of the refined timeout rules and the diagnostic stage (docs/verdicts.md)."""

    #: ``timeout.starved``: share of the run's wall time in which some task of the machine
    #: waited for a CPU (PSI ``cpu`` ``some``, the ``total`` delta) at or above this.
    starved_psi_share: float = DEFAULT_STARVED_PSI_SHARE
    #: ``timeout.starved``: CPU used by processes outside the tree / (wall x cores) at or above.
    starved_foreign_share: float = DEFAULT_STARVED_FOREIGN_SHARE
    #: Below this many cores of CPU (tree CPU / wall) the tree counts as idle: idle is
    #: ``timeout.hung`` material, never ``timeout.starved``.
    idle_cores: float = DEFAULT_IDLE_CORES
    #: ``timeout.hung``: a test had been running for at least this share of the budget.
    hung_running_share: float = DEFAULT_HUNG_RUNNING_SHARE
    #: Seconds the diagnostic stage may take at the deadline (stack dumps), taken out of the
    #: grace and never more than half of it; 0: no diagnostic stage.
    diagnose_s: float = DEFAULT_DIAGNOSE_S

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "ForensicsSettings":
        return cls(starved_psi_share=read("RETEST_STARVED_PSI_SHARE", environ),
                   starved_foreign_share=read("RETEST_STARVED_FOREIGN_SHARE", environ),
                   idle_cores=read("RETEST_IDLE_CORES", environ),
                   hung_running_share=read("RETEST_HUNG_RUNNING_SHARE", environ),
                   diagnose_s=read("RETEST_DIAGNOSE_S", environ))


# --------------------------------------------------------------------------- run timelines (issue 16)


@dataclass(frozen=True)
class TimelineSettings:
    """How much of each run's timeline the ledger keeps (``retest.timeline``)."""

    #: JSON bytes of one decision's timeline at most (``timeline.bounded``).
    max_bytes: int = DEFAULT_TIMELINE_MAX_BYTES
    #: Timelines kept, the newest; 0: none recorded.
    kept: int = DEFAULT_TIMELINES_KEPT

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "TimelineSettings":
        return cls(max_bytes=read("RETEST_TIMELINE_MAX_BYTES", environ),
                   kept=read("RETEST_TIMELINES_KEPT", environ))
