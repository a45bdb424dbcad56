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
import threading
from dataclasses import dataclass
from typing import Mapping

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

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "RunnerSettings":
        return cls(
            tree_kill_enabled=env_bool("SUBPROCESS_TREE_KILL_ENABLED", True, environ),
            grace_s=env_float("RETEST_KILL_GRACE_S", DEFAULT_KILL_GRACE_S, environ),
            capture_limit_bytes=env_int(
                "RETEST_CAPTURE_LIMIT_BYTES", DEFAULT_CAPTURE_LIMIT_BYTES, environ, minimum=1024
            ),
        )
