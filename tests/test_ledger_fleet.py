"""Many gate hosts, one PostgreSQL ledger: the bound and the one-alert rule under SIGKILL (issue 12).

Each "host" is a clone of one origin repository with its own ``RETEST_HOST_ID``, so its own
gate lock and kept worktree, exactly as on separate machines; every gate is a real
``python -m retest gate`` process. Per round, gates on every host race on the same tasks
(each suite an infra failure: lock-busy), a random third of them is SIGKILLed at random
moments, then one more gate per (host, task) runs to completion (a killed claimant's alert is
taken over: at once on its own host, where its pid is known dead). Then, per (task, sha, verdict):

* exactly one alert row and no claim left pending;
* the alert was sent exactly once, or once more only by a gate killed after sending and
  before confirming (the at-least-once window, counted separately);
* every acknowledged infra attempt number is unique, requeues only within the budget, holds
  only past it, and the count exceeds the acknowledged attempts by at most the gates killed.

``RETEST_FLEET_ROUNDS`` sets the rounds (default 2; the figures in bench/results.md are from 20).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest

from conftest import descendants, pid_alive, reap_own_zombies, wait_until
from gitrepo import Repo, gate_env, make_repo
from ledgers import LedgerPlace, place, require_server
from retest.ledger import open_ledger

ROUNDS = int(os.environ.get("RETEST_FLEET_ROUNDS", "2"))
HOSTS, TASKS, RACERS_PER_HOST_TASK, RETRY_MAX = 3, 3, 2, 3
LOCKED = (f"{sys.executable} -c \"print('sqlite3.OperationalError: database is locked'); "
          f"raise SystemExit(1)\"")
SINK = ("import json, os, sys; fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT); "
        "doc = json.load(sys.stdin); "
        "os.write(fd, (json.dumps({'seq': int(os.environ['GATE_SEQ']), 'task': doc['task_id'], "
        "'sha': doc['sha'], 'verdict': doc['verdict'], 'rule': doc['rule']}) + '\\n').encode())")


@dataclass
class Gate:
    seq: int
    host: int
    task: str
    proc: subprocess.Popen[bytes]
    killed: bool = False
    doc: Optional[dict[str, Any]] = None


@dataclass
class Fleet:
    origin: Repo
    hosts: list[Path]
    ledger: LedgerPlace
    sink: Path
    gates: list[Gate] = field(default_factory=list)

    def env(self, host: int, seq: int) -> dict[str, str]:
        return dict(self.origin.env, **self.ledger.env, RETEST_HOST_ID=f"host-{host}",
                    GATE_SEQ=str(seq), MERGE_GATE_INFRA_RETRY_MAX=str(RETRY_MAX),
                    MERGE_RETEST_COMMAND=LOCKED, MERGE_GATE_ALERT_TIMEOUT_S="5",
                    MERGE_GATE_ALERT_COMMAND=f"{sys.executable} -c \"{SINK}\" {self.sink}",
                    MERGE_GATE_WORKTREE_DIR=str(self.hosts[host].parent / f"wt-{host}"),
                    MERGE_GATE_LOCK_WAIT_S="0.3")

    def start(self, host: int, task: str) -> Gate:
        seq = len(self.gates)
        proc = subprocess.Popen(
            [sys.executable, "-m", "retest", "gate", "--repo", str(self.hosts[host]),
             "--branch", f"origin/{task}", "--onto", "origin/main", "--task", task, "--json"],
            env=self.env(host, seq), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL)
        gate = Gate(seq, host, task, proc)
        self.gates.append(gate)
        return gate

    def finish(self, gate: Gate) -> None:
        out, _ = gate.proc.communicate(timeout=120)
        if gate.proc.returncode in (3, 75):
            gate.doc = json.loads(out)
        else:
            assert gate.killed, f"gate {gate.seq} exit {gate.proc.returncode} without being killed"


def build_fleet(root: Path, ledger: LedgerPlace) -> tuple[Fleet, dict[str, str]]:
    origin = make_repo(root / "origin")
    shas = {f"t{k}": origin.branch(f"t{k}", {f"task{k}.py": f"K = {k}\n"}) for k in range(TASKS)}
    hosts = []
    for host in range(HOSTS):
        clone = root / f"host-{host}" / "repo"
        clone.parent.mkdir(parents=True)
        origin.git("clone", "-q", "--no-local", str(origin.path), str(clone))
        hosts.append(clone)
    return Fleet(origin, hosts, ledger, root / "alerts.jsonl"), shas


def one_round(root: Path, ledger: LedgerPlace, rng: random.Random) -> dict[str, Any]:
    fleet, shas = build_fleet(root, ledger)
    racers = [(h, t) for h in range(HOSTS) for t in shas for _ in range(RACERS_PER_HOST_TASK)]
    rng.shuffle(racers)
    started = [fleet.start(h, t) for h, t in racers]
    victims = rng.sample(started, len(started) // 3)
    t0 = time.monotonic()
    for gate in sorted(victims, key=lambda _: rng.random()):
        time.sleep(max(0.0, t0 + rng.uniform(0.3, 3.0) - time.monotonic()))
        if gate.proc.poll() is None:
            os.kill(gate.proc.pid, 9)  # our own child, by its pid
            gate.killed = True
    for gate in started:
        fleet.finish(gate)
    # One more gate per (host, task), to completion: spent budgets hold, and a claim a killed
    # gate left unsent is taken over by the gate of its own host (its pid is known dead).
    for host in range(HOSTS):
        for task in shas:
            fleet.finish(fleet.start(host, task))
    return check(fleet, shas)


def check(fleet: Fleet, shas: dict[str, str]) -> dict[str, Any]:
    ledger = open_ledger(fleet.ledger.env)
    sends = [json.loads(line) for line in fleet.sink.read_text().splitlines()] \
        if fleet.sink.exists() else []
    killed = [g for g in fleet.gates if g.killed]
    figures: dict[str, Any] = {"gates": len(fleet.gates), "killed": len(killed), "keys": {}}
    alert_rows = Counter((a["task"], a["sha"], a["verdict"]) for a in ledger.alerts())
    assert ledger.pending_alerts() == []
    for task, sha in shas.items():
        key = (task, sha, "lock-busy")
        decided = [g.doc for g in fleet.gates if g.task == task and g.doc is not None]
        assert {d["verdict"] for d in decided} == {"lock-busy"}, decided
        acked = [d["infra_attempt"] for d in decided]
        count = ledger.infra_attempts(*key)
        killed_here = sum(1 for g in killed if g.task == task)
        context = f"{task}: acked {sorted(acked)}, counted {count}, {killed_here} killed"
        assert len(set(acked)) == len(acked), context
        assert max(acked) <= count <= len(acked) + killed_here, context
        for d in decided:
            assert (d["action"] == "requeue") == (d["infra_attempt"] <= RETRY_MAX), (d, context)
        assert alert_rows[key] == 1, context
        sent = [s for s in sends if (s["task"], s["sha"]) == (task, sha)]
        by_killed = sum(1 for s in sent if fleet.gates[s["seq"]].killed)
        assert 1 <= len(sent) <= 1 + by_killed, (sent, context)
        figures["keys"][task] = {"acked": len(acked), "counted": count, "killed": killed_here,
                                 "requeues": sum(d["action"] == "requeue" for d in decided),
                                 "holds": sum(d["action"] == "hold" for d in decided),
                                 "alert_rows": alert_rows[key], "alerts_sent": len(sent),
                                 "sent_by_killed": by_killed}
    assert sum(alert_rows.values()) == len(shas)
    return figures


def test_gates_on_many_hosts_keep_one_budget_and_send_one_alert(tmp_path: Path) -> None:
    require_server()
    rng = random.Random(12)
    report = []
    for number in range(ROUNDS):
        for where in place("postgresql", tmp_path / f"ledger-{number}"):
            started = time.monotonic()
            figures = one_round(tmp_path / f"round-{number}", where, rng)
            figures["round"], figures["s"] = number + 1, round(time.monotonic() - started, 1)
            report.append(figures)
            if os.environ.get("RETEST_FLEET_REPORT"):  # round by round: a live record
                with open(os.environ["RETEST_FLEET_REPORT"], "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(figures, sort_keys=True) + "\n")

            def nothing_left() -> bool:
                reap_own_zombies()
                return not [p for p in descendants() if pid_alive(p)]
            assert wait_until(nothing_left, timeout=10)
    assert len(report) == ROUNDS
