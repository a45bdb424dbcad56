"""The merge gate: re-test a branch rebased onto its target, classify the run, route the task.

``retest_branch()`` is the one entry point. In order:

1. validate the names (no ``-`` prefix, no ref syntax), resolve the branch and target commits;
2. take the per-repository gate lock (a second gate waits briefly, then reports lock-busy);
3. rebase the branch onto the target in a temporary *detached* worktree (the user's checkout,
   index and refs are never written, nothing is pushed); a conflict rolls back;
4. skip the re-test only with proof (``MERGE_RETEST_SKIP_WHEN_CURRENT_ENABLED``): the rebase was
   a no-op and HEAD is the sha the caller says CI/tester/staging validated;
5. run the suite (``MERGE_RETEST_COMMAND``) through ``proc_group.run`` with the resolved deadline;
6. classify (``classify_retest_failure``) and route per DESIGN.md:

   =========  ======================================================================
   verdict    action
   =========  ======================================================================
   passed     merge (stage ``main``)
   timeout    requeue on ``deploy-staging`` with backoff, bounded by
   lock-busy  ``MERGE_GATE_INFRA_RETRY_MAX``; when spent: hold + exactly one alert
   red        rollback to ``development``
   conflict   rollback to ``development``
   other      hold + one alert (``MERGE_GATE_OTHER_ACTION=rollback``: the prior rollback)
   =========  ======================================================================

The worktree is removed and the lock released on every path, exceptions included. The gate
never raises for a runtime fault: an internal error becomes a ``hold`` with one alert and the
traceback in the log. Retry budgets, alerts and (with metrics on) decisions live in the
SQLite ledger (``retest.ledger``), so the bound and the one-alert rule hold across processes.

Secret values of the environment (``retest.redact``) are masked where untrusted text becomes
evidence: the suite's output before it is classified or cut to a tail, and every verdict's
reason and evidence as it is routed; so decisions, alerts, the ledger and the log never hold
them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shlex
import signal
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

from . import config, facts, gitops, layout, lockholder, probe, proc_group, redact, timeline
from .probe import StartupError
from .ledger import LedgerBackend, LedgerBusy, LedgerError, open_ledger

log = logging.getLogger(__name__)
# The gate's own records and those of the git it runs: redacted whoever configures logging.
redact.install(log)
redact.install(gitops.log)

__all__ = [
    "GateDecision",
    "GateMetrics",
    "METRICS",
    "MAIN_REGRESSION_MARKERS",
    "ACTIONS",
    "STAGES",
    "retest_branch",
    "classify_retest_failure",
    "queue_block",
    "check_regression_markers",
    "GateSignalled",
    "exit_cleanly_on_signals",
]

#: What the gate tells the orchestrator to do.
ACTIONS = ("merge", "rollback", "requeue", "hold", "skip-merge")
#: The task's life, in order; the gate moves a task only to ``development`` or ``main``.
STAGES = ("development", "CI", "tester", "deploy-staging", "main")
STAGE_DEVELOPMENT = "development"
STAGE_DEPLOY_STAGING = "deploy-staging"
STAGE_MAIN = "main"

#: Every verdict a decision can carry: the runner's five, plus the gate's own ``conflict``.
VERDICTS = ("passed", "red", "timeout", "lock-busy", "other", "conflict")
INFRA_VERDICTS = frozenset({"timeout", "lock-busy"})

#: (incident, symbol, file): symbols whose disappearance reintroduces an incident.
MAIN_REGRESSION_MARKERS: tuple[tuple[str, str, str], ...] = (
    ("ORCH-110", "classify_retest_failure", "python/retest/merge_gate.py"),
    ("ORCH-110", "_handle_merge_gate_infra_retry", "python/retest/merge_gate.py"),
    ("ORCH-110", "_resolve_retest_timeout", "python/retest/merge_gate.py"),
    ("ORCH-110", "retest_branch", "python/retest/merge_gate.py"),
)

AlertHook = Callable[[dict[str, Any]], None]

#: Bytes of the suite's output kept as evidence in a decision (its tail: the summary).
EVIDENCE_TAIL_CHARS = 2000


# --------------------------------------------------------------------------- the decision


@dataclass
class GateDecision:
    """What the gate decided for one (task, sha), and the evidence."""

    #: ``merge | rollback | requeue | hold | skip-merge``.
    action: str
    #: Where the task goes: ``main`` (merge), ``development`` (rollback), ``deploy-staging``.
    stage: str
    #: ``passed | red | timeout | lock-busy | other | conflict``.
    verdict: str
    #: Stable id of the rule that decided the verdict, e.g. ``red.tests-failed``.
    rule: str
    #: Human-readable evidence: pytest summary, lock message, conflicting paths, ...
    reason: str
    #: 1-based number of this gate run for (task, sha), counted in the ledger (0: ledger down).
    attempt: int = 0
    #: This decision sent the alert (exactly one decision per (task, sha, verdict) does).
    alert: bool = False
    #: The re-test was skipped (only with ``proof``).
    skipped: bool = False
    #: Why skipping was safe: ``branch_head``, ``onto_tip``, ``merge_base``, ``validated_sha``.
    proof: Optional[dict[str, str]] = None
    #: Wall-clock time (epoch seconds) before which a requeued task should not run again.
    next_attempt_at: Optional[float] = None
    #: The branch's own head commit (the key of retry budgets and alerts).
    sha: Optional[str] = None
    task_id: Optional[str] = None
    duration_s: float = 0.0
    #: Processes of the suite's tree killed at the deadline or swept after it exited.
    processes_killed: int = 0
    infra: bool = False
    #: 1-based number of this infra failure for (task, sha, verdict) (infra verdicts only).
    infra_attempt: Optional[int] = None
    branch: Optional[str] = None
    onto: Optional[str] = None
    onto_sha: Optional[str] = None
    #: HEAD of the rebased worktree: the commit the suite ran on.
    tested_sha: Optional[str] = None
    decided_at: float = field(default_factory=time.time)
    #: The run's figures (backend, exit status, timings) and the tail of its output.
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def merges(self) -> bool:
        return self.action in ("merge", "skip-merge")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["duration_s"] = round(self.duration_s, 3)
        return out


# --------------------------------------------------------------------------- counters


_COUNTER_NAMES = (
    "decisions", "retests_run", "retests_skipped", "requeues", "holds", "rollbacks", "merges",
    "alerts", "processes_killed",
) + tuple(f"verdict_{v.replace('-', '_')}" for v in VERDICTS)


def counter_increments(decision: GateDecision) -> dict[str, int]:
    """How one decision moves the counters (the same rule in-process and in the ledger)."""
    inc = dict.fromkeys(_COUNTER_NAMES, 0)
    inc["decisions"] = 1
    if decision.skipped:
        inc["retests_skipped"] = 1
    else:
        inc[f"verdict_{decision.verdict.replace('-', '_')}"] = 1
        if decision.evidence.get("suite_ran"):
            inc["retests_run"] = 1
    per_action = {"requeue": "requeues", "hold": "holds", "rollback": "rollbacks",
                  "merge": "merges", "skip-merge": "merges"}
    inc[per_action[decision.action]] = 1
    inc["alerts"] = int(decision.alert)
    inc["processes_killed"] = decision.processes_killed
    return inc


def _summary(decision: GateDecision) -> dict[str, Any]:
    """A decision as the ``recent`` list shows it (the evidence without the output tail)."""
    doc = decision.to_dict()
    doc["evidence"] = {k: v for k, v in decision.evidence.items() if k != "output_tail"}
    doc["reason"] = decision.reason[:1000]
    return doc


class GateMetrics:
    """Thread-safe in-process counters and a ring of the last decisions."""

    def __init__(self, recent: int = config.DEFAULT_RECENT_DECISIONS) -> None:
        self._lock = threading.Lock()
        self._counters = dict.fromkeys(_COUNTER_NAMES, 0)
        self._recent: deque[dict[str, Any]] = deque(maxlen=recent)

    def record(self, decision: GateDecision) -> None:
        inc = counter_increments(decision)
        doc = _summary(decision)
        with self._lock:
            for name, delta in inc.items():
                self._counters[name] += delta
            self._recent.appendleft(doc)

    def snapshot(self) -> tuple[dict[str, int], list[dict[str, Any]]]:
        with self._lock:
            return dict(self._counters), list(self._recent)

    def reset(self) -> None:
        with self._lock:
            self._counters = dict.fromkeys(_COUNTER_NAMES, 0)
            self._recent.clear()


#: The counters of this process (``queue_block()`` without a ledger shows these).
METRICS = GateMetrics()


def queue_block(
    *,
    ledger: Optional[LedgerBackend] = None,
    settings: Optional[config.GateSettings] = None,
    metrics: Optional[GateMetrics] = None,
    recent: Optional[int] = None,
) -> dict[str, Any]:
    """The read-only ``merge_gate`` block of ``GET /queue``.

    With ``ledger``: totals and recent decisions of every gate process that wrote to it
    (what ``retest serve`` shows); without: this process's counters. Holds no environment
    values: switches, numbers and decisions only.
    """
    settings = settings or config.GateSettings.from_env()
    if not settings.metrics_enabled:
        return {"enabled": False}
    limit = settings.recent_decisions if recent is None else recent
    counters = dict.fromkeys(_COUNTER_NAMES, 0)
    block: dict[str, Any] = {"enabled": True}
    if ledger is not None:
        block["source"] = "ledger"
        block["ledger_backend"] = ledger.backend
        try:
            counters.update({k: v for k, v in ledger.totals().items() if k in counters})
            recent_docs = ledger.recent_decisions(limit)
        except LedgerError as err:
            block["error"] = "ledger busy" if isinstance(err, LedgerBusy) else "ledger unavailable"
            recent_docs = []
    else:
        block["source"] = "process"
        own, recent_docs = (metrics or METRICS).snapshot()
        counters.update(own)
        recent_docs = recent_docs[:limit]
    block["counters"] = counters
    block["recent"] = recent_docs
    block["settings"] = {
        "classify_enabled": settings.classify_enabled,
        "infra_retry_enabled": settings.infra_retry_enabled,
        "skip_when_current_enabled": settings.skip_when_current_enabled,
        "metrics_enabled": settings.metrics_enabled,
        "tree_kill_enabled": settings.tree_kill_enabled,
        "infra_retry_max": settings.infra_retry_max,
        "other_action": settings.other_action,
        "retest_timeout_s": _resolve_retest_timeout(
            settings.retest_timeout_raw, settings.grace_s, settings.reaper_max_running_s, warn=False
        ),
    }
    block["generated_at"] = time.time()
    return block


# --------------------------------------------------------------------------- verdicts


def _verdict(result: proc_group.RunResult, classify_enabled: bool) -> proc_group.Verdict:
    """The runner's verdict; with classification off, every failure is red (the prior rule)."""
    return _maybe_red(proc_group.classify(result), classify_enabled)


