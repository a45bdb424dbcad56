"""Ledger durability under SIGKILL (issue 6, item 5), with real processes.

Workers record infra failures and claim alerts on one ledger file in a loop and print an ack
line after every committed call; the test SIGKILLs them (by their own pids) at random moments.
Afterwards the file must be intact, every acked attempt must be counted, nothing may be
invented (at most one unacked attempt per killed worker), the alert table holds one row per
key, an alert claimed by a worker killed before it was sent is sent by the next claimant,
and a fresh ``Ledger`` keeps counting where the dead ones stopped.

The full-gate variants SIGKILL ``python -m retest gate`` while its suite runs and at random
moments of a fast infra-failing gate: no process is left, the gate lock is free, and the
ledger is as consistent as above.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest

from conftest import descendants, pid_alive, reap_own_zombies, wait_until
from gitrepo import PYTHON_DIR, SLOW_SUITE, Repo, lock_is_free, make_repo
from retest import gitops
from retest.ledger import Ledger
from retest.merge_gate import GateMetrics, retest_branch

TASK, SHA = "T-durable", "d" * 40

#: Records infra failures (and claims a second alert key) forever, acking each committed call
#: with one write(2) of one line: the pipe holds whole lines or nothing.
WORKER = textwrap.dedent("""\
    import os, sys
    from retest.ledger import Ledger
    path, task, sha, retry_max = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    ledger = Ledger(path, busy_timeout_s=30)

    def ack(line):
        os.write(1, (line + "\\n").encode())

    def deliver(key):
        ack("SENT " + key)          # the alert is out ...
        ledger.alert_delivered(task, sha, key)
        ack("CONFIRMED " + key)     # ... and the ledger knows it

    ack("READY")
    while True:
        outcome = ledger.record_infra_failure(task, sha, "timeout", retry_max, "r",
                                              confirm_delivery=True)
        ack("ATTEMPT %d" % outcome.attempt)
        if outcome.alert_claimed:
            deliver("timeout")
        if ledger.claim_alert(task, sha, "other", "r", confirm_delivery=True):
            deliver("other")
""")


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    lines: list[str] = field(default_factory=list)
    reader: Optional[threading.Thread] = None

    def start_reading(self) -> None:
        def read() -> None:
            assert self.proc.stdout is not None
            for raw in self.proc.stdout:
                if raw.endswith(b"\n"):
                    self.lines.append(raw.decode().strip())

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()

    def kill_and_reap(self) -> None:
        try:
            os.kill(self.proc.pid, signal.SIGKILL)  # our own child, by its own pid
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        if self.reader is not None:
            self.reader.join(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start_worker(path: Path, retry_max: int) -> Worker:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": PYTHON_DIR}
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(path), TASK, SHA, str(retry_max)],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    worker = Worker(proc)
    worker.start_reading()
    return worker


def integrity(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


def alert_keys(path: Path) -> Counter[tuple[str, str, str]]:
    conn = sqlite3.connect(path)
    try:
        return Counter(conn.execute("SELECT task, sha, verdict FROM alerts").fetchall())
    finally:
        conn.close()


def unconfirmed_sends(lines: list[str], key: str) -> int:
    """1 if this worker's last word on ``key`` was SENT: it died between send and confirm."""
    last = [ln for ln in lines if ln in (f"SENT {key}", f"CONFIRMED {key}")]
    return int(bool(last) and last[-1] == f"SENT {key}")


def _acked(workers: list[Worker]) -> list[int]:
    """Attempts acked so far by these workers (their reader threads append as they read)."""
    return [int(ln.split()[1]) for w in workers for ln in list(w.lines) if ln.startswith("ATTEMPT ")]


