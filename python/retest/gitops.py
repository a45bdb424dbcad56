"""Git, run safely for the merge gate: every git process goes through ``proc_group.run``.

Safety rules, all in this one module:

* No shell, ever; refs are validated (``validate_ref``) and never start with ``-``, and
  ``--end-of-options`` separates options from revisions where git accepts it.
* Every call carries ``SAFE_CONFIG``: no hooks (``core.hooksPath=/dev/null``), no automatic or
  detached ``git gc`` (it would outlive the gate), no signing prompts, no editors, no rerere,
  no ``rebase.updateRefs`` (it would move the user's branch while we rebase a detached HEAD),
  no transport at all (``protocol.allow=never``), no pager (``--no-pager``).
* No program the repository's config names ever runs (issue 13): drivers are selected by
  ``.gitattributes`` of the very branch under test, and defined under any name. Before each
  call, git itself lists the names its config defines in that call's directory
  (``git config --name-only --list``: includes and ``includeIf`` resolved by git, nothing
  parsed here but the names), and every program-valued key of every name is overridden with
  a harmless value through ``GIT_CONFIG_COUNT``/``GIT_CONFIG_KEY_n``/``GIT_CONFIG_VALUE_n``
  (command scope, which wins over every file, and which takes any subsection verbatim where
  ``-c`` would split a name holding ``=``). See ``disarming_config``.
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
import hashlib
import logging
import os
import re
import shutil
import stat
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
    "DISARMED_PER_NAME",
    "MERGE_FILE_DRIVER",
    "disarming_config",
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
    "KEPT_WORKTREE_PREFIX",
    "KeptWorktree",
    "gate_worktree",
    "linear_history",
    "remove_stale_worktrees",
    "sweep_dead_gate_dirs",
]

SAFE_CONFIG: tuple[str, ...] = (
    "core.hooksPath=/dev/null",
    "core.fsmonitor=false",
    "core.editor=true",
    "core.pager=cat",
    "core.askPass=",
    # Only the git-wide attribute files are dropped here (the tree's own and info/attributes
    # still select drivers: those are disarmed by name, see disarming_config).
    "core.attributesFile=/dev/null",
    "sequence.editor=true",
    "diff.external=",
    # The gate never talks to a remote: no ssh, sshCommand, credential helper, askpass,
    # remote helper or proxy can start (per-protocol overrides are disarmed by name too).
    "protocol.allow=never",
    "credential.helper=",
    "gpg.program=",
    "gpg.ssh.defaultKeyCommand=",
    "gc.auto=0",
    "gc.autoDetach=false",
    "maintenance.auto=false",
    "commit.gpgSign=false",
    "rebase.autoStash=false",
    "rebase.autoSquash=false",
    "rebase.updateRefs=false",
    # The apply backend goes through format-patch and am (more machinery, same result).
    "rebase.backend=merge",
    "rerere.enabled=false",
    "submodule.recurse=false",
    "advice.detachedHead=false",
)

#: A merge driver the gate defines for every driver name the repository's config defines:
#: git's own three-way merge of the three files (what git does for a name it does not know),
#: so a clean merge stays clean and a conflict stays a conflict (exit status > 0).
MERGE_FILE_DRIVER = "git merge-file --marker-size=%L %A %O %B"

#: ``section -> {key: harmless value}`` for keys ``section.<name>.key`` that run a program
#: (or, ``filter.<name>.required``, make git die once the program is gone).
DISARMED_PER_NAME: dict[str, dict[str, str]] = {
    "filter": {"clean": "", "smudge": "", "process": "", "required": "false"},
    "merge": {"driver": MERGE_FILE_DRIVER},
    "diff": {"command": "", "textconv": ""},
    "credential": {"helper": ""},
    "gpg": {"program": ""},
    "protocol": {"allow": "never"},
}

#: Variables that point git at another repository, index or object store.
REDIRECTING_ENV = frozenset({
    "GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY", "GIT_COMMON_DIR",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_NAMESPACE", "GIT_PREFIX", "GIT_QUARANTINE_PATH",
    "GIT_REFLOG_ACTION", "GIT_CONFIG_PARAMETERS", "GIT_CONFIG_COUNT",
})

#: Temporary worktrees of the gate live in ``<tmp>/retest-gate-<pid>.<start>-XXXX/wt``: the
#: owner's pid and start time are in the name, so a dead gate's folder is known as such from
#: the name alone, registered with git or not (issue 12). Older gates wrote ``retest-gate-XXXX``.
WORKTREE_PREFIX = "retest-gate-"
#: The kept per-repository worktree: ``<root>/retest-gate-keep-<uid>-<repo hash>/wt``.
KEPT_WORKTREE_PREFIX = WORKTREE_PREFIX + "keep-"
_TEMP_DIR_NAME = re.compile(re.escape(WORKTREE_PREFIX) + r"(?:(\d+)\.(\d+)-)?[A-Za-z0-9_]+$")
_WORKTREE_PATH = re.compile(r"/" + re.escape(WORKTREE_PREFIX) + r"(?:\d+\.\d+-)?[A-Za-z0-9_]+/wt$")

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
        GIT_ATTR_NOSYSTEM="1",  # no /etc/gitattributes either
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


def _config_names(output: bytes) -> list[tuple[str, str, str]]:
    """``(section, name, key)`` of each ``section.name.key`` in ``git config -z --name-only``
    output (the name, a subsection, may hold dots and anything but NUL and newline)."""
    found = []
    for raw in output.split(b"\0"):
        entry = raw.decode("utf-8", "surrogateescape")
        section, dot, rest = entry.partition(".")
        name, dot2, key = rest.rpartition(".")
        if dot and dot2 and name:
            found.append((section.lower(), name, key.lower()))
    return found


def disarming_config(names: Sequence[tuple[str, str, str]]) -> list[tuple[str, str]]:
    """The ``(key, value)`` overrides that disarm every program-valued key of every name."""
    overrides: dict[str, str] = {}
    for section, name, _ in names:
        for key, value in DISARMED_PER_NAME.get(section, {}).items():
            overrides[f"{section}.{name}.{key}"] = value
    return sorted(overrides.items())


def _argv(args: Sequence[str]) -> list[str]:
    argv = ["git", "--no-pager"]
    for item in SAFE_CONFIG:
        argv += ["-c", item]
    return argv + list(args)


def _disarmed_env(cwd: str, env: Mapping[str, str], timeout: float
                  ) -> tuple[Optional[dict[str, str]], proc_group.RunResult]:
    """``env`` plus the overrides for the config git reads in ``cwd`` (``None`` if it could
    not be listed: the caller then fails closed with that result)."""
    listed = proc_group.run(_argv(["config", "--null", "--name-only", "--list"]), cwd=cwd,
                            env=env, timeout=timeout, grace=min(2.0, timeout),
                            backend=backend_for(env))
    # Exit 1 with no output: no config file at all (outside a repository, an empty HOME).
    if not listed.ok and not (listed.returncode == 1 and not listed.stdout.strip()):
        return None, listed
    overrides = disarming_config(_config_names(listed.stdout))
    out = {k: v for k, v in env.items() if not k.startswith("GIT_CONFIG_KEY_")
           and not k.startswith("GIT_CONFIG_VALUE_")}
    out["GIT_CONFIG_COUNT"] = str(len(overrides))
    for index, (key, value) in enumerate(overrides):
        out[f"GIT_CONFIG_KEY_{index}"] = key
        out[f"GIT_CONFIG_VALUE_{index}"] = value
    return out, listed


def git(
    args: Sequence[str],
    *,
    cwd: str,
    env: Mapping[str, str],
    timeout: float,
) -> proc_group.RunResult:
    """Run ``git <SAFE_CONFIG> args`` in ``cwd`` with every repository-defined program
    disarmed (module docstring); never raises for a runtime fault."""
    disarmed, listed = _disarmed_env(cwd, env, timeout)
    if disarmed is None:
        # Fail closed: a command whose drivers could not be listed is not run.
        result = listed
    else:
        result = proc_group.run(_argv(args), cwd=cwd, env=disarmed, timeout=timeout,
                                grace=min(2.0, timeout), backend=backend_for(env))
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


def ignored(repo: str, paths: Sequence[str], env: Mapping[str, str], timeout: float) -> list[str]:
    """The ``paths`` (relative to ``repo`` or absolute inside it) that git ignores there, as
    given, existing or not; a path in the index never is (``git check-ignore``: exit 1
    when none is)."""
    if not paths:
        return []
    result = git(["-c", "core.quotePath=false", "check-ignore", "--", *paths], cwd=repo,
                 env=env, timeout=timeout)
    if result.returncode not in (0, 1):
        raise git_failure("git check-ignore", result)
    asked = set(paths)  # a name with a newline comes back quoted: then it is not matched
    return [p for p in result.stdout.decode("utf-8", "surrogateescape").splitlines() if p in asked]


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


def changed_files(repo: str, base: str, head: str, env: Mapping[str, str], timeout: float) -> list[str]:
    """The paths that differ between two commits (``git diff --name-only -z``), relative."""
    result = git(["diff", "--name-only", "--no-renames", "-z", base, head, "--"], cwd=repo, env=env,
                 timeout=timeout)
    if not result.ok:
        raise git_failure("git diff --name-only", result)
    return [os.fsdecode(p) for p in result.stdout.split(b"\0") if p]


def linear_history(repo: str, base: str, head: str, env: Mapping[str, str], timeout: float) -> bool:
    """True when ``base..head`` has no merge commit: git's own condition (with ``base`` an
    ancestor of ``head``) for ``git rebase base`` to leave HEAD where it is."""
    result = git(["rev-list", "--min-parents=2", "--count", f"{base}..{head}"],
                 cwd=repo, env=env, timeout=timeout)
    if not result.ok:
        raise git_failure("git rev-list --min-parents=2", result)
    return _text(result) == "0"


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


def _start_time(pid: int) -> Optional[int]:
    """The start time of ``pid`` (clock ticks since boot, /proc/PID/stat field 22); ``None`` if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] == b"Z":
        return None
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _owner_tag() -> str:
    """``<pid>.<start time>`` of this process: who owns a temporary gate folder."""
    return f"{os.getpid()}.{_start_time(os.getpid()) or 0}"


