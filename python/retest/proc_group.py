"""Run a command as a contained process tree and classify how it ended.

``run()`` is the one entry point. It picks a backend in one place (``_select_backend``):

* ``native``: the C extension ``retest._proc_group`` and its shepherd process. The command
  runs in a new session under a shepherd that is a child subreaper, so every process the
  command starts (daemons and ``setsid`` escapees included) stays findable and is killed
  at the deadline (SIGTERM + SIGCONT, ``grace``, SIGKILL) and after the command exits.
  Containment is chosen in one place too (``_select_containment``, ``RETEST_CONTAINMENT``):
  ``cgroup`` where a cgroup v2 child can be made (each run in its own cgroup, killed with
  ``cgroup.kill``), else ``subreaper``; ``RunResult.containment`` says which ran.
* ``subprocess``: the prior ``subprocess.run(timeout=...)`` path. Selected by
  ``SUBPROCESS_TREE_KILL_ENABLED=false``, on a platform other than Linux, or when the
  extension cannot be loaded (logged once, at ERROR). It kills only the direct child.

Both backends return the same ``RunResult`` and never raise for a runtime fault (missing
executable, bad cwd, EMFILE, ...): the fault is in ``spawn_error``. Programming errors
(wrong types, a NUL byte in an argument, a NaN timeout) raise ``TypeError``/``ValueError``.
A ``KeyboardInterrupt`` in the caller kills the tree first, then propagates.
"""

from __future__ import annotations

import atexit
import dataclasses
import errno as _errno
import importlib
import importlib.util
import logging
import math
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO, Any, Callable, Iterable, Literal, Mapping, NamedTuple, Optional, Sequence, Union

from . import _frozen, cgroup as _cgroup, config, diagnose as _diagnose, facts, oom as _oom, pressure as _pressure, probe as _probe
from .oom import OomEvidence
from .diagnose import StackDump
from .pressure import Pressure
from .probe import EventCallback, ProbeReport

log = logging.getLogger(__name__)

__all__ = [
    "RunResult",
    "Verdict",
    "run",
    "classify",
    "backend_status",
    "OutputCallback",
    "EventCallback",
    "ProbeReport",
    "VerdictKind",
    "Evidence",
    "LOCK_BUSY_MESSAGE",
    "OomEvidence",
    "Leak",
    "containment_status",
    "Pressure",
]

#: The five verdicts of DESIGN.md.
VerdictKind = Literal["passed", "red", "timeout", "lock-busy", "other"]
#: What a verdict rests on: the runner's own facts, the suite's events, or its output text.
Evidence = Literal["runner", "events", "output"]

#: ``on_output(stream, chunk)``: ``stream`` is ``"stdout"`` or ``"stderr"``.
OutputCallback = Callable[[str, bytes], None]

#: What the merge gate prints when its own per-repository lock is held (a lock-busy verdict).
LOCK_BUSY_MESSAGE = "retest: repository lock busy"

#: Inserted between the head and the tail of a stream that outgrew ``capture_limit``.
OMITTED_MARKER = b"\n[retest: %d bytes omitted]\n"

StrPath = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]

#: A process left after the command exited: ``(pid, command line head, age in seconds)``;
#: the head is at most 200 bytes of ``/proc/PID/cmdline`` with NULs as spaces ("" and
#: ``None`` when ``/proc`` could not tell).
Leak = tuple[int, str, Optional[float]]


@dataclass(frozen=True)
class RunResult:
    """What happened to one command and its whole process tree."""

    args: tuple[str, ...]
    #: Exit status of the command; ``-N`` when killed by signal N; ``None`` if it never started.
    returncode: Optional[int]
    stdout: bytes
    stderr: bytes
    #: The runner's own deadline fired (not a per-test timeout inside the command).
    timed_out: bool
    duration_s: float
    #: Why the command could not be started (``None`` if it started).
    spawn_error: Optional[str]
    #: ``"native"`` or ``"subprocess"``.
    backend: str
    spawn_errno: Optional[int] = None
    pid: Optional[int] = None
    #: SIGKILL was needed because something outlived SIGTERM + grace.
    escalated: bool = False
    #: Processes of the tree signalled when the deadline fired.
    killed_at_deadline: int = 0
    #: Processes still alive after the command exited, killed by the sweep.
    swept_after_exit: int = 0
    #: Processes still alive when the shepherd gave up waiting after SIGKILL (uninterruptible
    #: sleep, e.g. a dead NFS mount); 0 in every normal run.
    unkillable: int = 0
    #: /proc showed another pid namespace (``unshare --pid`` without a new /proc): the tree
    #: could not be walked, so only the command's process group was signalled (native).
    proc_foreign: bool = False
    #: Bytes left out of the middle of each stream (bounded capture).
    stdout_dropped: int = 0
    stderr_dropped: int = 0
    #: CPU time and peak RSS of the whole tree (native backend; the direct child otherwise).
    user_cpu_s: float = 0.0
    sys_cpu_s: float = 0.0
    max_rss_kb: int = 0
    #: What the suite reported through the pytest probe (``None``: no probe in this run).
    probe: Optional[ProbeReport] = None
    #: The kernel's OOM killer ended the command or a process of its tree (``retest.oom``);
    #: ``None``: no OOM kill was attributed to this run.
    oom: Optional[OomEvidence] = None
    #: How the tree was contained: ``"cgroup"`` (a cgroup of its own), ``"subreaper"`` (the
    #: shepherd's descendants) or ``"none"`` (the subprocess backend, or it never started).
    containment: str = "none"
    #: The run's cgroup (cgroup mode); removed before ``run()`` returned.
    cgroup: Optional[str] = None
    #: Processes left after the command exited (killed by the sweep), at most 50 of them.
    leaks: tuple[Leak, ...] = ()
    #: How many there were in all.
    leak_count: int = 0
    #: Peaks of the cgroup (cgroup mode, where the memory / pids controller is enabled).
    memory_peak_bytes: Optional[int] = None
    pids_peak: Optional[int] = None
    #: The deadline the run was given, in seconds (``None``: none).
    timeout_s: Optional[float] = None
    #: How loaded the machine was during the run (``retest.pressure``): PSI, the tree's CPU
    #: share, the foreign CPU hogs. ``None`` only when the run never started.
    pressure: Optional[Pressure] = None
    #: Python stacks of the probe processes at the deadline (the diagnostic stage,
    #: ``retest.diagnose``), each attributed to its pid, xdist worker and running test.
    diagnostics: tuple[StackDump, ...] = ()

    @property
    def signal(self) -> Optional[int]:
        """The signal that ended the command, if one did."""
        if self.returncode is not None and self.returncode < 0:
            return -self.returncode
        return None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def to_dict(self, *, with_output: bool = False) -> dict[str, Any]:
        """A JSON-ready summary; output is left out unless asked for (it can be large)."""
        out: dict[str, Any] = {
            "args": list(self.args),
            "returncode": self.returncode,
            "signal": self.signal,
            "timed_out": self.timed_out,
            "duration_s": round(self.duration_s, 6),
            "spawn_error": self.spawn_error,
            "backend": self.backend,
            "pid": self.pid,
            "escalated": self.escalated,
            "killed_at_deadline": self.killed_at_deadline,
            "swept_after_exit": self.swept_after_exit,
            "unkillable": self.unkillable,
            "proc_foreign": self.proc_foreign,
            "stdout_bytes": len(self.stdout),
            "stderr_bytes": len(self.stderr),
            "stdout_dropped": self.stdout_dropped,
            "stderr_dropped": self.stderr_dropped,
            "user_cpu_s": round(self.user_cpu_s, 6),
            "sys_cpu_s": round(self.sys_cpu_s, 6),
            "max_rss_kb": self.max_rss_kb,
            "tests": self.probe.to_dict() if self.probe is not None else None,
            "oom": self.oom.to_dict() if self.oom is not None else None,
            "containment": self.containment,
            "cgroup": self.cgroup,
            "leak_count": self.leak_count,
            "leaks": [{"pid": pid, "cmdline": cmdline, "age_s": age} for pid, cmdline, age in self.leaks],
            "memory_peak_bytes": self.memory_peak_bytes,
            "pids_peak": self.pids_peak,
            "timeout_s": self.timeout_s,
            "pressure": self.pressure.to_dict() if self.pressure is not None else None,
            "diagnostics": [d.to_dict() for d in self.diagnostics],
        }
        if with_output:
            out["stdout"] = self.stdout.decode("utf-8", "replace")
            out["stderr"] = self.stderr.decode("utf-8", "replace")
        return out


