"""The contract both backends share: what ``run()`` returns for real children.

Every test here runs once per backend (the ``backend`` fixture). What only the native
backend can do (contain a process tree) is in test_containment.py.
"""

from __future__ import annotations

import errno
import math
import os
import signal
import sys
from pathlib import Path

import pytest

from helpers_proc import (CPYTHON_EMFILE_LEAK, PY, WRITE_PAYLOAD, assert_emfile_leaks_nothing_of_ours,
                          descendants, payload, py, write_payload)
from retest import proc_group
from retest.proc_group import RunResult, run

MARKER = b"\n[retest: %d bytes omitted]\n"


def expected_capture(data: bytes, limit: int) -> tuple[bytes, int]:
    """What a bounded capture keeps of ``data``: half head, half tail, a marker in between.

    Written out independently of proc_group._bound so the tests pin the contract, not the code.
    """
    if len(data) <= limit:
        return data, 0
    head = limit // 2
    tail = limit - head
    dropped = len(data) - limit
    return data[:head] + MARKER % dropped + data[len(data) - tail:], dropped


# ----------------------------------------------------------------------------- exit status


@pytest.mark.parametrize("code", [0, 1, 3, 255])
def test_exit_code_is_returned(backend: str, code: int) -> None:
    result = run(["sh", "-c", f"exit {code}"], backend=backend, timeout=10)

    assert isinstance(result, RunResult)
    assert result.returncode == code
    assert result.signal is None
    assert result.ok is (code == 0)
    assert not result.timed_out
    assert result.spawn_error is None and result.spawn_errno is None
    assert result.backend == backend
    assert result.to_dict()["backend"] == backend


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGSEGV])
def test_death_by_signal_is_minus_the_signal(backend: str, sig: int) -> None:
    result = run(["sh", "-c", f"kill -{int(sig)} $$"], backend=backend, timeout=10)

    assert result.returncode == -sig
    assert result.signal == sig
    assert not result.timed_out  # the command's own signal, not our deadline
    assert not result.ok


def test_result_describes_the_run(backend: str) -> None:
    result = run([Path(PY), b"-c", "print('hi')"], backend=backend, timeout=10)

    assert result.args == (PY, "-c", "print('hi')")  # path-like and bytes arguments, as text
    assert result.returncode == 0 and result.stdout == b"hi\n" and result.stderr == b""
    assert 0 < result.duration_s < 10
    assert result.stdout_dropped == 0 and result.stderr_dropped == 0
    assert result.killed_at_deadline == 0 and result.swept_after_exit == 0
    assert not result.escalated
    if backend == "native":
        assert isinstance(result.pid, int) and result.pid > 0
    summary = result.to_dict()
    assert summary["returncode"] == 0 and summary["stdout_bytes"] == 3
    assert "stdout" not in summary
    assert result.to_dict(with_output=True)["stdout"] == "hi\n"


# ----------------------------------------------------------------------------- bytes


def test_stdout_and_stderr_are_kept_apart(backend: str) -> None:
    code = r"""
import os
os.write(1, b"out\x00\xff\n")
os.write(2, b"err\x01\n")
os.write(1, b"more out")
"""
    result = run(py(code), backend=backend, timeout=10)

    assert result.returncode == 0
    assert result.stdout == b"out\x00\xff\nmore out"
    assert result.stderr == b"err\x01\n"


def test_binary_output_round_trips_byte_exact(backend: str) -> None:
    size = 700_000  # several pipe buffers; every byte value, NUL included
    result = run(
        py(WRITE_PAYLOAD + "os.write(2, bytes(range(256)) * 3)\n", "11", str(size), "1"),
        backend=backend,
        timeout=20,
    )

    assert result.returncode == 0, result.stderr[-500:]
    assert result.stdout == payload(11, size)
    assert result.stderr == bytes(range(256)) * 3
    assert result.stdout_dropped == 0


def test_input_is_fed_to_stdin(backend: str) -> None:
    data = payload(5, 3 * 1024 * 1024 + 17)  # bigger than both pipes: input and output interleave

    result = run(["cat"], input=data, backend=backend, timeout=20)

    assert result.returncode == 0
    assert result.stdout == data