class Worktree:
    """A detached, temporary worktree of ``repo`` at ``commit``; always removed by ``remove()``."""

    #: False: this worktree is removed after the attempt (``KeptWorktree``: True).
    kept = False

    def __init__(self, repo: str, env: Mapping[str, str], timeout: float,
                 root: Optional[str] = None) -> None:
        self.repo = repo
        self.env = env
        self.timeout = timeout
        if root:
            os.makedirs(root, mode=0o700, exist_ok=True)
        self.parent = tempfile.mkdtemp(prefix=f"{WORKTREE_PREFIX}{_owner_tag()}-", dir=root or None)
        self.path = os.path.join(self.parent, "wt")
        self.added = False
        #: How the worktree was brought to the commit: ``added`` (fresh) or ``moved`` (kept).
        self.how = "added"

    def add(self, commit: str) -> proc_group.RunResult:
        result = git(["worktree", "add", "--no-checkout", "--detach", "--end-of-options",
                      self.path, commit], cwd=self.repo, env=self.env, timeout=self.timeout)
        # Registered even when the checkout itself failed part-way: remove() must clean up.
        self.added = os.path.exists(self.path)
        if not result.ok:
            return result
        # Checked out from inside the worktree: the config git reads there (an ``includeIf
        # "gitdir:..."`` that matches only the worktree's own git dir) is the one disarmed.
        return git(["reset", "--hard", "--quiet"], cwd=self.path, env=self.env,
                   timeout=self.timeout)

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