#: ``RunResult(**values)`` without its per-field ``object.__setattr__`` (``retest._frozen``):
#: the native runner's ~30 fields, every run.
_new_result = _frozen.maker(RunResult)


@dataclass(frozen=True)
class Verdict:
    """How a run ended, with the rule that decided it and the evidence."""

    #: ``"passed" | "red" | "timeout" | "lock-busy" | "other"``.
    kind: str
    #: Stable id of the rule that fired, e.g. ``"red.tests-failed"``.
    rule: str
    #: Human-readable evidence: exit code, signal, pytest summary line, lock message.
    reason: str
    #: True when the cause is infrastructure (timeout, lock-busy), not the code under test.
    infra: bool
    #: What the verdict rests on: ``"runner"`` (deadline, spawn failure), ``"events"`` (the
    #: suite's own report through the probe) or ``"output"`` (the output text).
    evidence: str = "output"


# --------------------------------------------------------------------------- backend choice

_native: Any = None
_native_error: Optional[str] = None
_shepherd_path: Optional[str] = None
#: ``os.fsencode(_shepherd_path)``, as the C side takes it.
_shepherd_bytes = b""
_logged_fallback: set[str] = set()
_log_lock = threading.Lock()


def _load_native() -> None:
    """Import the extension and find its shepherd; remember why not, once."""
    global _native, _native_error, _shepherd_path, _shepherd_bytes
    if not sys.platform.startswith("linux"):
        _native_error = f"platform {sys.platform!r} is not supported by the native runner"
        return
    # Not installed at all (RETEST_PURE_PYTHON=1, or a build without a compiler) is told apart
    # from a broken build: a bare "from . import" of a missing submodule during the package's
    # own import reads "most likely due to a circular import" (issue 14), which misleads.
    if importlib.util.find_spec(f"{__package__}._proc_group") is None:
        _native_error = ("retest was installed without its native runner (retest._proc_group is "
                         "not installed: RETEST_PURE_PYTHON=1, or no C compiler at install time)")
        return
    try:
        _proc_group = importlib.import_module(f"{__package__}._proc_group")
    except ImportError as err:  # present but broken: wrong ABI, missing symbol
        _native_error = f"cannot import retest._proc_group: {err}"
        return
    shepherd = os.path.join(os.path.dirname(os.path.abspath(_proc_group.__file__ or "")),
                            "_retest_shepherd")
    if not os.access(shepherd, os.X_OK):
        _native_error = f"shepherd executable missing or not executable: {shepherd}"
        return
    _native = _proc_group
    _shepherd_path, _shepherd_bytes = shepherd, os.fsencode(shepherd)
    _pressure.running_shepherd = _proc_group.running_shepherd


_load_native()


def idle_shepherds() -> tuple[int, ...]:
    """The pids of the idle shepherds kept for later runs (children of this process, each
    waiting on its socket for the next run; ``RETEST_SHEPHERD_POOL``). Empty without the
    native backend."""
    return () if _native is None else _native.idle_shepherds()


def close_shepherds() -> int:
    """Let every idle shepherd go: each exits and is reaped before this returns. Return how
    many. The next run starts a new one. Called at interpreter exit; call it yourself before
    counting your own child processes, or to release them early."""
    return 0 if _native is None else _native.close_shepherds()


atexit.register(close_shepherds)


def _log_fallback_once(reason: str, level: int) -> None:
    with _log_lock:
        if reason in _logged_fallback:
            return
        _logged_fallback.add(reason)
    log.log(level, "retest: using the subprocess backend (no tree kill): %s", reason)


def backend_status(environ: Optional[Mapping[str, str]] = None) -> tuple[str, str]:
    """Return ``(backend, why)``: the backend ``run()`` would use now, and the reason."""
    return _backend_of(config.RunnerSettings.from_env(environ))