def _maybe_red(verdict: proc_group.Verdict, classify_enabled: bool) -> proc_group.Verdict:
    """Apply ``MERGE_GATE_CLASSIFY_ENABLED=false``: every failure but a conflict is red."""
    if classify_enabled or verdict.kind in ("passed", "conflict"):
        return verdict
    return proc_group.Verdict(
        "red", "red.classify-disabled",
        f"MERGE_GATE_CLASSIFY_ENABLED=false: every failure is red "
        f"(runner: {verdict.kind}, {verdict.rule}: {verdict.reason})",
        False,
    )


def classify_retest_failure(
    result: proc_group.RunResult, *, environ: Optional[Mapping[str, str]] = None
) -> Optional[str]:
    """``None`` for a pass, else ``"timeout" | "red" | "lock-busy" | "other"`` (DESIGN.md).

    ORCH-110: a timeout or a held lock is infrastructure, not red code. With
    ``MERGE_GATE_CLASSIFY_ENABLED=false`` every failure is ``"red"``, as before.
    """
    enabled = config.env_bool("MERGE_GATE_CLASSIFY_ENABLED", True, environ)
    kind = _verdict(result, enabled).kind
    return None if kind == "passed" else kind


def _resolve_retest_timeout(
    value: object,
    grace: float = config.DEFAULT_KILL_GRACE_S,
    reaper_max: float = config.DEFAULT_REAPER_MAX_RUNNING_S,
    *,
    warn: bool = True,
) -> float:
    """The re-test deadline in seconds (D5).

    ``None``/empty: the default (900). A non-number, a non-positive or a non-finite value:
    the default, with one warning. Any positive value is kept while ``timeout + grace`` stays
    below ``reaper_max`` (the reaper must never kill a run the gate still waits for);
    otherwise it is clamped to ``reaper_max - grace - 1``, with one warning.
    """
    default = config.DEFAULT_RETEST_TIMEOUT_S
    problems: list[str] = []
    timeout = default
    if value is None or (isinstance(value, str) and not value.strip()):
        pass
    elif isinstance(value, bool):
        problems.append(f"MERGE_RETEST_TIMEOUT_S={value!r} is not a number; using {default:g}")
    else:
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError, OverflowError):
            problems.append(f"MERGE_RETEST_TIMEOUT_S={value!r} is not a number; using {default:g}")
        else:
            if not math.isfinite(number):
                problems.append(f"MERGE_RETEST_TIMEOUT_S={value!r} is not finite; using {default:g}")
            elif number <= 0:
                problems.append(f"MERGE_RETEST_TIMEOUT_S={value!r} is not positive; using {default:g}")
            else:
                timeout = number
    if timeout + grace >= reaper_max:
        clamped = max(reaper_max - grace - 1.0, 1.0)
        if clamped + grace < reaper_max:
            problems.append(
                f"timeout {timeout:g}s + grace {grace:g}s would reach "
                f"REAPER_MAX_RUNNING_S={reaper_max:g}; clamped to {clamped:g}s"
            )
        else:  # a misconfiguration no deadline can fix: say so rather than claim safety
            problems.append(
                f"REAPER_MAX_RUNNING_S={reaper_max:g} leaves no room for a deadline plus the "
                f"{grace:g}s grace (RETEST_KILL_GRACE_S); using {clamped:g}s, and the reaper may "
                f"kill the run first: raise REAPER_MAX_RUNNING_S or lower the grace"
            )
        timeout = clamped
    if problems and warn:
        log.warning("retest timeout: %s", "; ".join(problems))
    return timeout


def _backoff_s(settings: config.GateSettings, infra_attempt: int) -> float:
    """Exponential backoff: base, 2 x base, 4 x base, ... capped at the maximum."""
    exponent = min(max(infra_attempt - 1, 0), 30)
    return float(min(settings.infra_retry_backoff_s * float(2 ** exponent), settings.infra_retry_backoff_max_s))


# --------------------------------------------------------------------------- signals (issue 12)


