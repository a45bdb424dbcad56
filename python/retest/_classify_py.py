"""Pure-Python twin of the native verdict classifier ``retest._proc_group.classify``.

``proc_group.classify()`` uses this module when the extension is missing; the benchmarks use
it as the "pure Python" baseline. It must give *exactly* the answers of ``ext/classify.c``
(``tests/test_classify.py`` runs every case against both), so the two are written as one
algorithm in two languages: change one, change the other. The rules are documented in
``docs/verdicts.md``.

Cost: every search is linear in the size of the output. The pytest summary is looked for from
the end of each buffer, so a log that ends with its summary (the usual case) costs only its last
lines; nothing here builds a copy of a whole buffer or splits it into lines.
"""

from __future__ import annotations

import re
import signal
from typing import NamedTuple, Optional

__all__ = ["classify"]

#: A line longer than this (raw bytes) is never a pytest summary line.
SUMMARY_LINE_MAX = 4096
#: Bytes of a matched line quoted in a reason (a window around the match).
QUOTE_MAX = 200

#: What the merge gate prints when its repository lock is held (``proc_group.LOCK_BUSY_MESSAGE``;
#: repeated here so that importing this module never imports ``proc_group``).
LOCK_BUSY_MESSAGE = b"retest: repository lock busy"

#: Lock patterns, in priority order: the first pattern found (stdout, then stderr) decides.
#: Git's bare "Unable to create '...lock'" is deliberately absent: git prints it for EACCES and
#: ENOSPC too, which are not a held lock; a held lock always adds "': File exists".
LOCK_PATTERNS: tuple[tuple[str, bytes], ...] = (
    ("lock-busy.gate-lock", LOCK_BUSY_MESSAGE),
    ("lock-busy.git-lock", b".lock': File exists"),
    ("lock-busy.git-lock", b"Another git process seems to be running"),
    ("lock-busy.sqlite", b"database is locked"),
)
COLLECTION_ERROR_MARK = b"ERROR collecting"
#: pytest-timeout's thread method prints this, dumps stacks and calls ``os._exit(1)``.
TEST_TIMEOUT_MARK = b"+++ Timeout +++"

# Colour/style escapes (CSI sequences). The three classes are disjoint, so a match is unique and
# the C scanner (one pass, no backtracking) removes exactly the same bytes.
_ANSI = re.compile(rb"\x1b\[[0-?]*[ -/]*[@-~]")
_COUNT_WORDS = rb"passed|failed|errors|error|skipped|xfailed|xpassed|warnings|warning|deselected|rerun"
_COUNT = re.compile(rb"([0-9]+) (" + _COUNT_WORDS + rb")")
# Linear: every repetition starts with a distinct literal (", "), so there is nothing to backtrack.
_SUMMARY = re.compile(
    rb"(?P<counts>no tests ran|[0-9]+ (?:" + _COUNT_WORDS + rb")(?:, [0-9]+ (?:" + _COUNT_WORDS
    + rb"))*) in [0-9]+(?:\.[0-9]+)?(?:s| seconds)(?: \([0-9:]+\))?"
)
_SUMMARY_STRIP = b" \t\x0b\x0c="
# Also strips pytest's "____ ERROR collecting x.py ____" decoration from quotes.
_QUOTE_STRIP = b" \t\x0b\x0c_="

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


class _Summary(NamedTuple):
    text: str
    failed: bool
    errors: bool


class _Rule(NamedTuple):
    kind: str
    infra: bool


RULES: dict[str, _Rule] = {
    "timeout.deadline": _Rule("timeout", True),
    "passed.exit-0": _Rule("passed", False),
    "other.spawn-error": _Rule("other", False),
    "other.no-status": _Rule("other", False),
    "lock-busy.gate-lock": _Rule("lock-busy", True),
    "lock-busy.git-lock": _Rule("lock-busy", True),
    "lock-busy.sqlite": _Rule("lock-busy", True),
    "red.tests-failed": _Rule("red", False),
    "red.collection-error": _Rule("red", False),
    "red.test-errors": _Rule("red", False),
    "red.test-timeout": _Rule("red", False),
    "red.exit-1": _Rule("red", False),
    "other.signal": _Rule("other", False),
    "other.interrupted": _Rule("other", False),
    "other.internal-error": _Rule("other", False),
    "other.usage-error": _Rule("other", False),
    "other.no-tests": _Rule("other", False),
    "other.exit-status": _Rule("other", False),
}