def _backend_of(settings: config.RunnerSettings) -> tuple[str, str]:
    """``backend_status`` of ``settings`` (``run()`` has them already: no variable read again)."""
    if not settings.tree_kill_enabled:
        return "subprocess", "SUBPROCESS_TREE_KILL_ENABLED=false"
    if _native is None:
        return "subprocess", _native_error or "native backend unavailable"
    return "native", "retest._proc_group loaded"


def _select_backend(requested: Optional[str], settings: Optional[config.RunnerSettings] = None) -> str:
    """The one place where the backend is chosen (``settings``: the run's, default now's)."""
    if requested is not None:
        if requested not in ("native", "subprocess"):
            raise ValueError(f"backend must be 'native' or 'subprocess', not {requested!r}")
        if requested == "native" and _native is None:
            raise ValueError(f"native backend unavailable: {_native_error}")
        return requested
    name, why = _backend_of(settings if settings is not None else config.RunnerSettings.from_env())
    if name == "subprocess":
        # A failed import is an installation fault worth an ERROR; the kill-switch is a choice.
        level = logging.INFO if why.startswith("SUBPROCESS_TREE_KILL_ENABLED") else logging.ERROR
        _log_fallback_once(why, level)
    return name


# --------------------------------------------------------------------------- containment choice

_logged_containment: set[str] = set()


def _log_containment_once(key: str, level: int, message: str, *args: object) -> None:
    if key in _logged_containment:  # every run but the first: no lock taken
        return
    with _log_lock:
        if key in _logged_containment:
            return
        _logged_containment.add(key)
    log.log(level, message, *args)


@dataclass(frozen=True)
class _Containment:
    """How one native run is to be contained, and why."""

    mode: str                      # "cgroup" or "subreaper"
    why: str
    required: bool = False         # cgroup demanded: no fallback, report why not
    parent: Optional[str] = None   # cgroup mode: where the run's cgroup is made
    refused: bool = False          # required but impossible: the run does not start


#: The plan of every run that asks for the subreaper (a frozen value: one for all of them).
_SUBREAPER_REQUESTED = _Containment("subreaper", "subreaper requested (RETEST_CONTAINMENT)")


def containment_status(environ: Optional[Mapping[str, str]] = None) -> tuple[str, str]:
    """Return ``(containment, why)``: what a native ``run()`` would use now, and the reason
    (``"none"`` when cgroup mode is required and impossible; a cgroup parent is only known
    to refuse once a run tried it)."""
    plan = _plan_containment(None, config.RunnerSettings.from_env(environ))
    return ("none" if plan.refused else plan.mode), plan.why


def _plan_containment(requested: Optional[str], settings: config.RunnerSettings) -> _Containment:
    """The containment a native run asks for, before its cgroup is made."""
    mode = requested if requested is not None else settings.containment
    if mode not in config.CONTAINMENTS:
        raise ValueError(f"containment must be one of {', '.join(config.CONTAINMENTS)}, not {mode!r}")
    if mode == "subreaper":
        return _SUBREAPER_REQUESTED
    try:
        parent = _cgroup.parent_dir(settings.cgroup_parent)
    except _cgroup.Unavailable as err:
        return _refuse_or_fall_back(mode, str(err))
    known = _cgroup.unusable_reason(parent)
    if known is not None:
        return _refuse_or_fall_back(mode, known, parent)
    required = mode == "cgroup"
    plan = _CGROUP_PLANS.get((parent, required))
    if plan is None:  # made once per parent: the same frozen value for each of its runs
        plan = _CGROUP_PLANS[(parent, required)] = _Containment(
            "cgroup", f"each run in its own cgroup under {parent}", required, parent)
    return plan


#: The plans of the runs that get a cgroup of their own, by (parent, required).
_CGROUP_PLANS: dict[tuple[str, bool], _Containment] = {}


def _refuse_or_fall_back(mode: str, why: str, parent: Optional[str] = None) -> _Containment:
    """cgroup mode is impossible: refused when it was required, else the subreaper."""
    if mode == "cgroup":
        return _Containment("cgroup", f"cgroup containment required but unavailable: {why}",
                            True, parent, refused=True)
    return _Containment("subreaper", f"cgroup mode unavailable: {why}", False, parent)


def _select_containment(requested: Optional[str], settings: Optional[config.RunnerSettings] = None
                        ) -> tuple[_Containment, Optional[str], int]:
    """The one place where containment is chosen: make (or take) the run's cgroup when the plan
    says cgroup. Return the plan (``refused`` when cgroup was required and is impossible), the
    cgroup's path and the run's ``cgroup_flags`` for the extension. The choice and why are
    logged once."""
    if settings is None:
        settings = config.RunnerSettings.from_env()
    plan = _plan_containment(requested, settings)
    if plan.mode == "cgroup" and not plan.refused:
        assert plan.parent is not None
        limits = _cgroup.NO_LIMITS if not (settings.cgroup_memory_max or settings.cgroup_pids_max
                                           or settings.cgroup_cpu_max) else \
            _cgroup.Limits(settings.cgroup_memory_max, settings.cgroup_pids_max, settings.cgroup_cpu_max)
        try:
            path, reused = _cgroup.take(plan.parent, limits)
        except _cgroup.Unavailable as err:
            plan = _refuse_or_fall_back("cgroup" if plan.required else "auto", str(err), plan.parent)
        else:
            watch = _pressure.current()
            if watch is not None:  # its cpu.stat and cpu.pressure, while the run lives
                watch.attach_cgroup(path, fresh=not reused)
            _log_containment_once("cgroup", logging.INFO, "retest: containment: cgroup (%s)", plan.why)
            # A cgroup with limits written is not kept: the next run's limits may differ.
            flags = ((_native.CGROUP_REQUIRED if plan.required else 0) |
                     (_native.CGROUP_KEEP if limits is _cgroup.NO_LIMITS else 0) |
                     (_native.CGROUP_REUSED if reused else 0)) if _native is not None else 0
            return plan, path, flags
    if not plan.refused:
        _log_containment_once("subreaper", logging.INFO, "retest: containment: subreaper (%s)",
                              plan.why)
    return plan, None, (_native.CGROUP_REQUIRED if plan.required and _native is not None else 0)


