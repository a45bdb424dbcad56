"""Issue 13.1: no git step of the gate runs a program the repository's config names.

Each test defines a program in the repository's config (``.git/config``, or a file it
includes), selects it where git would (``.gitattributes`` on the branch or on main, a hook,
a remote), lets the gate (or ``gitops.git``) run, and checks the program's marker file was
never created. The suite itself still sees the repository's normal config.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from gitrepo import Repo, make_repo
from retest import gitops
from retest.merge_gate import GateDecision, GateMetrics, retest_branch


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    return make_repo(tmp_path)


def marker_program(marker: Path) -> str:
    """A shell command line that leaves ``marker`` and passes its input through."""
    return f"touch {marker}; cat"


def gate(repo: Repo, branch: str, **kw: object) -> GateDecision:
    return retest_branch(repo.path, branch, env=repo.env, metrics=GateMetrics(), **kw)  # type: ignore[arg-type]


def filter_on_branch(repo: Repo, marker: Path, name: str, *, required: bool = False) -> None:
    """Define filter ``name`` (its smudge leaves ``marker``) and select it on branch feature."""
    repo.git("config", f"filter.{name}.smudge", marker_program(marker))
    repo.git("config", f"filter.{name}.clean", "cat")
    if required:
        repo.git("config", f"filter.{name}.required", "true")
    repo.branch("feature", {".gitattributes": f"*.py filter={name}\n", "feature.py": "VALUE = 1\n"})
    marker.unlink(missing_ok=True)  # git add on the branch ran clean, switch ran smudge


@pytest.mark.parametrize("name, required", [
    ("evil", False),
    ("lfsish", True),  # disarmed, not fatal
    ("a=b", False),  # -c filter.a=b.smudge= would set filter.a: GIT_CONFIG_KEY_n is verbatim
])
def test_a_smudge_filter_selected_by_the_branch_never_runs(repo: Repo, tmp_path: Path, name: str,
                                                           required: bool) -> None:
    marker = tmp_path / "smudge-ran"
    filter_on_branch(repo, marker, name, required=required)

    decision = gate(repo, "feature")
    assert (decision.action, decision.rule) == ("merge", "passed.exit-0"), decision.reason
    assert not marker.exists()


def test_a_smudge_filter_selected_on_main_never_runs_during_the_rebase(repo: Repo, tmp_path: Path) -> None:
    marker = tmp_path / "smudge-on-main-ran"
    # The branch forks before main selects the filter: only the rebase checks those files out.
    repo.branch("feature", {"feature.py": "VALUE = 1\n"})
    repo.git("config", "filter.evil.smudge", marker_program(marker))
    repo.git("config", "filter.evil.clean", "cat")
    repo.commit({".gitattributes": "*.py filter=evil\n", "more.py": "MORE = 2\n"}, "main: attributes")
    marker.unlink(missing_ok=True)

    decision = gate(repo, "feature")
    assert decision.action == "merge", decision.reason
    assert not marker.exists()


def test_a_long_running_filter_process_never_starts(repo: Repo, tmp_path: Path) -> None:
    marker = tmp_path / "process-ran"
    script = tmp_path / "filter-process.sh"
    script.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    script.chmod(0o755)
    repo.branch("feature", {".gitattributes": "*.py filter=proc\n", "feature.py": "VALUE = 1\n"})
    repo.git("config", "filter.proc.process", str(script))

    decision = gate(repo, "feature")
    assert decision.action == "merge", decision.reason
    assert not marker.exists()


def test_a_merge_driver_never_runs_and_the_merge_is_gits_own(repo: Repo, tmp_path: Path) -> None:
    marker = tmp_path / "merge-driver-ran"
    base = "".join(f"LINE_{i} = {i}\n" for i in range(10))
    repo.commit({"lines.py": base, ".gitattributes": "lines.py merge=evil\n"}, "lines")
    # The driver "resolves" every merge by writing junk: git's three-way merge must win.
    repo.git("config", "merge.evil.driver", f"touch {marker}; echo JUNK > %A")
    repo.branch("feature", {"lines.py": base.replace("LINE_8 = 8", "LINE_8 = 80")})
    repo.commit({"lines.py": base.replace("LINE_1 = 1", "LINE_1 = 10")}, "main edits line 1")

    decision = gate(repo, "feature", command=[
        sys.executable, "-c",
        "import lines, sys; sys.exit(0 if (lines.LINE_1, lines.LINE_8) == (10, 80) else 1)"])
    assert (decision.action, decision.rule) == ("merge", "passed.exit-0"), decision.reason
    assert not marker.exists()


def test_a_merge_driver_conflict_is_still_a_conflict(repo: Repo, tmp_path: Path) -> None:
    marker = tmp_path / "merge-driver-ran"
    repo.commit({"value.py": "VALUE = 1\n", ".gitattributes": "value.py merge=evil\n"}, "value")
    repo.git("config", "merge.evil.driver", f"touch {marker}; cp %B %A")  # "theirs wins"
    repo.branch("feature", {"value.py": "VALUE = 2\n"})
    repo.commit({"value.py": "VALUE = 3\n"}, "main changes it too")

    decision = gate(repo, "feature")
    assert (decision.action, decision.verdict) == ("rollback", "conflict"), decision.reason
    assert not marker.exists()


def test_a_filter_pulled_in_by_include_if_for_worktrees_never_runs(repo: Repo, tmp_path: Path) -> None:
    marker = tmp_path / "included-ran"
    included = tmp_path / "included.gitconfig"
    included.write_text(f"[filter \"evil\"]\n\tsmudge = {marker_program(marker)}\n\tclean = cat\n")
    # Matches only a linked worktree's git dir (.git/worktrees/<id>): never the main checkout.
    repo.git("config", "includeIf.gitdir:**/.git/worktrees/**.path", str(included))
    repo.git("config", "include.path", str(included))
    repo.branch("feature", {".gitattributes": "*.py filter=evil\n", "feature.py": "VALUE = 1\n"})
    marker.unlink(missing_ok=True)
    repo.git("config", "--unset", "include.path")  # from now on only the worktree includes it

    decision = gate(repo, "feature")
    assert decision.action == "merge", decision.reason
    assert not marker.exists()


def test_hooks_and_fsmonitor_never_run(repo: Repo, tmp_path: Path) -> None:
    marker = tmp_path / "hook-ran"
    hooks = repo.path / ".git" / "hooks"
    hooks.mkdir(exist_ok=True)
    for name in ("post-checkout", "pre-rebase", "post-rewrite", "reference-transaction",
                 "pre-commit", "prepare-commit-msg", "commit-msg", "post-commit", "fsmonitor"):
        hook = hooks / name
        hook.write_text(f"#!/bin/sh\necho {name} >> {marker}\n")
        hook.chmod(0o755)
    repo.git("config", "core.fsmonitor", str(hooks / "fsmonitor"))
    repo.branch("feature", {"feature.py": "VALUE = 1\n"})
    repo.commit({"more.py": "MORE = 1\n"}, "main moves on: the rebase replays a commit")
    marker.unlink(missing_ok=True)

    decision = gate(repo, "feature")
    assert decision.action == "merge", decision.reason
    assert not marker.exists(), marker.read_text()


def test_diff_drivers_and_textconv_never_run_in_any_git_the_gate_runs(repo: Repo, tmp_path: Path) -> None:
    marker = tmp_path / "diff-ran"
    repo.commit({".gitattributes": "*.py diff=evil\n", "a.py": "A = 1\n"}, "attrs")
    repo.commit({"a.py": "A = 2\n"}, "change")
    repo.git("config", "diff.evil.command", f"touch {marker}.command; true")
    repo.git("config", "diff.evil.textconv", f"touch {marker}.textconv; cat")
    repo.git("config", "diff.external", f"touch {marker}.external; true")
    env = gitops.git_env(repo.env)
    for args in (["diff", "HEAD~1", "HEAD"], ["log", "-p", "-1"], ["show", "HEAD"]):
        gitops.git(args, cwd=str(repo.path), env=env, timeout=30)
    assert sorted(p.name for p in tmp_path.glob("diff-ran*")) == []


def test_no_transport_program_ever_starts(repo: Repo, tmp_path: Path) -> None:
    """sshCommand, credential helpers, askpass, remote helpers: the gate never connects."""
    marker = tmp_path / "transport-ran"
    repo.git("config", "core.sshCommand", f"touch {marker}.ssh; false")
    repo.git("config", "credential.helper", f"!touch {marker}.credential; false")
    repo.git("config", "credential.https://example.invalid.helper", f"!touch {marker}.url-credential")
    repo.git("config", "core.askPass", str(tmp_path / "askpass"))
    repo.git("config", "protocol.ext.allow", "always")
    repo.git("remote", "add", "ssh", "ssh://git@example.invalid/x.git")
    repo.git("remote", "add", "ext", f"ext::sh -c touch% {marker}.ext")
    repo.git("remote", "add", "https", "https://example.invalid/x.git")
    env = gitops.git_env(repo.env)
    for remote in ("ssh", "ext", "https"):
        result = gitops.git(["fetch", remote], cwd=str(repo.path), env=env, timeout=30)
        assert not result.ok
        assert b"not allowed" in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.glob("transport-ran*")) == []


@pytest.mark.parametrize("key, value, disarmed", [
    ("filter.x.clean", "touch /tmp/x", ""),
    ("filter.x.smudge", "touch /tmp/x", ""),
    ("filter.x.process", "/tmp/x", ""),
    ("filter.x.required", "true", "false"),
    ("merge.x.driver", "touch /tmp/x", gitops.MERGE_FILE_DRIVER),
    ("diff.x.command", "touch /tmp/x", ""),
    ("diff.x.textconv", "touch /tmp/x", ""),
    ("credential.https://h.invalid.helper", "!touch /tmp/x", ""),
    ("gpg.x509.program", "/tmp/x", ""),
    ("gpg.program", "/tmp/x", ""),
    ("gpg.ssh.defaultKeyCommand", "touch /tmp/x", ""),
    ("protocol.file.allow", "always", "never"),
    ("core.fsmonitor", "/tmp/x", "false"),
    ("core.hooksPath", "/tmp/x", "/dev/null"),
    ("core.askPass", "/tmp/x", ""),
    ("core.pager", "touch /tmp/x", "cat"),
    ("core.editor", "touch /tmp/x", "true"),
    ("sequence.editor", "touch /tmp/x", "true"),
    ("core.attributesFile", "/tmp/x", "/dev/null"),
    ("diff.external", "/tmp/x", ""),
])
def test_git_itself_reports_every_program_key_disarmed(repo: Repo, key: str, value: str,
                                                       disarmed: str) -> None:
    """Per mechanism, what the gate's git sees: the last value of the key, as git reads it."""
    repo.git("config", key, value)
    result = gitops.git(["config", "--get-all", key], cwd=str(repo.path),
                        env=gitops.git_env(repo.env), timeout=30)
    assert result.ok, result.stderr
    assert result.stdout.decode().splitlines()[-1] == disarmed


