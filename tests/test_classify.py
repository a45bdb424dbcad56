"""The verdict rules (docs/verdicts.md), held identical in C and in pure Python.

Every case runs against both implementations through the ``classify`` fixture and asserts
the exact ``(kind, rule, reason, infra)``, so the two cannot drift apart. Real pytest runs
supply the output of the cases that matter most; hypothesis feeds random bytes to both.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from enum import IntEnum
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retest import _classify_py, probe, proc_group

Classify = Callable[..., tuple[str, str, str, bool]]

NATIVE_REQUIRED = os.environ.get("RETEST_REQUIRE_NATIVE") == "1"


def _load_native() -> tuple[Optional[Classify], str]:
    """``retest._proc_group.classify``, or ``None`` and why it cannot be used."""
    try:
        from retest import _proc_group
    except ImportError as err:
        return None, f"cannot import retest._proc_group: {err}"
    try:
        _proc_group.classify(b"", b"", 0, False, None, False, 0, True)
    except NotImplementedError:
        return None, "retest._proc_group was built without ext/classify.c (stale build)"
    return _proc_group.classify, ""


NATIVE, NATIVE_MISSING = _load_native()


def _native_or_skip() -> Classify:
    if NATIVE is None:
        if NATIVE_REQUIRED:
            pytest.fail(f"native classifier required but unavailable: {NATIVE_MISSING}")
        pytest.skip(f"native classifier unavailable: {NATIVE_MISSING}")
    return NATIVE


@pytest.fixture(params=["python", "native"])
def classify(request: pytest.FixtureRequest) -> Classify:
    """Each implementation in turn."""
    if request.param == "python":
        return _classify_py.classify
    return _native_or_skip()


@pytest.fixture
def twins() -> tuple[Classify, Classify]:
    """Both implementations, for tests that compare them directly."""
    return _classify_py.classify, _native_or_skip()


class Run(NamedTuple):
    stdout: bytes = b""
    stderr: bytes = b""
    returncode: Optional[int] = 1
    timed_out: bool = False
    spawn_error: Optional[str] = None
    escalated: bool = False
    killed_at_deadline: int = 0
    is_pytest: bool = True


GIT_LOCK = b"fatal: Unable to create '/repo/.git/index.lock': File exists.\n"
NO_PYTEST = b"/v/bin/python: No module named pytest\n"
NO_TEST_FILES = (b"  File \"/v/lib/_pytest/config/__init__.py\", line 1840, in issue_config_time_warning\n"
                 b"pytest.PytestConfigWarning: No files were found in testpaths; consider removing or "
                 b"adjusting your testpaths configuration. Searching recursively from the current "
                 b"directory instead.\n")
NO_TEST_FILES_QUOTE = ("pytest.PytestConfigWarning: No files were found in testpaths; consider removing or "
                       "adjusting your testpaths configuration. Searching recursively from the current "
                       "directory instead.")
# pytest 9 -q with subtests, and its coloured form (real bytes of --color=yes).
SUBTESTS = b"2 failed, 1 passed, 2 subtests passed in 0.01s\n"
SUBTESTS_COLOUR = (b"\x1b[31m\x1b[1m2 failed\x1b[0m, \x1b[32m1 passed\x1b[0m, \x1b[32m2 subtests passed"
                   b"\x1b[0m\x1b[31m in 0.03s\x1b[0m\n")
LONG_LOCK_LINE = b"x" * 300 + b" database is locked " + b"y" * 300
# python -m unittest (on stderr, as unittest writes) and Django's manage.py test: the same tail.
UNITTEST_FAILED = (b"..F.E\n======================================================================\n"
                   b"FAIL: test_add (tests.test_calc.T.test_add)\n----------------------------------"
                   b"------------------------------------\nAssertionError: 1 != 2\n\n-----------"
                   b"-----------------------------------------------------------\nRan 5 tests in "
                   b"0.004s\n\nFAILED (failures=1, errors=1)\n")
UNITTEST_NONE = b"\n----------------------------------------------------------------------\nRan 0 tests in 0.000s\n\nOK\n"
UNITTEST_SKIPPED = b"sss\n------\nRan %d tests in 0.001s\n\nOK (skipped=%d)\n"

# (id, run, expected (kind, rule, reason, infra))
CASES: list[tuple[str, Run, tuple[str, str, str, bool]]] = [
    # ---- unittest's summary, for a command that is not pytest (python -m unittest, Django)
    ("unittest-failed", Run(stderr=UNITTEST_FAILED, is_pytest=False),
     ("red", "red.tests-failed", "unittest: FAILED (failures=1, errors=1) (exit 1)", False)),
    ("unittest-errors-only", Run(stderr=b"Ran 2 tests in 0.1s\n\nFAILED (errors=2)\r\n",
                                 is_pytest=False),
     ("red", "red.tests-failed", "unittest: FAILED (errors=2) (exit 1)", False)),
    ("unittest-unexpected-success", Run(b"Ran 1 test in 0.0s\n\nFAILED (unexpected successes=1)\n",
                                        is_pytest=False),
     ("red", "red.tests-failed", "unittest: FAILED (unexpected successes=1) (exit 1)", False)),
    ("unittest-mark-under-pytest-is-pytests-rule", Run(stderr=UNITTEST_FAILED),
     ("red", "red.exit-1", "exit 1 with no pytest summary (pytest: tests failed)", False)),
    ("unittest-mark-with-a-signal", Run(stderr=UNITTEST_FAILED, returncode=-11, is_pytest=False),
     ("other", "other.signal", "killed by signal 11 (SIGSEGV)", False)),
    # ---- unittest passed, and what it ran (Python 3.11 exits 0 for "Ran 0 tests"; 3.12 exits 5)
    ("unittest-ran-nothing", Run(stderr=UNITTEST_NONE, returncode=0, is_pytest=False),
     ("other", "other.no-tests", "exit 0 but unittest ran no tests (Ran 0 tests in 0.000s): nothing "
      "was tested", False)),
    ("unittest-skipped-everything", Run(stderr=UNITTEST_SKIPPED % (3, 3), returncode=0, is_pytest=False),
     ("other", "other.no-tests", "exit 0 but unittest skipped every test it ran (Ran 3 tests in "
      "0.001s): nothing was tested", False)),
    ("unittest-skipped-some", Run(stderr=UNITTEST_SKIPPED % (3, 2), returncode=0, is_pytest=False),
     ("passed", "passed.exit-0", "exit 0", False)),
    ("unittest-skipped-and-expected-failure", Run(
        stderr=b"\nRan 2 tests in 0.1s\n\nOK (skipped=1, expected failures=1)\n", returncode=0,
        is_pytest=False),
     ("passed", "passed.exit-0", "exit 0", False)),
    ("unittest-one-test", Run(stderr=b"..\n------\nRan 1 test in 0.000s\n\nOK\n", returncode=0,
                              is_pytest=False),
     ("passed", "passed.exit-0", "exit 0", False)),
    ("unittest-the-last-count-decides", Run(stderr=UNITTEST_NONE + b"\nRan 4 tests in 0.2s\n\nOK\n",
                                            returncode=0, is_pytest=False),
     ("passed", "passed.exit-0", "exit 0", False)),
    ("unittest-stdout-before-stderr", Run(b"x\nRan 0 tests in 0.000s\n", UNITTEST_SKIPPED % (1, 0),
                                          returncode=0, is_pytest=False),
     ("other", "other.no-tests", "exit 0 but unittest ran no tests (Ran 0 tests in 0.000s): nothing "
      "was tested", False)),
    ("unittest-count-not-a-count", Run(stderr=b"\nRan 0000000000 tests in 0.0s\n", returncode=0,
                                       is_pytest=False),
     ("passed", "passed.exit-0", "exit 0", False)),
    ("unittest-not-at-a-line-start", Run(stderr=b"I Ran 0 tests in 0.0s\n", returncode=0,
                                         is_pytest=False),
     ("passed", "passed.exit-0", "exit 0", False)),
    ("unittest-count-under-pytest", Run(stderr=UNITTEST_NONE, returncode=0),
     ("passed", "passed.exit-0", "exit 0", False)),
    ("unittest-count-beside-a-pytest-summary", Run(b"3 passed in 0.1s\n", UNITTEST_NONE, returncode=0,
                                                   is_pytest=False),
     ("passed", "passed.exit-0", "exit 0: 3 passed in 0.1s", False)),
    # ---- timeout: the runner's own deadline, whatever else the output says
    ("timeout-escalated", Run(b"..\n12 passed in 899.10s\n", returncode=-9, timed_out=True,
                              escalated=True, killed_at_deadline=5),
     ("timeout", "timeout.deadline", "the runner's deadline fired; 5 processes signalled, "
      "SIGKILL needed; last pytest summary: 12 passed in 899.10s", True)),
    ("timeout-one-process", Run(returncode=-15, timed_out=True, killed_at_deadline=1),
     ("timeout", "timeout.deadline",
      "the runner's deadline fired; 1 process signalled, SIGTERM sufficed", True)),
    ("timeout-beats-exit-0-and-lock", Run(GIT_LOCK, returncode=0, timed_out=True),
     ("timeout", "timeout.deadline",
      "the runner's deadline fired; 0 processes signalled, SIGTERM sufficed", True)),
    # ---- passed
    ("passed-decorated", Run(b"..\n" + b"=" * 20 + b" 40 passed in 0.31s " + b"=" * 20 + b"\n",
                             returncode=0),
     ("passed", "passed.exit-0", "exit 0: 40 passed in 0.31s", False)),
    ("passed-no-summary", Run(b"hello\n", returncode=0),
     ("passed", "passed.exit-0", "exit 0", False)),
    ("passed-despite-noise", Run(b"database is locked\n1 failed, 2 passed in 0.3x\n", returncode=0),
     ("passed", "passed.exit-0", "exit 0", False)),
    # ---- could not start
    ("spawn-error", Run(returncode=None, spawn_error="exec 'pytestx': No such file or directory"),
     ("other", "other.spawn-error", "could not start: exec 'pytestx': No such file or directory",
      False)),
    ("no-status", Run(returncode=None),
     ("other", "other.no-status", "no exit status and no spawn error", False)),
    # ---- lock-busy
    ("git-index-lock", Run(stderr=GIT_LOCK, returncode=128),
     ("lock-busy", "lock-busy.git-lock",
      "exit 128; lock held: fatal: Unable to create '/repo/.git/index.lock': File exists.", True)),
    ("git-ref-lock", Run(stderr=b"error: cannot lock ref 'refs/heads/main': Unable to create "
                                b"'/r/.git/refs/heads/main.lock': File exists.\r\n", returncode=1),
     ("lock-busy", "lock-busy.git-lock", "exit 1; lock held: error: cannot lock ref "
      "'refs/heads/main': Unable to create '/r/.git/refs/heads/main.lock': File exists.", True)),
    ("git-another-process", Run(stderr=b"Another git process seems to be running in this "
                                       b"repository, e.g.\n", returncode=128),
     ("lock-busy", "lock-busy.git-lock", "exit 128; lock held: Another git process seems to be "
      "running in this repository, e.g.", True)),
    ("git-lock-permission-denied-is-not-busy",
     Run(stderr=b"fatal: Unable to create '/r/.git/index.lock': Permission denied\n",
         returncode=128),
     ("other", "other.exit-status", "exit 128", False)),
    ("sqlite", Run(b"E   sqlite3.OperationalError: database is locked\n", returncode=1),
     ("lock-busy", "lock-busy.sqlite",
      "exit 1; lock held: E   sqlite3.OperationalError: database is locked", True)),
    ("gate-lock", Run(stderr=proc_group.LOCK_BUSY_MESSAGE.encode() + b"\n", returncode=75),
     ("lock-busy", "lock-busy.gate-lock", "exit 75; lock held: retest: repository lock busy",
      True)),
    ("gate-lock-beats-sqlite", Run(b"database is locked\n",
                                   proc_group.LOCK_BUSY_MESSAGE.encode(), returncode=75),
     ("lock-busy", "lock-busy.gate-lock", "exit 75; lock held: retest: repository lock busy",
      True)),
    ("lock-with-clean-summary", Run(b"database is locked\n3 passed in 0.10s\n", returncode=1),
     ("lock-busy", "lock-busy.sqlite", "exit 1; lock held: database is locked", True)),
    ("lock-then-signal", Run(stderr=GIT_LOCK, returncode=-9),
     ("lock-busy", "lock-busy.git-lock", "killed by signal 9 (SIGKILL); lock held: fatal: "
      "Unable to create '/repo/.git/index.lock': File exists.", True)),
    ("lock-but-tests-failed-is-red", Run(b"database is locked\n1 failed, 3 passed in 0.10s\n"),
     ("red", "red.tests-failed", "pytest: 1 failed, 3 passed in 0.10s (exit 1)", False)),
    ("lock-long-line-quoted-window", Run(LONG_LOCK_LINE + b"\n"),
     ("lock-busy", "lock-busy.sqlite", "exit 1; lock held: ..." + "x" * 99
      + " database is locked " + "y" * 81 + "...", True)),
    ("lock-invalid-utf8-and-ansi", Run(b"\x1b[31m\xff\xfe database is locked\x1b[0m\n"),
     ("lock-busy", "lock-busy.sqlite", "exit 1; lock held: \ufffd\ufffd database is locked", True)),
    # ---- red
    ("red-q-form-long-run", Run(b"F..\n1 failed, 39 passed in 61.20s (0:01:01)\n"),
     ("red", "red.tests-failed", "pytest: 1 failed, 39 passed in 61.20s (0:01:01) (exit 1)", False)),
    ("red-ansi-crlf", Run(b"\x1b[31m\x1b[1m1 failed\x1b[0m, \x1b[32m2 passed\x1b[0m\x1b[31m in "
                          b"0.57s\x1b[0m\r\n"),
     ("red", "red.tests-failed", "pytest: 1 failed, 2 passed in 0.57s (exit 1)", False)),
    ("red-summary-in-stderr", Run(b"no summary here\n", b"== 2 failed, 2 warnings in 1.00s ==\n"),
     ("red", "red.tests-failed", "pytest: 2 failed, 2 warnings in 1.00s (exit 1)", False)),
    ("red-old-seconds-form", Run(b"1 failed in 0.10 seconds\n"),
     ("red", "red.tests-failed", "pytest: 1 failed in 0.10 seconds (exit 1)", False)),
    ("red-after-signal", Run(b"1 failed in 0.1s\n", returncode=-6),
     ("red", "red.tests-failed", "pytest: 1 failed in 0.1s (killed by signal 6 (SIGABRT))", False)),
    ("last-summary-wins", Run(b"1 failed in 0.1s\n3 passed in 0.2s\n"),
     ("red", "red.exit-1", "pytest: 3 passed in 0.2s (exit 1)", False)),
    ("stdout-summary-before-stderr", Run(b"3 passed in 0.2s\n", b"1 failed in 0.1s\n"),
     ("red", "red.exit-1", "pytest: 3 passed in 0.2s (exit 1)", False)),
    ("zero-count-proves-nothing", Run(b"0 failed, 3 passed in 0.1s\n"),
     ("red", "red.exit-1", "pytest: 0 failed, 3 passed in 0.1s (exit 1)", False)),
    ("collection-error", Run(b"_____ ERROR collecting test_b.py _____\nE   ImportError\n"
                             b"!!!! Interrupted: 1 error during collection !!!!\n1 error in 0.61s\n",
                             returncode=2),
     ("red", "red.collection-error", "pytest: 1 error in 0.61s (exit 2); ERROR collecting test_b.py",
      False)),
    ("collection-error-no-summary", Run(stderr=b"ERROR collecting tests/test_x.py\n", returncode=2),
     ("red", "red.collection-error", "exit 2; ERROR collecting tests/test_x.py", False)),
    ("test-errors", Run(b"E\n3 passed, 1 error in 0.20s\n"),
     ("red", "red.test-errors", "pytest: 3 passed, 1 error in 0.20s (exit 1)", False)),
    ("test-timeout-thread-method", Run(b".+++++++ Timeout +++++++\n~~~ Stack of MainThread ~~~\n"),
     ("red", "red.test-timeout", "exit 1: a per-test pytest-timeout fired; no pytest summary", False)),
    ("exit-1-no-summary", Run(b"something failed\n"),
     ("red", "red.exit-1", "exit 1 with no pytest summary (pytest: tests failed)", False)),
    # ---- other
    ("signal", Run(returncode=-9),
     ("other", "other.signal", "killed by signal 9 (SIGKILL)", False)),
    ("signal-with-summary", Run(b"3 passed in 0.1s\n", returncode=-11),
     ("other", "other.signal", "killed by signal 11 (SIGSEGV); pytest: 3 passed in 0.1s", False)),
    ("interrupted", Run(b"!!! KeyboardInterrupt !!!\n2 passed in 0.1s\n", returncode=2),
     ("other", "other.interrupted", "exit 2 (pytest: interrupted): 2 passed in 0.1s", False)),
    ("internal-error", Run(b"INTERNALERROR> boom\n", returncode=3),
     ("other", "other.internal-error", "exit 3 (pytest: internal error)", False)),
    ("usage-error", Run(stderr=b"ERROR: usage: pytest\n", returncode=4),
     ("other", "other.usage-error", "exit 4 (pytest: usage error)", False)),
    ("no-tests", Run(b"\nno tests ran in 0.01s\n", returncode=5),
     ("other", "other.no-tests", "exit 5 (pytest: no tests collected): no tests ran in 0.01s",
      False)),
    ("exit-status", Run(returncode=7),
     ("other", "other.exit-status", "exit 7", False)),
    ("returncode-saturated-high", Run(returncode=2**70),
     ("other", "other.exit-status", "exit 9223372036854775807", False)),
    ("returncode-saturated-low", Run(returncode=-(2**70)),
     ("other", "other.signal", "killed by signal 9223372036854775808", False)),
    ("killed-at-deadline-saturated", Run(timed_out=True, killed_at_deadline=2**64),
     ("timeout", "timeout.deadline", "the runner's deadline fired; 9223372036854775807 processes "
      "signalled, SIGTERM sufficed", True)),
    # ---- the pytest 9 grammar: items of up to three words, the last one counts
    ("subtests-q", Run(SUBTESTS),
     ("red", "red.tests-failed", "pytest: 2 failed, 1 passed, 2 subtests passed in 0.01s (exit 1)", False)),
    ("subtests-colour", Run(SUBTESTS_COLOUR),
     ("red", "red.tests-failed", "pytest: 2 failed, 1 passed, 2 subtests passed in 0.03s (exit 1)", False)),
    ("subtests-failed-counts", Run(b"3 passed, 2 subtests failed in 0.1s\n"),
     ("red", "red.tests-failed", "pytest: 3 passed, 2 subtests failed in 0.1s (exit 1)", False)),
    ("three-word-error-item", Run(b"1 passed, 1 setup teardown error in 0.1s\n"),
     ("red", "red.test-errors", "pytest: 1 passed, 1 setup teardown error in 0.1s (exit 1)", False)),
    ("failed-not-last-word-is-no-failure", Run(b"2 failed subtests in 0.1s\n"),
     ("red", "red.exit-1", "pytest: 2 failed subtests in 0.1s (exit 1)", False)),
    ("plugin-words", Run(b"== 3 passed, 1 rerun, 2 xfailed, 4 deselected, 5 warnings in 1.00s ==\n",
                         returncode=0),
     ("passed", "passed.exit-0", "exit 0: 3 passed, 1 rerun, 2 xfailed, 4 deselected, 5 warnings in 1.00s",
      False)),
    # ---- not pytest itself (tox, make): no claim about pytest's exit statuses
    ("wrapper-exit-1-is-not-red", Run(b"tox: commands failed\n", is_pytest=False),
     ("other", "other.exit-status", "exit 1", False)),
    ("wrapper-exit-3", Run(b"INTERNALERROR> boom\n", returncode=3, is_pytest=False),
     ("other", "other.exit-status", "exit 3", False)),
    ("wrapper-exit-5-with-summary", Run(b"no tests ran in 0.01s\n", returncode=5, is_pytest=False),
     ("other", "other.exit-status", "exit 5; pytest summary: no tests ran in 0.01s", False)),
    ("wrapper-summary-is-still-evidence", Run(b"=== 1 failed, 3 passed in 0.2s ===\n", returncode=2,
                                              is_pytest=False),
     ("red", "red.tests-failed", "pytest summary: 1 failed, 3 passed in 0.2s (exit 2)", False)),
    ("wrapper-collection-error", Run(b"ERROR collecting t.py\n1 error in 0.1s\n", returncode=2,
                                     is_pytest=False),
     ("red", "red.collection-error", "pytest summary: 1 error in 0.1s (exit 2); ERROR collecting t.py",
      False)),
    ("wrapper-exit-2-is-not-collection", Run(b"ERROR collecting t.py\n", returncode=2, is_pytest=False),
     ("other", "other.exit-status", "exit 2", False)),
    ("wrapper-signal", Run(b"3 passed in 0.1s\n", returncode=-11, is_pytest=False),
     ("other", "other.signal", "killed by signal 11 (SIGSEGV); pytest summary: 3 passed in 0.1s", False)),
    ("wrapper-test-timeout", Run(b"+++ Timeout +++\n3 passed in 0.1s\n", is_pytest=False),
     ("red", "red.test-timeout", "exit 1: a per-test pytest-timeout fired; pytest summary: 3 passed in 0.1s",
      False)),
    # ---- pytest could not start, or found nothing to run
    ("environment-no-pytest", Run(stderr=NO_PYTEST),
     ("other", "other.environment", "exit 1 before pytest started: pytest is not importable: "
      "/v/bin/python: No module named pytest", False)),
    ("environment-in-a-wrapper", Run(stderr=NO_PYTEST, returncode=2, is_pytest=False),
     ("other", "other.environment", "exit 2 before pytest started: pytest is not importable: "
      "/v/bin/python: No module named pytest", False)),
    ("environment-needs-no-summary", Run(NO_PYTEST + b"1 failed in 0.1s\n"),
     ("red", "red.tests-failed", "pytest: 1 failed in 0.1s (exit 1)", False)),
    ("no-test-files-crash", Run(stderr=NO_TEST_FILES),
     ("other", "other.no-tests", f"exit 1: the configured testpaths hold no test files: {NO_TEST_FILES_QUOTE}",
      False)),
    ("no-test-files-any-exit-status", Run(stderr=NO_TEST_FILES, returncode=3, is_pytest=False),
     ("other", "other.no-tests", f"exit 3: the configured testpaths hold no test files: {NO_TEST_FILES_QUOTE}",
      False)),
    ("no-test-files-but-tests-failed", Run(NO_TEST_FILES + b"1 failed in 0.1s\n"),
     ("red", "red.tests-failed", "pytest: 1 failed in 0.1s (exit 1)", False)),
]

# Lines that look like a summary but are not one (the run exits 1, so red.exit-1 without it).
NOT_SUMMARIES = [
    b"1 failed, 2 passed in 0.3x",
    b"collected 3 items in 0.1s",
    b"1 failed,2 passed in 0.1s",
    b"1 Failed in 0.1s",
    b"FAILED test_x.py::test_a - assert 1 in 0.5s",
    b"1 failed in 0.1s and then some",
    b"1 failed in .1s",
    b"1 failed in 0.1s ()",
    b"= 1 failed =in 0.1s",
    b"1 failed \x1b[0min 0.1s",  # a colour code inside " in " (pytest never does this)
    b"=" * 4100 + b" 1 failed in 0.1s",  # would parse, but longer than SUMMARY_LINE_MAX
    b"1 a b c failed in 0.1s",  # four words in one item
    b"1 failed  in 0.1s",
    b"1 in 0.1s",  # an item needs a word, and " in <digit>" is never one
    b"1 failed in 0.1s in 0.2s",
    b"1 fa1led in 0.1s",
    b"1 failed, in 0.1s",
]


COUNT_WORDS = ["passed", "failed", "error", "errors", "skipped", "xfailed", "xpassed", "warning",
               "warnings", "deselected", "rerun"]


@pytest.mark.parametrize("word", COUNT_WORDS)
def test_every_count_word(classify: Classify, word: str) -> None:
    rule = {"failed": "red.tests-failed", "error": "red.test-errors", "errors": "red.test-errors"}
    verdict = classify(*Run(f"3 {word} in 0.10s\n".encode()))
    assert verdict == ("red", rule.get(word, "red.exit-1"), f"pytest: 3 {word} in 0.10s (exit 1)", False)


@pytest.mark.parametrize("words", ["subtests passed", "subtests failed", "a b c", "in x"])
def test_multi_word_items(classify: Classify, words: str) -> None:
    rule = "red.tests-failed" if words.endswith("failed") else "red.exit-1"
    verdict = classify(*Run(f"1 passed, 2 {words} in 0.10s\n".encode()))
    assert verdict == ("red", rule, f"pytest: 1 passed, 2 {words} in 0.10s (exit 1)", False)


@pytest.mark.parametrize("sep", [b"\n", b"\r"])
def test_summary_line_length_limit(classify: Classify, sep: bytes) -> None:
    core = b" 1 failed in 0.1s"
    at_limit = b"=" * (_classify_py.SUMMARY_LINE_MAX - len(core)) + core
    for tail in (b"", b"=" * 5):  # the window ends exactly at, or beyond, the anchor's line end
        line = at_limit[len(tail):] + tail
        assert classify(*Run(b"x" + sep + line + sep))[1] == "red.tests-failed"
        assert classify(*Run(b"x" + sep + b"=" + line + sep))[1] == "red.exit-1"
        assert classify(*Run(b"=" + line))[1] == "red.exit-1"


@pytest.mark.parametrize(
    "log, rule",
    [
        (b"1 failed in 0.1s\r x in y in 1 in z in 1x\r", "red.tests-failed"),  # lookalikes after it
        (b"1 failed in 0.1s\n in ", "red.tests-failed"),  # " in " at the very end
        (b"1 failed in 0.1s\r" + b"\x00 in 1\x00" * 1000 + b"\r", "red.tests-failed"),
        (b"1 failed in 0.1s" + b" in 1" * 1000, "red.exit-1"),  # anchors all over one line
        (b"1 failed in 0.1s\x00\n", "red.exit-1"),  # a NUL is not trimmed
        (b"\x001 failed in 0.1s\n", "red.exit-1"),
        (b"1 failed in 0.1s\r" + b"=" * 5000 + b" in 1 " + b"=" * 5000, "red.tests-failed"),
    ],
    ids=["lookalikes", "anchor-at-end", "nul-lines", "one-line", "nul-after", "nul-before",
         "too-long-line-after"],
)
def test_lookalike_anchors(classify: Classify, log: bytes, rule: str) -> None:
    assert classify(*Run(log))[1] == rule


@pytest.mark.parametrize(
    "line, is_summary",
    [
        (b"\x1b[2 q1 failed in 0.1s", True),  # a CSI with an intermediate byte
        (b"\x1b[?25l1 failed in 0.1s\x1b[?25h", True),
        (b"\x1b[38;5;196m1 failed\x1b[0m in 0.1s\x1b[0m", True),
        (b"\x1b1 failed in 0.1s", False),  # a lone ESC is not a colour code
        (b"\x1b[12\x1b[m1 failed in 0.1s", False),  # an unfinished CSI stays text
        (b"1 failed in 0.1s\x1b[", False),
    ],
)
def test_ansi_escapes(classify: Classify, line: bytes, is_summary: bool) -> None:
    assert (classify(*Run(line + b"\n"))[1] == "red.tests-failed") is is_summary


@pytest.mark.parametrize("run, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rule(classify: Classify, run: Run, expected: tuple[str, str, str, bool]) -> None:
    assert classify(*run) == expected


@pytest.mark.parametrize("line", NOT_SUMMARIES, ids=range(len(NOT_SUMMARIES)))
def test_not_a_summary(classify: Classify, line: bytes) -> None:
    assert classify(*Run(line + b"\n")) == (
        "red", "red.exit-1", "exit 1 with no pytest summary (pytest: tests failed)", False)


def test_every_rule_is_covered_and_documented() -> None:
    covered = {expected[1] for _, _, expected in CASES}
    assert covered == set(_classify_py.RULES)
    doc = (Path(__file__).resolve().parents[1] / "docs" / "verdicts.md").read_text()
    for rule in _classify_py.RULES:
        assert f"`{rule}`" in doc


def test_lock_message_matches_the_gate() -> None:
    assert _classify_py.LOCK_BUSY_MESSAGE == proc_group.LOCK_BUSY_MESSAGE.encode()


def test_signal_names_agree(twins: tuple[Classify, Classify]) -> None:
    python, native = twins
    for signum in range(1, 70):
        run = Run(returncode=-signum)
        assert python(*run) == native(*run), signum
    assert python(*Run(returncode=-int(signal.SIGTERM)))[2] == "killed by signal 15 (SIGTERM)"


class Status(IntEnum):
    FAILED = 1

    def __str__(self) -> str:  # must not leak into the reason
        return "nope"


def test_int_subclass_is_read_as_its_value(classify: Classify) -> None:
    assert classify(*Run(returncode=Status.FAILED)) == classify(*Run(returncode=1))


@pytest.mark.parametrize(
    "position, bad",
    [(0, "text"), (0, bytearray(b"x")), (0, None), (1, memoryview(b"")), (2, "1"), (2, 1.0),
     (2, True), (3, 1), (3, None), (4, b"err"), (4, 3), (5, 0), (6, None), (6, False), (6, 1.5),
     (7, 1), (7, None), (7, "yes")],
)
def test_wrong_types_raise_type_error(classify: Classify, position: int, bad: object) -> None:
    args: list[object] = list(Run())
    args[position] = bad
    with pytest.raises(TypeError):
        classify(*args)


def test_wrong_argument_count_raises_type_error(classify: Classify) -> None:
    with pytest.raises(TypeError):
        classify(*Run()[:7])
    with pytest.raises(TypeError):
        classify(*Run(), True)
    with pytest.raises(TypeError):
        classify(*Run()[:7], is_pytest=True)


# --------------------------------------------------------------------------- random input

# Pieces that steer random output towards the interesting paths of the scanner.
PIECES = [b" in ", b" in 1", b"1 failed", b", ", b"2 passed", b" error", b"s", b" (0:00:01)",
          b"no tests ran", b"=====", b"\n", b"\r", b"\r\n", b"\x1b[31m", b"\x1b[", b"\x1b",
          b"0.31", b"database is locked", b"ERROR collecting", b"+++ Timeout +++",
          b".lock': File exists", b"retest: repository lock busy", b"\xff", b"_", b" ",
          b"\x00", b" in x", b" in 1 in 1", b"2 subtests passed", b"No module named pytest",
          b"No files were found in testpaths", b"FAILED (failures=", b"FAILED (errors=", b"1)",
          b"\nRan ", b"0 tests in ", b" test in ", b"\n\nOK (skipped=", b"3", b")"]
noisy_bytes = st.lists(st.one_of(st.sampled_from(PIECES), st.binary(max_size=8)), max_size=40).map(
    b"".join)
ANSI_CODES = [b"\x1b[31m", b"\x1b[0m", b"\x1b[1;32m", b"\x1b[2 q", b"\x1b[?25h", b"\x1b[", b"\x1b"]
DURATIONS = [b"0.31s", b"12s", b"61.20s (0:01:01)", b"0.10 seconds", b"0.5x", b"1.s", b"3s ()"]


@st.composite
def summary_lines(draw: st.DrawFn) -> bytes:
    """Valid summary lines, then colour codes and small edits: the parser's hard cases."""
    if draw(st.integers(0, 5)) == 0:
        body = b"no tests ran"
    else:
        counts = draw(st.lists(st.tuples(st.integers(0, 12), st.sampled_from(COUNT_WORDS)),
                               min_size=1, max_size=4))
        body = b", ".join(b"%d %s" % (n, w.encode()) for n, w in counts)
    line = body + b" in " + draw(st.sampled_from(DURATIONS))
    decoration = b"=" * draw(st.integers(0, 3))
    line = decoration + (b" " if decoration else b"") + line + (b" " if decoration else b"") + decoration
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(line)))
        line = line[:at] + draw(st.sampled_from(ANSI_CODES)) + line[at:]
    if draw(st.booleans()):
        at = draw(st.integers(0, len(line)))
        line = line[:at] + draw(st.binary(max_size=2)) + line[at + draw(st.integers(0, 2)):]
    return line