def _cgroup_fallback(plan: _Containment, err: int) -> None:
    """The shepherd could not place the command in its cgroup (EBUSY: the parent has
    controllers and processes, EOPNOTSUPP...) and ran it as a subreaper run: no more tries."""
    why = f"cannot place a process in a cgroup under {plan.parent}: {os.strerror(err)}"
    if plan.parent is not None and _cgroup.mark_unusable(plan.parent, why):
        _log_containment_once("subreaper", logging.INFO, "retest: containment: subreaper (%s)", why)


# --------------------------------------------------------------------------- argument checks


def _check_args(args: Sequence[StrPath]) -> tuple[list[bytes], tuple[str, ...]]:
    # A list or a tuple (nearly every call) skips the ABC check of typing's Sequence (~2 us).
    if type(args) is not list and type(args) is not tuple and (
            isinstance(args, (str, bytes)) or not isinstance(args, Sequence)):
        raise TypeError("args must be a sequence of str, bytes or path-like (no shell string)")
    if len(args) == 0:
        raise ValueError("args must not be empty")
    argv: list[bytes] = []
    for arg in args:
        if type(arg) is str:  # os.fsencode's own encode, without its two calls
            raw = arg.encode(_FS_ENCODING, _FS_ERRORS)
        elif isinstance(arg, (str, bytes, os.PathLike)):
            raw = os.fsencode(arg)
        else:
            raise TypeError(f"argument must be str, bytes or path-like, not {type(arg).__name__}")
        if b"\0" in raw:
            raise ValueError("argument contains a NUL byte")
        argv.append(raw)
    return argv, tuple([raw.decode(_FS_ENCODING, _FS_ERRORS) for raw in argv])  # os.fsdecode's


#: What os.fsencode and os.fsdecode use (read once by ``os`` too).
_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()


def _check_env(env: Optional[Mapping[str, str]]) -> Optional[list[bytes]]:
    if env is None:
        return None
    if not isinstance(env, Mapping):
        raise TypeError("env must be a mapping of str to str")
    envp: list[bytes] = []
    for key, value in env.items():
        if not isinstance(key, (str, bytes)) or not isinstance(value, (str, bytes)):
            raise TypeError("env keys and values must be str or bytes")
        bkey, bvalue = os.fsencode(key), os.fsencode(value)
        if b"\0" in bkey or b"\0" in bvalue:
            raise ValueError("env contains a NUL byte")
        if not bkey or b"=" in bkey:
            raise ValueError(f"illegal environment variable name {key!r}")
        envp.append(bkey + b"=" + bvalue)
    return envp


def _check_timeout(timeout: Optional[float]) -> Optional[float]:
    if timeout is None:
        return None
    if type(timeout) is int:  # never NaN nor infinite; float() raises for a huge one, as before
        seconds = float(timeout)
        return seconds if seconds > 0.0 else 0.0
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError("timeout must be a number or None")
    if math.isnan(timeout):
        raise ValueError("timeout must not be NaN")
    if math.isinf(timeout):
        return None if timeout > 0 else 0.0
    return max(float(timeout), 0.0)


def _check_grace(grace: Optional[float]) -> float:
    if grace is None:
        return config.RunnerSettings.from_env().grace_s
    if isinstance(grace, bool) or not isinstance(grace, (int, float)):
        raise TypeError("grace must be a number")
    if not math.isfinite(grace) or grace < 0:
        raise ValueError("grace must be a finite number >= 0")
    return float(grace)


def _check_stop_signal(stop_signal: Optional[int]) -> Optional[int]:
    if stop_signal is None:
        return None
    if isinstance(stop_signal, bool) or not isinstance(stop_signal, int):
        raise TypeError("stop_signal must be a signal number (int or signal.Signals) or None")
    if not 1 <= stop_signal < signal.NSIG:
        raise ValueError(f"stop_signal must be a signal number in 1..{signal.NSIG - 1}")
    return int(stop_signal)


def _tee_fd(tee: Union[IO[bytes], int, None]) -> int:
    if tee is None:
        return -1
    if isinstance(tee, bool):
        raise TypeError("tee must be a binary file or a file descriptor")
    if isinstance(tee, int):
        if tee < 0:
            raise ValueError("tee file descriptor must be >= 0")
        return tee
    try:
        tee.flush()
        return tee.fileno()
    except (AttributeError, OSError) as err:
        raise TypeError("tee must be a binary file with fileno() or a file descriptor") from err


# --------------------------------------------------------------------------- run