def test_empty_input_is_an_immediate_eof(backend: str) -> None:
    result = run(py("import sys; print(len(sys.stdin.buffer.read()))"), input=b"",
                 backend=backend, timeout=10)

    assert result.returncode == 0
    assert result.stdout == b"0\n"


def test_stdin_is_dev_null_without_input(backend: str) -> None:
    code = "import os, sys; print(os.readlink('/proc/self/fd/0')); print(len(sys.stdin.buffer.read()))"

    result = run(py(code), backend=backend, timeout=10)

    assert result.returncode == 0
    assert result.stdout == b"/dev/null\n0\n"


def test_input_the_command_does_not_read_is_not_an_error(backend: str) -> None:
    result = run(["true"], input=payload(1, 2 * 1024 * 1024), backend=backend, timeout=10)

    assert result.returncode == 0
    assert result.spawn_error is None


# ----------------------------------------------------------------------------- env, cwd


def test_env_replaces_the_environment(backend: str) -> None:
    env = {"RETEST_PROBE": "v\u00e4rde \u2713 = x", "PATH": os.environ["PATH"]}

    result = run(["env"], env=env, backend=backend, timeout=10)

    assert result.returncode == 0
    lines = sorted(result.stdout.splitlines())
    assert lines == sorted(f"{k}={v}".encode() for k, v in env.items())


def test_env_none_inherits_the_callers_environment(backend: str, monkeypatch) -> None:
    monkeypatch.setenv("RETEST_INHERIT_PROBE", "inherited")

    result = run(["sh", "-c", 'printf %s "$RETEST_INHERIT_PROBE"'], backend=backend, timeout=10)

    assert result.stdout == b"inherited"


@pytest.mark.parametrize("as_type", [str, bytes, Path])
def test_cwd_is_where_the_command_runs(backend: str, tmp_path: Path, as_type) -> None:
    (tmp_path / "marker.txt").write_bytes(b"here")
    cwd = as_type(os.fsencode(tmp_path)) if as_type is bytes else as_type(tmp_path)

    result = run(py("import os; print(os.getcwd()); print(open('marker.txt').read())"),
                 cwd=cwd, backend=backend, timeout=10)

    assert result.returncode == 0, result.stderr
    assert result.stdout == os.fsencode(os.path.realpath(tmp_path)) + b"\nhere\n"


# ----------------------------------------------------------------------------- runtime faults: no raise


@pytest.mark.parametrize("argv0", ["retest-no-such-program", "/nonexistent/dir/retest-prog"])
def test_missing_executable_is_a_spawn_error(backend: str, argv0: str) -> None:
    result = run([argv0, "arg"], backend=backend, timeout=10)

    assert result.returncode is None
    assert result.spawn_errno == errno.ENOENT
    assert result.spawn_error is not None and argv0 in result.spawn_error
    assert "No such file or directory" in result.spawn_error
    assert result.stdout == b"" and result.stderr == b""
    assert not result.timed_out and not result.ok
    assert result.signal is None
    assert result.pid is None
    assert result.backend == backend