def test_the_suite_keeps_the_repositorys_normal_config(repo: Repo, tmp_path: Path) -> None:
    seen = tmp_path / "suite-saw.json"
    repo.git("config", "filter.evil.smudge", "cat")
    repo.git("config", "filter.evil.clean", "cat")
    repo.branch("feature", {".gitattributes": "*.txt filter=evil\n", "feature.py": "VALUE = 1\n"})
    script = (
        "import json, os, subprocess, sys\n"
        "value = subprocess.run(['git', 'config', '--get', 'filter.evil.smudge'],"
        " capture_output=True, text=True).stdout.strip()\n"
        f"json.dump({{'smudge': value, 'env': sorted(k for k in os.environ if k.startswith('GIT_CONFIG'))}},"
        f" open({str(seen)!r}, 'w'))\n"
    )
    decision = gate(repo, "feature", command=[sys.executable, "-c", script])
    assert decision.action == "merge", decision.reason
    saw = json.loads(seen.read_text())
    assert saw["smudge"] == "cat"
    # The gate's own overrides never reach the suite (the test's GIT_CONFIG_* do).
    assert "GIT_CONFIG_COUNT" not in saw["env"] and not [k for k in saw["env"] if "KEY_" in k]
    assert os.environ.get("GIT_CONFIG_COUNT") is None
