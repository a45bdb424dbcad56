"""``retest run``: exit statuses as GNU timeout, --json, live output, the verdict line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def retest(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "retest", *args], capture_output=True,
                          timeout=timeout, env=full_env)


@pytest.mark.parametrize("code", [0, 1, 3, 77])
def test_exit_status_is_the_commands_own(code: int, backend: str) -> None:
    env = {"SUBPROCESS_TREE_KILL_ENABLED": str(backend == "native").lower()}
    proc = retest("run", "--", sys.executable, "-c", f"raise SystemExit({code})", env=env)
    assert proc.returncode == code


def test_deadline_is_124_and_says_timeout(backend: str) -> None:
    env = {"SUBPROCESS_TREE_KILL_ENABLED": str(backend == "native").lower()}
    proc = retest("run", "--timeout", "0.3", "--grace", "0.2", "--", "sleep", "5", env=env)
    assert proc.returncode == 124
    assert b"retest: timeout (timeout.deadline)" in proc.stderr


def test_not_found_is_127(backend: str) -> None:
    env = {"SUBPROCESS_TREE_KILL_ENABLED": str(backend == "native").lower()}
    proc = retest("run", "--", "retest-no-such-command-xyz", env=env)
    assert proc.returncode == 127
    assert b"retest: other" in proc.stderr


def test_not_executable_is_126(tmp_path: Path, backend: str) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    env = {"SUBPROCESS_TREE_KILL_ENABLED": str(backend == "native").lower()}
    proc = retest("run", "--", str(script), env=env)
    assert proc.returncode == 126


def test_killed_by_signal_is_128_plus_n(native: str) -> None:
    proc = retest("run", "--", "sh", "-c", "kill -USR1 $$")
    assert proc.returncode == 128 + 10


def test_output_streams_live_and_verdict_on_stderr(native: str) -> None:
    proc = retest("run", "--", "sh", "-c", "echo to-out; echo to-err >&2")
    assert proc.returncode == 0
    assert proc.stdout == b"to-out\n"
    assert proc.stderr.startswith(b"to-err\n")
    last = proc.stderr.decode().strip().splitlines()[-1]
    assert last.startswith("retest: passed (passed.exit-0)")
    assert "backend=native" in last


def test_json_has_the_contract_fields(native: str) -> None:
    proc = retest("run", "--json", "--timeout", "10", "--", "sh", "-c", "echo x; exit 1")
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    for key in ("verdict", "rule", "reason", "returncode", "timed_out", "duration_s"):
        assert key in doc
    assert doc["returncode"] == 1 and doc["timed_out"] is False and doc["backend"] == "native"
    assert doc["verdict"] in ("red", "other")


def test_example_suite_passes_through_the_cli(native: str) -> None:
    proc = retest("run", "--timeout", "120", "--", sys.executable, "-m", "pytest", "-q",
                  "-p", "no:cacheprovider", str(REPO / "examples" / "suite"))
    assert proc.returncode == 0, proc.stderr
    assert b"passed" in proc.stdout
    assert b"retest: passed" in proc.stderr


def test_no_command_is_a_usage_error() -> None:
    proc = retest("run")
    assert proc.returncode == 2  # argparse's status; 125 is "internal error" (issue 14)
    assert proc.stderr.startswith(b"usage: retest run")
    assert b"no command given" in proc.stderr


def test_version() -> None:
    import retest as package

    proc = retest("--version")
    assert proc.returncode == 0 and proc.stdout.decode().strip() == f"retest {package.__version__}"


@pytest.mark.parametrize("sub", ["run", "gate", "serve"])
def test_an_unknown_option_prints_the_subcommands_own_usage(sub: str) -> None:
    required = ["--repo", ".", "--branch", "x"] if sub == "gate" else []
    proc = retest(sub, *required, "--bogus")
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"usage: retest {sub}".encode())
    assert f"retest {sub}: error:".encode() in proc.stderr and b"--bogus" in proc.stderr


def test_gate_with_a_missing_repo_or_branch_is_a_usage_error(tmp_path: Path) -> None:
    from gitrepo import gate_env, make_repo

    env = gate_env(tmp_path / "home")
    repo = make_repo(tmp_path, env=env)
    cases = [
        (["--repo", str(tmp_path / "nowhere"), "--branch", "main"], "no such directory"),
        (["--repo", str(tmp_path), "--branch", "main"], "not a git repository"),
        (["--repo", str(repo.path), "--branch", "nosuch"], "no such branch in"),
        (["--repo", str(repo.path), "--branch", "main", "--onto", "nosuch"], "no such target branch"),
    ]
    for args, said in cases:
        proc = retest("gate", *args, env=env)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith(b"usage: retest gate") and said.encode() in proc.stderr


def test_an_embedded_gate_caller_still_gets_a_decision_for_a_missing_branch(tmp_path: Path) -> None:
    from gitrepo import gate_env, make_repo
    from retest import merge_gate

    env = gate_env(tmp_path / "home")
    repo = make_repo(tmp_path, env=env)
    decision = merge_gate.retest_branch(str(repo.path), "nosuch", task_id="T-1", env=env,
                                        command=["true"], timeout=30)
    assert decision.action == "hold" and decision.verdict == "other"
    assert "no branch or commit 'nosuch'" in decision.reason  # no longer an empty detail
