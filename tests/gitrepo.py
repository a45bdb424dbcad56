"""Build real git repositories with real pytest suites, for the gate's tests.

Every git process goes through ``retest.proc_group.run`` with an explicit, deterministic
environment (fixed identities and dates, HOME in the test's tmp folder, no system or global
git config), so the repositories are the same on every machine.
"""

from __future__ import annotations

import fcntl
import atexit
import hashlib
import os
import shutil
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from retest import proc_group
from retest.gitops import KEPT_WORKTREE_PREFIX, WORKTREE_PREFIX, GateLock

import retest


def _retest_only_dir() -> str:
    """A folder from which ``retest`` imports, and nothing else.

    The checkout's ``python/`` holds only retest. An installed copy lives in site-packages
    beside pytest & co.: putting that whole folder on a suite's PYTHONPATH would hand pytest
    to a venv a test builds without it (issue 14: found when the suite ran from a wheel or
    an sdist install), so it gets a private folder with a link to the package.
    """
    package = Path(retest.__file__).resolve().parent
    parent = package.parent
    if not (parent / "pytest").exists() and not (parent / "_pytest").exists():
        return str(parent)
    only = Path(tempfile.mkdtemp(prefix="retest-import-"))
    atexit.register(shutil.rmtree, only, ignore_errors=True)
    (only / "retest").symlink_to(package, target_is_directory=True)
    return str(only)


#: Where the children import ``retest`` from: the checkout's ``python/`` in development; a
#: folder with only a link to the installed package when CI tests an installed copy.
PYTHON_DIR = _retest_only_dir()

CALC = "def add(a, b):\n    return a + b\n"
TEST_CALC = "from calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n"


def gate_env(home: Path, **extra: str) -> dict[str, str]:
    """A deterministic environment for git, the suite and the gate (settings included)."""
    home.mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "XDG_STATE_HOME": str(home / "state"),
        "RETEST_LEDGER_PATH": str(home / "ledger.sqlite3"),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_AUTHOR_NAME": "Test Author",
        "GIT_AUTHOR_EMAIL": "author@example.com",
        "GIT_COMMITTER_NAME": "Test Committer",
        "GIT_COMMITTER_EMAIL": "committer@example.com",
        "GIT_AUTHOR_DATE": "2024-01-01T00:00:00Z",
        "GIT_COMMITTER_DATE": "2024-01-01T00:00:00Z",
        "PYTHONPATH": PYTHON_DIR,
        "PYTHONDONTWRITEBYTECODE": "1",
        # pytest in the gated repos loads no plugins: 0.4 s per run instead of 1.5 s.
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
        "LC_ALL": "C",
        "RETEST_KILL_GRACE_S": "0.5",
        "MERGE_GATE_LOCK_WAIT_S": "0.5",
        "MERGE_GATE_INFRA_RETRY_BACKOFF_S": "1",
        # The gate's kept worktree (and any temporary one) in the test's own folder.
        "MERGE_GATE_WORKTREE_DIR": str(home / "worktrees"),
    }
    if "TMPDIR" in os.environ:
        env["TMPDIR"] = os.environ["TMPDIR"]
    env.update(extra)
    return env


class GitFailed(AssertionError):
    pass


@dataclass
class Repo:
    """A real repository on disk and the environment its git commands use."""

    path: Path
    env: dict[str, str]

    def git(self, *args: str, check: bool = True, input: Optional[bytes] = None) -> str:
        result = proc_group.run(["git", "-c", "core.hooksPath=/dev/null", *args], cwd=self.path,
                                env=self.env, timeout=60, input=input)
        if check and not result.ok:
            raise GitFailed(f"git {' '.join(args)}: exit {result.returncode} {result.spawn_error}\n"
                            f"{result.stdout.decode()}{result.stderr.decode()}")
        return result.stdout.decode().strip()

    def write(self, files: Mapping[str, str]) -> None:
        for name, text in files.items():
            target = self.path / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)

    def commit(self, files: Mapping[str, str], message: str) -> str:
        self.write(files)
        self.git("add", "--", *files)
        self.git("commit", "-q", "-m", message)
        return self.head()

    def head(self, rev: str = "HEAD") -> str:
        return self.git("rev-parse", "--verify", f"{rev}^{{commit}}")

    def branch(self, name: str, files: Mapping[str, str], message: str = "", base: str = "main") -> str:
        """Create ``name`` from ``base`` with one commit of ``files``; back on main after; its sha."""
        self.git("switch", "-q", "-c", name, base)
        sha = self.commit(files, message or f"work on {name}")
        self.git("switch", "-q", "main")
        return sha

    def snapshot(self) -> dict[str, object]:
        """What a gate must never change in the user's checkout: HEAD, refs, index, files."""
        index = self.path / ".git" / "index"
        files = {}
        for p in sorted(self.path.rglob("*")):
            if ".git" in p.relative_to(self.path).parts or not p.is_file():
                continue
            files[str(p.relative_to(self.path))] = hashlib.sha256(p.read_bytes()).hexdigest()
        return {
            "head": self.git("rev-parse", "HEAD"),
            "symbolic": self.git("symbolic-ref", "-q", "HEAD", check=False),
            "refs": self.git("for-each-ref", "--format=%(refname) %(objectname)", "refs/"),
            "index": hashlib.sha256(index.read_bytes()).hexdigest() if index.exists() else None,
            "status": self.git("status", "--porcelain", "--untracked-files=all"),
            "files": files,
            "worktrees": user_worktrees(self.git("worktree", "list", "--porcelain")),
        }

    def gate_worktrees(self) -> list[str]:
        """Temporary gate worktrees git lists (the kept one is not among them)."""
        return [block for block in self.git("worktree", "list", "--porcelain").split("\n\n")
                if WORKTREE_PREFIX in block and KEPT_WORKTREE_PREFIX not in block]


def user_worktrees(porcelain: str) -> str:
    """``git worktree list --porcelain`` without the gate's kept worktree (its own, by design)."""
    return "\n\n".join(block for block in porcelain.split("\n\n") if KEPT_WORKTREE_PREFIX not in block)


def make_repo(root: Path, *, env: Optional[dict[str, str]] = None, files: Optional[Mapping[str, str]] = None) -> Repo:
    """A repository on ``main`` with a tiny package ``calc`` and its passing test."""
    path = root / "repo"
    path.mkdir(parents=True)
    repo = Repo(path, env or gate_env(root / "home"))
    repo.git("init", "-q", "-b", "main")
    repo.commit(files or {"calc.py": CALC, "tests/test_calc.py": TEST_CALC}, "initial: calc and its test")
    return repo


def sleeping_test(seconds: float) -> str:
    return textwrap.dedent(f"""\
        import time


        def test_slow():
            time.sleep({seconds})
        """)


FAILING_TEST = textwrap.dedent("""\
    from calc import add


    def test_add_is_wrong():
        assert add(2, 2) == 5
    """)

PY = sys.executable


#: A test that writes its pid to ``$SUITE_PID_FILE`` (atomically), then sleeps a minute.
SLOW_SUITE = textwrap.dedent("""\
    import os, time


    def test_slow():
        with open(os.environ["SUITE_PID_FILE"] + ".tmp", "w") as handle:
            handle.write(str(os.getpid()))
        os.replace(os.environ["SUITE_PID_FILE"] + ".tmp", os.environ["SUITE_PID_FILE"])
        time.sleep(60)
""")


def lock_is_free(repo: Repo) -> bool:
    """Nobody holds the repository's gate lock (we can take it at once, and let it go)."""
    fd = os.open(repo.path / ".git" / GateLock.FILENAME, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
