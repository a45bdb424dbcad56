"""How the shepherd starts and watches the command, in both containment modes (issue 15).

cgroup mode starts the command with a vfork-like clone3 on a stack of its own (the no-libc
build on x86_64) and reads cgroup.events only once the leader has exited. These tests hold
what that must not change: every way a start can fail is reported as before, a command is
found on PATH or taken as given, and a shepherd waiting on a live command sleeps (an unread
cgroup.events change keeps the file POLLPRI: polled without a read, it would spin).
"""

from __future__ import annotations

import errno
import os
import resource
import signal
from pathlib import Path

import pytest

from retest.proc_group import run


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def test_waiting_on_a_live_command_does_not_spin(containment: str) -> None:
    before = _children_cpu_s()
    result = run(["sleep", "0.5"], timeout=30, backend="native")
    spent = _children_cpu_s() - before  # the shepherd's own CPU time, and sleep's

    assert result.returncode == 0 and result.containment == containment
    assert spent < 0.2, f"{spent:.3f} s of CPU while waiting 0.5 s"


@pytest.mark.parametrize("how", ["path", "PATH search"])
def test_the_command_runs_as_given_or_from_path(containment: str, how: str) -> None:
    argv = ["/bin/sh" if how == "path" else "sh", "-c", "echo $0 ran"]
    result = run(argv, timeout=30, backend="native")

    assert result.returncode == 0, result.spawn_error
    assert result.stdout == f"{argv[0]} ran\n".encode()
    assert result.containment == containment


FAILED_STARTS = ["missing path", "directory", "not on PATH", "empty name", "bad cwd"]


@pytest.mark.parametrize("case", FAILED_STARTS)
def test_a_failed_start_is_reported_with_its_errno(containment: str, tmp_path: Path,
                                                   case: str) -> None:
    argv, cwd, expected = {
        "missing path": ([str(tmp_path / "absent")], None, errno.ENOENT),
        "directory": ([str(tmp_path)], None, errno.EACCES),
        "not on PATH": (["retest-no-such-command-15"], None, errno.ENOENT),
        "empty name": ([""], None, errno.ENOENT),
        "bad cwd": (["true"], str(tmp_path / "absent"), errno.ENOENT),
    }[case]
    result = run(argv, cwd=cwd, timeout=30, backend="native")

    assert result.returncode is None
    assert result.spawn_errno == expected, result.spawn_error
    assert ("chdir" if case == "bad cwd" else "exec") in (result.spawn_error or "")



def _native_run(cgroup: "str | None") -> dict:
    """One run of `true` through the extension itself, as run() makes it (cgroup: its path)."""
    from retest import proc_group

    proc_group._load_native()
    assert proc_group._native is not None and proc_group._shepherd_path is not None
    return proc_group._native.run(
        os.fsencode(proc_group._shepherd_path), [b"true"], None, None, None, 30.0, 1.0, 1 << 20,
        None, -1, None if cgroup is None else os.fsencode(cgroup), cgroup is not None,
        signal.SIGTERM, False, None, 8)


def test_the_result_carries_the_cgroups_oom_counters(cgroup_mode: str) -> None:
    """memory.events of the run's cgroup, read by the shepherd before it removes the cgroup
    (retest.oom could only look after): ints where the memory controller is enabled."""
    from retest import cgroup as _cgroup

    parent = _cgroup.parent_dir()
    path = _cgroup.create(parent, _cgroup.Limits())
    try:
        raw = _native_run(path)
    finally:
        if os.path.isdir(path):
            os.rmdir(path)
    controllers = Path(parent, "cgroup.subtree_control").read_text().split()

    assert raw["containment"] == "cgroup" and raw["returncode"] == 0 and raw["cgroup_removed"]
    if "memory" in controllers:
        assert isinstance(raw["cgroup_oom_kill"], int) and raw["cgroup_oom_kill"] == 0
        assert raw["cgroup_oom_group_kill"] is None or raw["cgroup_oom_group_kill"] == 0
    else:
        assert raw["cgroup_oom_kill"] is None and raw["cgroup_oom_group_kill"] is None


def test_a_run_without_a_cgroup_has_no_oom_counters(native: str) -> None:
    raw = _native_run(None)
    assert raw["containment"] == "subreaper" and raw["returncode"] == 0
    assert raw["cgroup_oom_kill"] is None and raw["cgroup_oom_group_kill"] is None