def test_non_executable_file_is_eacces(backend: str, tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho should-not-run\n")
    script.chmod(0o644)

    result = run([str(script)], backend=backend, timeout=10)

    assert result.returncode is None
    assert result.spawn_errno == errno.EACCES
    assert str(script) in result.spawn_error
    assert result.stdout == b""


def test_directory_as_executable_is_eacces(backend: str, tmp_path: Path) -> None:
    result = run([str(tmp_path)], backend=backend, timeout=10)

    assert result.returncode is None
    assert result.spawn_errno == errno.EACCES


def test_garbage_executable_is_enoexec(backend: str, tmp_path: Path) -> None:
    binary = tmp_path / "garbage"
    binary.write_bytes(b"\x00\x01\x02 not an executable format")
    binary.chmod(0o755)

    result = run([str(binary)], backend=backend, timeout=10)

    assert result.returncode is None
    assert result.spawn_errno == errno.ENOEXEC


def test_path_lookup_uses_the_commands_path(backend: str, tmp_path: Path) -> None:
    tool = tmp_path / "retest-probe-tool"
    tool.write_text("#!/bin/sh\necho found-via-path\n")
    tool.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")

    result = run(["retest-probe-tool"], env=env, backend=backend, timeout=10)

    assert result.spawn_error is None
    assert result.stdout == b"found-via-path\n"


@pytest.mark.parametrize("kind, err", [("missing", errno.ENOENT), ("file", errno.ENOTDIR)])
def test_bad_cwd_is_a_spawn_error(backend: str, tmp_path: Path, kind: str, err: int) -> None:
    if kind == "missing":
        cwd = tmp_path / "does-not-exist"
    else:
        cwd = tmp_path / "a-file"
        cwd.write_text("x")

    result = run(["true"], cwd=cwd, backend=backend, timeout=10)

    assert result.returncode is None
    assert result.spawn_errno == err
    assert result.spawn_error.startswith("chdir ")
    assert str(cwd) in result.spawn_error


# ----------------------------------------------------------------------------- deadline


def test_timeout_sets_timed_out_and_keeps_earlier_output(backend: str) -> None:
    result = run(["sh", "-c", "echo before; exec sleep 30"], timeout=0.5, grace=2,
                 backend=backend)

    assert result.timed_out
    assert result.signal in (signal.SIGTERM, signal.SIGKILL)
    assert not result.ok
    assert result.spawn_error is None
    assert result.stdout == b"before\n"
    assert 0.45 < result.duration_s < 5


def test_zero_timeout_is_already_due(backend: str) -> None:
    result = run(["sleep", "30"], timeout=0, grace=2, backend=backend)

    assert result.timed_out
    assert result.returncode is not None and result.returncode < 0
    assert result.duration_s < 5


@pytest.mark.parametrize("timeout", [None, math.inf, 30])
def test_no_deadline_or_a_far_one_lets_the_command_finish(backend: str, timeout) -> None:
    result = run(["sh", "-c", "sleep 0.1; echo done"], timeout=timeout, backend=backend)

    assert not result.timed_out
    assert result.returncode == 0 and result.stdout == b"done\n"


def test_stop_signal_is_the_first_signal_at_the_deadline(backend: str) -> None:
    """GNU timeout -s: the command sees SIGINT (it exits 7 from its trap), not SIGTERM."""
    handler = ("import os, signal, sys, time\n"
               "def on(signo, frame):\n"
               "    print('got-int' if signo == signal.SIGINT else 'got-other', flush=True)\n"
               "    os._exit(7)\n"
               "signal.signal(signal.SIGINT, on)\nsignal.signal(signal.SIGTERM, on)\n"
               "print('ready', flush=True)\ntime.sleep(30)\n")
    result = run([sys.executable, "-c", handler], timeout=1.5, grace=5, backend=backend,
                 stop_signal=signal.SIGINT)

    assert result.timed_out and not result.escalated
    assert result.returncode == 7 and result.stdout == b"ready\ngot-int\n"
    assert result.duration_s < 4.5  # it did not sit out the grace


def test_stop_signal_ignored_is_followed_by_sigkill_after_the_grace(backend: str) -> None:
    result = run(["sh", "-c", "trap '' USR1; exec sleep 30"], timeout=0.2, grace=0.3,
                 backend=backend, stop_signal=signal.SIGUSR1)

    assert result.timed_out and result.escalated
    assert result.returncode == -signal.SIGKILL


def test_stop_signal_kill_needs_no_grace(backend: str) -> None:
    result = run(["sleep", "30"], timeout=0.2, grace=10, backend=backend,
                 stop_signal=signal.SIGKILL)

    assert result.timed_out and result.returncode == -signal.SIGKILL
    assert result.duration_s < 5


@pytest.mark.parametrize("bad", [0, -1, 65, 1000])
def test_stop_signal_out_of_range_is_a_value_error(bad: int) -> None:
    with pytest.raises(ValueError):
        run(["true"], stop_signal=bad)
    with pytest.raises(TypeError):
        run(["true"], stop_signal="TERM")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- bounded capture

LIMIT = 2 * 65536


@pytest.mark.parametrize(
    "size",
    [
        LIMIT - 1,
        LIMIT,  # exactly the limit: nothing dropped, no marker
        LIMIT + 1,
        3 * 65536,  # the tail ring wraps exactly at its end
        3 * 65536 + 1,
        10 * 65536 + 12345,  # the ring wraps several times, mid-read
    ],
)
def test_bounded_capture_keeps_head_and_tail(backend: str, size: int) -> None:
    result = run(write_payload(21, size), capture_limit=LIMIT, backend=backend, timeout=20)

    kept, dropped = expected_capture(payload(21, size), LIMIT)
    assert result.returncode == 0
    assert result.stdout_dropped == dropped
    assert result.stdout == kept
    assert result.stderr == b"" and result.stderr_dropped == 0


@pytest.mark.parametrize("limit", [0, 1, 2, 3, 1001])
def test_tiny_capture_limits(backend: str, limit: int) -> None:
    data = payload(4, 5000)
    code = WRITE_PAYLOAD + "os.write(2, b'E' * 10)\n"

    result = run(py(code, "4", "5000", "1"), capture_limit=limit, backend=backend, timeout=10)

    assert (result.stdout, result.stdout_dropped) == expected_capture(data, limit)
    assert (result.stderr, result.stderr_dropped) == expected_capture(b"E" * 10, limit)


def test_both_backends_keep_the_same_bytes(native: str) -> None:
    """One command, both backends: identical capture, to the byte, dropped counts included."""
    size, limit = 5_000_003, 3 * 1024 * 1024 + 7
    cmd = py(WRITE_PAYLOAD + "os.write(2, b'tail of stderr' * 100000)\n", "8", str(size), "1")

    results = [run(cmd, capture_limit=limit, backend=b, timeout=30) for b in ("native", "subprocess")]

    for result in results:
        assert result.returncode == 0
        assert (result.stdout, result.stdout_dropped) == expected_capture(payload(8, size), limit)
        assert (result.stderr, result.stderr_dropped) == expected_capture(b"tail of stderr" * 100000, limit)
    native_result, subprocess_result = results
    assert native_result.stdout == subprocess_result.stdout
    assert native_result.stderr == subprocess_result.stderr
    assert [r.backend for r in results] == ["native", "subprocess"]


# ----------------------------------------------------------------------------- streaming


def test_on_output_chunks_concatenate_to_the_full_output(backend: str) -> None:
    code = WRITE_PAYLOAD + "os.write(2, b'progress\\n' * 40000)\n"
    chunks: list[tuple[str, bytes]] = []

    # A capture limit far below the output: streaming still sees every byte.
    result = run(py(code, "31", "1500000", "1"), capture_limit=1024,
                 on_output=lambda stream, chunk: chunks.append((stream, chunk)),
                 backend=backend, timeout=20)

    assert result.returncode == 0
    assert {stream for stream, _ in chunks} == {"stdout", "stderr"}
    assert all(isinstance(chunk, bytes) and chunk for _, chunk in chunks)
    streamed_out = b"".join(c for s, c in chunks if s == "stdout")
    streamed_err = b"".join(c for s, c in chunks if s == "stderr")
    assert streamed_out == payload(31, 1500000)
    assert streamed_err == b"progress\n" * 40000
    assert (result.stdout, result.stdout_dropped) == expected_capture(streamed_out, 1024)
    assert (result.stderr, result.stderr_dropped) == expected_capture(streamed_err, 1024)


def test_on_output_that_raises_propagates_and_leaves_nothing(backend: str) -> None:
    def explode(stream: str, chunk: bytes) -> None:
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        run(["sh", "-c", "echo x; exec sleep 1"], on_output=explode, grace=1,
            backend=backend, timeout=20)
    # the autouse guard fails the test if the sleep is still around


@pytest.mark.parametrize("as_fd", [False, True])
def test_tee_receives_both_streams(backend: str, tmp_path: Path, as_fd: bool) -> None:
    out_data = payload(41, 400_000)
    code = WRITE_PAYLOAD + "os.write(2, b'\\xee' * 5000)\n"
    path = tmp_path / "tee.log"

    with open(path, "wb") as tee_file:
        tee_file.write(b"preamble|")  # flushed by run() before the first chunk is teed
        tee = tee_file.fileno() if as_fd else tee_file
        if as_fd:
            tee_file.flush()
        result = run(py(code, "41", "400000", "1"), tee=tee, capture_limit=100,
                     backend=backend, timeout=20)

    assert result.returncode == 0
    teed = path.read_bytes()
    assert teed.startswith(b"preamble|")
    teed = teed[len(b"preamble|"):]
    # The two streams interleave in arrival order; each keeps its own order.
    assert len(teed) == len(out_data) + 5000
    assert teed.replace(b"\xee", b"") == out_data.replace(b"\xee", b"")
    assert teed.count(b"\xee") == out_data.count(b"\xee") + 5000
    assert result.stdout_dropped == len(out_data) - 100  # capture stays bounded while teeing


# ----------------------------------------------------------------------------- programming errors

NAN = float("nan")


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        ({"args": []}, ValueError),
        ({"args": ()}, ValueError),
        ({"args": "echo hi"}, TypeError),
        ({"args": b"echo"}, TypeError),
        ({"args": None}, TypeError),
        ({"args": ["echo", "a\0b"]}, ValueError),
        ({"args": [b"ec\0ho"]}, ValueError),
        ({"args": ["echo", 3]}, TypeError),
        ({"timeout": NAN}, ValueError),
        ({"timeout": "1"}, TypeError),
        ({"timeout": True}, TypeError),
        ({"grace": -1}, ValueError),
        ({"grace": -0.001}, ValueError),
        ({"grace": NAN}, ValueError),
        ({"grace": math.inf}, ValueError),
        ({"grace": "5"}, TypeError),
        ({"env": {"A\0": "b"}}, ValueError),
        ({"env": {"A": "b\0c"}}, ValueError),
        ({"env": {"A=B": "c"}}, ValueError),
        ({"env": {"": "c"}}, ValueError),
        ({"env": {"A": 1}}, TypeError),
        ({"env": [("A", "b")]}, TypeError),
        ({"input": "text"}, TypeError),
        ({"capture_limit": -1}, ValueError),
        ({"capture_limit": 1.5}, TypeError),
        ({"on_output": 3}, TypeError),
        ({"cwd": "a\0b"}, ValueError),
        ({"cwd": 3}, TypeError),
        ({"tee": -1}, ValueError),
        ({"tee": "file.log"}, TypeError),
    ],
)
def test_programming_errors_raise_before_anything_starts(backend: str, kwargs: dict, exc) -> None:
    call = {"args": ["sh", "-c", "echo started >&2; sleep 5"], "timeout": 10, **kwargs}
    before = set(descendants())

    with pytest.raises(exc):
        run(backend=backend, **call)

    assert set(descendants()) == before  # nothing was spawned


