"""Property tests: for hostile but well-typed inputs run() returns a RunResult, or raises only
the documented TypeError/ValueError for a programming error."""

from __future__ import annotations

import math
import os
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retest import proc_group

SETTINGS = settings(max_examples=int(os.environ.get("RETEST_FUZZ_EXAMPLES", "40")), deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

specials = st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0])
timeouts = st.one_of(st.none(), specials, st.floats(-10, 0.3), st.integers(-5, 0))
graces = st.one_of(st.none(), specials, st.floats(-1, 0.2))
env_values = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
envs = st.one_of(st.none(), st.dictionaries(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=12),
    env_values, max_size=5))
cwds = st.one_of(st.none(), st.sampled_from(["/", "/nonexistent/dir", "/etc/hostname", "", "."]),
                 st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20))
args_strategy = st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30),
                         min_size=0, max_size=4)


def _expect_programming_error(args, env, timeout, grace, cwd) -> bool:
    if not args:
        return True
    if any("\0" in a for a in args) or (cwd is not None and "\0" in cwd):
        return True
    if isinstance(timeout, float) and math.isnan(timeout):
        return True
    if grace is not None and (not math.isfinite(grace) or grace < 0):
        return True
    if env is not None and any((not k) or "=" in k or "\0" in k or "\0" in v for k, v in env.items()):
        return True
    return False


@SETTINGS
@given(args=args_strategy, env=envs, timeout=timeouts, grace=graces, cwd=cwds,
       data=st.one_of(st.none(), st.binary(max_size=2048)))
def test_run_never_raises_for_runtime_faults(args, env, timeout, grace, cwd, data, backend) -> None:
    # Prefix a harmless real command so most examples start something: `true` ignores its args.
    argv = ["true", *args] if args and args[0] != "" else args
    expect_error = _expect_programming_error(argv, env, timeout, grace, cwd)
    try:
        r = proc_group.run(argv, env=env, timeout=timeout, grace=grace, cwd=cwd, input=data,
                           backend=backend)
    except (TypeError, ValueError):
        assert expect_error
        return
    assert not expect_error
    assert isinstance(r, proc_group.RunResult) and r.backend == backend
    assert (r.returncode is None) == (r.spawn_error is not None)


@pytest.mark.parametrize("timeout", [0, -1, 0.0, -math.inf, 1e-9])
def test_zero_and_negative_timeouts_are_already_due(timeout, backend) -> None:
    r = proc_group.run(["sleep", "5"], timeout=timeout, grace=0.1, backend=backend)
    assert r.timed_out and r.duration_s < 4


def test_infinite_timeout_means_none(backend) -> None:
    r = proc_group.run(["true"], timeout=math.inf, backend=backend)
    assert r.returncode == 0 and not r.timed_out


@pytest.mark.parametrize("bad", [math.nan])
def test_nan_timeout_is_a_value_error(bad, backend) -> None:
    with pytest.raises(ValueError):
        proc_group.run(["true"], timeout=bad, backend=backend)


@pytest.mark.parametrize("bad", [-1, math.nan, math.inf])
def test_bad_grace_is_a_value_error(bad, backend) -> None:
    with pytest.raises(ValueError):
        proc_group.run(["true"], grace=bad, backend=backend)


@pytest.mark.parametrize("bad", [b"a\0b", "x\0"])
def test_nul_byte_in_an_argument_is_a_value_error(bad, backend) -> None:
    with pytest.raises(ValueError):
        proc_group.run(["echo", bad], backend=backend)


@pytest.mark.parametrize("bad", ["echo hi", b"echo", 42, None, [1]])
def test_wrong_types_are_type_errors(bad, backend) -> None:
    with pytest.raises(TypeError):
        proc_group.run(bad, backend=backend)  # type: ignore[arg-type]


def test_huge_argument_list_is_a_spawn_error(backend) -> None:
    args = ["true"] + ["x" * 1000] * 5000  # ~5 MB: beyond ARG_MAX
    r = proc_group.run(args, backend=backend)
    assert r.returncode is None and r.spawn_errno == 7  # E2BIG
    assert "Argument list too long" in (r.spawn_error or "")


def test_many_arguments_within_the_limit_reach_the_child(backend) -> None:
    args = [sys.executable, "-c", "import sys; print(len(sys.argv))"] + ["a"] * 20000
    r = proc_group.run(args, backend=backend)
    assert r.returncode == 0 and r.stdout.strip() == b"20001"
