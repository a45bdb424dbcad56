"""Fault injection: starved resources and hostile children give a clear result, never a crash.

Limits are set in a fresh child Python process (``_in_child``) so that they cannot starve
the test run itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers_proc import CPYTHON_EMFILE_LEAK, assert_emfile_leaks_nothing_of_ours
from retest import proc_group

PYTHONPATH = os.pathsep.join(p for p in sys.path if p)


def _in_child(code: str, *, env: dict[str, str] | None = None, timeout: float = 60) -> dict:
    """Run ``code`` in a fresh interpreter; it must print one JSON document last."""
    full_env = dict(os.environ, PYTHONPATH=PYTHONPATH)
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          timeout=timeout, env=full_env, cwd="/")
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


def test_emfile_is_a_spawn_error_and_leaks_nothing(backend: str) -> None:
    doc = _in_child(textwrap.dedent(f"""
        import json, os, resource
        from retest import proc_group
        ok = proc_group.run(["true"], backend={backend!r})
        open_now = len(os.listdir("/proc/self/fd"))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 1, hard))
        starved = proc_group.run(["true"], backend={backend!r})
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        fds_after = len(os.listdir("/proc/self/fd"))
        again = proc_group.run(["sh", "-c", "echo back"], backend={backend!r})
    """) + CPYTHON_EMFILE_LEAK + textwrap.dedent("""
        cpython_leak = cpython_emfile_leak(lambda: len(os.listdir("/proc/self/fd")) + 1)
        print(json.dumps(dict(first=ok.returncode, rc=starved.returncode, err=starved.spawn_error,
                              errno=starved.spawn_errno, again=again.returncode,
                              out=again.stdout.decode(), leaked=fds_after - open_now,
                              cpython_leak=cpython_leak)))
    """))
    assert doc["first"] == 0
    assert doc["rc"] is None
    assert "Too many open files" in doc["err"] and doc["errno"] == 24
    assert doc["again"] == 0 and doc["out"] == "back\n"
    assert_emfile_leaks_nothing_of_ours(backend, doc["leaked"], doc["cpython_leak"])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to an unprivileged user")
@pytest.mark.parametrize("nproc", [1, 2], ids=["no-shepherd", "no-command"])
def test_nproc_exhausted_is_a_spawn_error(backend: str, nproc: int) -> None:
    # RLIMIT_NPROC is not enforced for root: drop to nobody first. With a limit of 1 the
    # first spawn fails; with 2 (native) the shepherd starts but cannot start the command.
    doc = _in_child(f"""
        import json, os, resource
        from retest import proc_group  # import first: nobody cannot read root's interpreter
        os.setgid(65534); os.setuid(65534)
        resource.setrlimit(resource.RLIMIT_NPROC, ({nproc}, {nproc}))
        r = proc_group.run(["true"], timeout=5, backend={backend!r})
        print(json.dumps(dict(rc=r.returncode, err=r.spawn_error, errno=r.spawn_errno)))
    """)
    if doc["rc"] is None:
        assert doc["errno"] == 11 and "Resource temporarily unavailable" in doc["err"]
    else:
        # the subprocess backend needs one process only: with 2 allowed it simply runs
        assert backend == "subprocess" and nproc == 2 and doc["rc"] == 0


def test_stderr_flood_with_quiet_stdout(backend: str) -> None:
    size = 20_000_000
    r = proc_group.run([sys.executable, "-c", f"import sys; sys.stderr.buffer.write(b'e' * {size})"],
                       capture_limit=64 * 1024, timeout=60, backend=backend)
    assert r.returncode == 0 and r.stdout == b""
    assert r.stderr_dropped == size - 64 * 1024
    assert r.stderr.startswith(b"e" * 32768) and r.stderr.endswith(b"e" * 32768)


def test_child_that_closes_its_pipes_early(backend: str) -> None:
    r = proc_group.run(["sh", "-c", "echo early; exec >&- 2>&-; sleep 0.3; exit 4"], timeout=10,
                       backend=backend)
    assert r.returncode == 4
    assert r.stdout == b"early\n"
    assert r.duration_s >= 0.25


def test_input_to_a_child_that_closed_stdin(backend: str) -> None:
    r = proc_group.run(["sh", "-c", "exec <&-; echo done"], input=b"x" * 5_000_000, timeout=10,
                       backend=backend)
    assert r.returncode == 0 and r.stdout == b"done\n"


@pytest.mark.parametrize("how", ["ignored", "blocked"])
def test_sigchld_ignored_or_blocked_by_the_caller(how: str, native: str) -> None:
    # The shepherd insists on SIGCHLD's default disposition for itself, so the exit status
    # survives a caller that ignores SIGCHLD (subprocess would report 0 here).
    setup = ("signal.signal(signal.SIGCHLD, signal.SIG_IGN)" if how == "ignored"
             else "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})")
    doc = _in_child(f"""
        import json, signal
        {setup}
        from retest import proc_group
        r = proc_group.run(["sh", "-c", "echo hi; exit 3"], timeout=10)
        t = proc_group.run(["sleep", "5"], timeout=0.2, grace=0.2)
        print(json.dumps(dict(rc=r.returncode, out=r.stdout.decode(), t=t.timed_out, trc=t.returncode)))
    """)
    assert doc == {"rc": 3, "out": "hi\n", "t": True, "trc": -15}


def test_sigchld_ignored_fallback_still_returns(backend: str) -> None:
    doc = _in_child(f"""
        import json, signal
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        from retest import proc_group
        r = proc_group.run(["sh", "-c", "exit 3"], timeout=10, backend={backend!r})
        print(json.dumps(dict(rc=r.returncode, err=r.spawn_error)))
    """)
    assert doc["err"] is None and isinstance(doc["rc"], int)


def test_shepherd_killed_mid_run_is_reported_and_tree_killed(native: str, tmp_path: Path) -> None:
    """If someone SIGKILLs the shepherd, the leader dies with it (PDEATHSIG) and the caller
    gets a clear spawn_error instead of hanging."""
    import threading

    from tests.conftest import children_of, pid_alive, wait_until

    result: list[proc_group.RunResult] = []
    t = threading.Thread(target=lambda: result.append(proc_group.run(["sleep", "30"], timeout=60)))
    t.start()
    try:
        assert wait_until(lambda: any(_is_shepherd(p) for p in children_of(os.getpid())), 5)
        shepherd = next(p for p in children_of(os.getpid()) if _is_shepherd(p))
        assert wait_until(lambda: bool(children_of(shepherd)), 5)
        leader = children_of(shepherd)[0]
        os.kill(shepherd, 9)
        t.join(20)
        assert not t.is_alive()
        assert result[0].returncode is None and "shepherd lost" in (result[0].spawn_error or "")
        assert wait_until(lambda: not pid_alive(leader), 5)
    finally:
        t.join(30)


def _is_shepherd(pid: int) -> bool:
    """A shepherd serving a run now (an idle one waits for the next and has no child)."""
    if pid in proc_group.idle_shepherds():
        return False
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"_retest_shepherd")
    except OSError:
        return False
