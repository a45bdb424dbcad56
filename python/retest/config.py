"""Settings read from the environment, validated in one place.

Every setting is an upper-case environment variable; ``.env.example`` lists them all
with their defaults. An invalid value never crashes the caller: it falls back to the
default and logs one warning naming the variable and the value it rejected.
Secrets are never logged: only the names of variables are.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shlex
import sys
import threading
from dataclasses import dataclass, field
from typing import Mapping, Sequence, Union

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
DEFAULT_CAPTURE_LIMIT_BYTES = 8 * 1024 * 1024
DEFAULT_INFRA_RETRY_MAX = 3
DEFAULT_PROBE_MAX_BYTES = 8 * 1024 * 1024

_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


def _warn_once(name: str, raw: str, why: str) -> None:
    """Log one warning per (variable, value): settings are re-read on every gate call."""
    with _warned_lock:
        if (name, raw) in _warned:
            return
        _warned.add((name, raw))
    log.warning("setting %s=%r ignored (%s); using the default", name, raw, why)


def env_bool(name: str, default: bool, environ: Mapping[str, str] | None = None) -> bool:
    """Read a boolean setting: 1/true/yes/on or 0/false/no/off, any case."""
    raw = (os.environ if environ is None else environ).get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    _warn_once(name, raw, "not a boolean")
    return default


def env_float(
    name: str,
    default: float,
    environ: Mapping[str, str] | None = None,
    *,
    positive: bool = True,
) -> float:
    """Read a finite number; non-numbers, NaN, infinities and (if ``positive``) values <= 0 fall back."""
    raw = (os.environ if environ is None else environ).get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        _warn_once(name, raw, "not a number")
        return default
    if not math.isfinite(value):
        _warn_once(name, raw, "not finite")
        return default
    if positive and value <= 0:
        _warn_once(name, raw, "not positive")
        return default
    return value


def env_int(name: str, default: int, environ: Mapping[str, str] | None = None, *, minimum: int = 0) -> int:
    """Read an integer >= ``minimum``."""
    raw = (os.environ if environ is None else environ).get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        _warn_once(name, raw, "not an integer")
        return default
    if value < minimum:
        _warn_once(name, raw, f"below {minimum}")
        return default
    return value


def env_str(name: str, default: str, environ: Mapping[str, str] | None = None) -> str:
    raw = (os.environ if environ is None else environ).get(name)
    if raw is None or raw.strip() == "":
        return default
    return raw


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

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "RunnerSettings":
        return cls(
            tree_kill_enabled=env_bool("SUBPROCESS_TREE_KILL_ENABLED", True, environ),
            grace_s=env_float("RETEST_KILL_GRACE_S", DEFAULT_KILL_GRACE_S, environ),
            capture_limit_bytes=env_int(
                "RETEST_CAPTURE_LIMIT_BYTES", DEFAULT_CAPTURE_LIMIT_BYTES, environ, minimum=1024
            ),
            probe_enabled=env_bool("RETEST_PROBE_ENABLED", True, environ),
            probe_max_bytes=env_int("RETEST_PROBE_MAX_BYTES", DEFAULT_PROBE_MAX_BYTES, environ,
                                    minimum=65536),
            containment=_env_choice("RETEST_CONTAINMENT", "auto", CONTAINMENTS, environ),
            cgroup_parent=_env_abspath("RETEST_CGROUP_PARENT", environ),
            cgroup_memory_max=_env_limit("RETEST_CGROUP_MEMORY_MAX", _MEMORY_MAX, environ),
            cgroup_pids_max=_env_limit("RETEST_CGROUP_PIDS_MAX", _PIDS_MAX, environ),
            cgroup_cpu_max=_env_limit("RETEST_CGROUP_CPU_MAX", _CPU_MAX, environ),
            fail_on_leak=env_bool("RETEST_FAIL_ON_LEAK", False, environ),
        )


CONTAINMENTS = ("auto", "cgroup", "subreaper")
#: Accepted values of the cgroup limits: the kernel's own syntax (memory.max takes K/M/G).
_MEMORY_MAX = re.compile(r"(max|[0-9]+[KMG]?)")
_PIDS_MAX = re.compile(r"(max|[0-9]+)")
_CPU_MAX = re.compile(r"(max|[0-9]+)( [0-9]+)?")


def _env_limit(name: str, pattern: "re.Pattern[str]", environ: Mapping[str, str] | None) -> str:
    """A cgroup limit in the kernel's syntax, or "" (none); anything else warns and is ignored."""
    raw = env_str(name, "", environ).strip()
    if raw and not pattern.fullmatch(raw):
        _warn_once(name, raw, "not in the cgroup file's syntax")
        return ""
    return raw


def _env_abspath(name: str, environ: Mapping[str, str] | None) -> str:
    """An absolute path, or "" (unset); a relative one warns and is ignored."""
    raw = env_str(name, "", environ).strip()
    if raw and not os.path.isabs(raw):
        _warn_once(name, raw, "not an absolute path")
        return ""
    return raw


