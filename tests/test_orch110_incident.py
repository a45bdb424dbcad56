"""ORCH-110 regression case TC-12: the incident, red before and green after.

The incident: a merge-gate re-test of a pytest-xdist suite timed out because a transient
fault kept the suite's helper services from coming up (they spin, retrying). The prior code
(``subprocess.run(timeout=...)``, every failure red) killed only pytest itself and rolled the
task back to development; the xdist workers' helpers lived on as orphans and burned the CPU,
so the next attempt timed out too, and more orphans piled up. With the fix (the five
kill-switches on) the same scenario kills the whole tree, requeues the task on
deploy-staging, and the next attempt, on a free CPU, passes and merges.

Scaled down, not simplified: a two-test suite run with ``-n 2`` (one test per worker), three
helper services per test and per core (six per test on two cores), 1.25 CPU-seconds of work per
test and a 7 s deadline. On a free CPU the suite takes ~3 s; under the spinning orphans it takes
well over the deadline whether or not the kernel groups each session's CPU share (autogroup):
with it, each orphan is a session of its own and the suite gets one share of many; without it,
each worker gets about one sixth of a core (12 orphans and 2 workers on 2 cores). The test asserts the causal
facts (the orphans are alive and consuming CPU before, none exists after, and the gate's
decisions) and kills every orphan by its recorded pid in a ``finally``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import pytest

from conftest import descendants
from gitrepo import Repo, make_repo
from helpers_proc import alive, pid_alive, wait_until
from orch110_helpers import (
    SWITCHES,
    XDIST_SUITE,
    all_recorded,
    cpu_seconds_over,
    cpu_ticks,
    gate,
    incident_run_dir,
    incident_suite_files,
    kill_all_recorded,
    kinds,
    ledger_rows,
    switches,
    with_env,
)
from retest import config, proc_group
from retest.merge_gate import GateDecision

pytest.importorskip("xdist", reason="pytest-xdist is part of the test extra")

#: The gate's re-test deadline, scaled down from 900 s; room for xdist's start, the probe in
#: every worker and the two tests on a loaded 2-core machine (4.5 s was seen to run out).
DEADLINE_S = 7.0
TESTS = 2  # one per xdist worker
#: Enough spinning orphans to starve the suite on any core count (capped for large machines):
#: without autogroup a worker's share is about cores / (orphans + workers).
HELPERS_PER_TEST = min(24, 3 * len(os.sched_getaffinity(0)))
WORK_CPU_S = 1.25
#: Helper services spinning when both workers hang in their test: the would-be orphans.
SPINNING = TESTS * HELPERS_PER_TEST


class Incident(NamedTuple):
    repo: Repo
    branch: str
    sha: str
    fault: Path
    root: Path


@pytest.fixture
def incident(tmp_path: Path) -> Incident:
    repo = make_repo(tmp_path, files={"README.md": "the shop\n"})
    sha = repo.branch("orders", incident_suite_files(tests=TESTS, helpers=HELPERS_PER_TEST, work_s=WORK_CPU_S))
    fault = tmp_path / "fault"
    fault.write_text("the helper services cannot come up (a transient infrastructure fault)\n")
    return Incident(repo, "orders", sha, fault, tmp_path)


def attempt(incident: Incident, env: dict[str, str], name: str) -> tuple[GateDecision, Path]:
    """One gate run of the incident's branch; the suite's processes record into ``name/pids``."""
    run_dir = incident_run_dir(incident.root, name)
    decision = gate(incident.repo, incident.branch, task_id="SHOP-110", command=XDIST_SUITE,
                    timeout=DEADLINE_S,
                    env=with_env(env, INCIDENT_RUN_DIR=str(run_dir), INCIDENT_FAULT=str(incident.fault)))
    return decision, run_dir / "pids"


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def live_descendants() -> list[int]:
    return [p for p in descendants() if pid_alive(p)]


def test_tc12_before_switches_off_rolls_back_and_orphans_burn_the_cpu(incident: Incident) -> None:
    """TC-12 before: every switch off (the prior path) -> rollback, orphans, and a second failure."""
    env = switches(incident.repo.env, off=SWITCHES)
    pid_dirs: list[Path] = []
    try:
        # Attempt 1: the transient fault holds both workers in their test; the deadline fires.
        first, pids1 = attempt(incident, env, "before-1")
        pid_dirs.append(pids1)

        assert (first.action, first.stage, first.verdict, first.rule) == \
            ("rollback", "development", "red", "red.classify-disabled")
        assert "runner: timeout" in first.reason  # it was the deadline, yet the task goes back
        assert first.evidence["backend"] == "subprocess" and first.evidence["timed_out"] is True
        tree1 = kinds(pids1)
        assert len(tree1.get("controller", ())) == 1 and len(tree1.get("worker", ())) == 2, tree1
        assert len(tree1.get("helper", ())) == SPINNING, tree1
        # subprocess.run killed pytest itself, nothing else: the workers are orphans now
        # (re-parented to the nearest subreaper, this test process) and the helpers live on.
        assert alive(tree1["controller"]) == []
        for worker in alive(tree1["worker"]):
            assert parent_of(worker) == os.getpid()
        orphans = sorted(tree1["helper"])
        assert alive(orphans) == orphans
        burned = cpu_seconds_over(orphans, 0.5)
        assert all(seconds > 0 for seconds in burned.values()), burned
        assert sum(burned.values()) >= 0.25, burned  # busy-looping, not sleeping

        # Attempt 2: the fault is gone, the branch is unchanged, but the orphans still burn
        # the CPU the suite needs, and it misses the deadline again.
        incident.fault.unlink()
        cpu_before = {pid: cpu_ticks(pid) for pid in orphans}
        second, pids2 = attempt(incident, env, "before-2")
        pid_dirs.append(pids2)
        cpu_after = {pid: cpu_ticks(pid) for pid in orphans}

        assert (second.action, second.stage, second.verdict, second.rule) == \
            ("rollback", "development", "red", "red.classify-disabled")
        assert second.evidence["timed_out"] is True, second.evidence  # contention, not red code
        assert "runner: timeout" in second.reason
        assert second.sha == first.sha == incident.sha
        # While attempt 2 ran, the orphans took CPU time it needed: on average more than
        # half a core of the two over its whole deadline.
        stolen = sum(cpu_after[p] - cpu_before[p] for p in orphans) / os.sysconf("SC_CLK_TCK")
        assert stolen > DEADLINE_S / 2, stolen
        # Orphans pile up: the first attempt's are all still alive and burning, and the
        # second attempt left processes of its own behind.
        assert alive(orphans) == orphans
        tree2 = kinds(pids2)
        assert alive(tree2.get("controller", ())) == []
        assert len(alive(all_recorded(pid_dirs))) > len(orphans)

        # The prior path counted nothing and kept no decisions (metrics off too).
        assert ledger_rows(env, "counters") == [] and ledger_rows(env, "infra_attempts") == []
    finally:
        kill_all_recorded(pid_dirs)
    assert alive(all_recorded(pid_dirs)) == []
    assert wait_until(lambda: not live_descendants(), timeout=2.0), live_descendants()


def test_tc12_after_switches_on_requeues_leaves_no_orphan_then_merges(incident: Incident) -> None:
    """TC-12 after: every switch on -> requeue on deploy-staging, no orphan, then a merge."""
    env = switches(incident.repo.env)
    pid_dirs: list[Path] = []
    try:
        # Attempt 1: the same transient fault, the same deadline.
        first, pids1 = attempt(incident, env, "after-1")
        pid_dirs.append(pids1)

        assert (first.action, first.stage, first.verdict, first.rule) == \
            ("requeue", "deploy-staging", "timeout", "timeout.deadline")
        assert first.infra and first.infra_attempt == 1 and not first.alert
        assert first.evidence["backend"] == "native" and first.evidence["timed_out"] is True
        tree1 = kinds(pids1)
        everyone = all_recorded([pids1])
        assert len(tree1.get("worker", ())) == 2 and len(tree1.get("helper", ())) == SPINNING, tree1
        # The whole tree died with the run: controller, workers, helpers in their own sessions.
        assert alive(everyone) == []
        assert first.processes_killed >= len(everyone)
        assert live_descendants() == []

        # Attempt 2: the fault is gone and the CPU is free: the same sha passes and merges.
        incident.fault.unlink()
        second, pids2 = attempt(incident, env, "after-2")
        pid_dirs.append(pids2)

        assert (second.action, second.stage, second.verdict, second.rule) == \
            ("merge", "main", "passed", "passed.exit-0"), (second.reason, second.evidence)
        assert f"{TESTS} passed" in second.reason
        assert second.evidence["timed_out"] is False
        # inside the deadline the runner was given: the budget plus the diagnostic stage's
        # seconds, which the runner waits before SIGTERM (a suite that ends in them passes)
        assert second.evidence["run_duration_s"] < DEADLINE_S + config.ForensicsSettings().diagnose_s
        assert second.sha == first.sha == incident.sha and second.attempt == 2
        assert len(kinds(pids2).get("helper", ())) == SPINNING  # the services came up this time
        assert alive(all_recorded(pid_dirs)) == []

        docs = [json.loads(r["doc"]) for r in ledger_rows(env, "decisions")]
        assert [(d["action"], d["stage"]) for d in docs] == [("requeue", "deploy-staging"), ("merge", "main")]
        assert [(r["verdict"], r["attempts"]) for r in ledger_rows(env, "infra_attempts")] == [("timeout", 1)]
        assert ledger_rows(env, "alerts") == []
    finally:
        kill_all_recorded(pid_dirs)
    assert live_descendants() == []
    assert proc_group.backend_status(env)[0] == "native"