def run(
    args: Sequence[StrPath],
    *,
    timeout: Optional[float] = None,
    grace: Optional[float] = None,
    cwd: Optional[StrPath] = None,
    env: Optional[Mapping[str, str]] = None,
    input: Optional[bytes] = None,
    capture_limit: Optional[int] = None,
    on_output: Optional[OutputCallback] = None,
    tee: Union[IO[bytes], int, None] = None,
    backend: Optional[str] = None,
    containment: Optional[str] = None,
    probe: Optional[bool] = None,
    probe_packages: Sequence[str] = (),
    on_event: Optional[EventCallback] = None,
    stop_signal: Optional[int] = None,
) -> RunResult:
    """Run ``args`` as a contained process tree and return what happened.

    ``timeout``: seconds until the deadline (``None``/``inf``: none; ``<= 0``: already due).
    ``grace``: seconds between SIGTERM and SIGKILL (default ``RETEST_KILL_GRACE_S``, 5).
    ``input``: bytes fed to stdin (stdin is ``/dev/null`` otherwise).
    ``capture_limit``: bytes kept per stream, half head and half tail (default
    ``RETEST_CAPTURE_LIMIT_BYTES``); the middle is replaced by a marker and counted.
    ``on_output``: called as ``on_output("stdout" | "stderr", chunk)`` as output arrives.
    ``tee``: a binary file or fd that receives both streams as they arrive.
    ``backend``: force ``"native"`` or ``"subprocess"`` (tests, benchmarks); default: automatic.
    ``containment`` (native): ``"auto"``, ``"cgroup"`` or ``"subreaper"`` (default
    ``RETEST_CONTAINMENT``, auto); a ``"cgroup"`` that is impossible is a ``spawn_error``.
    ``probe``: inject the pytest probe when ``args`` runs pytest (default ``RETEST_PROBE_ENABLED``,
    on); its facts are in ``RunResult.probe``. ``probe_packages``: top-level packages whose
    import origin the probe records. ``on_event(event)``: called with each probe event as the
    suite writes it (from a helper thread).
    ``stop_signal``: the first signal of the stop sequence at the deadline, on an interrupt and
    for leftovers (GNU ``timeout -s``), then SIGCONT, ``grace``, SIGKILL. Default: SIGTERM
    (native); the subprocess backend keeps its prior SIGKILL at once unless one is given, and
    then sends it to the direct child only, SIGKILL after ``grace``.
    """
    settings = config.RunnerSettings.from_env()
    argv, args_text = _check_args(args)
    envp = None if env is None else _check_env(env)
    deadline = _check_timeout(timeout)
    grace_s = settings.grace_s if grace is None else _check_grace(grace)
    stop_signo = None if stop_signal is None else _check_stop_signal(stop_signal)
    if input is not None and not isinstance(input, (bytes, bytearray, memoryview)):
        raise TypeError("input must be bytes or None")
    if capture_limit is None:
        capture_limit = settings.capture_limit_bytes
    if isinstance(capture_limit, bool) or not isinstance(capture_limit, int):
        raise TypeError("capture_limit must be an int")
    if capture_limit < 0:
        raise ValueError("capture_limit must be >= 0")
    if on_output is not None and not callable(on_output):
        raise TypeError("on_output must be callable")
    bcwd: Optional[bytes] = None
    if cwd is not None:
        if not isinstance(cwd, (str, bytes, os.PathLike)):
            raise TypeError("cwd must be str, bytes or path-like")
        bcwd = os.fsencode(cwd)
        if b"\0" in bcwd:
            raise ValueError("cwd contains a NUL byte")
    tee_fd = -1 if tee is None else _tee_fd(tee)
    stdin_bytes = bytes(input) if input is not None else None
    if on_event is not None and not callable(on_event):
        raise TypeError("on_event must be callable")

    chosen = _select_backend(backend, settings)
    if containment is not None and containment not in config.CONTAINMENTS:
        raise ValueError(f"containment must be one of {', '.join(config.CONTAINMENTS)}, "
                         f"not {containment!r}")
    launch = _Launch(chosen, argv, args_text, env, bcwd, stdin_bytes, deadline, grace_s,
                     capture_limit, on_output, tee_fd, containment, stop_signo, envp, settings)
    if probe is None:
        probe = settings.probe_enabled
    evidence = _Evidence(native=chosen == "native")
    try:
        if not probe or not _probe.is_pytest_argv(args_text):
            result = _dispatch(launch, evidence)
        else:
            result = _run_probed(launch, probe_packages, on_event, evidence)
    except BaseException:
        evidence.close()
        raise
    return evidence.finish(result, launch.timeout)


def _set_fields(result: RunResult, **fields: Any) -> RunResult:
    """Fill fields of a result that nobody else holds yet (made by this run, not returned): in
    place, as its own ``__init__`` would, instead of ``dataclasses.replace``'s copy of every
    field (~20 us a run). Its fields live in its ``__dict__`` (no slots, no descriptors), so
    one update of it is ``object.__setattr__`` of each."""
    vars(result).update(fields)
    return result


class _Evidence:
    """The evidence of one run in the making: the machine's load (``retest.pressure``) and
    the kernel's OOM kills (``retest.oom``).

    Native backend: the runner reads both in C without the GIL (``ext/evidence.c``: the start
    while the shepherd starts the command, the end after the tree is gone) and hands them
    over in ``native``; the sampler's timeline runs as for every run. Subprocess backend:
    read here, before and after, in Python.
    """

    def __init__(self, *, native: bool) -> None:
        self.watch = _pressure.Watch(read=not native)
        self.oom = None if native else _oom.Watch()
        #: The native runner's readings: (before, after, kernel log records or None,
        #: log complete, log errno); None until it ran (or when it never started).
        self.native: Optional[tuple[Any, ...]] = None
        #: The run's own cgroup's memory.events ``oom_kill`` and ``oom_group_kill``, read by
        #: the shepherd before it removed the cgroup (``None``: no cgroup, or no such file).
        self.cgroup_oom: tuple[Optional[int], Optional[int]] = (None, None)

    def close(self) -> None:
        self.watch.close()
        if self.oom is not None:
            self.oom.close()

    def finish(self, result: RunResult, timeout: Optional[float]) -> RunResult:
        """``result`` with its ``timeout_s``, ``pressure`` and ``oom``."""
        if result.pid is None:
            self.close()
            return _set_fields(result, timeout_s=timeout)
        probe_pids = result.probe.pids if result.probe is not None else ()
        tree = {result.pid, *probe_pids}
        if result.leaks:
            tree.update(pid for pid, _, _ in result.leaks)
        readings = None if self.native is None else (self.native[0], self.native[1])
        pressure = self.watch.finish(tree_cpu_s=result.user_cpu_s + result.sys_cpu_s,
                                     tree_pids=tree, wall_s=result.duration_s, readings=readings)
        try:
            oom = self._oom(result, probe_pids)
        finally:
            if self.oom is not None:
                self.oom.close()
        return _set_fields(result, timeout_s=timeout, pressure=pressure, oom=oom)

    def _oom(self, result: RunResult, probe_pids: Iterable[int]) -> Optional[OomEvidence]:
        if self.oom is not None:
            return self.oom.attribute(leader=result.pid, pids=probe_pids,
                                      returncode=result.returncode, timed_out=result.timed_out,
                                      cgroup=result.cgroup)
        if self.native is None:  # the native runner without its readings: nothing to go on
            return None
        before, after, records, complete, log_errno = self.native
        if records is None:
            _oom.note_unreadable_log(log_errno)
        moved = None
        kills, group_kills = self.cgroup_oom
        if kills is not None and result.cgroup is not None:  # its own cgroup, fresh: from 0
            moved = (os.path.join(result.cgroup, "memory.events"), kills, group_kills or 0)
        vmstat = max(after[15] - before[15], 0) if after[15] >= 0 and before[15] >= 0 else 0
        return _oom.decide(kills=_oom.kills_from_records(records) if records else [],
                           log_complete=bool(complete), leader=result.pid, pids=probe_pids,
                           returncode=result.returncode, timed_out=result.timed_out,
                           cgroup=result.cgroup, moved=moved, vmstat_delta=vmstat)