# --------------------------------------------------------------------------- merge gate

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


def default_ledger_path(environ: Mapping[str, str] | None = None) -> str:
    """``$XDG_STATE_HOME/retest/ledger.sqlite3`` (``~/.local/state`` when unset or relative)."""
    env = os.environ if environ is None else environ
    state = env.get("XDG_STATE_HOME", "")
    if not state or not os.path.isabs(state):  # the XDG spec says: ignore a relative path
        home = env.get("HOME") or os.path.expanduser("~")
        state = os.path.join(home, ".local", "state")
    return os.path.join(state, "retest", "ledger.sqlite3")


def _env_choice(name: str, default: str, choices: tuple[str, ...], environ: Mapping[str, str] | None) -> str:
    raw = (os.environ if environ is None else environ).get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in choices:
        return value
    _warn_once(name, raw, f"not one of {', '.join(choices)}")
    return default


@dataclass(frozen=True)
class GateSettings:
    """Settings of the merge gate and the coverage gate (``retest.merge_gate``, ``retest.coverage_gate``).

    ``retest_timeout_raw`` is kept as given: ``merge_gate._resolve_retest_timeout`` turns it into
    seconds, because the safe range depends on the grace and on ``REAPER_MAX_RUNNING_S``.
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
        retest_command = env_str("MERGE_RETEST_COMMAND", "", env)
        coverage_command = env_str("COVERAGE_GATE_COMMAND", "", env)
        alert_command = env_str("MERGE_GATE_ALERT_COMMAND", "", env)
        raw_timeout = env.get("MERGE_RETEST_TIMEOUT_S")
        min_percent = env_float("COVERAGE_GATE_MIN_PERCENT", 0.0, env, positive=False)
        if not 0.0 <= min_percent <= 100.0:
            _warn_once("COVERAGE_GATE_MIN_PERCENT", str(min_percent), "not within 0..100")
            min_percent = 0.0
        return cls(
            classify_enabled=env_bool("MERGE_GATE_CLASSIFY_ENABLED", True, env),
            infra_retry_enabled=env_bool("MERGE_GATE_INFRA_RETRY_ENABLED", True, env),
            skip_when_current_enabled=env_bool("MERGE_RETEST_SKIP_WHEN_CURRENT_ENABLED", True, env),
            metrics_enabled=env_bool("MERGE_GATE_METRICS_ENABLED", True, env),
            tree_kill_enabled=runner.tree_kill_enabled,
            probe_enabled=runner.probe_enabled,
            retest_command=retest_command or DEFAULT_RETEST_COMMAND,
            retest_setup_command=env_str("MERGE_RETEST_SETUP_COMMAND", "", env) or None,
            retest_command_is_default=not retest_command,
            retest_timeout_raw=None if raw_timeout is None or raw_timeout.strip() == "" else raw_timeout,
            reaper_max_running_s=env_float("REAPER_MAX_RUNNING_S", DEFAULT_REAPER_MAX_RUNNING_S, env),
            grace_s=runner.grace_s,
            infra_retry_max=env_int("MERGE_GATE_INFRA_RETRY_MAX", DEFAULT_INFRA_RETRY_MAX, env),
            infra_retry_backoff_s=env_float(
                "MERGE_GATE_INFRA_RETRY_BACKOFF_S", DEFAULT_INFRA_RETRY_BACKOFF_S, env, positive=False
            ),
            infra_retry_backoff_max_s=env_float(
                "MERGE_GATE_INFRA_RETRY_BACKOFF_MAX_S", DEFAULT_INFRA_RETRY_BACKOFF_MAX_S, env,
                positive=False,
            ),
            other_action=_env_choice("MERGE_GATE_OTHER_ACTION", "hold", OTHER_ACTIONS, env),
            alert_command=alert_command or None,
            alert_timeout_s=env_float("MERGE_GATE_ALERT_TIMEOUT_S", DEFAULT_ALERT_TIMEOUT_S, env),
            ledger_path=env_str("RETEST_LEDGER_PATH", "", env) or default_ledger_path(env),
            ledger_busy_timeout_s=env_float(
                "RETEST_LEDGER_BUSY_TIMEOUT_S", DEFAULT_LEDGER_BUSY_TIMEOUT_S, env
            ),
            gate_lock_wait_s=env_float("MERGE_GATE_LOCK_WAIT_S", DEFAULT_GATE_LOCK_WAIT_S, env,
                                       positive=False),
            git_timeout_s=env_float("MERGE_GATE_GIT_TIMEOUT_S", DEFAULT_GIT_TIMEOUT_S, env),
            recent_decisions=env_int("MERGE_GATE_RECENT_DECISIONS", DEFAULT_RECENT_DECISIONS, env,
                                     minimum=1),
            coverage_command=coverage_command or DEFAULT_COVERAGE_COMMAND,
            coverage_command_is_default=not coverage_command,
            coverage_min_percent=min_percent,
        )


def command_argv(command: Union[str, Sequence[str], None], configured: str,
                 configured_is_default: bool) -> list[str]:
    """The argv of a suite command: never a shell.

    ``command`` (a string, split with ``shlex``, or an argv) wins over the ``configured``
    setting. The built-in default's ``python`` is this very interpreter, so the suite runs with
    the packages the gate runs with; a command someone configured is used as written.
    """
    if command is None:
        argv = shlex.split(configured)
        if configured_is_default and argv and argv[0] == "python":
            argv[0] = sys.executable
        return argv
    if isinstance(command, str):
        return shlex.split(command)
    return [os.fspath(part) for part in command]


# --------------------------------------------------------------------------- fleet: ledger backends, kept worktrees (issue 12)

DEFAULT_LEDGER_CONNECT_TIMEOUT_S = 5.0
DEFAULT_LEDGER_RECONNECT_S = 15.0
DEFAULT_LEDGER_CLAIM_LEASE_S = 90.0
#: A claim's lease must outlast the alert command it covers by at least this much.
LEDGER_CLAIM_LEASE_MARGIN_S = 5.0
LEDGER_URL_SCHEMES = ("postgresql://", "postgres://")


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
        url = env_str("RETEST_LEDGER_URL", "", env).strip()
        if url and not url.startswith(LEDGER_URL_SCHEMES):
            # Never echo the value: it may hold a password.
            _warn_once("RETEST_LEDGER_URL", "(not shown)",
                       "not a postgresql:// URL; using the SQLite ledger")
            url = ""
        alert_timeout = env_float("MERGE_GATE_ALERT_TIMEOUT_S", DEFAULT_ALERT_TIMEOUT_S, env)
        lease = env_float("RETEST_LEDGER_CLAIM_LEASE_S", DEFAULT_LEDGER_CLAIM_LEASE_S, env)
        floor = alert_timeout + LEDGER_CLAIM_LEASE_MARGIN_S
        if lease < floor:
            # A lease shorter than the alert command may run would let another host take a
            # claim over while its claimant is still sending: a double alert.
            _warn_once("RETEST_LEDGER_CLAIM_LEASE_S", str(lease),
                       f"shorter than MERGE_GATE_ALERT_TIMEOUT_S + {LEDGER_CLAIM_LEASE_MARGIN_S:g}; "
                       f"using {floor:g}")
            lease = floor
        return cls(
            url=url,
            connect_timeout_s=env_float("RETEST_LEDGER_CONNECT_TIMEOUT_S",
                                        DEFAULT_LEDGER_CONNECT_TIMEOUT_S, env),
            reconnect_s=env_float("RETEST_LEDGER_RECONNECT_S", DEFAULT_LEDGER_RECONNECT_S, env,
                                  positive=False),
            claim_lease_s=lease,
            host_id=env_str("RETEST_HOST_ID", "", env).strip()[:200],
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
        env = os.environ if environ is None else environ
        root = env_str("MERGE_GATE_WORKTREE_DIR", "", env).strip()
        if root and not os.path.isabs(root):
            _warn_once("MERGE_GATE_WORKTREE_DIR", root, "not an absolute path; using the temporary folder")
            root = ""
        return cls(keep_enabled=env_bool("MERGE_GATE_KEEP_WORKTREE_ENABLED", True, env), root=root)


# --------------------------------------------------------------------------- forensics (issue 11)
# One block, so that the settings layer's own work elsewhere merges without conflicts.

DEFAULT_STARVED_PSI_SHARE = 0.5
DEFAULT_STARVED_FOREIGN_SHARE = 0.5
DEFAULT_IDLE_CORES = 0.05
DEFAULT_HUNG_RUNNING_SHARE = 0.8
DEFAULT_DIAGNOSE_S = 2.0


def _env_share(name: str, default: float, environ: Mapping[str, str] | None) -> float:
    """A fraction in (0, 1]; anything else warns once and falls back."""
    value = env_float(name, default, environ)
    if value > 1.0:
        _warn_once(name, str(value), "above 1")
        return default
    return value


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
        raw = (os.environ if environ is None else environ).get("RETEST_DIAGNOSE_S", "")
        diagnose = 0.0 if raw.strip() in ("0", "0.0") else env_float("RETEST_DIAGNOSE_S",
                                                                    DEFAULT_DIAGNOSE_S, environ)
        return cls(
            starved_psi_share=_env_share("RETEST_STARVED_PSI_SHARE", DEFAULT_STARVED_PSI_SHARE,
                                         environ),
            starved_foreign_share=_env_share("RETEST_STARVED_FOREIGN_SHARE",
                                             DEFAULT_STARVED_FOREIGN_SHARE, environ),
            idle_cores=env_float("RETEST_IDLE_CORES", DEFAULT_IDLE_CORES, environ),
            hung_running_share=_env_share("RETEST_HUNG_RUNNING_SHARE", DEFAULT_HUNG_RUNNING_SHARE,
                                          environ),
            diagnose_s=diagnose,
        )