class GateSignalled(BaseException):
    """SIGTERM/SIGINT/SIGHUP reached a gate run under ``exit_cleanly_on_signals``.

    A ``BaseException`` (as ``KeyboardInterrupt``): no ``except Exception`` turns it into a
    decision. The runner takes the suite's tree down as it propagates, the ``finally`` blocks
    remove the worktree (or leave the kept one consistent) and release the lock.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class _SignalState:
    """Main-thread only (signals are delivered there). ``deciding``: the gate is routing and
    recording (ledger writes, the alert and its confirmation); a signal then waits for the
    decision to be whole, so a stop never leaves a sent alert unconfirmed (a double alert)."""

    installed = False
    deciding = False
    pending: Optional[int] = None
    raised = False


_SIGNALS = _SignalState()
GATE_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _on_signal(signum: int, frame: object) -> None:
    if _SIGNALS.raised:
        return  # one is enough: the clean-up it started must not be cut short by a second
    if _SIGNALS.deciding:
        _SIGNALS.pending = _SIGNALS.pending or signum
        return
    _SIGNALS.raised = True
    raise GateSignalled(signum)


@contextmanager
def exit_cleanly_on_signals() -> Iterator[None]:
    """Within: SIGTERM, SIGINT and SIGHUP raise ``GateSignalled`` in the gate (main thread).

    ``retest gate`` wraps its run in this and exits ``128 + N``. Handlers are restored after.
    """
    previous = {sig: signal.signal(sig, _on_signal) for sig in GATE_SIGNALS}
    _SIGNALS.installed, _SIGNALS.deciding, _SIGNALS.pending, _SIGNALS.raised = True, False, None, False
    try:
        yield
    finally:
        _SIGNALS.installed = False
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _deciding() -> None:
    """From here on a signal waits until the decision is recorded (``_raise_pending_signal``)."""
    if _SIGNALS.installed and threading.current_thread() is threading.main_thread():
        _SIGNALS.deciding = True


def _raise_pending_signal() -> None:
    if not (_SIGNALS.installed and threading.current_thread() is threading.main_thread()):
        return
    _SIGNALS.deciding = False
    if _SIGNALS.pending is not None and not _SIGNALS.raised:
        signum, _SIGNALS.pending = _SIGNALS.pending, None
        _SIGNALS.raised = True
        raise GateSignalled(signum)


# --------------------------------------------------------------------------- one gate run


@dataclass
class _GateRun:
    """Everything one ``retest_branch`` call knows; filled in as it goes."""

    repo: str
    branch: str
    onto: str
    task: str
    settings: config.GateSettings
    ledger: LedgerBackend
    alert_hook: Optional[AlertHook]
    base_env: dict[str, str]
    metrics: GateMetrics
    started: float = field(default_factory=time.monotonic)
    sha: Optional[str] = None
    onto_sha: Optional[str] = None
    merge_base: Optional[str] = None
    tested_sha: Optional[str] = None
    attempt: int = 0
    evidence: dict[str, Any] = field(default_factory=dict)
    #: Secret values of the environment (``redact.secret_values``), masked in all evidence.
    secrets: frozenset[str] = frozenset()
    #: Stands in for the sha when none was resolved (bad repository, unknown branch):
    #: ``unknown:<digest of rule and reason>``, so different failures alert separately.
    failure_key: Optional[str] = None
    #: The suite's run as ``retest serve``'s decision page draws it (``retest.timeline``).
    timeline: Optional[dict[str, Any]] = None

    @property
    def key_sha(self) -> str:
        return self.sha or self.failure_key or "unknown"

    @property
    def key_task(self) -> str:
        """The task as the ledger keys it: secrets masked (the ledger is read by others)."""
        return redact.redact(self.task, self.secrets) if self.secrets else self.task

    def key_failure(self, verdict: proc_group.Verdict) -> None:
        """Key a failure that has no sha by what failed (issue 13: one per failure, not task)."""
        if self.sha is None and self.failure_key is None:
            digest = hashlib.sha256(f"{verdict.rule}\0{verdict.reason}".encode("utf-8", "replace"))
            self.failure_key = f"unknown:{digest.hexdigest()[:16]}"


def retest_branch(
    repo_path: Union[str, "os.PathLike[str]"],
    branch: str,
    *,
    onto: str = "main",
    task_id: Optional[str] = None,
    validated_sha: Optional[str] = None,
    command: Union[str, Sequence[str], None] = None,
    timeout: Union[float, str, None] = None,
    settings: Optional[config.GateSettings] = None,
    ledger: Optional[LedgerBackend] = None,
    alert_hook: Optional[AlertHook] = None,
    env: Optional[Mapping[str, str]] = None,
    metrics: Optional[GateMetrics] = None,
) -> GateDecision:
    """Re-test ``branch`` rebased onto ``onto`` in ``repo_path`` and decide; never raises.

    ``task_id`` keys retry budgets and alerts (default: the branch name). ``validated_sha``:
    the commit CI/tester/staging validated (enables skip-when-current). ``command``: the suite
    (a string is split with ``shlex``, never given to a shell; default ``MERGE_RETEST_COMMAND``).
    ``timeout``: seconds (default ``MERGE_RETEST_TIMEOUT_S``; both go through
    ``_resolve_retest_timeout``). ``env``: the environment of git and of the suite, and where
    settings are read from (default ``os.environ``). ``alert_hook(payload)`` is called once per
    alert. A ``KeyboardInterrupt`` cleans up (worktree, lock) and propagates.
    """
    base_env = dict(os.environ if env is None else env)
    secrets = redact.secret_values(base_env) | redact.secret_values()
    with redact.FILTER.covering(secrets):
        return _retest_branch(repo_path, branch, onto, task_id, validated_sha, command, timeout,
                              settings, ledger, alert_hook, base_env, secrets, metrics)


def _retest_branch(
    repo_path: Union[str, "os.PathLike[str]"],
    branch: str,
    onto: str,
    task_id: Optional[str],
    validated_sha: Optional[str],
    command: Union[str, Sequence[str], None],
    timeout: Union[float, str, None],
    settings: Optional[config.GateSettings],
    ledger: Optional[LedgerBackend],
    alert_hook: Optional[AlertHook],
    base_env: dict[str, str],
    secrets: frozenset[str],
    metrics: Optional[GateMetrics],
) -> GateDecision:
    run: Optional[_GateRun] = None
    try:
        settings = settings or config.GateSettings.from_env(base_env)
        # The one place the backend is chosen (RETEST_LEDGER_URL: PostgreSQL, else SQLite).
        ledger = ledger or open_ledger(base_env, path=settings.ledger_path)
        run = _GateRun(
            repo=os.path.abspath(os.fspath(repo_path)),
            branch=branch,
            onto=onto,
            task=str(task_id) if task_id is not None else str(branch),
            settings=settings,
            ledger=ledger,
            alert_hook=alert_hook,
            base_env=base_env,
            metrics=metrics or METRICS,
            secrets=secrets,
        )
        decision = _retest(run, validated_sha, command, timeout)
    except Exception as err:  # never-raise: an internal error holds the task, never rolls it back
        log.exception("merge gate: internal error on %r (task %r)", branch, task_id)
        _deciding()
        decision = _internal_error(run, branch, task_id, err, secrets)
    _record(run, decision)
    _raise_pending_signal()  # a stop that came while deciding: now, with the decision whole
    return decision


def _retest(
    run: _GateRun,
    validated_sha: Optional[str],
    command: Union[str, Sequence[str], None],
    timeout: Union[float, str, None],
) -> GateDecision:
    settings = run.settings
    try:
        gitops.validate_ref(run.branch, "branch")
        gitops.validate_ref(run.onto, "onto")
    except gitops.InvalidRef as err:
        verdict = proc_group.Verdict("other", "other.invalid-ref", str(err), False)
        return _route(run, verdict)
    timeout_s = _resolve_retest_timeout(
        timeout if timeout is not None else settings.retest_timeout_raw,
        settings.grace_s, settings.reaper_max_running_s,
    )
    try:  # before any git, lock or worktree: a command that cannot run holds at once
        argv = config.command_argv(command, settings.retest_command,
                                   settings.retest_command_is_default)
    except ValueError as err:
        what = "--command / command=" if command is not None else "MERGE_RETEST_COMMAND"
        verdict = proc_group.Verdict("other", "other.invalid-command",
                                     f"{what} is not a valid command: {err}", False)
        return _route(run, verdict)
    git_env = gitops.git_env(run.base_env)
    git_timeout = settings.git_timeout_s
    try:
        common = gitops.common_dir(run.repo, git_env, git_timeout)
        run.sha = gitops.rev_parse(run.repo, run.branch, git_env, git_timeout)
        run.onto_sha = gitops.rev_parse(run.repo, run.onto, git_env, git_timeout)
        run.merge_base = gitops.merge_base(run.repo, run.onto_sha, run.sha, git_env, git_timeout)
    except gitops.GitError as err:
        return _route(run, _git_verdict(err, settings))

    # Issue 12: the skip proof needs no worktree, so it is decided before any checkout (and
    # before the lock: a skip-merge writes nothing but the ledger).
    try:
        proof, doubt = _skip_proof(run, validated_sha, git_env)
    except gitops.GitError as err:
        return _route(run, _git_verdict(err, settings))
    if proof is not None:
        run.tested_sha = run.sha
        verdict = proc_group.Verdict(
            "passed", "passed.skip-when-current",
            f"re-test skipped: the rebase onto {run.onto} was a no-op and HEAD {run.sha} "
            f"is the validated sha",
            False,
        )
        return _route(run, verdict, proof=proof)
    run.evidence["skip"] = doubt

    lock = gitops.GateLock(common)
    try:
        acquired = lock.acquire(settings.gate_lock_wait_s)
    except OSError as err:  # a read-only .git, a full disk: not the branch's fault
        verdict = proc_group.Verdict(
            "other", "other.gate-lock-error",
            f"cannot take the repository lock {lock.path}: {err.strerror or err}", False)
        return _route(run, _maybe_red(verdict, settings.classify_enabled))
    if not acquired:
        holder = lockholder.describe(lock.path, flock=True)
        run.evidence["lock"] = holder.to_dict()
        verdict = proc_group.Verdict(
            "lock-busy", "lock-busy.gate-lock",
            f"{proc_group.LOCK_BUSY_MESSAGE}: another gate holds {lock.path} "
            f"(waited {settings.gate_lock_wait_s:g}s); {holder.text()}",
            True,
        )
        return _route(run, _maybe_red(verdict, settings.classify_enabled))
    worktree: Optional[gitops.Worktree] = None
    places = config.WorktreeSettings.from_env(run.base_env)
    try:
        gitops.remove_stale_worktrees(run.repo, git_env, git_timeout, places.root or None)
        worktree = gitops.gate_worktree(run.repo, common, git_env, git_timeout,
                                        keep=places.keep_enabled, root=places.root or None)
        run.evidence["worktree"] = worktree.path
        started = time.monotonic()
        added = worktree.add(run.sha)
        run.evidence["checkout"] = {"how": worktree.how, "kept": worktree.kept,
                                    "s": round(time.monotonic() - started, 3)}
        if not added.ok:
            what = "git worktree add" if worktree.how == "added" else "moving the kept worktree"
            return _route(run, _git_verdict(gitops.git_failure(what, added), settings))
        rebased = worktree.rebase(run.onto_sha)
        if rebased.status == "conflict":
            verdict = proc_group.Verdict(
                "conflict", "conflict.rebase",
                f"rebase of {run.branch} onto {run.onto} conflicts: {rebased.detail}", False,
            )
            return _route(run, verdict)
        if rebased.status != "ok" or rebased.head is None:
            failure = gitops.GitError(f"git rebase failed: {rebased.detail}", rebased.result)
            return _route(run, _git_verdict(failure, settings))
        run.tested_sha = rebased.head

        return _run_suite(run, argv, worktree.path, timeout_s)
    finally:
        try:
            if worktree is not None:
                worktree.remove()
        finally:
            lock.release()


def _run_setup(run: _GateRun, worktree: str, env: Mapping[str, str],
               timeout_s: float) -> Optional[proc_group.Verdict]:
    """``MERGE_RETEST_SETUP_COMMAND`` in the worktree (a build step); a verdict if it failed."""
    command = run.settings.retest_setup_command
    if not command:
        return None
    try:
        argv = shlex.split(command)
    except ValueError as err:
        return proc_group.Verdict("other", "other.setup-failed",
                                  f"MERGE_RETEST_SETUP_COMMAND cannot be split: {err}", False,
                                  evidence="runner")
    result = _redacted_result(proc_group.run(
        argv, timeout=timeout_s, grace=run.settings.grace_s, cwd=worktree, env=env, probe=False,
        backend=None if run.settings.tree_kill_enabled else "subprocess"), run.secrets)
    run.evidence["setup"] = {"returncode": result.returncode, "timed_out": result.timed_out,
                             "duration_s": round(result.duration_s, 3),
                             "spawn_error": result.spawn_error,
                             "output_tail": _tail(result.stdout + result.stderr,
                                                  EVIDENCE_TAIL_CHARS // 2)}
    if result.ok:
        return None
    status = (result.spawn_error or ("timed out" if result.timed_out
                                     else f"exit {result.returncode}"))
    # Neither proof of red code (a missing compiler is the machine's) nor a pass: hold.
    return proc_group.Verdict("other", "other.setup-failed",
                              f"the set-up step (MERGE_RETEST_SETUP_COMMAND) failed: {status}; "
                              f"the suite did not run", False, evidence="runner")


def _run_suite(run: _GateRun, argv: list[str], worktree: str, timeout_s: float) -> GateDecision:
    """Run the suite in the worktree with its import roots first, then prove which tree it tested."""
    settings = run.settings
    roots = layout.import_roots(worktree)
    packages = layout.top_level_packages(roots, worktree)
    env = _suite_env(run.base_env)
    env["PYTHONPATH"] = layout.pythonpath(roots, env.get("PYTHONPATH"))
    checkout = _checkout_top(run)
    if checkout and os.path.realpath(checkout) != os.path.realpath(worktree):
        # whatever the suite loads from the developer's checkout was not the branch's code
        env[probe.ENV_OUTSIDE] = os.pathsep.join([os.path.realpath(checkout),
                                                  os.path.realpath(worktree)])
    _provide_generated(run, worktree)
    failed_setup = _run_setup(run, worktree, env, timeout_s)
    if failed_setup is not None:
        return _route(run, failed_setup)
    # The gate's own grace: the one _resolve_retest_timeout kept the reaper bound with
    # (the runner's default would read the calling process's environment instead).
    result = _redacted_result(proc_group.run(
        argv, timeout=timeout_s, grace=settings.grace_s, cwd=worktree, env=env,
        backend=None if settings.tree_kill_enabled else "subprocess",
        probe=settings.probe_enabled, probe_packages=packages), run.secrets)
    run.evidence.update(_run_evidence(result, timeout_s))
    run.timeline = timeline.from_result(
        result, grace_s=settings.grace_s,
        max_bytes=config.TimelineSettings.from_env(run.base_env).max_bytes)
    report = result.probe
    proof = layout.prove(worktree, roots, packages, report.imports if report else None,
                         report.rootdir if report else None,
                         report.imported_outside if report else None)
    run.evidence["tree"] = proof.to_dict()
    verdict = _verdict(result, settings.classify_enabled)
    if proof.status == "wrong-tree":
        # Not a failure of the branch and not a pass: whatever the suite said was about another
        # tree. Held whatever MERGE_GATE_CLASSIFY_ENABLED says: it must never merge.
        verdict = proc_group.Verdict(
            "other", "other.wrong-tree",
            f"{proof.reason()} (the suite's own verdict: {verdict.kind}, {verdict.rule})",
            False, evidence="events")
    elif verdict.kind == "passed":
        verdict = _native_proof(run, worktree, report, verdict)
    elif verdict.kind == "red" and report is not None:
        verdict = _missing_generated(run, worktree, roots, report, verdict)
        if verdict.rule in ("red.collection-error", "red.tests-failed", "red.test-errors"):
            verdict = _missing_dependency(run, worktree, packages, report, verdict)
        if verdict.rule in ("red.collection-error", "red.tests-failed", "red.test-errors"):
            verdict = _deprecated_by_the_environment(run, worktree, report, verdict)
    elif verdict.rule == "other.environment":
        verdict = _startup_red(run, worktree, roots, packages, result, verdict)
    return _route(run, _against_history(run, argv, timeout_s, verdict), result=result)


def _provide_generated(run: _GateRun, worktree: str) -> None:
    """Copy into the worktree the files the project's build writes at install time (a VCS
    version file: setuptools-scm, hatch-vcs, pdm-backend; ``layout.generated_files``) that it
    lacks: they are git-ignored, so a fresh worktree never has them, and the package cannot
    be imported without them. The checkout's copy (an editable install wrote it) is the one
    the developer's own suite runs with; what was done is in ``evidence["generated"]``."""
    missing = [rel for rel in layout.generated_files(worktree)
               if not os.path.lexists(os.path.join(worktree, rel))]
    if not missing:
        return
    checkout = _checkout_top(run)
    done: list[dict[str, Any]] = []
    for rel in missing:
        source = os.path.join(checkout, rel) if checkout else None
        entry: dict[str, Any] = {"path": rel}
        try:
            if source is None or not os.path.isfile(source):
                entry["missing"] = "not in the checkout either (is the project installed?)"
            else:
                _copy_into(source, worktree, rel)
                entry["copied_from"] = source
        except OSError as err:
            entry["missing"] = f"cannot copy it: {err}"
        done.append(entry)
    run.evidence["generated"] = done
    log.info("merge gate: install-time files for the worktree: %s", done)


