"""Git, run safely for the merge gate: every git process goes through ``proc_group.run``.

Safety rules, all in this one module:

* No shell, ever; refs are validated (``validate_ref``) and never start with ``-``, and
  ``--end-of-options`` separates options from revisions where git accepts it.
* Every call carries ``SAFE_CONFIG``: no hooks (``core.hooksPath=/dev/null``), no automatic or
  detached ``git gc`` (it would outlive the gate), no signing prompts, no editors, no rerere,
  no ``rebase.updateRefs`` (it would move the user's branch while we rebase a detached HEAD).
* The environment drops variables that would redirect git to another repository or index
  (``GIT_DIR``, ``GIT_INDEX_FILE``, ...) and sets ``GIT_TERMINAL_PROMPT=0`` and
  ``GIT_OPTIONAL_LOCKS=0`` so the gate never waits on a prompt or takes the user's index lock.
* The rebase happens in a detached worktree of its own (``Worktree``): the user's checkout,
  index and refs are never written; nothing is ever pushed.
* A failed git command's output only ever becomes evidence (an error message, a conflict
  detail), so ``git()`` masks the environment's secret values in it (``retest.redact``)
  before anything quotes or truncates it.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from . import config, proc_group, redact

log = logging.getLogger(__name__)

__all__ = [
    "GitError",
    "git_failure",
    "REDIRECTING_ENV",
    "InvalidRef",
    "SAFE_CONFIG",
    "git_env",
    "backend_for",
    "git",
    "validate_ref",
    "validate_sha",
    "common_dir",
    "rev_parse",
    "merge_base",
    "GateLock",
    "Worktree",
    "RebaseOutcome",
    "WORKTREE_PREFIX",
]

SAFE_CONFIG: tuple[str, ...] = (
    "core.hooksPath=/dev/null",
    "core.fsmonitor=false",
    "core.editor=true",
    "core.pager=cat",
    "gc.auto=0",
    "gc.autoDetach=false",
    "maintenance.auto=false",
    "commit.gpgSign=false",
    "rebase.autoStash=false",
    "rebase.autoSquash=false",
    "rebase.updateRefs=false",
    "rerere.enabled=false",
    "submodule.recurse=false",
    "advice.detachedHead=false",
)

#: Variables that point git at another repository, index or object store.
REDIRECTING_ENV = frozenset({
    "GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY", "GIT_COMMON_DIR",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_NAMESPACE", "GIT_PREFIX", "GIT_QUARANTINE_PATH",
    "GIT_REFLOG_ACTION", "GIT_CONFIG_PARAMETERS", "GIT_CONFIG_COUNT",
})

#: Temporary worktrees of the gate live in ``<tmp>/retest-gate-XXXX/wt``.
WORKTREE_PREFIX = "retest-gate-"
_WORKTREE_PATH = re.compile(r"/" + re.escape(WORKTREE_PREFIX) + r"[A-Za-z0-9_]+/wt$")

_SHA = re.compile(r"^[0-9a-fA-F]{40}([0-9a-fA-F]{24})?$")
_BAD_REF_CHARS = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


class GitError(Exception):
    """A git command failed; ``result`` holds what happened."""

    def __init__(self, message: str, result: Optional[proc_group.RunResult] = None) -> None:
        super().__init__(message)
        self.result = result


class InvalidRef(ValueError):
    """A branch or revision name the gate refuses to pass to git."""


def validate_ref(name: object, what: str = "ref") -> str:
    """Return ``name`` if it is a plain ref name git cannot mistake for an option; else raise.

    Accepted: names ``git check-ref-format --allow-onelevel`` would accept, and full shas.
    Refused: a leading ``-`` (``--upload-pack=x``), whitespace and control characters, ``..``,
    ``@{``, the characters ``~^:?*[\\``, a trailing ``.lock`` or ``/``, over 255 bytes.
    """
    if not isinstance(name, str) or not name:
        raise InvalidRef(f"{what} must be a non-empty string")
    if name.startswith("-"):
        raise InvalidRef(f"{what} {name!r} starts with '-'")
    if len(name.encode("utf-8", "surrogateescape")) > 255:
        raise InvalidRef(f"{what} is longer than 255 bytes")
    if _BAD_REF_CHARS.search(name) or ".." in name or "@{" in name or name == "@":
        raise InvalidRef(f"{what} {name!r} contains characters git refs may not hold")
    if name.startswith("/") or name.endswith("/") or name.endswith(".") or "//" in name:
        raise InvalidRef(f"{what} {name!r} is not a valid ref name")
    if any(part.startswith(".") or part.endswith(".lock") for part in name.split("/")):
        raise InvalidRef(f"{what} {name!r} is not a valid ref name")
    return name


def validate_sha(sha: object) -> Optional[str]:
    """A full hex object id in lower case, or ``None`` if ``sha`` is not one."""
    if isinstance(sha, str) and _SHA.match(sha.strip()):
        return sha.strip().lower()
    return None


def backend_for(env: Optional[Mapping[str, str]]) -> Optional[str]:
    """The runner backend for children started with ``env``: its kill-switch decides.

    ``proc_group.run`` reads ``SUBPROCESS_TREE_KILL_ENABLED`` from this process's environment;
    the gate takes its settings from the ``env`` it was given, so it passes the choice on.
    """
    return None if config.env_bool("SUBPROCESS_TREE_KILL_ENABLED", True, env) else "subprocess"


def git_env(base: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The environment for the gate's git processes (see the module docstring)."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in REDIRECTING_ENV}
    env.update(
        GIT_TERMINAL_PROMPT="0",
        GIT_OPTIONAL_LOCKS="0",
        GIT_EDITOR="true",
        GIT_SEQUENCE_EDITOR="true",
        GIT_PAGER="cat",
        GIT_ASKPASS="true",
        LC_ALL="C",
        LANGUAGE="C",
        # The rebased commits are throw-away (never pushed, the worktree is removed), so a
        # fixed committer keeps the rebase working where no identity is configured.
        GIT_COMMITTER_NAME="retest gate",
        GIT_COMMITTER_EMAIL="retest-gate@localhost",
    )
    return env


def git(
    args: Sequence[str],
    *,
    cwd: str,
    env: Mapping[str, str],
    timeout: float,
) -> proc_group.RunResult:
    """Run ``git <SAFE_CONFIG> args`` in ``cwd``; never raises for a runtime fault."""
    argv = ["git"]
    for item in SAFE_CONFIG:
        argv += ["-c", item]
    argv += list(args)
    result = proc_group.run(argv, cwd=cwd, env=env, timeout=timeout, grace=min(2.0, timeout),
                            backend=backend_for(env))
    if not result.ok:
        result = redact.redact_result(result, redact.secret_values(env) | redact.secret_values())
        log.debug("git %s in %s: %s", " ".join(args[:2]), cwd,
                  result.spawn_error or result.stderr[-500:].decode("utf-8", "replace"))
    return result


def _text(result: proc_group.RunResult) -> str:
    return result.stdout.decode("utf-8", "replace").strip()


def git_failure(what: str, result: proc_group.RunResult) -> GitError:
    detail = result.spawn_error or result.stderr.decode("utf-8", "replace").strip()[-400:]
    status = "timed out" if result.timed_out else f"exit {result.returncode}"
    return GitError(f"{what} failed ({status}): {detail}", result)


def common_dir(repo: str, env: Mapping[str, str], timeout: float) -> str:
    """The absolute git common dir of ``repo`` (the main ``.git`` even from a worktree)."""
    result = git(["rev-parse", "--path-format=absolute", "--git-common-dir"],
                 cwd=repo, env=env, timeout=timeout)
    if not result.ok:
        raise git_failure(f"git rev-parse --git-common-dir in {repo}", result)
    path = _text(result)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(repo, path))


def rev_parse(repo: str, rev: str, env: Mapping[str, str], timeout: float) -> str:
    """The commit id ``rev`` (already validated) names."""
    result = git(["rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}"],
                 cwd=repo, env=env, timeout=timeout)
    sha = validate_sha(_text(result)) if result.ok else None
    if sha is None:
        if result.returncode == 1 and not result.stderr.strip():
            # --quiet says nothing: the one thing exit 1 means here is that rev names no commit
            raise GitError(f"no branch or commit {rev!r} in {repo}", result)
        raise git_failure(f"git rev-parse {rev!r}", result)
    return sha


def merge_base(repo: str, a: str, b: str, env: Mapping[str, str], timeout: float) -> Optional[str]:
    """The merge base of two commit ids, ``None`` when they share no history."""
    result = git(["merge-base", a, b], cwd=repo, env=env, timeout=timeout)
    if result.returncode == 1 and not result.stdout.strip():
        return None
    sha = validate_sha(_text(result)) if result.ok else None
    if sha is None:
        raise git_failure("git merge-base", result)
    return sha


# --------------------------------------------------------------------------- the gate lock


class GateLock:
    """An exclusive per-repository lock: ``flock`` on ``<git common dir>/retest-gate.lock``.

    ``flock`` belongs to the open file, so two gates in one process exclude each other too,
    and the kernel releases it when the holder dies: a crashed gate never leaves it held.
    """

    FILENAME = "retest-gate.lock"

    def __init__(self, git_common_dir: str) -> None:
        self.path = os.path.join(git_common_dir, self.FILENAME)
        self._fd: Optional[int] = None

    def acquire(self, wait_s: float, poll_s: float = 0.05) -> bool:
        """Take the lock, waiting up to ``wait_s`` seconds; ``False`` if it stayed busy."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + max(wait_s, 0.0)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(poll_s)
                continue
            self._fd = fd
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            except OSError:
                pass  # the pid is informative only
            return True

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)


# --------------------------------------------------------------------------- the worktree


@dataclass(frozen=True)
class RebaseOutcome:
    """How ``git rebase`` in the gate's worktree ended."""

    #: ``"ok"``, ``"conflict"`` or ``"error"``.
    status: str
    head: Optional[str]
    detail: str
    result: Optional[proc_group.RunResult]


class Worktree:
    """A detached, temporary worktree of ``repo`` at ``commit``; always removed by ``remove()``."""

    def __init__(self, repo: str, env: Mapping[str, str], timeout: float) -> None:
        self.repo = repo
        self.env = env
        self.timeout = timeout
        self.parent = tempfile.mkdtemp(prefix=WORKTREE_PREFIX)
        self.path = os.path.join(self.parent, "wt")
        self.added = False

    def add(self, commit: str) -> proc_group.RunResult:
        result = git(["worktree", "add", "--detach", "--end-of-options", self.path, commit],
                     cwd=self.repo, env=self.env, timeout=self.timeout)
        # Registered even when the checkout itself failed part-way: remove() must clean up.
        self.added = os.path.exists(self.path)
        return result

    def head(self) -> Optional[str]:
        result = git(["rev-parse", "--verify", "HEAD"], cwd=self.path, env=self.env, timeout=self.timeout)
        return validate_sha(_text(result)) if result.ok else None

    def _rebase_in_progress(self) -> bool:
        for name in ("rebase-merge", "rebase-apply"):
            result = git(["rev-parse", "--git-path", name], cwd=self.path, env=self.env,
                         timeout=self.timeout)
            if result.ok:
                path = _text(result)
                if not os.path.isabs(path):
                    path = os.path.join(self.path, path)
                if os.path.exists(path):
                    return True
        return False

    def rebase(self, onto: str) -> RebaseOutcome:
        """Rebase the detached HEAD onto commit ``onto``; abort and report a conflict."""
        result = git(["rebase", "--no-autostash", "--end-of-options", onto],
                     cwd=self.path, env=self.env, timeout=self.timeout)
        if result.ok:
            return RebaseOutcome("ok", self.head(), "", result)
        output = (result.stdout + b"\n" + result.stderr).decode("utf-8", "replace")
        in_progress = self._rebase_in_progress()
        if in_progress:
            git(["rebase", "--abort"], cwd=self.path, env=self.env, timeout=self.timeout)
        if in_progress and ("CONFLICT" in output or "could not apply" in output):
            lines = [ln.strip() for ln in output.splitlines()
                     if ln.startswith("CONFLICT") or ln.startswith("error: could not apply")]
            return RebaseOutcome("conflict", None, "; ".join(lines[:5]) or "merge conflict", result)
        return RebaseOutcome("error", None, output.strip()[-400:], result)

    def remove(self) -> None:
        """Remove the worktree and its folder; never raises (it logs what it could not do)."""
        try:
            if self.added:
                result = git(["worktree", "remove", "--force", "--force", self.path],
                             cwd=self.repo, env=self.env, timeout=self.timeout)
                if not result.ok:
                    log.warning("git worktree remove %s failed; deleting the folder and pruning",
                                self.path)
            shutil.rmtree(self.parent, ignore_errors=True)
            if self.added:
                git(["worktree", "prune"], cwd=self.repo, env=self.env, timeout=self.timeout)
        except Exception:  # cleanup must not mask the decision
            log.exception("could not remove the gate worktree %s", self.path)


def remove_stale_worktrees(repo: str, env: Mapping[str, str], timeout: float) -> int:
    """Remove gate worktrees a killed gate left behind; call only while holding the gate lock."""
    git(["worktree", "prune"], cwd=repo, env=env, timeout=timeout)
    result = git(["worktree", "list", "--porcelain"], cwd=repo, env=env, timeout=timeout)
    if not result.ok:
        return 0
    removed = 0
    for line in _text(result).splitlines():
        if not line.startswith("worktree "):
            continue
        path = line[len("worktree "):]
        if _WORKTREE_PATH.search(path):
            log.warning("removing a gate worktree left by an earlier gate: %s", path)
            git(["worktree", "remove", "--force", "--force", path], cwd=repo, env=env, timeout=timeout)
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)
            removed += 1
    if removed:
        git(["worktree", "prune"], cwd=repo, env=env, timeout=timeout)
    return removed
