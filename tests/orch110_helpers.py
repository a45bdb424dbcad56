"""Shared helpers of the ORCH-110 incident regression suite (``tests/test_orch110_*.py``).

Everything here builds *real* things: git repositories (``gitrepo``), pytest suites that run
under the runner or the gate, processes that record their pids as files (``helpers_proc``),
and reads of the real SQLite ledger. Nothing is mocked.

Two suites are used:

* ``tree_suite_files()``: one test that starts a detached helper (its own session, as test
  servers do), records both pids and sleeps; it finishes at once when the "fault" marker is
  gone. Cheap: used for the routing cases (timeout, tree kill).
* ``incident_suite_files()``: the incident's suite, run with pytest-xdist (``-n 2``). Each
  test starts helper services and does a fixed amount of CPU work. While the fault marker
  exists the helpers cannot come up and spin retrying, and the tests wait for them, so the
  run outlives its deadline; a prior-path kill orphans the spinning helpers, which then
  burn the CPU the next attempt needs.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from gitrepo import Repo
from helpers_proc import alive, kill_recorded, recorded_pids
from retest import config
from retest.merge_gate import GateDecision, GateMetrics, retest_branch

PY = sys.executable

#: The five kill-switches, in the order of DESIGN.md.
SWITCHES: tuple[str, ...] = config.KILL_SWITCHES

#: pytest with xdist and two workers. The gate's test environment disables plugin
#: autoload (for speed), so xdist is loaded explicitly.
XDIST_SUITE = [PY, "-m", "pytest", "-q", "-p", "xdist", "-n", "2", "-p", "no:cacheprovider"]
PLAIN_SUITE = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider"]


# --------------------------------------------------------------------------- environments


def switches(env: Mapping[str, str], *, off: Iterable[str] = ()) -> dict[str, str]:
    """``env`` with every kill-switch set explicitly: on, except those named in ``off``."""
    off = set(off)
    unknown = off - set(SWITCHES)
    assert not unknown, f"not a kill-switch: {unknown}"
    out = dict(env)
    for name in SWITCHES:
        out[name] = "false" if name in off else "true"
    return out


def with_env(env: Mapping[str, str], **extra: str) -> dict[str, str]:
    out = dict(env)
    out.update(extra)
    return out


def gate(repo: Repo, branch: str, *, env: Optional[Mapping[str, str]] = None, **kw: Any) -> GateDecision:
    """``retest_branch`` on ``repo`` with its deterministic environment and private counters."""
    kw.setdefault("metrics", GateMetrics())
    return retest_branch(repo.path, branch, env=dict(env or repo.env), **kw)


# --------------------------------------------------------------------------- the ledger, read raw


def ledger_rows(env_or_path: Mapping[str, str] | str | Path, table: str) -> list[dict[str, Any]]:
    """Every row of ``table`` in the SQLite ledger, read with plain ``sqlite3`` (no retest code)."""
    if isinstance(env_or_path, Mapping):
        path = env_or_path["RETEST_LEDGER_PATH"]
    else:
        path = os.fspath(env_or_path)
    if not os.path.exists(path):
        return []
    assert table in ("runs", "infra_attempts", "alerts", "counters", "decisions", "meta"), table
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        conn.row_factory = sqlite3.Row
        order = " ORDER BY id" if table == "decisions" else ""
        return [dict(row) for row in conn.execute(f"SELECT * FROM {table}{order}")]
    finally:
        conn.close()


def counters(env: Mapping[str, str]) -> dict[str, int]:
    return {row["name"]: row["value"] for row in ledger_rows(env, "counters")}


# --------------------------------------------------------------------------- processes


def cpu_ticks(pid: int) -> Optional[int]:
    """utime + stime of ``pid`` in clock ticks, ``None`` if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def cpu_seconds_over(pids: Iterable[int], interval: float = 0.5) -> dict[int, float]:
    """CPU seconds each of ``pids`` used during ``interval`` of wall time (gone: 0)."""
    pids = list(pids)
    tick = os.sysconf("SC_CLK_TCK")
    before = {pid: cpu_ticks(pid) for pid in pids}
    time.sleep(interval)
    used: dict[int, float] = {}
    for pid in pids:
        after = cpu_ticks(pid)
        start = before[pid]
        used[pid] = 0.0 if after is None or start is None else (after - start) / tick
    return used


def kinds(pid_dir: Path) -> dict[str, set[int]]:
    """Recorded pids by kind (files ``KIND-PID``)."""
    out: dict[str, set[int]] = {}
    if not pid_dir.exists():
        return out
    for name in os.listdir(pid_dir):
        kind, _, pid = name.rpartition("-")
        if pid.isdigit():
            out.setdefault(kind, set()).add(int(pid))
    return out


def all_recorded(dirs: Iterable[Path]) -> list[int]:
    pids: set[int] = set()
    for directory in dirs:
        if directory.exists():
            pids.update(recorded_pids(directory))
    return sorted(pids)


