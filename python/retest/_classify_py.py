"""Pure-Python twin of the native verdict classifier ``retest._proc_group.classify``.

``proc_group.classify()`` uses this module when the extension is missing; the benchmarks use
it as the "pure Python" baseline. It must give *exactly* the answers of ``ext/classify.c``
(``tests/test_classify.py`` runs every case against both), so the two are written as one
algorithm in two languages: change one, change the other. The rules are documented in
``docs/verdicts.md``.

Cost: every search is linear in the size of the output, for every byte sequence: a line bound
is looked for only within the window that can matter (``SUMMARY_LINE_MAX`` for a summary, the
quote window for a quote), so no line is re-read once per anchor (issue 9: 8 MiB of ``\r``-only
progress bars). The pytest summary is looked for from the end of each buffer, so a log that ends
with its summary (the usual case) costs only its last lines; nothing here builds a copy of a
whole buffer or splits it into lines.
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
#: What ``python -m pytest`` prints (exit 1) when the interpreter has no pytest.
NO_PYTEST_MARK = b"No module named pytest"
#: pytest's PytestConfigWarning text; with ``filterwarnings = error`` it is a crash (exit 1).
NO_TEST_FILES_MARK = b"No files were found in testpaths"
#: unittest's (and Django's test runner's) last line when a test failed: ``FAILED (failures=1,
#: errors=2)``; the first count it prints is one of these. Only for a command that is not
#: pytest (pytest prints ``FAILED tests/x.py::t``).
UNITTEST_FAILED_MARKS = (b"FAILED (failures=", b"FAILED (errors=", b"FAILED (unexpected successes=")
#: unittest's (and Django's test runner's) count line at a line's start, ``Ran 3 tests in
#: 0.002s``; after a blank line, its result: ``OK``, ``OK (skipped=3)``, ``FAILED (...)``.
UNITTEST_RAN_MARK = b"\nRan "
UNITTEST_SKIPPED_MARK = b"\n\nOK (skipped="
#: Digits read of one count (a longer one is not unittest's).
COUNT_DIGITS_MAX = 9

# Colour/style escapes (CSI sequences). The three classes are disjoint, so a match is unique and
# the C scanner (one pass, no backtracking) removes exactly the same bytes.
_ANSI = re.compile(rb"\x1b\[[0-?]*[ -/]*[@-~]")
# An item is "N word [word [word]]" ("2 subtests passed"). The lookahead refuses the "in" of
# " in <digit>" as a word: an item word there could be followed by neither ", " nor " in ", so
# the match never backtracks into an item, as the C parser's single left-to-right pass.
_ITEM = rb"[0-9]+(?: (?!in [0-9])[a-z]+){1,3}"
_SUMMARY = re.compile(
    rb"(?P<counts>no tests ran|" + _ITEM + rb"(?:, " + _ITEM + rb")*)"
    rb" in [0-9]+(?:\.[0-9]+)?(?:s| seconds)(?: \([0-9:]+\))?"
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
    "other.environment": _Rule("other", False),
}

#: pytest's exit statuses 2..5 (``pytest.ExitCode``) and the rule each one maps to; they mean
#: this only when the command is pytest itself (a wrapper's exit 2 is not "interrupted").
_PYTEST_EXITS: dict[int, tuple[str, str]] = {
    2: ("other.interrupted", "interrupted"),
    3: ("other.internal-error", "internal error"),
    4: ("other.usage-error", "usage error"),
    5: ("other.no-tests", "no tests collected"),
}


# --------------------------------------------------------------------------- scanning


def _strip_ansi(raw: bytes) -> bytes:
    return _ANSI.sub(b"", raw)


#: Bytes a line-break search looks at before it doubles its step: most lines are short.
_SHORT_LINE = 64


def _last_break(buf: bytes, low: int, high: int) -> int:
    """Offset of the last ``\\n`` or ``\\r`` in ``buf[low:high]``, or -1.

    Cost: about the distance from ``high`` to that break (steps that double from
    ``_SHORT_LINE``), not ``high - low``: a window without ``\\n`` is not read whole.
    """
    step = _SHORT_LINE
    while high > low:
        chunk = max(low, high - step)
        found = max(buf.rfind(b"\n", chunk, high), buf.rfind(b"\r", chunk, high))
        if found >= 0:
            return found
        high, step = chunk, step * 2
    return -1


def _first_break(buf: bytes, low: int, high: int) -> int:
    """Offset of the first ``\\n`` or ``\\r`` in ``buf[low:high]``, or ``high``; cost as
    ``_last_break``."""
    step = _SHORT_LINE
    while low < high:
        chunk = min(high, low + step)
        newline, carriage = buf.find(b"\n", low, chunk), buf.find(b"\r", low, chunk)
        if newline >= 0 or carriage >= 0:
            return min(newline if newline >= 0 else chunk, carriage if carriage >= 0 else chunk)
        low, step = chunk, step * 2
    return high


def _line_start(buf: bytes, pos: int, floor: int) -> int:
    """Start of the line holding ``pos`` if it is ``>= floor`` (``floor <= pos``), else
    ``floor - 1``. Reads at most ``pos - floor + 1`` bytes: callers bound the cost."""
    low = max(floor - 1, 0)
    found = _last_break(buf, low, pos)
    return found + 1 if found >= 0 else low


def _line_end(buf: bytes, pos: int, ceiling: int) -> int:
    """End of the line holding ``pos`` if it is ``<= ceiling``, else ``ceiling + 1``; never past
    the end of ``buf``. Bounded like ``_line_start``."""
    return _first_break(buf, pos, min(ceiling + 1, len(buf)))


def _parse_summary(raw_line: bytes) -> Optional[_Summary]:
    """The pytest summary in ``raw_line``, or ``None`` if the line is not one."""
    # Exact, not a heuristic (as C's cannot_be_summary): if the first byte trimming keeps is not
    # ESC, removing escapes leaves it first, and a body starts with a digit or "no tests ran".
    first = raw_line.lstrip(_SUMMARY_STRIP)[:1]
    if not (first == b"\x1b" or first == b"n" or first.isdigit()):
        return None
    text = _strip_ansi(raw_line).strip(_SUMMARY_STRIP)
    match = _SUMMARY.fullmatch(text)
    if match is None:
        return None
    failed = errors = False
    counts = match.group("counts")
    for item in () if counts == b"no tests ran" else counts.split(b", "):
        digits, _, words = item.partition(b" ")
        if not digits.strip(b"0"):
            continue  # a zero count proves nothing
        word = words.rpartition(b" ")[2]  # the last word says what is counted
        if word == b"failed":
            failed = True
        elif word in (b"error", b"errors"):
            errors = True
    return _Summary(text.decode("ascii"), failed, errors)


def _find_summary(buf: bytes) -> Optional[_Summary]:
    """The last pytest summary line of ``buf``, searched from the end."""
    # Every summary holds " in <digit>" verbatim (pytest never colours inside " in 0.31s"), so
    # only lines with that anchor are parsed, and a line is dropped as a whole once parsed (or,
    # if longer than SUMMARY_LINE_MAX, everything back to the window's floor without looking
    # for its start), so each byte is looked at a bounded number of times whatever the input.
    end = len(buf)
    while True:
        pos = buf.rfind(b" in ", 0, end)
        if pos < 0:
            return None
        if pos + 4 >= len(buf) or not 0x30 <= buf[pos + 4] <= 0x39:
            end = pos + 3
            continue
        floor = max(pos - SUMMARY_LINE_MAX, 0)
        start = _line_start(buf, pos, floor)
        if start >= floor:  # else the line is too long
            stop = _line_end(buf, pos, start + SUMMARY_LINE_MAX)
            if stop - start <= SUMMARY_LINE_MAX:
                summary = _parse_summary(buf[start:stop])
                if summary is not None:
                    return summary
        end = start


def _quote(buf: bytes, pos: int) -> str:
    """Up to ``QUOTE_MAX`` bytes of the line holding ``pos``, around ``pos``, as text."""
    # Bounds are looked for only as far as the window reaches: a quote costs QUOTE_MAX bytes
    # however long its line (the bounds' "else" values mean "cut here").
    floor = max(pos - QUOTE_MAX // 2, 0)
    start = _line_start(buf, pos, floor)
    low = max(start, floor)
    stop = _line_end(buf, pos, low + QUOTE_MAX)
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


def _summary_label(is_pytest: bool) -> str:
    """What a summary is quoted as: only pytest's own exit status is pytest's, so a wrapper's
    (tox, make) reads "pytest summary: 1 failed in 0.1s (exit 2)", not "pytest: ..."."""
    return "pytest: " if is_pytest else "pytest summary: "


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
    is_pytest: bool,
    /,
) -> tuple[str, str, str, bool]:
    """Return ``(kind, rule, reason, infra)`` for a finished run; see docs/verdicts.md.

    ``is_pytest``: the command is pytest itself, so its exit status has pytest's meaning; for
    a wrapper (tox, make) only a pytest summary found in the output is evidence.

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
    pytest_itself = _check_bool(is_pytest, "is_pytest")
    rule, reason = _decide(out, err, rc, deadline_fired, spawn_error, sigkill_needed, signalled,
                           pytest_itself)
    return RULES[rule].kind, rule, reason, RULES[rule].infra