class KeptWorktree(Worktree):
    """The repository's own gate worktree, kept between attempts and moved to each new commit.

    ``git worktree add`` costs seconds on a large repository (every file written, fresh inodes
    each time); moving a kept worktree (``checkout --detach -f`` + ``clean -ffdxq``) writes only
    the files that differ. Used only under the gate lock, so one gate at a time. Rebuilt when
    missing or suspect: registered with another repository or not at all, locked
    (``git worktree lock``, an ``index.lock`` left by a killed git), a rebase left in
    progress, or a move that fails. A folder of that name that is not ours (another owner, a
    symlink) is never used: ``gate_worktree`` falls back to a temporary worktree.
    """

    kept = True

    def __init__(self, repo: str, git_common_dir: str, env: Mapping[str, str], timeout: float,
                 root: Optional[str] = None) -> None:
        self.repo = repo
        self.common = os.path.realpath(git_common_dir)
        self.env = env
        self.timeout = timeout
        digest = hashlib.sha256(self.common.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        self.parent = os.path.join(root or tempfile.gettempdir(),
                                   f"{KEPT_WORKTREE_PREFIX}{os.getuid()}-{digest}")
        self.path = os.path.join(self.parent, "wt")
        self.added = False
        self.how = "moved"

    def foreign(self) -> Optional[str]:
        """Why the folder must not be used at all (not ours), else ``None``."""
        try:
            info = os.lstat(self.parent)
        except FileNotFoundError:
            return None
        except OSError as err:
            return f"cannot inspect {self.parent}: {err.strerror}"
        if not stat.S_ISDIR(info.st_mode):
            return f"{self.parent} is not a folder"
        if info.st_uid != os.getuid():
            return f"{self.parent} belongs to uid {info.st_uid}"
        if info.st_mode & 0o022:
            return f"{self.parent} is writable by others"
        return None

    def _admin_dir(self) -> Optional[str]:
        """``<common>/worktrees/<name>``, read from the worktree's ``.git`` file, if it is ours."""
        try:
            with open(os.path.join(self.path, ".git"), encoding="utf-8") as handle:
                line = handle.read().strip()
        except OSError:
            return None
        if not line.startswith("gitdir: "):
            return None
        admin = os.path.realpath(line[len("gitdir: "):])
        if os.path.dirname(admin) != os.path.join(self.common, "worktrees"):
            return None
        try:
            with open(os.path.join(admin, "gitdir"), encoding="utf-8") as handle:
                back = os.path.realpath(handle.read().strip())
        except OSError:
            return None
        return admin if back == os.path.realpath(os.path.join(self.path, ".git")) else None

    def suspect(self) -> Optional[str]:
        """Why the kept worktree cannot simply be moved (``"missing"`` included), else ``None``."""
        if not os.path.isdir(self.path):
            return "missing"
        admin = self._admin_dir()
        if admin is None:
            return "not registered with this repository (foreign or corrupted)"
        for name, why in (("locked", "locked (git worktree lock)"),
                          ("index.lock", "locked (index.lock left by a killed git)"),
                          ("rebase-merge", "a rebase left in progress"),
                          ("rebase-apply", "a rebase left in progress")):
            if os.path.exists(os.path.join(admin, name)):
                return why
        if not os.path.isfile(os.path.join(admin, "HEAD")):
            return "corrupted (no HEAD)"
        return None

    def add(self, commit: str) -> proc_group.RunResult:
        """Move the kept worktree to ``commit`` (only changed files written), or rebuild it."""
        problem = self.suspect()
        if problem is None:
            moved = git(["checkout", "--detach", "--force", commit], cwd=self.path, env=self.env,
                        timeout=self.timeout)
            if moved.ok:
                cleaned = git(["clean", "-ffdxq"], cwd=self.path, env=self.env, timeout=self.timeout)
                if cleaned.ok:
                    self.added, self.how = True, "moved"
                    return cleaned
                problem = "git clean failed"
            else:
                problem = "git checkout failed"
        if problem != "missing":
            log.warning("rebuilding the kept gate worktree %s: %s", self.path, problem)
        self.discard()
        os.makedirs(self.parent, mode=0o700, exist_ok=True)
        result = super().add(commit)  # --no-checkout, then checked out from inside (disarmed)
        self.how = "added"
        return result

    def remove(self) -> None:
        """Keep the worktree, unless it was left inconsistent (a killed git, a rebase in progress)."""
        try:
            problem = self.suspect()
            if problem not in (None, "missing"):
                log.warning("discarding the kept gate worktree %s: %s", self.path, problem)
                self.discard()
        except Exception:  # cleanup must not mask the decision
            log.exception("could not check the kept gate worktree %s", self.path)

    def discard(self) -> None:
        """Remove the kept worktree and its registration; never raises."""
        try:
            if os.path.isdir(self.path):
                git(["worktree", "remove", "--force", "--force", self.path],
                    cwd=self.repo, env=self.env, timeout=self.timeout)
            if self.foreign() is None:
                shutil.rmtree(self.parent, ignore_errors=True)
            git(["worktree", "prune"], cwd=self.repo, env=self.env, timeout=self.timeout)
        except Exception:
            log.exception("could not remove the kept gate worktree %s", self.path)
        self.added = False


def gate_worktree(repo: str, git_common_dir: str, env: Mapping[str, str], timeout: float, *,
                  keep: bool = True, root: Optional[str] = None) -> Worktree:
    """The worktree of this attempt: the kept one, or (``keep`` off, or its folder is not
    ours) a temporary one removed afterwards."""
    if keep:
        kept = KeptWorktree(repo, git_common_dir, env, timeout, root)
        why = kept.foreign()
        if why is None:
            return kept
        log.warning("not using the kept gate worktree: %s; using a temporary one", why)
    return Worktree(repo, env, timeout, root)


def sweep_dead_gate_dirs(root: Optional[str] = None) -> int:
    """Remove ``retest-gate-<pid>.<start>-*`` folders (ours) whose gate is dead; return how many.

    Found by name, whether or not any repository still lists them (a gate killed between
    ``mkdtemp`` and ``git worktree add`` leaves one git never heard of); the repository's own
    registration goes at its next ``git worktree prune``. Folders of live gates, of other
    users, and old-style names (no owner in them) are left alone.
    """
    base = root or tempfile.gettempdir()
    removed = 0
    try:
        entries = list(os.scandir(base))
    except OSError:
        return 0
    uid = os.getuid()
    for entry in entries:
        match = _TEMP_DIR_NAME.match(entry.name)
        if match is None or match.group(1) is None:
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid:
            continue
        pid, started = int(match.group(1)), int(match.group(2))
        if _start_time(pid) == started:
            continue  # its gate is alive
        log.warning("removing %s, left by gate pid %d, which is gone", entry.path, pid)
        shutil.rmtree(entry.path, ignore_errors=True)
        removed += not os.path.exists(entry.path)
    return removed


def remove_stale_worktrees(repo: str, env: Mapping[str, str], timeout: float,
                           root: Optional[str] = None) -> int:
    """Remove gate worktrees a killed gate left behind; call only while holding the gate lock."""
    sweep_dead_gate_dirs(root)
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