#: A generated file larger than this is not a version file: not copied.
GENERATED_MAX_BYTES = 1 << 20


def _copy_into(source: str, worktree: str, rel: str) -> None:
    """Copy ``source`` to ``worktree/rel`` as a new file. The path comes from the branch's own
    pyproject.toml: its directory must resolve inside the worktree (a branch may commit a
    symlink there), and the file is created, never followed or overwritten."""
    target = os.path.join(worktree, rel)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if not layout.inside(os.path.realpath(os.path.dirname(target)), worktree):
        raise OSError(f"{os.path.dirname(rel)} resolves outside the worktree")
    with open(source, "rb") as f:
        data = f.read(GENERATED_MAX_BYTES + 1)
    if len(data) > GENERATED_MAX_BYTES:
        raise OSError(f"larger than {GENERATED_MAX_BYTES} bytes")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _checkout_top(run: _GateRun) -> Optional[str]:
    """The top of the repository's own working tree (None: a bare repository)."""
    result = gitops.git(["rev-parse", "--show-toplevel"], cwd=run.repo,
                        env=gitops.git_env(run.base_env), timeout=run.settings.git_timeout_s)
    top = result.stdout.decode("utf-8", "surrogateescape").strip() if result.ok else ""
    return top or None


def _missing_generated(run: _GateRun, worktree: str, roots: Sequence[str],
                       report: proc_group.ProbeReport,
                       verdict: proc_group.Verdict) -> proc_group.Verdict:
    """Red because a module of the project's own is missing that git ignores (generated at
    install time, so the worktree never had it): the machine's set-up, not the branch's code.
    Held (``other.generated-missing``) rather than rolled back: every branch, the target's
    own head included, would fail the same way."""
    texts = [t for f in (*report.collection_errors, *report.failures) for t in (f.message, f.longrepr)]
    modules = layout.missing_modules(texts)
    hold = (_generated_hold(run, worktree, roots, modules, verdict)
            or _unbuilt_hold(run, worktree, roots, modules, verdict))
    return verdict if hold is None else hold