@pytest.mark.parametrize("seed", [1, 2])
def test_killed_writers_lose_no_attempt_invent_none_and_alert_once(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    path = tmp_path / "ledger.sqlite3"
    retry_max = 40  # crossed during the storm: claims and takeovers happen under fire
    Ledger(path, busy_timeout_s=5).totals()  # create the schema once, as a gate would
    workers: list[Worker] = []
    live: list[Worker] = []
    try:
        for _ in range(3):
            live.append(start_worker(path, retry_max))
        workers.extend(live)
        storm_ends = time.monotonic() + 2.5
        while time.monotonic() < storm_ends:
            time.sleep(rng.uniform(0.0, 0.12))
            victim = live.pop(rng.randrange(len(live)))
            victim.kill_and_reap()
            fresh = start_worker(path, retry_max)
            live.append(fresh)
            workers.append(fresh)
        # On a loaded machine (the suite on 2 cores) workers may die before they ack much:
        # let the survivors work, without kills, until the storm means something and the
        # budget is spent, so that its alert is claimed (bounded; CI once ended short of it).
        calm_ends = time.monotonic() + 60
        while time.monotonic() < calm_ends:
            acked_now = _acked(workers)
            if len(acked_now) > len(workers) and max(acked_now, default=0) > retry_max:
                break
            time.sleep(0.05)
    finally:
        for worker in live:
            worker.kill_and_reap()

    kills = len(workers)  # every worker ended by SIGKILL
    acked = [int(ln.split()[1]) for w in workers for ln in w.lines if ln.startswith("ATTEMPT ")]
    context = f"seed {seed}: {kills} workers killed, {len(acked)} attempts acked"
    assert integrity(path) == "ok", context
    assert len(acked) > kills, f"the storm was too short to mean anything ({context})"

    ledger = Ledger(path, busy_timeout_s=5)  # a restart: a fresh instance on the same file
    count = ledger.infra_attempts(TASK, SHA, "timeout")
    # Each acked number was handed to exactly one caller and is still counted: none lost.
    assert len(set(acked)) == len(acked), context
    assert max(acked) <= count, context
    # Nothing invented: an attempt nobody acked belongs to a worker killed between its
    # commit and its ack, at most one per killed worker.
    assert len(acked) <= count <= len(acked) + kills, context
    assert set(range(1, count + 1)) >= set(acked)

    # One alert row per key; the spent budget has its row.
    keys = alert_keys(path)
    assert set(keys.values()) == {1}, keys
    assert (TASK, SHA, "timeout") in keys and (TASK, SHA, "other") in keys

    # A claim whose worker died before confirming is taken over by the next claimant (this
    # process): the alert goes out at least once; a duplicate only where a worker died
    # between its send and its confirmation.
    for key in ("timeout", "other"):
        sent = sum(w.lines.count(f"SENT {key}") for w in workers)
        pending_by_dead = [p for p in ledger.pending_alerts() if p["verdict"] == key]
        if ledger.claim_alert(TASK, SHA, key, confirm_delivery=True):
            assert pending_by_dead, f"{key}: claimed again without a dead claimant ({context})"
            sent += 1
            ledger.alert_delivered(TASK, SHA, key)
        assert sent >= 1, f"{key}: the alert was never sent ({context})"
        assert sent - 1 <= sum(unconfirmed_sends(w.lines, key) for w in workers), (key, context)
    assert ledger.pending_alerts() == []
    assert not ledger.claim_alert(TASK, SHA, "other", confirm_delivery=True)

    # The bound holds across the restart: counting resumes at count + 1, already spent.
    after = ledger.record_infra_failure(TASK, SHA, "timeout", retry_max, confirm_delivery=True)
    assert (after.attempt, after.exhausted, after.alert_claimed) == (count + 1, True, False)
    assert Ledger(path, busy_timeout_s=5).infra_attempts(TASK, SHA, "timeout") == count + 1


CLAIM_AND_DIE = textwrap.dedent("""\
    import os, signal, sys
    from retest.ledger import Ledger
    ledger = Ledger(sys.argv[1], busy_timeout_s=5)
    outcome = ledger.record_infra_failure(sys.argv[2], sys.argv[3], sys.argv[4], 0, "first",
                                          confirm_delivery=True)
    assert outcome.alert_claimed
    if sys.argv[5] == "die":
        os.kill(os.getpid(), signal.SIGKILL)   # after the claim, before the alert is out
    os.write(1, b"CLAIMED\\n")
    sys.stdin.read()                           # stay alive, claim unconfirmed, until told
""")


def claimant(path: Path, key: tuple[str, str, str], mode: str) -> subprocess.Popen[bytes]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": PYTHON_DIR}
    return subprocess.Popen([sys.executable, "-c", CLAIM_AND_DIE, str(path), *key, mode], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def test_a_claim_is_taken_over_only_from_a_dead_claimant(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(path, busy_timeout_s=5)

    alive = claimant(path, ("T", "s", "timeout"), "live")
    try:
        assert alive.stdout is not None and alive.stdout.readline() == b"CLAIMED\n"
        # Its claim is pending, but it may still be sending: never overtaken while it lives.
        assert not ledger.claim_alert("T", "s", "timeout", confirm_delivery=True)
    finally:
        alive.kill()
        alive.communicate(timeout=10)
    assert ledger.claim_alert("T", "s", "timeout", confirm_delivery=True)   # it died unconfirmed
    assert not ledger.claim_alert("T", "s", "timeout", confirm_delivery=True)  # we live
    ledger.alert_delivered("T", "s", "timeout")
    assert ledger.pending_alerts() == []

    # Without confirm_delivery (the old API) a claim is final, as before.
    dead = claimant(path, ("U", "s", "timeout"), "die")
    dead.communicate(timeout=10)
    assert dead.returncode == -signal.SIGKILL
    assert not ledger.claim_alert("U", "s", "timeout")
    assert [a["task"] for a in ledger.alerts()] == ["T", "U"]


# --------------------------------------------------------------------------- the whole gate

def gate_cli(repo: Repo, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "retest", "gate", "--repo", str(repo.path), *args],
                            env=env, cwd=repo.path, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def no_process_left(timeout: float) -> bool:
    def gone() -> bool:
        reap_own_zombies()
        return not [p for p in descendants() if pid_alive(p)]
    return wait_until(gone, timeout=timeout, interval=0.05)


def test_a_gate_killed_while_its_suite_runs_leaves_nothing_behind(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    repo.branch("slow", {"tests/test_slow.py": SLOW_SUITE})
    repo.branch("feature", {"feature.py": "VALUE = 1\n"})
    pid_file = tmp_path / "suite.pid"
    env = dict(repo.env, SUITE_PID_FILE=str(pid_file))
    proc = gate_cli(repo, env, "--branch", "slow", "--task", "T-kill", "--timeout", "120")
    try:
        assert wait_until(pid_file.exists, timeout=30), f"the suite never started (gate exit {proc.poll()})"
        suite_pid = int(pid_file.read_text())
        assert pid_alive(suite_pid)
        assert not lock_is_free(repo)  # the gate holds it while its suite runs
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)

    # The shepherd saw its caller die and took the suite's tree down (grace 0.5 s).
    assert no_process_left(timeout=10), [p for p in descendants() if pid_alive(p)]
    assert not pid_alive(suite_pid)
    assert lock_is_free(repo)
    # The dead gate's worktree is still there: the kept one (issue 12), which the next gate moves.
    assert gitops.KEPT_WORKTREE_PREFIX in repo.git("worktree", "list", "--porcelain")

    # The next gate runs at once (no stale lock), clears the dead gate's worktree, and decides.
    ledger_path = Path(env["RETEST_LEDGER_PATH"])
    decision = retest_branch(repo.path, "feature", env=env, metrics=GateMetrics())
    assert (decision.action, decision.rule) == ("merge", "passed.exit-0")
    assert repo.gate_worktrees() == []
    # The killed gate recorded nothing (it never decided); the ledger is whole.
    assert integrity(ledger_path) == "ok"
    ledger = Ledger(ledger_path, busy_timeout_s=5)
    assert ledger.infra_attempts("T-kill", decision.sha or "", "timeout") == 0
    assert [d["task_id"] for d in ledger.recent_decisions(10)] == ["feature"]


LOCKED_COMMAND = (f"{sys.executable} -c \"print('sqlite3.OperationalError: database is locked'); "
                  f"raise SystemExit(1)\"")
ALERT_SINK = "import sys; open(sys.argv[1], 'a').write(sys.stdin.read().strip() + '\\n')"


def test_gates_killed_at_random_moments_keep_the_ledger_consistent(tmp_path: Path) -> None:
    rng = random.Random(6)
    repo = make_repo(tmp_path)
    sha = repo.branch("flaky-infra", {"feature.py": "VALUE = 1\n"})
    alerts_file = tmp_path / "alerts.jsonl"
    retry_max = 2
    env = dict(repo.env, MERGE_GATE_INFRA_RETRY_MAX=str(retry_max), MERGE_RETEST_COMMAND=LOCKED_COMMAND,
               MERGE_GATE_ALERT_COMMAND=f"{sys.executable} -c \"{ALERT_SINK}\" {alerts_file}")
    args = ("--branch", "flaky-infra", "--task", "T-rand", "--json")

    def complete() -> dict[str, Any]:
        proc = gate_cli(repo, env, *args)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode in (3, 75), err
        doc: dict[str, Any] = json.loads(out)
        return doc

    started = time.monotonic()
    decided = [complete()]
    full_s = time.monotonic() - started
    killed = 0
    for _ in range(14):
        proc = gate_cli(repo, env, *args)
        try:
            time.sleep(rng.uniform(0.4, 1.3) * full_s)  # python start-up, git, suite, ledger
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                killed += 1
            out, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=10)
        if proc.returncode in (3, 75):
            decided.append(json.loads(out))
        assert no_process_left(timeout=10)
        assert lock_is_free(repo)
    # After the storm gates still decide; run them until the budget is spent (a claim a
    # killed gate left unsent is taken over by the first of them that holds).
    decided.append(complete())
    while decided[-1]["action"] != "hold":
        decided.append(complete())
    assert no_process_left(timeout=10)

    ledger_path = Path(env["RETEST_LEDGER_PATH"])
    assert integrity(ledger_path) == "ok"
    ledger = Ledger(ledger_path, busy_timeout_s=5)
    count = ledger.infra_attempts("T-rand", sha, "lock-busy")
    acked = [d["infra_attempt"] for d in decided]
    context = f"{killed} gates killed, infra attempts acked {acked}, counted {count}"
    assert {d["rule"] for d in decided} == {"lock-busy.sqlite"}, context
    assert len(set(acked)) == len(acked) and max(acked) <= count, context
    assert len(acked) <= count <= len(acked) + killed, context
    # Exactly one alert row; the alert went out at least once (a killed claimant's claim is
    # taken over), more than once only if a gate died between sending and confirming it.
    assert alert_keys(ledger_path) == Counter({("T-rand", sha, "lock-busy"): 1})
    assert ledger.pending_alerts() == []
    sent = alerts_file.read_text().splitlines() if alerts_file.exists() else []
    assert 1 <= len(sent) <= 1 + killed, context
    assert {json.loads(line)["rule"] for line in sent} == {"lock-busy.sqlite"}
    # No stale worktree survives the next gate.
    assert repo.gate_worktrees() == []


def test_a_gate_sends_the_alert_a_killed_gate_claimed_but_never_sent(tmp_path: Path) -> None:
    """The bug this file found: before ``confirm_delivery`` the claim was final, so a gate
    SIGKILLed between its claim and its send left the task held with no alert, ever."""
    repo = make_repo(tmp_path)
    sha = repo.branch("feature", {"feature.py": "VALUE = 1\n"})
    env = dict(repo.env, MERGE_GATE_INFRA_RETRY_MAX="0", MERGE_RETEST_COMMAND=LOCKED_COMMAND)
    ledger = Ledger(env["RETEST_LEDGER_PATH"], busy_timeout_s=5)
    dead = claimant(Path(ledger.path), ("T-lost", sha, "lock-busy"), "die")
    dead.communicate(timeout=10)
    assert dead.returncode == -signal.SIGKILL
    assert [p["task"] for p in ledger.pending_alerts()] == ["T-lost"]

    hook: list[dict[str, Any]] = []
    first = retest_branch(repo.path, "feature", task_id="T-lost", env=env, alert_hook=hook.append,
                          metrics=GateMetrics())
    second = retest_branch(repo.path, "feature", task_id="T-lost", env=env, alert_hook=hook.append,
                           metrics=GateMetrics())

    assert (first.action, first.rule, first.infra_attempt, first.alert) == \
        ("hold", "lock-busy.sqlite", 2, True)
    assert (second.action, second.alert) == ("hold", False)
    assert len(hook) == 1 and hook[0]["task_id"] == "T-lost"
    assert ledger.pending_alerts() == []
    assert len(ledger.alerts("T-lost")) == 1