class _Launch(NamedTuple):
    """One checked ``run()`` call, ready for a backend (a named tuple: made in ~1 us, where
    a frozen dataclass of 15 fields takes ~4 us, every run)."""

    backend: str
    argv: list[bytes]
    args_text: tuple[str, ...]
    env: Optional[Mapping[str, str]]
    cwd: Optional[bytes]
    stdin_bytes: Optional[bytes]
    timeout: Optional[float]
    grace_s: float
    capture_limit: int
    on_output: Optional[OutputCallback]
    tee_fd: int
    containment: Optional[str] = None
    #: ``None``: the backend's default (SIGTERM native, the prior SIGKILL subprocess).
    stop_signal: Optional[int] = None
    #: ``env`` checked and encoded (``_check_env``), and the settings the run was called with.
    envp: Optional[list[bytes]] = None
    settings: Optional[config.RunnerSettings] = None


def _dispatch(launch: _Launch, evidence: Optional[_Evidence] = None) -> RunResult:
    """Run ``launch`` on its backend."""
    x = launch
    if x.backend == "native":
        return _run_native(x.argv, x.args_text, x.envp, x.cwd, x.stdin_bytes, x.timeout,
                           x.grace_s, x.capture_limit, x.on_output, x.tee_fd, x.containment,
                           signal.SIGTERM if x.stop_signal is None else x.stop_signal,
                           evidence, x.settings)
    return _run_subprocess(x.argv, x.args_text, x.env, x.cwd, x.stdin_bytes, x.timeout,
                           x.capture_limit, x.on_output, x.tee_fd, x.stop_signal, x.grace_s)


def _run_probed(launch: _Launch, packages: Sequence[str],
                on_event: Optional[EventCallback], evidence: Optional[_Evidence] = None) -> RunResult:
    """Run pytest with the probe: a private events file, followed live if asked, summed up."""
    settings = launch.settings or config.RunnerSettings.from_env()
    try:
        channel = _probe.Channel(packages=packages, max_bytes=settings.probe_max_bytes)
    except OSError as err:  # no temporary directory: run without the probe, say so once
        _log_fallback_once(f"probe disabled for this run: {err}", logging.WARNING)
        return _dispatch(launch, evidence)
    follower = _probe.Follower(channel, on_event) if on_event is not None else None
    stage, timeout, grace_s = _diagnostic_stage(channel, launch.timeout, launch.grace_s)
    try:
        probe_env = channel.environ(os.environ if launch.env is None else launch.env)
        probed = launch._replace(
            argv=[os.fsencode(a) for a in _probe.inject([os.fsdecode(a) for a in launch.argv])],
            env=probe_env, envp=_check_env(probe_env), timeout=timeout, grace_s=grace_s,
        )
        started_wall = time.time()
        if follower is not None:
            follower.start()
        if stage is not None:
            stage.start()
        try:
            result = _dispatch(probed, evidence)
        finally:
            if stage is not None:
                stage.stop()
            if follower is not None:
                follower.stop()
        channel.poll()
        # Tests "running at the deadline" are timed to the deadline, not to the end of the kill.
        ended = started_wall + launch.timeout if result.timed_out and launch.timeout is not None \
            else time.time()
        report = ProbeReport.from_events(channel.events, ended_at=ended)
        dumps = _stage_dumps(stage, channel.events, report) if result.timed_out else ()
    finally:
        channel.close()
    return dataclasses.replace(result, probe=report, diagnostics=dumps)


def _diagnostic_stage(channel: _probe.Channel, timeout: Optional[float],
                      grace_s: float) -> tuple[Optional[_diagnose.Stage], Optional[float], float]:
    """The stage (``retest.diagnose``) and the native deadline and grace that make room for it:
    ``d`` = ``RETEST_DIAGNOSE_S``, at most half the grace, moved from the grace to the deadline
    so that SIGKILL comes when it would have without it."""
    budget = min(config.ForensicsSettings.from_env().diagnose_s, grace_s / 2)
    if timeout is None or budget <= 0 or _diagnose.DUMP_SIGNAL is None:
        return None, timeout, grace_s

    def probe_pids() -> list[int]:
        channel.poll()
        return [e["pid"] for e in list(channel.events) if isinstance(e.get("pid"), int)]

    return _diagnose.Stage(channel.dir, timeout, budget, probe_pids), timeout + budget, grace_s - budget


def _stage_dumps(stage: Optional[_diagnose.Stage], events: list[dict[str, Any]],
                 report: ProbeReport) -> tuple[StackDump, ...]:
    if stage is None or not stage.fired:
        return ()
    # A worker says who it is in its own worker_start; the controller's events may carry a
    # worker id too (the reports it relays), so only worker_start maps a pid to a worker.
    workers = {e["pid"]: e.get("worker") for e in events
               if e.get("ev") == "worker_start" and isinstance(e.get("pid"), int)}
    running = {r.worker: r.nodeid for r in sorted(report.running, key=lambda r: r.running_s)}
    return stage.dumps(workers, running)


