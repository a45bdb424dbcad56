"""Issue 11, item 5: the ledger's duration history per (repository, suite command)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from gitrepo import Repo, make_repo, sleeping_test
from retest.merge_gate import GateMetrics, retest_branch

REFINED_TIMEOUT_RULES = True


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    return make_repo(tmp_path)


def _gate(repo: Repo, branch: str, **kw: Any):
    return retest_branch(repo.path, branch, env=repo.env, metrics=GateMetrics(), **kw)


def test_a_timeout_is_compared_with_the_passing_runs(repo: Repo, caplog: pytest.LogCaptureFixture) -> None:
    first = _gate(repo, repo.branch("p1", {"tests/test_p1.py": sleeping_test(1.5)}) and "p1",
                  task_id="P1", timeout=20)
    assert first.verdict == "passed", first.reason
    assert first.evidence["history"] == {"passing_runs": 0, "budget_s": 20}
    second = _gate(repo, repo.branch("p2", {"tests/test_p2.py": sleeping_test(1.5)}) and "p2",
                   task_id="P2", timeout=20)
    assert second.verdict == "passed" and second.evidence["history"]["passing_runs"] == 1
    assert "warning" not in second.evidence["history"]  # ~2 s of a 20 s budget
    assert second.evidence["suite_key"] == first.evidence["suite_key"]

    with caplog.at_level(logging.WARNING, logger="retest.merge_gate"):
        slow = _gate(repo, repo.branch("slow", {"tests/test_slow.py": sleeping_test(60)}) and "slow",
                     task_id="S", timeout=1.5)
    assert slow.verdict == "timeout"
    history = slow.evidence["history"]
    assert history["passing_runs"] == 2 and history["budget_s"] == 1.5
    assert f"passing runs took {history['median_s']:.1f} s median over the last 2; budget 1.5 s" \
        in slow.reason
    # The passing runs slept 1.5 s each, so they took at least the whole of this budget: the gate warns.
    assert history["median_s"] >= 1.5 and "approach the budget" in history["warning"]
    assert any("approach the budget" in r.getMessage() for r in caplog.records)