#: pytest's exit statuses 2..5 (``pytest.ExitCode``) and the rule each one maps to.
_PYTEST_EXITS: dict[int, tuple[str, str]] = {
    2: ("other.interrupted", "interrupted"),
    3: ("other.internal-error", "internal error"),
    4: ("other.usage-error", "usage error"),
    5: ("other.no-tests", "no tests collected"),
}


# --------------------------------------------------------------------------- scanning


def _strip_ansi(raw: bytes) -> bytes:
    return _ANSI.sub(b"", raw)


def _line_bounds(buf: bytes, pos: int) -> tuple[int, int]:
    """``(start, end)`` of the line holding ``pos``; lines end at ``\\n`` or ``\\r``."""
    # Each search is bounded by the line itself, so finding a line costs its length only.
    newline = buf.rfind(b"\n", 0, pos)
    start = max(newline, buf.rfind(b"\r", newline + 1, pos)) + 1
    end = buf.find(b"\n", pos)
    if end < 0:
        end = len(buf)
    carriage = buf.find(b"\r", pos, end)
    return start, (end if carriage < 0 else carriage)


def _parse_summary(raw_line: bytes) -> Optional[_Summary]:
    """The pytest summary in ``raw_line``, or ``None`` if the line is not one."""
    text = _strip_ansi(raw_line).strip(_SUMMARY_STRIP)
    match = _SUMMARY.fullmatch(text)
    if match is None:
        return None
    failed = errors = False
    for digits, word in _COUNT.findall(match.group("counts")):
        if not digits.strip(b"0"):
            continue  # a zero count proves nothing
        if word == b"failed":
            failed = True
        elif word in (b"error", b"errors"):
            errors = True
    return _Summary(text.decode("ascii"), failed, errors)


def _find_summary(buf: bytes) -> Optional[_Summary]:
    """The last pytest summary line of ``buf``, searched from the end."""
    # Every summary holds " in <digit>" verbatim (pytest never colours inside " in 0.31s"), so
    # only lines with that anchor are parsed, and a line is dropped as a whole once parsed.
    end = len(buf)
    while True:
        pos = buf.rfind(b" in ", 0, end)
        if pos < 0:
            return None
        if pos + 4 >= len(buf) or not 0x30 <= buf[pos + 4] <= 0x39:
            end = pos + 3
            continue
        start, stop = _line_bounds(buf, pos)
        if stop - start <= SUMMARY_LINE_MAX:
            summary = _parse_summary(buf[start:stop])
            if summary is not None:
                return summary
        end = start


def _quote(buf: bytes, pos: int) -> str:
    """Up to ``QUOTE_MAX`` bytes of the line holding ``pos``, around ``pos``, as text."""
    start, stop = _line_bounds(buf, pos)
    low = max(start, pos - QUOTE_MAX // 2)
    high = min(stop, low + QUOTE_MAX)
    text = _strip_ansi(buf[low:high]).strip(_QUOTE_STRIP).decode("utf-8", "replace")
    return ("..." if low > start else "") + text + ("..." if high < stop else "")


def _search(stdout: bytes, stderr: bytes, pattern: bytes) -> Optional[str]:
    """The quoted line of the last ``pattern`` in stdout, else in stderr; ``None`` if absent."""
    for buf in (stdout, stderr):
        pos = buf.rfind(pattern)
        if pos >= 0:
            return _quote(buf, pos)
    return None


# --------------------------------------------------------------------------- reasons


def _signal_name(signum: int) -> Optional[str]:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return None


def _status(returncode: int) -> str:
    """``exit N`` or ``killed by signal N (NAME)``."""
    if returncode >= 0:
        return f"exit {returncode}"
    name = _signal_name(-returncode)
    return f"killed by signal {-returncode} ({name})" if name else f"killed by signal {-returncode}"


def _saturate(value: int) -> int:
    return min(max(value, _INT64_MIN), _INT64_MAX)


def _check_int(value: object, name: str, none_ok: bool) -> Optional[int]:
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int{' or None' if none_ok else ''}")
    # int.__index__ reads the int value itself, as the C side does, never a subclass override.
    return _saturate(int.__index__(value))


def _check_bytes(value: object, name: str) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"{name} must be bytes")
    # A bytes subclass may override find/rfind; scan its plain bytes as C does.
    return value if type(value) is bytes else bytes(memoryview(value))


