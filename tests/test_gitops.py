"""gitops: ref validation, the git environment, the detached worktree and the gate lock."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gitrepo import Repo, make_repo
from retest import gitops


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    return make_repo(tmp_path)


@pytest.mark.parametrize("name", ["main", "feature/x-1", "origin/main", "v1.2", "a" * 40, "user@host"])
def test_plain_names_are_accepted(name: str) -> None:
    assert gitops.validate_ref(name) == name


@pytest.mark.parametrize("name", [
    "-x", "--upload-pack=touch x", "--output=/tmp/f", "", "a..b", "a b", "a\tb", "a\nb", "x~1", "x^",
    "a:b", "a?", "a*", "a[", "a\\b", "@", "x@{1}", "/abs", "trail/", "dot.", "x.lock", ".hidden",
    "a//b", "a\x00b", "a" * 256,
])
def test_dangerous_or_invalid_names_are_refused(name: str) -> None:
    with pytest.raises(gitops.InvalidRef):
        gitops.validate_ref(name)


def test_non_strings_are_refused() -> None:
    with pytest.raises(gitops.InvalidRef):
        gitops.validate_ref(None)
    with pytest.raises(gitops.InvalidRef):
        gitops.validate_ref(b"main")


def test_validate_sha() -> None:
    assert gitops.validate_sha("A" * 40) == "a" * 40
    assert gitops.validate_sha("a" * 64) == "a" * 64
    for bad in ("a" * 12, "g" * 40, "", None, "-" + "a" * 39, "a" * 41):
        assert gitops.validate_sha(bad) is None


def test_git_env_drops_redirections_and_never_prompts() -> None:
    env = gitops.git_env({"PATH": "/bin", "GIT_DIR": "/elsewhere", "GIT_INDEX_FILE": "/x",
                          "GIT_WORK_TREE": "/w", "KEEP": "1"})
    assert "GIT_DIR" not in env and "GIT_INDEX_FILE" not in env and "GIT_WORK_TREE" not in env
    assert env["KEEP"] == "1" and env["GIT_TERMINAL_PROMPT"] == "0" and env["GIT_OPTIONAL_LOCKS"] == "0"


def test_backend_for_follows_the_kill_switch() -> None:
    assert gitops.backend_for({"SUBPROCESS_TREE_KILL_ENABLED": "false"}) == "subprocess"
    assert gitops.backend_for({"SUBPROCESS_TREE_KILL_ENABLED": "true"}) is None
    assert gitops.backend_for({}) is None


def test_rev_parse_and_merge_base(repo: Repo) -> None:
    env = gitops.git_env(repo.env)
    main = gitops.rev_parse(str(repo.path), "main", env, 30)
    assert main == repo.head("main")
    sha = repo.branch("feature", {"f.py": "F = 1\n"})
    assert gitops.merge_base(str(repo.path), main, sha, env, 30) == main
    with pytest.raises(gitops.GitError):
        gitops.rev_parse(str(repo.path), "no-such-branch", env, 30)
    assert gitops.common_dir(str(repo.path), env, 30) == str(repo.path / ".git")


def test_worktree_is_detached_and_removed(repo: Repo) -> None:
    sha = repo.branch("feature", {"f.py": "F = 1\n"})
    env = gitops.git_env(repo.env)
    worktree = gitops.Worktree(str(repo.path), env, 30)
    try:
        assert worktree.add(sha).ok
        assert worktree.head() == sha
        assert (Path(worktree.path) / "f.py").exists()
        assert repo.git("symbolic-ref", "-q", "HEAD") == "refs/heads/main"
        outcome = worktree.rebase(repo.head("main"))
        assert outcome.status == "ok" and outcome.head == sha
    finally:
        worktree.remove()
    assert not os.path.exists(worktree.parent)
    assert repo.gate_worktrees() == []
    assert repo.head("feature") == sha


def test_conflicting_rebase_is_aborted(repo: Repo) -> None:
    sha = repo.branch("feature", {"calc.py": "X = 1\n"})
    repo.commit({"calc.py": "X = 2\n"}, "main edits calc")
    env = gitops.git_env(repo.env)
    worktree = gitops.Worktree(str(repo.path), env, 30)
    try:
        worktree.add(sha)
        outcome = worktree.rebase(repo.head("main"))
        assert outcome.status == "conflict" and "calc.py" in outcome.detail
        assert worktree.head() == sha  # aborted: back where it started
    finally:
        worktree.remove()


def test_gate_lock_excludes_a_second_holder_in_the_same_process(tmp_path: Path) -> None:
    first, second = gitops.GateLock(str(tmp_path)), gitops.GateLock(str(tmp_path))
    assert first.acquire(0)
    try:
        assert not second.acquire(0.1)
    finally:
        first.release()
    assert second.acquire(0)
    second.release()
    assert (tmp_path / "retest-gate.lock").read_text().strip() == str(os.getpid())