_NO_MODULE_NAMED = re.compile(r"No module named '([A-Za-z_][A-Za-z0-9_.]*)'")


def _missing_dependency(run: _GateRun, worktree: str, packages: Sequence[str],
                        report: proc_group.ProbeReport,
                        verdict: proc_group.Verdict) -> proc_group.Verdict:
    """Red only because the suite's venv lacks a third-party module: every collection error
    (or, without one, every failed and errored test, all of them listed) is ``No module
    named 'x'`` for an ``x`` that is not one of the project's packages and that the branch
    touched no file of (a ``tests/helpers.py`` it deleted stays red). Held
    (``other.environment``): a dependency missing from the venv is the machine's, and every
    branch would fail alike (found on markupsafe and pyyaml: a conftest below the top one,
    or a test module, importing an uninstalled module rolled back; a test that imports it
    in its body fails the same way)."""
    errors = _every_failure(report)
    if errors is None:
        return verdict
    what = "collection error" if report.collection_errors else "failed test"
    names: list[str] = []
    for e in errors:
        found = _NO_MODULE_NAMED.findall(f"{e.message or ''}\n{e.longrepr or ''}")
        if not found:
            return verdict
        names.extend(n.partition(".")[0] for n in found)
    tops = sorted(set(names))
    if not tops or any(top in packages for top in tops):
        return verdict
    changed = _changed_files(run, worktree)
    if changed is None:
        return verdict
    touched = {part.removesuffix(".py") for path in changed for part in path.split("/")}
    if touched & set(tops):
        return verdict  # the branch changed (or removed) a module of that name: its own
    return proc_group.Verdict(
        "other", "other.environment",
        f"the suite's venv lacks {', '.join(tops)}: {len(errors)} {what}"
        f"{'s' if len(errors) > 1 else ''} of No module named "
        f"({_names_of(errors)}), no package of the project and no file the branch touched; "
        f"install it in the suite's venv (the suite's own verdict: {verdict.kind}, "
        f"{verdict.rule})", False, evidence="events")


#: A warning the suite's ``filterwarnings = error`` raised: pytest's own deprecations and the
#: libraries' (``pytest.PytestRemovedIn10Warning: ...``, ``DeprecationWarning: ...``).
_DEPRECATION_RAISED = re.compile(
    r"^(?:E\s+)?(?:[A-Za-z_][\w.]*\.)?(\w*(?:Deprecation|RemovedIn\d+)\w*Warning|FutureWarning): ",
    re.MULTILINE)
#: ``path.py:12`` in a traceback: the files the failure went through.
_TRACEBACK_FILE = re.compile(r"([^\s\"':]+\.py)[\":, ]+(?:line )?\d+")


def _deprecated_by_the_environment(run: _GateRun, worktree: str, report: proc_group.ProbeReport,
                                   verdict: proc_group.Verdict) -> proc_group.Verdict:
    """Red only because the environment's pytest or a library is newer than the suite: every
    collection error (or, without one, every failed and errored test, all listed) is a
    deprecation warning that the suite's own ``filterwarnings = error`` raised, in code the
    branch did not touch (the test's file and every worktree file of its traceback). Held
    (``other.environment``): every branch, main included, fails alike (found on dateutil under
    pytest 9: a generator passed to ``parametrize``, ``PytestRemovedIn10Warning``). A branch
    that itself calls the deprecated API (a touched file in the traceback) stays red."""
    items = _every_failure(report)
    if items is None:
        return verdict
    warnings, files = set(), set()
    for item in items:
        text = f"{item.message or ''}\n{item.longrepr or ''}"
        found = _DEPRECATION_RAISED.findall(text)
        if not found or not (item.message and _DEPRECATION_RAISED.search(item.message)):
            return verdict
        warnings.update(found)
        files.add(item.nodeid.partition("::")[0])
        files.update(_worktree_files(worktree, _TRACEBACK_FILE.findall(item.longrepr or "")))
    changed = _changed_files(run, worktree)
    if changed is None or files & changed:
        return verdict  # the branch's own code meets the deprecation: its to fix
    return proc_group.Verdict(
        "other", "other.environment",
        f"the environment is newer than the suite: {len(items)} "
        f"{'collection error' if report.collection_errors else 'failed test'}"
        f"{'s' if len(items) > 1 else ''} ({_names_of(items)}) "
        f"{'are' if len(items) > 1 else 'is'} {', '.join(sorted(warnings))} raised as an error "
        f"by the suite's filterwarnings, in files the branch did not touch; every branch would "
        f"fail alike (the suite's own verdict: {verdict.kind}, {verdict.rule})", False,
        evidence="events")


def _every_failure(report: proc_group.ProbeReport) -> Optional[Sequence[probe.TestFailure]]:
    """What made the run red, every item of it: its collection errors, else its failed and
    errored tests; None when there is none, or some were not listed (past the cap)."""
    if report.collection_errors:
        return report.collection_errors
    if not report.failures or len(report.failures) != report.failure_count + report.error_count:
        return None
    return report.failures


def _changed_files(run: _GateRun, worktree: str) -> Optional[set[str]]:
    """The files the branch changes against its base, or None (logged) when git cannot say."""
    try:
        return set(gitops.changed_files(worktree, run.onto_sha or "HEAD", run.tested_sha or "HEAD",
                                        gitops.git_env(run.base_env), run.settings.git_timeout_s))
    except gitops.GitError as err:
        log.warning("merge gate: cannot list the branch's changed files: %s", err)
        return None


def _worktree_files(worktree: str, paths: Sequence[str]) -> set[str]:
    """The paths of a traceback that are files of the worktree, relative to it."""
    top = os.path.realpath(worktree) + os.sep
    out = set()
    for path in paths:
        full = os.path.realpath(path if os.path.isabs(path) else os.path.join(worktree, path))
        if full.startswith(top) and os.path.isfile(full):
            out.add(full[len(top):])
    return out


def _names_of(errors: Sequence[Any]) -> str:
    shown = [e.nodeid for e in errors[:3]]
    return ", ".join(shown) + (f" and {len(errors) - 3} more" if len(errors) > 3 else "")


def _unbuilt_hold(run: _GateRun, worktree: str, roots: Sequence[str], modules: Sequence[str],
                  verdict: proc_group.Verdict) -> Optional[proc_group.Verdict]:
    """``other.native-not-built`` if one of the missing ``modules`` is a compiled extension of
    the project's that the worktree never built (its source is there, or the checkout has it
    built): the machine's set-up, not the branch's code; every branch would fail alike."""
    checkout = _checkout_top(run) if modules else None
    for module in modules:
        why = layout.compiled_module(module, roots, checkout, worktree)
        if why is not None:
            return proc_group.Verdict(
                "other", "other.native-not-built",
                f"the suite could not import {module}, a compiled module of the project: {why} "
                f"in the gate's worktree (set MERGE_RETEST_SETUP_COMMAND to build it, e.g. "
                f"'python setup.py build_ext --inplace') (the suite's own verdict: "
                f"{verdict.kind}, {verdict.rule})", False, evidence="events")
    return None