def _check_bool(value: object, name: str) -> bool:
    if type(value) is not bool:
        raise TypeError(f"{name} must be a bool")
    return value


# --------------------------------------------------------------------------- the rules


def classify(
    stdout: bytes,
    stderr: bytes,
    returncode: Optional[int],
    timed_out: bool,
    spawn_error: Optional[str],
    escalated: bool,
    killed_at_deadline: int,
    /,
) -> tuple[str, str, str, bool]:
    """Return ``(kind, rule, reason, infra)`` for a finished run; see docs/verdicts.md.

    Raises ``TypeError`` for an argument of the wrong type and nothing else. Ints outside
    the signed 64-bit range are saturated (the C side holds them in a ``long long``).
    """
    out = _check_bytes(stdout, "stdout")
    err = _check_bytes(stderr, "stderr")
    rc = _check_int(returncode, "returncode", True)
    deadline_fired = _check_bool(timed_out, "timed_out")
    if spawn_error is not None and not isinstance(spawn_error, str):
        raise TypeError("spawn_error must be a str or None")
    sigkill_needed = _check_bool(escalated, "escalated")
    signalled = _check_int(killed_at_deadline, "killed_at_deadline", False)
    rule, reason = _decide(out, err, rc, deadline_fired, spawn_error, sigkill_needed, signalled)
    return RULES[rule].kind, rule, reason, RULES[rule].infra


def _decide(
    out: bytes,
    err: bytes,
    rc: Optional[int],
    timed_out: bool,
    spawn_error: Optional[str],
    escalated: bool,
    signalled: Optional[int],
) -> tuple[str, str]:
    """``(rule, reason)``: the first rule that matches, in the order of docs/verdicts.md."""
    summary = _find_summary(out) or _find_summary(err)

    if timed_out:
        reason = (
            f"the runner's deadline fired; {signalled} process{'' if signalled == 1 else 'es'}"
            f" signalled, {'SIGKILL needed' if escalated else 'SIGTERM sufficed'}"
        )
        if summary is not None:
            reason += f"; last pytest summary: {summary.text}"
        return "timeout.deadline", reason
    if rc == 0:
        return "passed.exit-0", f"exit 0: {summary.text}" if summary is not None else "exit 0"
    if spawn_error is not None:
        # join() uses the str data itself, as C's %U does, even for a str subclass.
        return "other.spawn-error", "".join(("could not start: ", spawn_error))
    if rc is None:
        return "other.no-status", "no exit status and no spawn error"

    status = _status(rc)
    pytest_part = f"pytest: {summary.text} ({status})" if summary is not None else status

    if summary is None or not (summary.failed or summary.errors):
        # A lock only explains the failure if no test had failed yet.
        for rule, pattern in LOCK_PATTERNS:
            quote = _search(out, err, pattern)
            if quote is not None:
                return rule, f"{status}; lock held: {quote}"

    if summary is not None and summary.failed:
        return "red.tests-failed", pytest_part
    if (summary is not None and summary.errors) or rc == 2:
        quote = _search(out, err, COLLECTION_ERROR_MARK)
        if quote is not None:
            return "red.collection-error", f"{pytest_part}; {quote}"
    if summary is not None and summary.errors:
        return "red.test-errors", pytest_part
    if rc == 1:
        if _search(out, err, TEST_TIMEOUT_MARK) is not None:
            tail = f"; pytest: {summary.text}" if summary is not None else "; no pytest summary"
            return "red.test-timeout", f"exit 1: a per-test pytest-timeout fired{tail}"
        if summary is not None:
            return "red.exit-1", pytest_part
        return "red.exit-1", "exit 1 with no pytest summary (pytest: tests failed)"

    if rc < 0:
        tail = f"; pytest: {summary.text}" if summary is not None else ""
        return "other.signal", status + tail
    tail = f": {summary.text}" if summary is not None else ""
    if rc in _PYTEST_EXITS:
        rule, meaning = _PYTEST_EXITS[rc]
        return rule, f"{status} (pytest: {meaning}){tail}"
    return "other.exit-status", status + tail