def test_unknown_backend_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="backend"):
        run(["true"], backend="bogus")


def test_kill_switch_selects_the_subprocess_backend(monkeypatch) -> None:
    monkeypatch.setenv("SUBPROCESS_TREE_KILL_ENABLED", "false")

    result = run(["sh", "-c", "echo ok"], timeout=10)

    assert result.backend == "subprocess"
    assert result.stdout == b"ok\n"
    assert proc_group.backend_status()[0] == "subprocess"


def test_large_output_on_both_streams_at_once_does_not_deadlock(backend: str) -> None:
    code = """
import os, threading
def pump(fd, byte):
    block = byte * 65536
    for _ in range(48):
        os.write(fd, block)
t = threading.Thread(target=pump, args=(2, b"e"))
t.start()
pump(1, b"o")
t.join()
"""
    result = run(py(code), backend=backend, timeout=20)

    assert result.returncode == 0
    assert result.stdout == b"o" * (48 * 65536)
    assert result.stderr == b"e" * (48 * 65536)


def test_python_child_sees_its_arguments_unchanged(backend: str) -> None:
    args = ["plain", "with space", "quote\"'", "", "\u00fcnicode", "-c", "$HOME", "*"]

    result = run(py("import sys, json; print(json.dumps(sys.argv[1:]))", *args),
                 backend=backend, timeout=10)

    import json

    assert json.loads(result.stdout) == args


