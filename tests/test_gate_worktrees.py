"""Fast worktrees and clean exits (issue 12), on real repositories and with real signals.

* the skip-merge proof is decided from the commits alone: no worktree, no lock;
* the repository's kept worktree is moved to each new commit (tracked files restored,
  untracked and ignored ones cleaned) and rebuilt when missing or suspect;
* SIGTERM/SIGINT/SIGHUP to ``retest gate`` take the suite down, leave the kept worktree
  consistent (or remove the temporary one), release the lock, and exit 128 + N;
* folders of dead gates are found by name and removed, listed by git or not.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from conftest import descendants, pid_alive, reap_own_zombies, wait_until
from gitrepo import SLOW_SUITE, Repo, lock_is_free, make_repo
from retest import gitops
from retest.merge_gate import GateDecision, GateMetrics, retest_branch


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    return make_repo(tmp_path)


def gate(repo: Repo, branch: str, **kw: Any) -> GateDecision:
    kw.setdefault("metrics", GateMetrics())
    env = kw.pop("env", repo.env)
    return retest_branch(repo.path, branch, env=env, **kw)


def kept(repo: Repo) -> gitops.KeptWorktree:
    return gitops.KeptWorktree(str(repo.path), str(repo.path / ".git"), repo.env, 30,
                               repo.env["MERGE_GATE_WORKTREE_DIR"])


# --------------------------------------------------------------------------- skip before checkout


def test_a_skip_merge_is_proven_without_any_checkout(repo: Repo) -> None:
    sha = repo.branch("validated", {"feature.py": "VALUE = 1\n"})
    decision = gate(repo, "validated", validated_sha=sha)
    assert (decision.action, decision.rule) == ("skip-merge", "passed.skip-when-current")
    assert decision.proof is not None and decision.proof["rebased_head"] == sha
    assert "worktree" not in decision.evidence and "checkout" not in decision.evidence
    assert not os.path.exists(repo.env["MERGE_GATE_WORKTREE_DIR"])  # nothing was ever built


def test_a_merge_commit_since_the_target_is_doubt_not_proof(repo: Repo) -> None:
    repo.git("switch", "-q", "-c", "side")
    repo.commit({"side.py": "S = 1\n"}, "side")
    repo.git("switch", "-q", "-c", "merged", "main")
    repo.commit({"other.py": "O = 1\n"}, "other")
    repo.git("merge", "-q", "--no-ff", "-m", "merge side", "side")
    sha = repo.head()
    repo.git("switch", "-q", "main")
    decision = gate(repo, "merged", validated_sha=sha)
    assert decision.action == "merge" and not decision.skipped  # the suite ran
    assert "merge commits" in decision.evidence["skip"]


# --------------------------------------------------------------------------- the kept worktree


def test_the_kept_worktree_is_moved_between_attempts_and_cleaned(repo: Repo) -> None:
    repo.branch("one", {"one.py": "ONE = 1\n"})
    repo.branch("two", {"two.py": "TWO = 2\n"})
    first = gate(repo, "one")
    assert first.action == "merge" and first.evidence["checkout"]["how"] == "added"
    wt = Path(first.evidence["worktree"])
    assert gitops.KEPT_WORKTREE_PREFIX in str(wt) and wt.is_dir()
    # What a suite leaves behind: a changed tracked file, untracked and ignored files.
    (wt / "calc.py").write_text("broken(\n")
    (wt / "leftover.txt").write_text("x")
    (wt / ".gitignore").write_text("*.log\n")
    (wt / "build.log").write_text("x")
    (wt / "nested").mkdir()
    (wt / "nested" / "junk.bin").write_bytes(b"\0")

    second = gate(repo, "two")
    assert second.action == "merge", second.reason
    assert second.evidence["checkout"]["how"] == "moved"
    assert Path(second.evidence["worktree"]) == wt
    assert (wt / "calc.py").read_text() == repo.git("show", "main:calc.py") + "\n"
    left = sorted(p.name for p in wt.iterdir() if p.name not in (".pytest_cache", "__pycache__"))
    assert left == [".git", "calc.py", "tests", "two.py"]  # the suite's own caches came back
    assert repo.gate_worktrees() == []
    assert repo.snapshot()["worktrees"].count("worktree ") == 1  # the user's only


def _admin_dir(wt: Path) -> Path:
    return Path((wt / ".git").read_text().split("gitdir: ", 1)[1].strip())


@pytest.mark.parametrize("damage", ["missing", "index.lock", "rebase-merge", "locked", "foreign",
                                    "corrupted"])
def test_a_suspect_kept_worktree_is_rebuilt(repo: Repo, tmp_path: Path, damage: str) -> None:
    repo.branch("one", {"one.py": "ONE = 1\n"})
    repo.branch("two", {"two.py": "TWO = 2\n"})
    wt = Path(gate(repo, "one").evidence["worktree"])
    admin = _admin_dir(wt)
    if damage == "missing":
        import shutil
        shutil.rmtree(wt.parent)
    elif damage in ("index.lock", "rebase-merge", "locked"):
        target = admin / damage
        target.mkdir() if damage == "rebase-merge" else target.write_text("")
    elif damage == "foreign":  # the folder now holds a worktree of another repository
        other = make_repo(tmp_path / "other")
        repo.git("worktree", "remove", "--force", str(wt))
        other.git("worktree", "add", "--detach", str(wt), "main")
    else:
        (wt / ".git").write_text("garbage\n")
    assert kept(repo).suspect() is not None

    second = gate(repo, "two")
    assert second.action == "merge", second.reason
    assert second.evidence["checkout"]["how"] == "added"
    assert kept(repo).suspect() is None
    assert (wt / "two.py").exists() and not (wt / "one.py").exists()
    assert repo.gate_worktrees() == []


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to hand a folder to another uid")
def test_a_kept_folder_owned_by_someone_else_is_never_used(repo: Repo) -> None:
    repo.branch("one", {"one.py": "ONE = 1\n"})
    squatter = Path(kept(repo).parent)
    squatter.mkdir(parents=True)
    os.chown(squatter, 54321, 54321)
    decision = gate(repo, "one")
    assert decision.action == "merge"
    assert gitops.KEPT_WORKTREE_PREFIX not in decision.evidence["worktree"]  # a temporary one
    assert list(squatter.iterdir()) == [] and squatter.stat().st_uid == 54321
    assert repo.gate_worktrees() == []


def test_the_kill_switch_gives_a_fresh_temporary_worktree_per_attempt(repo: Repo) -> None:
    repo.branch("one", {"one.py": "ONE = 1\n"})
    env = dict(repo.env, MERGE_GATE_KEEP_WORKTREE_ENABLED="false")
    decision = gate(repo, "one", env=env)
    assert decision.action == "merge" and decision.evidence["checkout"]["kept"] is False
    assert not os.path.exists(os.path.dirname(decision.evidence["worktree"]))
    assert repo.gate_worktrees() == [] and not os.path.exists(kept(repo).parent)


# --------------------------------------------------------------------------- dead gates' folders


def test_folders_of_dead_gates_are_removed_listed_or_not(repo: Repo) -> None:
    repo.branch("one", {"one.py": "ONE = 1\n"})
    root = Path(repo.env["MERGE_GATE_WORKTREE_DIR"])
    root.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    empty = root / f"{gitops.WORKTREE_PREFIX}{dead.pid}.12345-abcd1234"   # killed before git ran
    empty.mkdir()
    listed = root / f"{gitops.WORKTREE_PREFIX}{dead.pid}.12345-efgh5678"  # killed mid-attempt
    listed.mkdir()
    repo.git("worktree", "add", "--detach", str(listed / "wt"), "main")
    alive = Path(tempfile.mkdtemp(prefix=f"{gitops.WORKTREE_PREFIX}{gitops._owner_tag()}-", dir=root))
    old_style = root / f"{gitops.WORKTREE_PREFIX}legacy12"                 # no owner in the name
    old_style.mkdir()

    decision = gate(repo, "one")
    assert decision.action == "merge"
    assert not empty.exists() and not listed.exists()
    assert alive.exists() and old_style.exists()   # a live gate's; one we cannot prove dead
    assert repo.gate_worktrees() == []
    alive.rmdir()


# --------------------------------------------------------------------------- clean exits

@pytest.mark.parametrize("signum,keep", [(signal.SIGTERM, True), (signal.SIGINT, True),
                                         (signal.SIGHUP, True), (signal.SIGTERM, False)])
def test_a_signalled_gate_cleans_up_and_exits_128_plus_n(repo: Repo, tmp_path: Path,
                                                         signum: int, keep: bool) -> None:
    repo.branch("slow", {"tests/test_slow.py": SLOW_SUITE})
    pid_file = tmp_path / "suite.pid"
    env = dict(repo.env, SUITE_PID_FILE=str(pid_file),
               MERGE_GATE_KEEP_WORKTREE_ENABLED="true" if keep else "false")
    proc = subprocess.Popen([sys.executable, "-m", "retest", "gate", "--repo", str(repo.path),
                             "--branch", "slow", "--task", "T-sig", "--timeout", "120", "--json"],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert wait_until(pid_file.exists, timeout=30), f"no suite (gate exit {proc.poll()})"
        suite_pid = int(pid_file.read_text())
        assert not lock_is_free(repo)
        os.kill(proc.pid, signum)  # our own child, by its pid
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 128 + signum, err.decode()
    assert out == b""  # no decision: the gate was stopped, not decided
    assert b"lock released" in err
    assert not pid_alive(suite_pid)

    def nothing_left() -> bool:
        reap_own_zombies()
        return not [p for p in descendants() if pid_alive(p)]
    assert wait_until(nothing_left, timeout=10)
    assert lock_is_free(repo)
    assert repo.gate_worktrees() == []
    if keep:
        assert kept(repo).suspect() is None       # kept, and consistent: the next gate moves it
    else:
        assert not any(Path(repo.env["MERGE_GATE_WORKTREE_DIR"]).glob(f"{gitops.WORKTREE_PREFIX}*"))
    doc = json.loads(subprocess.run(
        [sys.executable, "-m", "retest", "gate", "--repo", str(repo.path), "--branch", "slow",
         "--task", "T-sig", "--timeout", "1", "--json"], env=env, capture_output=True,
        timeout=60).stdout)
    assert doc["verdict"] == "timeout" and doc["attempt"] == 1  # the stopped run counted nothing
