"""Type stubs of the private native module retest._proc_group (use retest.proc_group)."""

from typing import Any, Callable, Optional

PROTOCOL: str
CGROUP_REQUIRED: int
CGROUP_KEEP: int
CGROUP_REUSED: int

def run(
    shepherd: bytes,
    argv: list[bytes],
    envp: Optional[list[bytes]],
    cwd: Optional[bytes],
    input: Optional[bytes],
    timeout_s: float,
    grace_s: float,
    capture_limit: int,
    on_output: Optional[Callable[[str, bytes], object]],
    tee_fd: int,
    cgroup: Optional[bytes],
    cgroup_flags: int,
    stop_signal: int,
    evidence: bool,
    prepare: Optional[bytes],
    pool: int,
    /,
) -> dict[str, Any]: ...
def idle_shepherds() -> tuple[int, ...]: ...
def close_shepherds() -> int: ...
def running_shepherd(tid: int, /) -> Optional[int]: ...
def _fingerprint() -> Optional[int]: ...
def classify(
    stdout: bytes,
    stderr: bytes,
    returncode: Optional[int],
    timed_out: bool,
    spawn_error: Optional[str],
    escalated: bool,
    killed_at_deadline: int,
    is_pytest: bool,
    /,
) -> tuple[str, str, str, bool]: ...
