"""``retest run`` as a drop-in for GNU ``timeout``: the same command lines through both.

Each case runs ``timeout ARGS...`` and ``retest run ARGS...`` with the very same ARGS and
compares the exit statuses (124 deadline, 125 could not start, 126, 127, 137 SIGKILL,
``--preserve-status``), then checks the status is the one GNU documents. The differences
retest keeps on purpose (usage errors are 2, not 125; ``--`` always starts CMD) are asserted
too, so the README's compatibility table cannot drift from the code.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(shutil.which("timeout") is None, reason="GNU timeout not installed")

#: A Python child that exits 7 on SIGINT (and says which signal it got).
ON_INT_EXIT_7 = ("import os, signal, time\n"
                 "signal.signal(signal.SIGINT, lambda *a: os._exit(7))\n"
                 "time.sleep(10)\n")


def gnu(*args: str) -> subprocess.CompletedProcess:
    """GNU timeout, its status as a shell's ``$?`` (it dies of the SIGKILL it sends to its own
    group, and re-raises a signal that killed the command: ``-N`` here is 128+N there)."""
    done = subprocess.run(["timeout", *args], capture_output=True, timeout=60)
    if done.returncode < 0:
        done.returncode = 128 - done.returncode
    return done


def retest_run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "retest", "run", "-q", "--no-progress", *args],
                          capture_output=True, timeout=60, env=dict(os.environ, **(env or {})))


CASES = {
    "deadline-124": (["0.3", "sleep", "5"], 124),
    "no-deadline-own-status": (["5", "sh", "-c", "exit 3"], 3),
    "zero-is-no-deadline": (["0", "sh", "-c", "sleep 0.5; exit 4"], 4),
    "suffix-m": (["1m", "true"], 0),
    "suffix-d": (["0.01d", "true"], 0),
    "exponent": (["1e-1", "sleep", "5"], 124),
    "inf": (["inf", "true"], 0),
    "not-found-127": (["5", "retest-no-such-command-xyz"], 127),
    "cannot-execute-126": (["5", "/etc/passwd"], 126),
    "killed-by-signal-128+n": (["5", "sh", "-c", "kill -USR1 $$"], 128 + 10),
    "signal-kill-137": (["-s", "KILL", "0.3", "sleep", "5"], 137),
    "signal-number-9": (["-s", "9", "0.3", "sleep", "5"], 137),
    "signal-lowercase-sig": (["-s", "sigkill", "0.3", "sleep", "5"], 137),
    "signal-usr1-still-124": (["-s", "SIGUSR1", "0.3", "sleep", "5"], 124),
    "kill-after-137": (["-k", "0.3", "0.3", "sh", "-c", "trap '' TERM; sleep 5"], 137),
    "kill-after-unused-124": (["-k", "1m", "0.3", "sleep", "5"], 124),
    "long-kill-after": (["--kill-after=0.3", "0.3", "sh", "-c", "trap '' TERM; sleep 5"], 137),
    "preserve-status-term": (["--preserve-status", "0.3", "sleep", "5"], 128 + 15),
    "preserve-status-int": (["--preserve-status", "-s", "INT", "0.3", "sleep", "5"], 128 + 2),
    "preserve-status-kill": (["--preserve-status", "-s", "KILL", "0.3", "sleep", "5"], 137),
    "preserve-status-own-exit": (["--preserve-status", "-s", "INT", "1.5", sys.executable, "-c",
                                  ON_INT_EXIT_7], 7),
    "signal-int-handled-124": (["-s", "INT", "1.5", sys.executable, "-c", ON_INT_EXIT_7], 124),
    "foreground": (["--foreground", "0.3", "sleep", "5"], 124),
    "options-after-command-are-its-own": (["5", "sh", "-c", "exit 5", "-s", "KILL"], 5),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_same_command_line_same_exit_status(case: str, native: str) -> None:
    args, documented = CASES[case]
    ours, theirs = retest_run(*args), gnu(*args)
    assert (ours.returncode, theirs.returncode) == (documented, documented), ours.stderr.decode()


def test_verbose_says_which_signals_were_sent(native: str) -> None:
    args = ["-v", "-k", "0.3", "0.3", "sh", "-c", "trap '' TERM; sleep 5"]
    ours, theirs = retest_run(*args), gnu(*args)
    assert ours.returncode == theirs.returncode == 137
    for stderr in (ours.stderr.decode(), theirs.stderr.decode()):
        assert "signal TERM to command" in stderr and "signal KILL to command" in stderr


#: Run CMD with RLIMIT_NPROC 1 (as nobody when root, whose limit the kernel does not enforce):
#: GNU timeout cannot fork the command, retest cannot start its shepherd. Both are "the
#: runner itself failed": 125. Everything retest needs is imported before the drop (a pyenv
#: interpreter's stdlib under /root is unreadable to nobody: argparse's lazy gettext/locale).
NPROC_1 = textwrap.dedent("""
    import locale, os, resource, sys
    import retest.cli, retest.proc_group, retest.redact, retest.facts, retest.probe
    retest.cli.build_parser().parse_args(["run", "-q", "--", "true"])
    if os.geteuid() == 0:
        os.setgroups([]); os.setgid(65534); os.setuid(65534)
    resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))
    if sys.argv[1] == "gnu":
        os.execvp("timeout", ["timeout", *sys.argv[2:]])
    sys.exit(retest.cli.main(["run", "-q", *sys.argv[2:]]))
""")


def test_runner_that_cannot_start_the_command_is_125(native: str) -> None:
    statuses = [subprocess.run([sys.executable, "-c", NPROC_1, tool, "5", "true"], cwd="/",
                               capture_output=True, timeout=60).returncode
                for tool in ("retest", "gnu")]
    assert statuses == [125, 125]


@pytest.mark.parametrize("args", [["--bogus", "1", "true"], ["1x", "true"], ["-s", "BOGUS", "1", "true"],
                                  ["-1", "true"], ["5"], []],
                         ids=["unknown-option", "bad-duration", "bad-signal", "negative", "no-command",
                              "nothing"])
def test_usage_errors_are_2_where_gnu_says_125(args: list[str]) -> None:
    """A documented difference: 125 is retest's "internal error" (DESIGN.md); usage is 2."""
    ours, theirs = retest_run(*args), gnu(*args)
    assert (ours.returncode, theirs.returncode) == (2, 125)
    assert ours.stderr.decode().startswith("usage: retest run")


def test_double_dash_always_starts_the_command(native: str) -> None:
    """A documented difference: GNU reads `timeout 0.3 -- sleep 5` as the command `--`."""
    assert (retest_run("0.3", "--", "sleep", "5").returncode, gnu("0.3", "--", "sleep", "5").returncode) \
        == (124, 127)
    assert retest_run("--", "sh", "-c", "exit 6").returncode == 6  # no deadline


def test_timeout_option_takes_durations_and_zero_is_none(native: str) -> None:
    assert retest_run("--timeout", "0.005m", "--", "sleep", "5").returncode == 124
    assert retest_run("--timeout", "0", "--", "sh", "-c", "sleep 0.5; exit 4").returncode == 4
    both = retest_run("--timeout", "1", "2", "true")
    assert both.returncode == 2 and b"given twice" in both.stderr