def test_sys_executable_is_runnable(backend: str) -> None:
    # Sanity: the interpreter the other tests drive is what they think it is.
    result = run([sys.executable, "-c", "import sys; print(sys.version_info[0])"],
                 backend=backend, timeout=10)
    assert result.stdout == b"3\n"


EMFILE_CALLER = """
import errno, json, os, resource, sys
from retest.proc_group import run
backend = sys.argv[1]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
fds_before = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
# No room for a new fd (the limit is the lowest free number): the first pipe fails.
lowest_free = next(fd for fd in range(len(fds_before) + 1) if fd not in fds_before)
resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
try:
    starved = run(["sh", "-c", "echo should-not-run"], backend=backend, timeout=10)
finally:
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
fds_after = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
again = run(["sh", "-c", "echo fine"], backend=backend, timeout=10)
""" + CPYTHON_EMFILE_LEAK + """
def lowest_free():
    fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
    return next(fd for fd in range(len(fds) + 1) if fd not in fds)
print(json.dumps({
    "returncode": starved.returncode, "spawn_errno": starved.spawn_errno,
    "spawn_error": starved.spawn_error, "stdout": starved.stdout.decode(),
    "fds_leaked": len(fds_after) - len(fds_before), "again": again.stdout.decode(),
    "cpython_leak": cpython_emfile_leak(lowest_free),
}))
"""