def _run_native(
    argv: list[bytes],
    args_text: tuple[str, ...],
    envp: Optional[list[bytes]],
    cwd: Optional[bytes],
    stdin_bytes: Optional[bytes],
    timeout: Optional[float],
    grace_s: float,
    capture_limit: int,
    on_output: Optional[OutputCallback],
    tee_fd: int,
    containment: Optional[str] = None,
    stop_signal: int = signal.SIGTERM,
    evidence: Optional[_Evidence] = None,
    settings: Optional[config.RunnerSettings] = None,
) -> RunResult:
    assert _native is not None and _shepherd_path is not None
    if settings is None:
        settings = config.RunnerSettings.from_env()
    plan, cgroup_path, cgroup_flags = _select_containment(containment, settings)
    if plan.refused:  # cgroup demanded, impossible: say so rather than contain less
        return RunResult(args=args_text, returncode=None, stdout=b"", stderr=b"", timed_out=False,
                         duration_s=0.0, spawn_error=plan.why, backend="native")
    # The next run's cgroup, made by the C side while this run's command starts.
    keep = bool(cgroup_flags & _native.CGROUP_KEEP)
    spare = _cgroup.next_name(plan.parent, keep) if cgroup_path is not None and plan.parent else None
    try:
        raw = _native.run(
            _shepherd_bytes,
            argv,
            envp,
            cwd,
            stdin_bytes,
            -1.0 if timeout is None else timeout,
            grace_s,
            capture_limit,
            on_output,
            tee_fd,
            None if cgroup_path is None else os.fsencode(cgroup_path),
            cgroup_flags,
            int(stop_signal),
            evidence is not None and evidence.oom is None,
            None if spare is None else os.fsencode(spare),
            settings.shepherd_pool,
        )
    except BaseException:
        if cgroup_path is not None:  # raised before the C side took the cgroup over
            _remove_quietly(cgroup_path)
        raise
    if raw.pop("prepared") == 0 and spare is not None and plan.parent is not None:
        _cgroup.add_spare(plan.parent, spare)
    changed = raw.pop("cgroup_changed")
    if raw["spawn_errno"] == _errno.ESTALE and cgroup_flags & _native.CGROUP_REUSED:
        # The kept cgroup was gone, or had a process in it, when the shepherd took it (one
        # that left it came back): nothing of the command ran. That cgroup is not ours any
        # more (left alone, not given back); the run goes again in another, fresh or kept.
        # Or the shepherd that kept it found, checking it after its run, that its command
        # had changed it (a limit, the freezer, a BPF program...): removed, no fault.
        if changed:
            log.debug("retest: cgroup %s was changed by its last command; the run takes "
                      "another", cgroup_path)
        else:
            log.warning("retest: cgroup %s was removed or had a process back in it; the run "
                        "takes another", cgroup_path)
        return _run_native(argv, args_text, envp, cwd, stdin_bytes, timeout, grace_s,
                           capture_limit, on_output, tee_fd, containment, stop_signal, evidence,
                           settings)
    readings = raw.pop("evidence")
    oom_counts = (raw.pop("cgroup_oom_kill", None), raw.pop("cgroup_oom_group_kill", None))
    if evidence is not None and readings is not None:
        evidence.native, evidence.cgroup_oom = readings, oom_counts
    tee_errno = raw.pop("tee_errno")
    if tee_errno is not None:  # the tee stopped at its first error, as the subprocess one does
        log.warning("tee write failed: %s", OSError(tee_errno, os.strerror(tee_errno)))
    cgroup_errno = raw.pop("cgroup_errno")
    if cgroup_errno:  # 0: not placed, but no placement failed (the command never started)
        _cgroup_fallback(plan, cgroup_errno)
    kept, some0 = raw.pop("cgroup_kept"), raw.pop("cgroup_cpu_some0")
    watch = _pressure.current() if cgroup_flags & _native.CGROUP_REUSED else None
    if watch is not None and some0 is not None:  # the kept cgroup's stall counter at the start
        watch.run_some0 = float(some0)
    if cgroup_path is not None and keep and plan.parent is not None:
        _cgroup.give_back(plan.parent, cgroup_path, kept)
    if cgroup_path is not None and not raw.pop("cgroup_removed") and not kept:
        log.warning("retest: cgroup %s could not be removed (a process in it survived SIGKILL?)",
                    cgroup_path)
    raw.pop("cgroup_removed", None)
    if raw["spawn_error"] is not None and raw["pid"] is None:
        raw["containment"] = "none"
    raw["args"], raw["backend"] = args_text, "native"
    return _new_result(raw)