def _generated_hold(run: _GateRun, worktree: str, roots: Sequence[str], modules: Sequence[str],
                    verdict: proc_group.Verdict) -> Optional[proc_group.Verdict]:
    """``other.generated-missing`` if one of the missing ``modules`` is a git-ignored module
    of the project's own; else None (also when git cannot say)."""
    if not modules:
        return None
    paths = {path: module for module in modules for path in layout.module_paths(module, roots)}
    try:
        ignored = gitops.ignored(worktree, sorted(paths), gitops.git_env(run.base_env),
                                 run.settings.git_timeout_s)
    except gitops.GitError as err:
        log.warning("merge gate: cannot ask git what it ignores: %s", err)
        return None
    hits = [p for p in ignored if p in paths]
    if not hits:
        return None
    module, rel = paths[hits[0]], os.path.relpath(hits[0], worktree)
    return proc_group.Verdict(
        "other", "other.generated-missing",
        f"the suite could not import {module}: {rel} is git-ignored (written at "
        f"install time, e.g. a VCS version file), so the gate's worktree does not have it; "
        f"set MERGE_RETEST_SETUP_COMMAND to make it (the suite's own verdict: {verdict.kind}, "
        f"{verdict.rule})", False, evidence="events")


def _startup_red(run: _GateRun, worktree: str, roots: Sequence[str], packages: Sequence[str],
                 result: proc_group.RunResult, verdict: proc_group.Verdict) -> proc_group.Verdict:
    """pytest failed before its session (``other.environment``): red when what it raised is
    proven to be the branch's own code: a syntax or name error in a file of the worktree, or
    an import of a module of the project's own that the branch does not have (or that lacks
    the name imported). A third-party module missing, a generated file missing, anything
    raised outside the worktree, or any other exception stays held."""
    error = facts.startup_error(result)
    if error is None:
        return verdict
    blame = _branch_blame(worktree, roots, packages, error)
    if blame is None:
        return verdict
    culprit, what = blame
    if error.category == "import":
        modules = layout.missing_modules([error.message])
        hold = (_generated_hold(run, worktree, roots, modules, verdict)
                or _unbuilt_hold(run, worktree, roots, modules, verdict))
        if hold is not None:
            return hold
    try:
        if gitops.ignored(worktree, [culprit], gitops.git_env(run.base_env),
                          run.settings.git_timeout_s):
            return verdict  # not the branch's file: git does not track it
    except gitops.GitError as err:
        log.warning("merge gate: cannot ask git what it ignores: %s", err)
        return verdict
    where = f"loading {os.path.relpath(error.conftest, worktree)}: " \
        if error.conftest and layout.inside(error.conftest, worktree) else (
            f"loading {error.plugin_text()}: " if error.plugin else "")
    return proc_group.Verdict(
        "red", "red.startup-error",
        f"pytest could not start (exit {result.returncode}): {where}{what}",
        False, evidence=error.source)


def _branch_blame(worktree: str, roots: Sequence[str], packages: Sequence[str],
                  error: StartupError) -> Optional[tuple[str, str]]:
    """``(the worktree's file at fault, what it did)`` when ``error`` is the branch's code."""
    def own(path: Optional[str]) -> Optional[str]:
        if not path or not os.path.isabs(path) or not layout.inside(path, worktree):
            return None
        rel = os.path.relpath(os.path.realpath(path), os.path.realpath(worktree))
        return None if "site-packages" in rel.split(os.sep) else rel

    shown = error.message.replace(os.path.realpath(worktree) + os.sep, "").replace(
        worktree.rstrip(os.sep) + os.sep, "")
    message = f": {shown}" if shown else ""
    at = f"{own(error.file)}:{error.line}" if error.line else str(own(error.file))
    if error.category in ("syntax", "name"):
        rel = own(error.file)
        return (rel, f"{error.type} in {at}{message}") if rel else None
    if error.category != "import":
        return None
    rel = own(error.module_file)
    if rel is not None:  # cannot import name 'x' from a module of the worktree
        return rel, f"{error.type} in {at}{message}" if own(error.file) else f"{error.type}{message}"
    module = error.module or ""
    parent = module.rpartition(".")[0]
    if module.partition(".")[0] not in packages or not parent:
        return None  # a third-party module, or the project's package itself (the gate's roots)
    if not layout.module_paths(module, roots):
        return None  # its package is not in the worktree either
    importer = own(error.file)
    if importer is None:
        return None
    return importer, f"{error.type} in {at}{message} (the branch has no module {module})"


#: Passing runs compared with the budget, and the share of it that earns a warning.
HISTORY_RUNS = 10
HISTORY_WARN_SHARE = 0.8


def _against_history(run: _GateRun, argv: Sequence[str], timeout_s: float,
                     verdict: proc_group.Verdict) -> proc_group.Verdict:
    """Issue 11, item 5: this run against the last passing runs of the same (repository,
    suite command) in the ledger; a timeout quotes it, and passing runs that approach the
    budget warn (log and ``evidence["history"]["warning"]``)."""
    import hashlib
    import statistics

    key = hashlib.sha256(f"{os.path.realpath(run.repo)}\0{shlex.join(argv)}".encode()).hexdigest()[:32]
    run.evidence["suite_key"] = key
    try:
        history = run.ledger.suite_history(key, HISTORY_RUNS * 3)
    except (LedgerError, AttributeError) as err:  # the history is evidence, never a failure
        log.info("merge gate: no duration history: %s", err)
        return verdict
    passing = [s for v, s in history if v == "passed"][:HISTORY_RUNS]
    if not passing:
        run.evidence["history"] = {"passing_runs": 0, "budget_s": timeout_s}
        return verdict
    median = statistics.median(passing)
    text = (f"passing runs took {median:.1f} s median over the last {len(passing)}; "
            f"budget {timeout_s:g} s")
    block: dict[str, Any] = {"passing_runs": len(passing), "median_s": round(median, 3),
                             "max_s": round(max(passing), 3), "budget_s": timeout_s, "text": text}
    if median >= HISTORY_WARN_SHARE * timeout_s:
        block["warning"] = (f"passing runs approach the budget: {median:.1f} s median is "
                            f"{median / timeout_s:.0%} of {timeout_s:g} s (MERGE_RETEST_TIMEOUT_S)")
        log.warning("merge gate: %s", block["warning"])
    run.evidence["history"] = block
    if verdict.kind != "timeout":
        return verdict
    return dataclasses.replace(verdict, reason=f"{verdict.reason}; {text}")


def _native_proof(run: _GateRun, worktree: str, report: Optional[proc_group.ProbeReport],
                  verdict: proc_group.Verdict) -> proc_group.Verdict:
    """A pass stands only if the branch's changed native sources were built and loaded."""
    if report is None or run.onto_sha is None or run.tested_sha is None:
        return verdict
    try:
        changed = gitops.changed_files(worktree, run.onto_sha, run.tested_sha,
                                       gitops.git_env(run.base_env), run.settings.git_timeout_s)
    except gitops.GitError as err:
        log.warning("merge gate: cannot list the branch's changed files: %s", err)
        return verdict
    native = layout.native_sources(changed)
    run.evidence["tree"]["native_changed"] = native[:50]
    run.evidence["tree"]["compiled"] = {k: list(v) for k, v in report.compiled.items()}
    why = layout.untested_native_code(worktree, native, report.compiled)
    if why is None:
        return verdict
    return proc_group.Verdict("other", "other.native-not-built",
                              f"{why} (the suite's own verdict: {verdict.kind}, {verdict.rule})",
                              False, evidence="events")


def _git_verdict(err: gitops.GitError, settings: config.GateSettings) -> proc_group.Verdict:
    """A failed git step: a deadline or a held lock is infra; anything else is ``other``."""
    if err.result is not None:
        verdict = proc_group.classify(err.result)
        if verdict.kind in INFRA_VERDICTS:
            verdict = dataclasses.replace(verdict, reason=f"{err} [{verdict.reason}]", infra=True)
            return _maybe_red(verdict, settings.classify_enabled)
    return _maybe_red(proc_group.Verdict("other", "other.git-error", str(err), False),
                      settings.classify_enabled)