def test_fd_exhaustion_is_a_spawn_error_not_an_exception(backend: str) -> None:
    from helpers_proc import child_env

    caller = run(py(EMFILE_CALLER, backend), env=child_env(), backend=backend, timeout=30)

    assert caller.returncode == 0, caller.stderr.decode()
    import json

    report = json.loads(caller.stdout)
    assert report["returncode"] is None
    assert report["spawn_errno"] == errno.EMFILE
    assert "Too many open files (RLIMIT_NOFILE " in report["spawn_error"]
    # the run's own fds ran out, before the command: not to be read as the command's failure
    assert report["spawn_error"].startswith("the run's own pipes")
    assert report["spawn_error"].endswith(": the command never ran")
    assert report["stdout"] == ""
    # the failed start closed what it had opened (subprocess: as far as CPython's Popen does)
    assert_emfile_leaks_nothing_of_ours(backend, report["fds_leaked"], report["cpython_leak"])
    assert report["again"] == "fine\n"


def test_the_callers_inheritable_fds_do_not_leak_into_the_command(backend: str) -> None:
    read_end, write_end = os.pipe()
    try:
        os.set_inheritable(write_end, True)  # e.g. a pipe or lock file a library made inheritable
        code = f"import os, sys\ntry:\n    os.fstat({write_end})\n    print('leaked')\nexcept OSError:\n    print('closed')"

        result = run(py(code), backend=backend, timeout=10)

        assert result.stdout == b"closed\n"
    finally:
        os.close(read_end)
        os.close(write_end)


def test_non_utf8_argument_bytes_reach_the_command_unchanged(backend: str) -> None:
    result = run([b"sh", b"-c", b'printf %s "$1"', b"sh", b"\xff\xfe raw"], backend=backend, timeout=10)

    assert result.returncode == 0
    assert result.stdout == b"\xff\xfe raw"
    assert os.fsencode(result.args[4]) == b"\xff\xfe raw"  # args text round-trips (surrogateescape)


def test_empty_env_is_an_empty_environment(backend: str) -> None:
    result = run(["env"], env={}, backend=backend, timeout=10)  # found on the default PATH

    assert result.returncode == 0, result.spawn_error
    assert result.stdout == b""