def _decide(
    out: bytes,
    err: bytes,
    rc: Optional[int],
    timed_out: bool,
    spawn_error: Optional[str],
    escalated: bool,
    signalled: Optional[int],
    is_pytest: bool,
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
        if summary is not None:
            return "passed.exit-0", f"exit 0: {summary.text}"
        return ("passed.exit-0", "exit 0") if is_pytest else _unittest_pass_rule(out, err)
    if spawn_error is not None:
        # join() uses the str data itself, as C's %U does, even for a str subclass.
        return "other.spawn-error", "".join(("could not start: ", spawn_error))
    if rc is None:
        return "other.no-status", "no exit status and no spawn error"
    return _failure_rule(out, err, rc, summary, is_pytest)


def _count_at(buf: bytes, at: int) -> tuple[int, int]:
    """The count of at most ``COUNT_DIGITS_MAX`` digits at ``buf[at]`` and the offset after
    it; ``(-1, at)`` if there is none, or a longer one."""
    end = at
    while end < len(buf) and end - at < COUNT_DIGITS_MAX and 0x30 <= buf[end] <= 0x39:
        end += 1
    if end == at or (end < len(buf) and 0x30 <= buf[end] <= 0x39):
        return -1, at
    return int(buf[at:end]), end


def _unittest_pass_rule(out: bytes, err: bytes) -> tuple[str, str]:
    """A passing command that is not pytest and printed no pytest summary, judged on
    unittest's last count line (stdout, else stderr): ``Ran 0 tests``, or a result of
    ``OK (skipped=N)`` for all N it ran, is ``other.no-tests``; else ``passed.exit-0``."""
    for buf in (out, err):
        pos = buf.rfind(UNITTEST_RAN_MARK)
        if pos < 0:
            continue
        ran, at = _count_at(buf, pos + len(UNITTEST_RAN_MARK))
        if ran < 0 or not (buf.startswith(b" tests in ", at) or buf.startswith(b" test in ", at)):
            return "passed.exit-0", "exit 0"
        quote = _quote(buf, pos + 1)
        if ran == 0:
            return "other.no-tests", f"exit 0 but unittest ran no tests ({quote}): nothing was tested"
        eol = buf.find(b"\n", at)
        if eol < 0 or not buf.startswith(UNITTEST_SKIPPED_MARK, eol):
            return "passed.exit-0", "exit 0"
        skipped, at = _count_at(buf, eol + len(UNITTEST_SKIPPED_MARK))
        if skipped == ran and buf.startswith(b")", at):
            return "other.no-tests", (f"exit 0 but unittest skipped every test it ran ({quote}): "
                                      f"nothing was tested")
        return "passed.exit-0", "exit 0"
    return "passed.exit-0", "exit 0"


def _failure_rule(
    out: bytes, err: bytes, rc: int, summary: Optional[_Summary], is_pytest: bool
) -> tuple[str, str]:
    """``(rule, reason)`` of a run that started and failed: the output's evidence first."""
    status = _status(rc)
    label = _summary_label(is_pytest)
    pytest_part = f"{label}{summary.text} ({status})" if summary is not None else status

    if summary is None or not (summary.failed or summary.errors):
        # A lock only explains the failure if no test had failed yet.
        for rule, pattern in LOCK_PATTERNS:
            quote = _search(out, err, pattern)
            if quote is not None:
                return rule, f"{status}; lock held: {quote}"
    if summary is None and rc > 0:
        quote = _search(out, err, NO_PYTEST_MARK)
        if quote is not None:
            return "other.environment", f"{status} before pytest started: pytest is not importable: {quote}"

    if summary is not None and summary.failed:
        return "red.tests-failed", pytest_part
    if (summary is not None and summary.errors) or (is_pytest and rc == 2):
        quote = _search(out, err, COLLECTION_ERROR_MARK)
        if quote is not None:
            return "red.collection-error", f"{pytest_part}; {quote}"
    if summary is not None and summary.errors:
        return "red.test-errors", pytest_part
    if rc == 1 and _search(out, err, TEST_TIMEOUT_MARK) is not None:
        tail = f"; {label}{summary.text}" if summary is not None else "; no pytest summary"
        return "red.test-timeout", f"exit 1: a per-test pytest-timeout fired{tail}"
    if rc > 0:
        quote = _search(out, err, NO_TEST_FILES_MARK)
        if quote is not None:
            return "other.no-tests", f"{status}: the configured testpaths hold no test files: {quote}"
    if rc > 0 and not is_pytest and summary is None:
        for mark in UNITTEST_FAILED_MARKS:
            quote = _search(out, err, mark)
            if quote is not None:
                return "red.tests-failed", f"unittest: {quote} ({status})"
    return _status_rule(rc, summary, is_pytest)


def _status_rule(rc: int, summary: Optional[_Summary], is_pytest: bool) -> tuple[str, str]:
    """``(rule, reason)`` by the exit status alone; pytest's statuses only for pytest itself."""
    status = _status(rc)
    if rc < 0:
        tail = f"; {_summary_label(is_pytest)}{summary.text}" if summary is not None else ""
        return "other.signal", status + tail
    if not is_pytest:
        tail = f"; pytest summary: {summary.text}" if summary is not None else ""
        return "other.exit-status", status + tail
    if rc == 1:
        if summary is not None:
            return "red.exit-1", f"pytest: {summary.text} ({status})"
        return "red.exit-1", "exit 1 with no pytest summary (pytest: tests failed)"
    tail = f": {summary.text}" if summary is not None else ""
    if rc in _PYTEST_EXITS:
        rule, meaning = _PYTEST_EXITS[rc]
        return rule, f"{status} (pytest: {meaning}){tail}"
    return "other.exit-status", status + tail