def _skip_proof(run: _GateRun, validated_sha: Optional[str],
                git_env: Mapping[str, str]) -> tuple[Optional[dict[str, str]], str]:
    """``(proof, "")`` when skipping is proven safe, else ``(None, why not)``. Doubt runs the suite.

    Decided from the commits alone, before any checkout: ``git rebase <onto>`` leaves HEAD
    where it is exactly when ``onto`` is an ancestor of HEAD and the history between them is
    linear (git's own fast-forward rule; a merge commit would be linearized, changing HEAD).
    """
    if not run.settings.skip_when_current_enabled:
        return None, "MERGE_RETEST_SKIP_WHEN_CURRENT_ENABLED=false"
    if validated_sha is None:
        return None, "no validated sha given"
    validated = gitops.validate_sha(validated_sha)
    if validated is None:
        return None, f"validated sha {validated_sha!r} is not a full commit id"
    if run.merge_base is None or run.merge_base != run.onto_sha:
        return None, f"the branch does not contain {run.onto}'s tip: the rebase was not a no-op"
    if run.sha != validated:
        return None, f"HEAD {run.sha} is not the validated sha {validated}"
    assert run.sha is not None and run.onto_sha is not None
    if not gitops.linear_history(run.repo, run.onto_sha, run.sha, git_env, run.settings.git_timeout_s):
        return None, f"the branch has merge commits since {run.onto}: the rebase would change HEAD"
    return {
        "branch_head": run.sha,
        "onto_tip": run.onto_sha,
        "merge_base": run.merge_base,
        "validated_sha": validated,
        # What the rebase would leave: HEAD itself (no checkout was needed to know it).
        "rebased_head": run.sha,
    }, ""


def _suite_env(base: Mapping[str, str]) -> dict[str, str]:
    """The suite's environment: the caller's, minus variables that redirect git elsewhere."""
    return {k: v for k, v in base.items() if k not in gitops.REDIRECTING_ENV}


def _redacted_result(result: proc_group.RunResult, secrets: frozenset[str]) -> proc_group.RunResult:
    """The suite's run with secrets masked (output, argv, spawn error) as it returns."""
    return redact.redact_result(result, secrets)


def _tail(data: bytes, limit: int) -> str:
    text = data.decode("utf-8", "replace")
    return text[-limit:]