def kill_all_recorded(dirs: Iterable[Path], settle_s: float = 0.3) -> list[int]:
    """Kill every recorded pid that is a live descendant of this process, until none is left.

    A process of an orphaned tree may start a helper while we kill; the helper records
    itself first thing, so one more pass after ``settle_s`` catches it.
    """
    dirs = list(dirs)
    killed: set[int] = set()
    for _ in range(20):
        killed.update(kill_recorded(all_recorded(dirs)))
        time.sleep(settle_s)
        if not alive(all_recorded(dirs)):
            break
    return sorted(killed)


# --------------------------------------------------------------------------- suites


def tree_suite_files() -> dict[str, str]:
    """A suite whose one test starts a detached helper and sleeps while the fault lasts.

    Environment: ``ORCH110_PIDS`` (where the test and its helper record their pids) and
    ``ORCH110_FAULT`` (a path; the test is slow while it exists; unset: always slow).
    """
    test = textwrap.dedent('''\
        import os
        import subprocess
        import time


        def test_talks_to_a_helper_service():
            fault = os.environ.get("ORCH110_FAULT")
            if fault and not os.path.exists(fault):
                return  # the transient fault is gone: the service answers at once
            pids = os.environ["ORCH110_PIDS"]
            open(os.path.join(pids, "test-%d" % os.getpid()), "w").close()
            # a helper service that detaches into a session of its own, as test servers do
            subprocess.Popen(["sh", "-c", 'touch "$0/helper-$$"; exec sleep 60', pids],
                             start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
            time.sleep(60)
        ''')
    return {"tests/test_service.py": test}


INCIDENT_CONFTEST = '''\
"""Every process of the suite records its pid: the controller and each xdist worker."""
import os

RUN_DIR = os.environ["INCIDENT_RUN_DIR"]
PIDS = os.path.join(RUN_DIR, "pids")


def record(kind, pid=None):
    open(os.path.join(PIDS, "%s-%d" % (kind, pid or os.getpid())), "w").close()


def pytest_configure(config):
    record("worker" if os.environ.get("PYTEST_XDIST_WORKER") else "controller")
'''

INCIDENT_HELPER = '''\
import os, sys, time
pids, fault, ready = sys.argv[1:4]
open(os.path.join(pids, "helper-%d" % os.getpid()), "w").close()
give_up = time.monotonic() + 60  # bounded, whatever happens
if os.path.exists(fault):
    # The transient fault: the service cannot come up and retries in a tight loop.
    while time.monotonic() < give_up:
        pass
    sys.exit(1)
open(ready, "w").close()
while time.monotonic() < give_up:
    time.sleep(0.05)
'''

INCIDENT_TESTS = '''\
"""The incident's suite: each test needs helper services and a fixed amount of CPU work."""
import os
import subprocess
import sys
import time

from conftest import PIDS, RUN_DIR, record

HELPER = {helper!r}
HELPERS_PER_TEST = {helpers}
WORK_CPU_S = {work_s}


def start_services(name):
    fault = os.environ["INCIDENT_FAULT"]
    ready = [os.path.join(RUN_DIR, "ready", "%s-%d" % (name, i)) for i in range(HELPERS_PER_TEST)]
    procs = []
    for path in ready:
        proc = subprocess.Popen([sys.executable, "-c", HELPER, PIDS, fault, path],
                                start_new_session=True, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        record("helper", proc.pid)
        procs.append(proc)
    give_up = time.monotonic() + 60
    while not all(os.path.exists(p) for p in ready):  # wait for the services to come up
        assert time.monotonic() < give_up, "services never came up"
        time.sleep(0.01)
    return procs


def stop_services(procs):
    # Not in a finally: like many real suites, an interrupted test leaks its services.
    for proc in procs:
        proc.kill()
        proc.wait()


def burn_cpu(seconds):
    end = time.process_time() + seconds
    n = 0
    while time.process_time() < end:
        n += 1
    return n


{tests}
'''


def incident_suite_files(tests: int = 4, helpers: int = 2, work_s: float = 0.25) -> dict[str, str]:
    """The incident's suite (see the module docstring), ``tests`` tests of ``work_s`` CPU seconds.

    Environment: ``INCIDENT_RUN_DIR`` (holds ``pids/`` and ``ready/``, both created by the
    caller) and ``INCIDENT_FAULT`` (a path; while it exists the helper services spin).
    """
    bodies = "\n\n".join(
        f"def test_order_{i}():\n"
        f"    services = start_services('order{i}-%d' % os.getpid())\n"
        f"    assert burn_cpu(WORK_CPU_S) > 0\n"
        f"    stop_services(services)\n"
        for i in range(tests)
    )
    return {
        "tests/conftest.py": INCIDENT_CONFTEST,
        "tests/test_orders.py": INCIDENT_TESTS.format(helper=INCIDENT_HELPER, helpers=helpers,
                                                      work_s=work_s, tests=bodies),
    }


def incident_run_dir(root: Path, name: str) -> Path:
    """A fresh run directory (``pids/``, ``ready/``) for one attempt of the incident suite."""
    run_dir = root / name
    (run_dir / "pids").mkdir(parents=True)
    (run_dir / "ready").mkdir()
    return run_dir