def _remove_quietly(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass


def _bound(data: bytes, limit: int) -> tuple[bytes, int]:
    """Keep a head and a tail of ``data`` within ``limit`` bytes, as the native capture does."""
    if len(data) <= limit:
        return data, 0
    head = limit // 2
    tail = limit - head
    dropped = len(data) - limit
    return data[:head] + OMITTED_MARKER % dropped + (data[len(data) - tail:] if tail else b""), dropped


def _spawn_error_text(err: OSError, argv0: str, cwd: Optional[bytes]) -> str:
    if cwd is not None and err.filename is not None and os.fsencode(err.filename) == cwd:
        return f"chdir {os.fsdecode(cwd)!r}: {os.strerror(err.errno or 0)}"
    if err.errno in (_errno.EMFILE, _errno.ENFILE):
        # the pipes Popen makes, or its child's set-up before the exec (reported with the
        # program's name): not the command's failure, as the native runner says it
        limit = (f" (RLIMIT_NOFILE {resource.getrlimit(resource.RLIMIT_NOFILE)[0]})"
                 if err.errno == _errno.EMFILE else "")
        return (f"the run's own pipes for {argv0!r}: {os.strerror(err.errno)}{limit}: the "
                f"command never ran")
    return f"exec {argv0!r}: {os.strerror(err.errno or 0)}" if err.errno else f"exec {argv0!r}: {err}"


def _run_subprocess(
    argv: list[bytes],
    args_text: tuple[str, ...],
    env: Optional[Mapping[str, str]],
    cwd: Optional[bytes],
    stdin_bytes: Optional[bytes],
    timeout: Optional[float],
    capture_limit: int,
    on_output: Optional[OutputCallback],
    tee_fd: int,
    stop_signal: Optional[int] = None,
    grace_s: float = 0.0,
) -> RunResult:
    """The prior path: ``subprocess.run(timeout=...)``; kills only the direct child.

    With a ``stop_signal`` (``retest run -s``), the deadline sends that signal (+ SIGCONT) to
    the direct child instead of SIGKILL, and SIGKILL only if it outlives ``grace_s``.
    """
    start = time.monotonic()
    timed_out = escalated = False
    before = _children_rusage()
    pid: Optional[int] = None
    try:
        # subprocess.run(capture_output=True, timeout=...), written out to keep the child's pid
        # (the OOM killer's victim is matched to it, retest.oom).
        with subprocess.Popen(argv, stdin=subprocess.DEVNULL if stdin_bytes is None else
                              subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              cwd=cwd, env=env) as child:
            pid = child.pid
            try:
                out, err = child.communicate(stdin_bytes, timeout=timeout)
            except subprocess.TimeoutExpired as exc:
                timed_out = True
                out, err = exc.stdout or b"", exc.stderr or b""
                if stop_signal is None:
                    # As subprocess.run: SIGKILL the direct child and reap it; grandchildren live
                    # on. The output so far is in the exception; reading on would wait for a
                    # grandchild that holds the pipes.
                    child.kill()
                    child.wait()
                else:
                    out, err, escalated = _stop_child(child, stop_signal, grace_s, out, err)
            except BaseException:
                child.kill()
                raise
        returncode: Optional[int] = -9 if timed_out and stop_signal is None else child.returncode
    except (OSError, subprocess.SubprocessError) as exc:
        duration = time.monotonic() - start
        spawn_errno = exc.errno if isinstance(exc, OSError) else None
        text = _spawn_error_text(exc, args_text[0], cwd) if isinstance(exc, OSError) else str(exc)
        return RunResult(args=args_text, returncode=None, stdout=b"", stderr=b"", timed_out=False,
                         duration_s=duration, spawn_error=text, backend="subprocess",
                         spawn_errno=spawn_errno)
    duration = time.monotonic() - start
    after = _children_rusage()
    for name, chunk in (("stdout", out), ("stderr", err)):
        if chunk:
            if tee_fd >= 0:
                _write_all(tee_fd, chunk)
            if on_output is not None:
                on_output(name, chunk)
    out_kept, out_dropped = _bound(out, capture_limit)
    err_kept, err_dropped = _bound(err, capture_limit)
    return RunResult(
        args=args_text,
        returncode=returncode,
        stdout=out_kept,
        stderr=err_kept,
        timed_out=timed_out,
        duration_s=duration,
        spawn_error=None,
        backend="subprocess",
        pid=pid,
        escalated=escalated,
        killed_at_deadline=1 if timed_out and stop_signal is not None else 0,
        stdout_dropped=out_dropped,
        stderr_dropped=err_dropped,
        user_cpu_s=max(after[0] - before[0], 0.0),
        sys_cpu_s=max(after[1] - before[1], 0.0),
        max_rss_kb=after[2],
    )


def _stop_child(child: "subprocess.Popen[bytes]", stop_signal: int, grace_s: float,
                out: bytes, err: bytes) -> tuple[bytes, bytes, bool]:
    """GNU timeout's sequence for the direct child: SIG (+ SIGCONT), grace, SIGKILL. Returns
    the output (what it prints while it stops is kept) and whether SIGKILL was needed."""
    child.send_signal(stop_signal)
    if stop_signal not in (signal.SIGKILL, signal.SIGCONT):
        child.send_signal(signal.SIGCONT)  # a stopped child does not act on the signal
    try:  # bounded: a grandchild holding the pipes must not hold us past the grace
        more_out, more_err = child.communicate(timeout=grace_s)
        return more_out or out, more_err or err, False
    except subprocess.TimeoutExpired as exc:
        escalated = child.poll() is None
        child.kill()
        child.wait()
        return exc.stdout or out, exc.stderr or err, escalated


def _children_rusage() -> tuple[float, float, int]:
    try:
        import resource

        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ru.ru_utime, ru.ru_stime, ru.ru_maxrss
    except (ImportError, OSError):
        return 0.0, 0.0, 0


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except InterruptedError:
            continue
        except OSError as err:
            if err.errno in (_errno.EAGAIN, _errno.EPIPE, _errno.EBADF):
                log.warning("tee write failed: %s", err)
                return
            raise
        view = view[written:]


# --------------------------------------------------------------------------- classify


def classify(result: RunResult, *, fail_on_leak: Optional[bool] = None) -> Verdict:
    """Classify a finished run as passed / red / timeout / lock-busy / other (see DESIGN.md).

    The output classifier answers first; the kernel's word that its OOM killer ended the run
    (a runner fact, ``facts.oom_killed``) comes before the suite's; when the run carried the
    probe, the suite's own events decide (``retest.facts``), and ``Verdict.evidence`` says
    which was used. ``fail_on_leak`` (default ``RETEST_FAIL_ON_LEAK``, off): a run that would
    pass but left processes behind is ``other.leaked-processes`` instead.
    """
    output = _classify_output(result)
    oom_killed = facts.oom_killed(result, output)
    if oom_killed is not None:
        return oom_killed
    verdict = facts.decide(result, output, result.probe) if result.probe is not None else output
    verdict = facts.pytest_timeout_cause(result, facts.timeout_cause(result, verdict))
    verdict = facts.lock_holder(result, verdict)
    return _leak_verdict(result, verdict, fail_on_leak)


def _leak_verdict(result: RunResult, verdict: Verdict, fail_on_leak: Optional[bool]) -> Verdict:
    """The runner's leak fact, after the deadline and spawn-error facts: it only turns an
    otherwise passing run into ``other.leaked-processes`` (as nextest's LEAK)."""
    if fail_on_leak is None:
        fail_on_leak = config.RunnerSettings.from_env().fail_on_leak
    if not fail_on_leak or verdict.kind != "passed" or result.leak_count == 0:
        return verdict
    named = ", ".join(f"{pid} {cmdline!r} ({'?' if age is None else f'{age:.1f}s'})"
                      for pid, cmdline, age in result.leaks[:3])
    more = f" and {result.leak_count - 3} more" if result.leak_count > 3 else ""
    return Verdict(kind="other", rule="other.leaked-processes", infra=False, evidence="runner",
                   reason=f"the command passed but left {result.leak_count} process"
                          f"{'es' if result.leak_count != 1 else ''} behind, killed by the "
                          f"sweep: {named}{more} ({verdict.reason})")


def _classify_output(result: RunResult) -> Verdict:
    """The output classifier's verdict (native, or the Python twin without the extension)."""
    if _native is not None:
        kind, rule, reason, infra = _native.classify(
            result.stdout, result.stderr, result.returncode, result.timed_out,
            result.spawn_error, result.escalated, result.killed_at_deadline,
            _probe.is_pytest_argv(result.args),
        )
    else:
        from . import _classify_py

        kind, rule, reason, infra = _classify_py.classify(
            result.stdout, result.stderr, result.returncode, result.timed_out,
            result.spawn_error, result.escalated, result.killed_at_deadline,
            _probe.is_pytest_argv(result.args),
        )
    evidence = "runner" if (result.timed_out or result.spawn_error is not None) else "output"
    return Verdict(kind=kind, rule=rule, reason=reason, infra=infra, evidence=evidence)
