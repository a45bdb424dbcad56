"""measure_coverage on real repositories with real pytest suites under coverage.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from gitrepo import FAILING_TEST, Repo, make_repo, sleeping_test
from retest.coverage_gate import CoverageResult, measure_coverage

pytest.importorskip("coverage")

HALF_COVERED = "def add(a, b):\n    return a + b\n\n\ndef unused(x):\n    y = x * 2\n    z = y + 1\n    return z\n"


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    return make_repo(tmp_path)


def test_full_coverage_passes_the_threshold(repo: Repo) -> None:
    result = measure_coverage(repo.path, env=repo.env, min_percent=90)

    assert isinstance(result, CoverageResult)
    assert result.verdict.kind == "passed"
    assert result.percent == 100.0 and result.passed_threshold
    assert result.num_statements and result.covered_lines == result.num_statements
    assert not (repo.path / ".coverage").exists()  # the data file never lands in the repository
    assert result.to_dict()["verdict"] == "passed"


def test_below_the_threshold_fails_it(repo: Repo) -> None:
    repo.commit({"calc.py": HALF_COVERED}, "an untested function")

    result = measure_coverage(repo.path, env=repo.env, min_percent=95)

    assert result.verdict.kind == "passed"
    assert result.percent is not None and 50 < result.percent < 95
    assert not result.passed_threshold


def test_threshold_defaults_to_the_setting(repo: Repo) -> None:
    repo.commit({"calc.py": HALF_COVERED}, "an untested function")
    env = dict(repo.env, COVERAGE_GATE_MIN_PERCENT="99.5")
    assert measure_coverage(repo.path, env=env).min_percent == 99.5


def test_a_red_suite_never_passes(repo: Repo) -> None:
    repo.commit({"tests/test_broken.py": FAILING_TEST}, "a failing test")

    result = measure_coverage(repo.path, env=repo.env, min_percent=0)

    assert result.verdict.kind == "red" and "1 failed" in result.verdict.reason
    assert result.percent is not None  # measured all the same
    assert not result.passed_threshold


def test_a_hanging_suite_is_a_timeout(repo: Repo) -> None:
    repo.commit({"tests/test_slow.py": sleeping_test(60)}, "a slow test")

    result = measure_coverage(repo.path, env=repo.env, timeout=1.5)

    assert result.verdict.kind == "timeout" and result.run.timed_out
    assert not result.passed_threshold


def test_a_command_that_cannot_run_never_raises(repo: Repo) -> None:
    result = measure_coverage(repo.path, env=repo.env, command=["retest-no-such-command-xyz"])

    assert result.verdict.kind == "other" and result.percent is None
    assert result.report_error and not result.passed_threshold


def test_a_command_string_is_split_not_given_to_a_shell(repo: Repo, tmp_path: Path) -> None:
    marker = tmp_path / "shell-ran"
    result = measure_coverage(repo.path, env=repo.env,
                              command=f"{sys.executable} -m coverage run -m pytest -q ; touch {marker}")
    assert not marker.exists()
    # pytest got ";", "touch" and the path as arguments: a usage error, not a pass.
    assert result.verdict.kind == "other" and not result.passed_threshold