def _run_evidence(result: proc_group.RunResult, timeout_s: float) -> dict[str, Any]:
    return {
        "suite_ran": result.spawn_error is None,
        "backend": result.backend,
        "returncode": result.returncode,
        "timed_out": result.timed_out,
        "timeout_s": timeout_s,
        "run_duration_s": round(result.duration_s, 3),
        "killed_at_deadline": result.killed_at_deadline,
        "swept_after_exit": result.swept_after_exit,
        "escalated": result.escalated,
        "spawn_error": result.spawn_error,
        "tests": result.probe.evidence() if result.probe is not None else None,
        "oom": result.oom.to_dict() if result.oom is not None else None,
        # Issue 11: how loaded the machine was (PSI, the tree's CPU share, foreign hogs).
        # the timeline's samples go to the decision's timeline (run.timeline), not its evidence
        "pressure": _without_samples(result.pressure.to_dict()) if result.pressure is not None else None,
        "output_tail": _tail(result.stdout, EVIDENCE_TAIL_CHARS)
        + ("\n[stderr]\n" + _tail(result.stderr, EVIDENCE_TAIL_CHARS // 2) if result.stderr else ""),
    }


# --------------------------------------------------------------------------- routing


def _decision(run: _GateRun, verdict: proc_group.Verdict, action: str, stage: str,
              **extra: Any) -> GateDecision:
    return GateDecision(
        action=action, stage=stage, verdict=verdict.kind, rule=verdict.rule, reason=verdict.reason,
        attempt=run.attempt, sha=run.sha, task_id=run.task, branch=run.branch, onto=run.onto,
        onto_sha=run.onto_sha, tested_sha=run.tested_sha, infra=verdict.infra,
        duration_s=time.monotonic() - run.started,
        evidence=dict(run.evidence, verdict_evidence=verdict.evidence), **extra,
    )


def _scrub(run: _GateRun, verdict: proc_group.Verdict) -> proc_group.Verdict:
    """Mask secrets in the reason and the evidence's untrusted fields, before either is
    recorded or sent.

    The reason quotes untrusted text (branch names, git errors, conflict details, error
    messages; the suite's output was masked as it came back); the verdict's kind and rule
    and the evidence's keys are vocabulary and stay as they are.
    """
    if not run.secrets:
        return verdict
    run.evidence = redact.redact_fields(run.evidence, redact.EVIDENCE_UNTRUSTED, run.secrets)
    return dataclasses.replace(verdict, reason=redact.redact(verdict.reason, run.secrets))


def _count_run(run: _GateRun) -> None:
    try:
        run.attempt = run.ledger.next_run(run.key_task, run.key_sha)
    except LedgerError as err:
        log.warning("merge gate: cannot count the attempt in the ledger: %s", err)
        run.attempt = 0


def _route(
    run: _GateRun,
    verdict: proc_group.Verdict,
    *,
    result: Optional[proc_group.RunResult] = None,
    proof: Optional[dict[str, str]] = None,
) -> GateDecision:
    """Turn a verdict into a decision per the routing table (module docstring)."""
    _deciding()
    verdict = _scrub(run, verdict)
    run.key_failure(verdict)
    _count_run(run)
    killed = (result.killed_at_deadline + result.swept_after_exit) if result is not None else 0
    settings = run.settings
    kind = verdict.kind
    if kind == "passed":
        if proof is not None:
            return _decision(run, verdict, "skip-merge", STAGE_MAIN, skipped=True, proof=proof)
        return _decision(run, verdict, "merge", STAGE_MAIN, processes_killed=killed)
    if kind in INFRA_VERDICTS:
        if settings.infra_retry_enabled:
            return _handle_merge_gate_infra_retry(run, verdict, processes_killed=killed)
        verdict = proc_group.Verdict(
            kind, verdict.rule, f"{verdict.reason} (MERGE_GATE_INFRA_RETRY_ENABLED=false: rolled back)",
            verdict.infra,
        )
        return _decision(run, verdict, "rollback", STAGE_DEVELOPMENT, processes_killed=killed)
    if kind in ("red", "conflict"):
        return _decision(run, verdict, "rollback", STAGE_DEVELOPMENT, processes_killed=killed)
    # other: neither the code nor the infrastructure is proven at fault; never auto-retried.
    if settings.other_action == "rollback":
        return _decision(run, verdict, "rollback", STAGE_DEVELOPMENT, processes_killed=killed)
    decision = _decision(run, verdict, "hold", STAGE_DEPLOY_STAGING, processes_killed=killed)
    decision.alert = _alert_once(run, decision, "other")
    return decision


def _handle_merge_gate_infra_retry(
    run: _GateRun, verdict: proc_group.Verdict, *, processes_killed: int = 0
) -> GateDecision:
    """ORCH-110: an infra failure requeues on deploy-staging, bounded; when spent, hold + one alert.

    The budget (``MERGE_GATE_INFRA_RETRY_MAX`` requeues per (task, sha, verdict)) and the alert
    row live in the ledger, so the bound holds across processes and restarts. If the ledger
    itself is unusable the task is held (a requeue without a durable count could loop forever).
    """
    settings = run.settings
    try:
        recorded = run.ledger.record_infra_failure(
            run.key_task, run.key_sha, verdict.kind, settings.infra_retry_max, verdict.reason,
            confirm_delivery=True,
        )
    except LedgerError as err:
        log.error("merge gate: retry budget unavailable for task %r: %s", run.task, err)
        busy = isinstance(err, LedgerBusy)
        held = proc_group.Verdict(
            "lock-busy" if busy else "other",
            # lock-busy.sqlite as before; a PostgreSQL lock wait is lock-busy.ledger.
            ("lock-busy.sqlite" if run.ledger.backend == "sqlite" else "lock-busy.ledger")
            if busy else "other.ledger-error",
            f"{verdict.reason}; the retry budget could not be recorded: {err}",
            busy,
        )
        decision = _decision(run, held, "hold", STAGE_DEPLOY_STAGING, processes_killed=processes_killed)
        decision.alert = True
        _send_alert(run, decision, once=False)
        return decision
    budget = f"infra retry {recorded.attempt} of {settings.infra_retry_max}"
    if not recorded.exhausted:
        delay = _backoff_s(settings, recorded.attempt)
        requeued = dataclasses.replace(verdict, reason=f"{verdict.reason} ({budget}; next in {delay:g}s)")
        return _decision(run, requeued, "requeue", STAGE_DEPLOY_STAGING, infra_attempt=recorded.attempt,
                         next_attempt_at=time.time() + delay, processes_killed=processes_killed)
    spent = min(recorded.attempt - 1, settings.infra_retry_max)
    held = dataclasses.replace(  # the rule's evidence (runner, events, output) is kept
        verdict, reason=f"{verdict.reason} (infra retries spent: {spent} of {settings.infra_retry_max}; held)")
    decision = _decision(run, held, "hold", STAGE_DEPLOY_STAGING, infra_attempt=recorded.attempt,
                         processes_killed=processes_killed)
    if recorded.alert_claimed:
        decision.alert = True
        _send_alert(run, decision, once=True)
        _confirm_alert(run, verdict.kind)
    return decision


# --------------------------------------------------------------------------- alerts


def _alert_once(run: _GateRun, decision: GateDecision, key: str) -> bool:
    """Send the alert for (task, sha, key) unless some gate already did; return whether we did."""
    try:
        claimed = run.ledger.claim_alert(run.key_task, run.key_sha, key, decision.reason,
                                         confirm_delivery=True)
    except LedgerError as err:
        # Better an alert that may repeat than none: the task is held and a human must look.
        # Issue 12: the decision says so (other.ledger-error); the first rule stays in evidence.
        log.error("merge gate: ledger unavailable, alerting without de-duplication: %s", err)
        decision.evidence["rule_before_ledger_error"] = decision.rule
        decision.verdict, decision.rule = "other", "other.ledger-error"
        decision.reason = f"{decision.reason}; the ledger could not de-duplicate the alert: {err}"
        _send_alert(run, decision, once=False)
        return True
    if claimed:
        _send_alert(run, decision, once=True)
        _confirm_alert(run, key)
    return claimed


def _confirm_alert(run: _GateRun, key: str) -> None:
    """Tell the ledger the claimed alert is out (else a later gate re-sends it, see ledger)."""
    try:
        run.ledger.alert_delivered(run.key_task, run.key_sha, key)
    except LedgerError as err:
        log.warning("merge gate: alert sent but not confirmed in the ledger: %s", err)


def _alert_payload(decision: GateDecision, once: bool) -> dict[str, Any]:
    """The alert, its untrusted fields (branch, task, reason...) masked, its vocabulary not.

    ``once``: the ledger made this the one alert for its key (``"dedup": "ledger"``); else it
    could not (``"none"``: ledger unavailable, another gate may alert too). ``deduplicated``
    is ``false`` on every alert sent: a de-duplicated alert is one that is *not* sent (issue
    13: the first alert ever said ``true``).
    """
    return redact.redact_decision({
        "event": "retest.merge_gate.alert",
        "task_id": decision.task_id,
        "sha": decision.sha,
        "branch": decision.branch,
        "onto": decision.onto,
        "action": decision.action,
        "stage": decision.stage,
        "verdict": decision.verdict,
        "rule": decision.rule,
        "reason": decision.reason,
        "attempt": decision.attempt,
        "infra_attempt": decision.infra_attempt,
        "deduplicated": False,
        "dedup": "ledger" if once else "none",
        "at": decision.decided_at,
        "tests": _alert_tests(decision.evidence.get("tests")),
        "tree": (decision.evidence.get("tree") or {}).get("status"),
        # The kernel's OOM-kill evidence (victim, counter): the host ran out, not the branch.
        "oom": decision.evidence.get("oom"),
        # Issue 11: the machine's load during the run, the evidence of timeout.starved (its
        # samples are in the decision's timeline, for retest serve: an alert is read, not plotted).
        "pressure": decision.evidence.get("pressure"),
    }, redact.FILTER.secrets())


def _without_samples(pressure: Any) -> Any:
    if not isinstance(pressure, dict):
        return pressure
    return {k: v for k, v in pressure.items() if k != "samples"}


def _alert_tests(tests: Any) -> Optional[dict[str, Any]]:
    """What a person acts on: the counts, every failing id (bounded), the tests at a deadline.

    Built from the probe's evidence, which was masked at its source with the suite's output.
    """
    if not isinstance(tests, dict):
        return None
    return {
        "counts": tests.get("counts"),
        "collected": tests.get("collected"),
        "done": tests.get("done"),
        "failure_count": tests.get("failure_count"),
        "error_count": tests.get("error_count"),
        "failed": [{"nodeid": f.get("nodeid"), "when": f.get("when"), "message": f.get("message")}
                   for f in tests.get("failures") or []],
        "collection_errors": [{"nodeid": e.get("nodeid"), "message": e.get("message")}
                              for e in tests.get("collection_errors") or []],
        "running": tests.get("running") or [],
    }


def _send_alert(run: Optional[_GateRun], decision: GateDecision, *, once: bool) -> None:
    """Log the alert at ERROR, call the hook, run ``MERGE_GATE_ALERT_COMMAND``; never raises."""
    payload = _alert_payload(decision, once)
    # Clean: the payload's untrusted fields are masked; its rule and action must stay whole.
    log.error("merge gate ALERT: %s", redact.Clean(json.dumps(payload, sort_keys=True)))
    if run is None:
        return
    if run.alert_hook is not None:
        try:
            run.alert_hook(payload)
        except Exception:
            log.exception("merge gate: the alert hook raised")
    if run.settings.alert_command:
        try:
            argv = shlex.split(run.settings.alert_command)
            result = proc_group.run(argv, input=json.dumps(payload).encode(), env=run.base_env,
                                    timeout=run.settings.alert_timeout_s, grace=1.0,
                                    backend=gitops.backend_for(run.base_env))
        except (ValueError, TypeError) as err:
            # The command itself is not logged: it may carry a webhook token.
            log.error("merge gate: MERGE_GATE_ALERT_COMMAND is not a valid command (%s)",
                      type(err).__name__)
            return
        if not result.ok:
            log.error("merge gate: the alert command failed (%s)",
                      result.spawn_error or ("timed out" if result.timed_out else
                                             f"exit {result.returncode}"))


def _internal_error(run: Optional[_GateRun], branch: object, task_id: object, err: Exception,
                    secrets: frozenset[str] = frozenset()) -> GateDecision:
    verdict = proc_group.Verdict(
        "other", "other.gate-internal-error",
        redact.redact(f"internal error in the merge gate: {type(err).__name__}: {err}", secrets),
        False,
    )
    if run is None:
        decision = GateDecision(action="hold", stage=STAGE_DEPLOY_STAGING, verdict=verdict.kind,
                                rule=verdict.rule, reason=verdict.reason, alert=True,
                                task_id=None if task_id is None else str(task_id),
                                branch=str(branch))
        _send_alert(None, decision, once=False)
        return decision
    try:
        verdict = _scrub(run, verdict)
        run.key_failure(verdict)
        decision = _decision(run, verdict, "hold", STAGE_DEPLOY_STAGING)
        decision.alert = _alert_once(run, decision, "internal-error")
    except Exception:
        log.exception("merge gate: could not even build the internal-error decision")
        decision = GateDecision(action="hold", stage=STAGE_DEPLOY_STAGING, verdict=verdict.kind,
                                rule=verdict.rule, reason=verdict.reason, alert=True,
                                task_id=run.task, branch=run.branch, sha=run.sha)
        _send_alert(None, decision, once=False)
    return decision


def _record(run: Optional[_GateRun], decision: GateDecision) -> None:
    """Counters (process and ledger) and one INFO log line; never raises."""
    try:
        log.info("merge gate: %s %s -> %s (%s: %s) [attempt %d, %.2fs]", decision.task_id,
                 decision.sha, redact.Clean(decision.action), redact.Clean(decision.verdict),
                 redact.Clean(decision.rule), decision.attempt, decision.duration_s)
        if run is None or not run.settings.metrics_enabled:
            return
        run.metrics.record(decision)
        try:
            run.ledger.record_decision(
                _summary(decision), counter_increments(decision), timeline=run.timeline,
                timelines_kept=config.TimelineSettings.from_env(run.base_env).kept)
        except LedgerError as err:
            log.warning("merge gate: decision not recorded in the ledger: %s", err)
    except Exception:
        log.exception("merge gate: recording the decision failed")


# --------------------------------------------------------------------------- regression markers


def check_regression_markers(
    root: Union[str, "os.PathLike[str]"],
    markers: Sequence[tuple[str, str, str]] = MAIN_REGRESSION_MARKERS,
) -> list[str]:
    """Problems with ``markers``: each symbol must still be defined in its file under ``root``."""
    problems: list[str] = []
    for incident, symbol, relpath in markers:
        path = Path(root) / relpath
        try:
            source = path.read_text(encoding="utf-8")
        except OSError as err:
            problems.append(f"{incident}: {relpath} cannot be read ({err.strerror})")
            continue
        pattern = rf"^\s*(?:async\s+def|def|class)\s+{re.escape(symbol)}\b|^{re.escape(symbol)}\s*(?::[^=\n]*)?="
        if not re.search(pattern, source, re.MULTILINE):
            problems.append(f"{incident}: {symbol} is no longer defined in {relpath}")
    return problems