log_with_summaries = st.lists(st.one_of(summary_lines(), noisy_bytes), max_size=5).flatmap(
    lambda lines: st.sampled_from([b"\n", b"\r\n", b"\r"]).map(lambda sep: sep.join(lines)))

any_run = st.builds(
    Run,
    stdout=st.one_of(st.binary(max_size=300), noisy_bytes, log_with_summaries),
    stderr=st.one_of(st.binary(max_size=100), noisy_bytes, log_with_summaries),
    returncode=st.one_of(st.none(), st.integers(-70, 260), st.integers()),
    timed_out=st.booleans(),
    spawn_error=st.one_of(st.none(), st.text(max_size=20)),
    escalated=st.booleans(),
    killed_at_deadline=st.integers(),
    is_pytest=st.booleans(),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(run=any_run)
def test_random_input_python_never_crashes(run: Run) -> None:
    kind, rule, reason, infra = _classify_py.classify(*run)
    assert _classify_py.RULES[rule] == (kind, infra)
    assert isinstance(reason, str) and reason


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(run=any_run)
def test_random_input_twins_agree(twins: tuple[Classify, Classify], run: Run) -> None:
    python, native = twins
    assert native(*run) == python(*run)


# Output with no "\n" at all, NULs, lookalike anchors and lines near the 4096-byte summary limit
# and the quote window: the inputs of issue 9. Long runs come from repeating a piece.
CR_PIECES = [b"\r", b"\x00", b" in ", b" in x", b" in 1", b"1 failed in 0.1s", b"2 subtests passed",
             b"=", b"x", b"\xff\xfe", b"\x1b[31m", b"database is locked", b"ERROR collecting",
             b"No module named pytest", b"No files were found in testpaths", b"FAILED (failures="]
cr_only_bytes = st.lists(
    st.tuples(st.sampled_from(CR_PIECES), st.sampled_from([1, 2, 50, 99, 100, 101, 200, 4080, 4096, 4100])),
    max_size=6,
).map(lambda parts: b"".join(piece * (count if len(piece) == 1 else 1 + count // 40)
                             for piece, count in parts))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stdout=st.one_of(cr_only_bytes, st.binary(max_size=5000)), stderr=cr_only_bytes,
       returncode=st.sampled_from([1, 2, 3, 5, -9, 7]), is_pytest=st.booleans())
def test_cr_only_nul_and_lookalikes_twins_agree(twins: tuple[Classify, Classify], stdout: bytes,
                                                 stderr: bytes, returncode: int, is_pytest: bool) -> None:
    python, native = twins
    run = Run(stdout, stderr, returncode, is_pytest=is_pytest)
    assert native(*run) == python(*run)


def _naive_bounds(buf: bytes, pos: int) -> tuple[int, int]:
    """The line holding pos, found the obvious way (the definition the bounded search keeps)."""
    start = max(buf.rfind(b"\n", 0, pos), buf.rfind(b"\r", 0, pos)) + 1
    ends = [i for i in (buf.find(b"\n", pos), buf.find(b"\r", pos)) if i >= 0]
    return start, min(ends, default=len(buf))


@settings(max_examples=300, deadline=None)
@given(buf=st.one_of(cr_only_bytes, st.binary(max_size=300)), data=st.data())
def test_bounded_line_search_matches_the_definition(buf: bytes, data: st.DataObject) -> None:
    pos = data.draw(st.integers(0, len(buf)))
    floor = data.draw(st.integers(0, pos))
    ceiling = data.draw(st.integers(pos, len(buf) + 5))
    start, stop = _naive_bounds(buf, pos)
    assert _classify_py._line_start(buf, pos, floor) == (start if start >= floor else floor - 1)
    assert _classify_py._line_end(buf, pos, ceiling) == (stop if stop <= ceiling else ceiling + 1)


@pytest.mark.parametrize("unit", [b"\r[####      ] 42% eta in 1 min, x in y in ", b"\r in 1",
                                  b"\r" + b" in 1" * 1000, b" in 1\x00"],
                         ids=["progress-bar", "anchors", "long-lines", "one-line"])
def test_line_search_work_is_linear(monkeypatch: pytest.MonkeyPatch, unit: bytes) -> None:
    # Machine-independent: count the bytes the twin's line-break searches look at.
    read = [0]
    last_break, first_break = _classify_py._last_break, _classify_py._first_break

    def counting_last(buf: bytes, low: int, high: int) -> int:
        found = last_break(buf, low, high)
        read[0] += high - max(found, low)
        return found

    def counting_first(buf: bytes, low: int, high: int) -> int:
        found = first_break(buf, low, high)
        read[0] += found - low
        return found

    monkeypatch.setattr(_classify_py, "_last_break", counting_last)
    monkeypatch.setattr(_classify_py, "_first_break", counting_first)
    for size in (64 * 1024, 256 * 1024):
        read[0] = 0
        buf = unit * (size // len(unit))
        assert _classify_py.classify(*Run(buf))[1] == "red.exit-1"
        assert read[0] <= 2 * len(buf), (size, read[0])  # before issue 9: ~len(buf)**2 / 500


# --------------------------------------------------------------------------- large input

MB = 1024 * 1024


def _pathological_log(size: int, seed: int) -> bytes:
    """``size`` bytes built to hurt a naive scanner: near-summaries, a huge line, escapes."""
    rng = random.Random(seed)
    shapes = [
        b"1 failed, 2 passed in 0.3x\n",  # parses almost to the end
        b"x in 1s\n",  # an anchor on every line
        b'  File "x.py", line 1, in f\n',
        b"\x1b[31m1 failed\x1b[0m, \x1b[32m2 passed in 0.5x\x1b[0m\r\n",
        b"=" * 79 + b"\n",
        b"database is lock\n",
        b"\x1b[1;2;3;4;5;6;7;8",  # escapes that never end
    ]
    parts = []
    total = 0
    while total < size:
        if rng.random() < 0.02:
            chunk = b"1 failed, 2 passed, " * rng.randrange(10_000, 200_000)  # one huge line
        else:
            chunk = rng.choice(shapes) * rng.randrange(1, 20_000)
        parts.append(chunk)
        total += len(chunk)
    return b"".join(parts)[:size]


@pytest.mark.parametrize(
    "prefix, rule",
    [(b"", "red.exit-1"), (b"1 failed, 1 passed in 0.10s\n", "red.tests-failed")],
    ids=["no-summary", "summary-at-the-very-start"],
)
def test_50_mb_pathological_log(twins: tuple[Classify, Classify], prefix: bytes, rule: str) -> None:
    # Completion and agreement only: timing belongs to the benchmarks.
    python, native = twins
    log = prefix + _pathological_log(50 * MB, seed=110)
    run = Run(log, log[: 5 * MB], returncode=1)
    verdict = native(*run)
    assert verdict[1] == rule
    assert python(*run) == verdict


def test_large_log_with_summary_at_the_end(classify: Classify) -> None:
    log = b"test_x.py::test_a PASSED    [ 50%]\n" * (50 * MB // 35) + b"\n= 7 passed in 9.00s =\n"
    assert classify(*Run(log, returncode=0)) == ("passed", "passed.exit-0", "exit 0: 7 passed in 9.00s",
                                                 False)


# --------------------------------------------------------------------------- real pytest runs


def _run_pytest(tmp_path: Path, sources: dict[str, str], *options: str, with_path: bool = True) -> Run:
    """Run a tiny real suite under pytest and return what classify() would be given; without
    ``with_path`` pytest gets no path argument and reads its ``testpaths``."""
    for name, text in sources.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    # Only the plugins a suite asks for: keeps each run near 0.3 s instead of 1 s.
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *options,
         *([str(tmp_path)] if with_path else [])],
        capture_output=True, cwd=tmp_path, env=env, timeout=60,
    )
    return Run(proc.stdout, proc.stderr, proc.returncode)


PASSING = {"test_ok.py": "def test_a(): pass\ndef test_b(): pass\ndef test_c(): pass\n"}
ONE_FAILING = {"test_mixed.py": "def test_a(): pass\ndef test_b(): pass\ndef test_c(): assert 1 == 2\n"}
BROKEN_IMPORT = {"test_broken.py": "import no_such_module_for_retest\ndef test_a(): pass\n"}
PER_TEST_TIMEOUT = {"test_slow.py": """
    import time
    import pytest

    def test_quick():
        pass

    @pytest.mark.timeout(0.5)
    def test_slow():
        time.sleep(5)
    """}


SUBTESTS_SUITE = {"test_sub.py": """
    def test_a(subtests):
        for i in range(3):
            with subtests.test(i=i):
                assert i != 1

    def test_b():
        pass
    """}


def test_real_subtests_summary(classify: Classify, tmp_path: Path) -> None:
    if not hasattr(pytest, "Subtests"):
        pytest.skip("pytest < 9 has no built-in subtests")
    for colour in ("no", "yes"):
        run = _run_pytest(tmp_path, SUBTESTS_SUITE, f"--color={colour}")
        kind, rule, reason, infra = classify(*run)
        assert (kind, rule, infra) == ("red", "red.tests-failed", False)
        assert reason.startswith("pytest: 2 failed, 1 passed, 2 subtests passed in "), reason


def test_real_testpaths_warning_as_error(classify: Classify, tmp_path: Path) -> None:
    # No path argument, so pytest reads testpaths; the warning, made an error, is a crash.
    (tmp_path / "pytest.ini").write_text("[pytest]\ntestpaths = nothere\nfilterwarnings = error\n")
    run = _run_pytest(tmp_path, PASSING, with_path=False)
    kind, rule, reason, infra = classify(*run)
    assert (kind, rule, infra) == ("other", "other.no-tests", False)
    assert reason.startswith("exit 1: the configured testpaths hold no test files: "
                             "pytest.PytestConfigWarning: No files were found in testpaths;"), reason


def test_real_pytest_not_importable(tmp_path: Path) -> None:
    # -S: no site-packages, so this interpreter has no pytest, as a venv without it.
    # probe=False: the output rule itself (with the probe, the events say the same: test_probe.py).
    result = proc_group.run([sys.executable, "-S", "-m", "pytest", "-q"], cwd=tmp_path, timeout=60,
                            probe=False)
    verdict = proc_group.classify(result)
    assert (verdict.kind, verdict.rule) == ("other", "other.environment")
    assert verdict.reason == (f"exit 1 before pytest started: pytest is not importable: "
                              f"{sys.executable}: No module named pytest")


@pytest.mark.parametrize("suite, rule_311", [
    ({}, "other.no-tests"),
    ({"test_s.py": "import unittest\nclass T(unittest.TestCase):\n    @unittest.skip('no')\n"
                   "    def test_a(self): pass\n"}, "other.no-tests"),
    ({"test_p.py": "import unittest\nclass T(unittest.TestCase):\n    def test_a(self): pass\n"},
     "passed.exit-0"),
], ids=["no-test", "all-skipped", "one-passed"])
def test_real_unittest(tmp_path: Path, suite: dict[str, str], rule_311: str) -> None:
    """``python -m unittest`` run by the runner: a suite that found or ran nothing is not a
    pass. Python 3.12 and later exit 5 for ``Ran 0 tests`` themselves (not pytest: exit 5 is
    ``other.exit-status``); an all-skipped run still exits 0 there."""
    for name, text in suite.items():
        (tmp_path / name).write_text(text)
    verdict = proc_group.classify(proc_group.run([sys.executable, "-m", "unittest"], cwd=tmp_path,
                                                 timeout=60))
    expected = rule_311 if suite or sys.version_info < (3, 12) else "other.exit-status"
    assert verdict.rule == expected, verdict.reason
    assert verdict.kind == ("passed" if expected == "passed.exit-0" else "other")


def test_real_wrapper_is_not_pytest(tmp_path: Path) -> None:
    for name, text in ONE_FAILING.items():
        (tmp_path / name).write_text(text)
    pytest_cmd = f"{sys.executable} -m pytest -q -p no:cacheprovider {tmp_path}"
    failing = proc_group.classify(proc_group.run(["sh", "-c", f"{pytest_cmd}; exit 2"], timeout=60))
    assert failing.rule == "red.tests-failed"
    assert failing.reason.startswith("pytest summary: 1 failed, 2 passed in ")
    assert failing.reason.endswith("s (exit 2)")
    quiet = proc_group.classify(proc_group.run(["sh", "-c", "echo boom; exit 3"], timeout=60))
    assert (quiet.kind, quiet.rule, quiet.reason) == ("other", "other.exit-status", "exit 3")


@pytest.mark.parametrize(
    "argv, expected",
    [(["pytest"], True), (["/v/bin/pytest", "-q"], True), (["py.test"], True), (["pytest-3"], True),
     (["pytest3.11"], True), (["python", "-m", "pytest"], True), (["python3.11", "-mpytest"], True),
     (["/usr/bin/pypy3", "-Bm", "pytest"], True), (["python3", "-X", "dev", "-Werror", "-m", "pytest"], True),
     (["python3.13t", "-I", "-m", "pytest", "-x"], True),
     ([], False), (["tox"], False), (["make", "test"], False), (["sh", "-c", "pytest"], False),
     (["pytestx"], False), (["python", "-m", "tox"], False), (["python", "-m", "pytest_cov"], False),
     (["python", "run.py", "-m", "pytest"], False), (["python", "-c", "0", "-m", "pytest"], False),
     (["python", "--version", "-m", "pytest"], False), (["python", "-m"], False),
     (["python3.x", "-m", "pytest"], False)],
)
def test_is_pytest_argv(argv: list[str], expected: bool) -> None:
    assert probe.is_pytest_argv(argv) is expected


def test_real_passing_suite(classify: Classify, tmp_path: Path) -> None:
    run = _run_pytest(tmp_path, PASSING)
    kind, rule, reason, infra = classify(*run)
    assert (kind, rule, infra) == ("passed", "passed.exit-0", False)
    assert reason.startswith("exit 0: 3 passed in ")


def test_real_failing_suite(classify: Classify, tmp_path: Path) -> None:
    run = _run_pytest(tmp_path, ONE_FAILING)
    kind, rule, reason, infra = classify(*run)
    assert (kind, rule, infra) == ("red", "red.tests-failed", False)
    assert reason.startswith("pytest: 1 failed, 2 passed in ") and reason.endswith("s (exit 1)")


def test_real_failing_suite_in_colour(classify: Classify, tmp_path: Path) -> None:
    run = _run_pytest(tmp_path, ONE_FAILING, "--color=yes")
    assert b"\x1b[" in run.stdout
    assert classify(*run)[1] == "red.tests-failed"


def test_real_collection_error(classify: Classify, tmp_path: Path) -> None:
    run = _run_pytest(tmp_path, BROKEN_IMPORT)
    kind, rule, reason, infra = classify(*run)
    assert (kind, rule, infra) == ("red", "red.collection-error", False)
    assert reason.startswith("pytest: 1 error in ")
    assert reason.endswith("(exit 2); ERROR collecting test_broken.py")


def test_real_no_tests(classify: Classify, tmp_path: Path) -> None:
    run = _run_pytest(tmp_path, {})
    kind, rule, reason, infra = classify(*run)
    assert (kind, rule, infra) == ("other", "other.no-tests", False)
    assert reason.startswith("exit 5 (pytest: no tests collected): no tests ran in ")


@pytest.mark.parametrize("method", ["signal", "thread"])
def test_real_per_test_timeout_is_red(classify: Classify, tmp_path: Path, method: str) -> None:
    # pytest-timeout inside a suite that finished: the branch is at fault, not the runner.
    run = _run_pytest(tmp_path, PER_TEST_TIMEOUT, "-p", "pytest_timeout", "-o",
                      f"timeout_method={method}")
    kind, rule, reason, infra = classify(*run)
    assert (kind, infra) == ("red", False)
    if method == "signal":
        assert rule == "red.tests-failed"
        assert reason.startswith("pytest: 1 failed, 1 passed in ")
    else:  # os._exit(1) after the stack dump: no summary at all
        assert (rule, reason) == ("red.test-timeout",
                                  "exit 1: a per-test pytest-timeout fired; no pytest summary")
