"""Verdict rules on facts: the suite's own events (the probe) decide where they exist.

``proc_group.classify`` first asks the output classifier (``ext/classify.c`` or its Python
twin), then, when the run carried the probe, lets ``decide`` replace that inference with what
the suite reported: a test of the repository failed (red), pytest never started (other), no
test was collected (other), the session did not finish (other). The runner's own facts
(deadline, spawn failure) and a held lock keep the output classifier's answer; the kernel's
word that its OOM killer ended the run (``oom_killed``) comes before both the events and the
output, and keeps the run ``other`` even when tests had failed before it. Every verdict
says which evidence it rests on: ``runner``, ``events`` or ``output``. Rules and examples:
docs/verdicts.md.
"""

from __future__ import annotations

import re
import statistics
from typing import TYPE_CHECKING, Optional

from .probe import ProbeReport, RunningTest, StartupError, TestFailure, startup_error_from_traceback

if TYPE_CHECKING:  # pragma: no cover
    from .config import ForensicsSettings
    from .pressure import Pressure
    from .proc_group import RunResult, Verdict

__all__ = ["decide", "oom_killed", "timeout_cause", "pytest_timeout_cause", "lock_holder",
           "failures_text", "running_text", "startup_error"]

#: Test ids named in a reason (all of them, bounded, are in the evidence).
REASON_IDS_MAX = 3
#: What pytest-timeout's signal method puts in the failure of the test it stopped: ``Failed:
#: Timeout >1.0s`` up to 2.3, ``Failed: Timeout (>1.0s) from pytest-timeout.`` from 2.4 on.
_PYTEST_TIMEOUT_MESSAGE = re.compile(r"\bTimeout \(?>[0-9.]+s\b")
_TIMEOUT_THREAD_MARK = b"+++ Timeout +++"
#: What pytest (8.4 and later) fails an ``async def`` test with when no plugin runs it.
_NO_ASYNC_PLUGIN = "async def functions are not natively supported"
_NO_TESTPATHS = b"No files were found in testpaths"
_TAIL_SCAN = 4096
#: The end of stderr read for a Python traceback when the probe saw nothing.
_TRACEBACK_SCAN = 64 * 1024


def _names(items: list[str], total: int) -> str:
    shown = ", ".join(items[:REASON_IDS_MAX])
    more = total - min(len(items), REASON_IDS_MAX)
    return shown + (f" and {more} more" if more > 0 else "")


def failures_text(failures: tuple[TestFailure, ...], total: int) -> str:
    """``tests/a.py::t1, tests/b.py::t2 and 4 more``."""
    return _names([f.nodeid for f in failures], total)


def running_text(report: ProbeReport) -> str:
    """``tests/x.py::t (612.3s, gw1), ...``: the tests running when the run ended."""
    items = [f"{r.nodeid} ({r.running_s:.1f}s{', ' + r.worker if r.worker else ''})"
             for r in report.running]
    return _names(items, len(report.running))


def _progress(report: ProbeReport) -> str:
    total = report.collected
    return f"{report.done} of {total} tests done" if total is not None else f"{report.done} tests done"


def _last_line(result: "RunResult") -> str:
    """The last non-empty line of stderr, else stdout (what a crashing interpreter said)."""
    for buf in (result.stderr, result.stdout):
        tail = buf[-_TAIL_SCAN:].replace(b"\r", b"\n")
        for line in reversed(tail.split(b"\n")):
            text = line.strip().decode("utf-8", "replace")
            if text:
                return text[:200]
    return "no output"


def _status(result: "RunResult") -> str:
    rc = result.returncode
    assert rc is not None
    if rc >= 0:
        return f"exit {rc}"
    import signal

    try:
        return f"killed by signal {-rc} ({signal.Signals(-rc).name})"
    except ValueError:
        return f"killed by signal {-rc}"


def _verdict(kind: str, rule: str, reason: str, infra: bool = False) -> "Verdict":
    from .proc_group import Verdict

    return Verdict(kind, rule, reason, infra, evidence="events")


def _with_evidence(verdict: "Verdict", evidence: str, extra: str = "") -> "Verdict":
    from dataclasses import replace

    return replace(verdict, evidence=evidence, reason=verdict.reason + extra)


def decide(result: "RunResult", output: "Verdict", report: ProbeReport) -> "Verdict":
    """The verdict on the probe's facts; ``output`` is the output classifier's answer."""
    if result.timed_out:
        return _with_evidence(output, "runner", _timeout_detail(report))
    if result.spawn_error is not None or result.returncode is None:
        return _with_evidence(output, "runner")
    if not report.session_started:
        return _before_session(result, output)
    red = _red(result, report)
    if red is not None:
        return red
    if output.kind == "lock-busy":
        return _with_evidence(output, "output", f" (no test failed: {report.counts_text()})")
    return _no_failure(result, report)


def oom_killed(result: "RunResult", output: "Verdict") -> Optional["Verdict"]:
    """``other.oom-killed`` when the kernel's OOM killer ended a run that did not pass.

    After the deadline and a spawn failure, before every rule on the events or the output: a
    run whose memory ran out proves nothing about the branch, failures before it included
    (they are named in the reason; the run never finished to say what else would fail).
    """
    oom = result.oom
    if (oom is None or result.timed_out or result.spawn_error is not None
            or result.returncode is None or result.returncode == 0):
        return None
    from .proc_group import Verdict

    if oom.victim_is_leader or oom.victim_pid is None:
        reason = f"killed by the kernel's OOM killer: {oom.victim_text()} ({oom.counter_text()})"
        if result.returncode != -9:
            reason += f"; {_status(result)}"
    else:
        reason = (f"the kernel's OOM killer killed {oom.victim_text()}, a process of the run "
                  f"({oom.counter_text()}); the command: {_status(result)}")
    report = result.probe
    if report is not None and report.session_started:
        if not report.session_finished:
            where = f"while running {running_text(report)}; " if report.running else ""
            reason += f"; {where}{_progress(report)}"
        failed = report.failure_count + report.error_count + len(report.collection_errors)
        if failed:
            named = report.collection_errors + report.failures
            reason += (f"; tests had failed before it ({report.counts_text()}): "
                       f"{failures_text(named, failed)}")
    elif output.kind == "red":
        reason += f"; the output also shows {output.reason}"
    return Verdict("other", "other.oom-killed", reason, False, evidence="runner")


def _timeout_detail(report: ProbeReport) -> str:
    if not report.session_started:
        return "; the pytest session had not started"
    detail = f"; {_progress(report)}"
    if report.running:
        detail += f"; running at the deadline: {running_text(report)}"
    return detail


def _before_session(result: "RunResult", output: "Verdict") -> "Verdict":
    """pytest never started its session: the environment, not the branch, is at fault."""
    if output.kind == "lock-busy":
        return _with_evidence(output, "output")
    if _NO_TESTPATHS in result.stdout or _NO_TESTPATHS in result.stderr:
        return _verdict("other", "other.no-tests",
                        f"{_status(result)} before the pytest session started: no files were "
                        f"found in testpaths (no tests to run)")
    if result.returncode == 0:
        return _verdict("other", "other.no-session",
                        "exit 0 but the pytest session never started: nothing was tested")
    error = startup_error(result)
    if error is not None:
        from .proc_group import Verdict

        return Verdict("other", "other.environment",
                       f"{_status(result)} before the pytest session started: {error.text()}",
                       False, evidence=error.source)
    return _verdict("other", "other.environment",
                    f"{_status(result)} before the pytest session started (pytest not importable, "
                    f"a missing interpreter or a plugin that failed to load): {_last_line(result)}")


def startup_error(result: "RunResult") -> Optional[StartupError]:
    """What ended pytest before its session: the probe's ``startup_error`` event, else (the
    probe never loaded: pytest itself failed to import) the last Python traceback on stderr.
    ``None`` for a run whose session started, that exited 0 or that the runner ended."""
    report = result.probe
    if report is not None and report.startup_error is not None:
        return report.startup_error
    if (report is not None and report.session_started) or result.timed_out \
            or not result.returncode or result.spawn_error is not None:
        return None
    tail = result.stderr[-_TRACEBACK_SCAN:].decode("utf-8", "replace")
    return startup_error_from_traceback(tail)


def _red(result: "RunResult", report: ProbeReport) -> Optional["Verdict"]:
    """Red only with proof: a collection error, a failed or an errored test."""
    status = _status(result)
    if report.collection_errors:
        n = len(report.collection_errors)
        first = report.collection_errors[0]
        what = f": {first.message}" if first.message else ""
        return _verdict("red", "red.collection-error",
                        f"pytest: {n} collection error{'s' if n > 1 else ''} ({status}): "
                        f"{_names([e.nodeid for e in report.collection_errors], n)}{what}")
    calls = [f for f in report.failures if f.outcome == "failed"]
    if (calls and not report.error_count and report.async_plugins == ()
            and all(_NO_ASYNC_PLUGIN in (f.message or "") for f in calls)):
        # every failure is pytest's own refusal of an async test and no plugin that runs them
        # was loaded: the environment lacks the suite's async plugin, and every branch (main
        # included) would fail the same way. With one loaded, an async test it did not take
        # (strict mode, no marker) is the suite's own fault: red.
        return _verdict("other", "other.environment",
                        f"pytest: {report.summary_text()} ({status}): every failed test is an "
                        f"async test that no installed plugin runs (pytest: {_NO_ASYNC_PLUGIN}): "
                        f"the environment lacks the suite's async plugin (pytest-asyncio, anyio, "
                        f"pytest-trio...); failed: {failures_text(tuple(calls), report.failure_count)}")
    if calls:
        timeouts = [f for f in calls if _PYTEST_TIMEOUT_MESSAGE.search(f.message or "")]
        rule = "red.test-timeout" if len(timeouts) == len(calls) else "red.tests-failed"
        return _verdict("red", rule, f"pytest: {report.summary_text()} ({status}); failed: "
                        f"{failures_text(tuple(calls), report.failure_count)}")
    missing = _missing_plugins(report)
    if missing:
        return _verdict("other", "other.environment",
                        f"pytest: {report.summary_text()} ({status}): every error is a fixture "
                        f"that an uninstalled plugin provides: {missing}; the environment lacks "
                        f"it, and every branch would error the same way; errors: "
                        f"{failures_text(report.failures, report.error_count)}")
    if report.error_count:
        errors = tuple(f for f in report.failures if f.outcome == "error")
        # pytest-timeout stopping a fixture's set-up or tear-down: an error, the same timeout
        all_timeouts = len(errors) == report.error_count and all(
            _PYTEST_TIMEOUT_MESSAGE.search(f.message or "") for f in errors)
        return _verdict("red", "red.test-timeout" if all_timeouts else "red.test-errors",
                        f"pytest: {report.summary_text()} ({status}); errors: "
                        f"{failures_text(errors, report.error_count)}")
    if (not report.session_finished and result.returncode == 1 and report.running
            and (_TIMEOUT_THREAD_MARK in result.stdout or _TIMEOUT_THREAD_MARK in result.stderr)):
        return _verdict("red", "red.test-timeout",
                        f"exit 1: a per-test pytest-timeout fired in {running_text(report)}")
    return None


#: Fixtures only a plugin provides, and the distribution that does: a set-up error that finds
#: none of them is a plugin missing from the environment, not the branch's (a name this
#: distinctive is no project's own typo).
PLUGIN_FIXTURES = {
    **dict.fromkeys(("mocker", "class_mocker", "module_mocker", "package_mocker",
                     "session_mocker"), "pytest-mock"),
    "benchmark": "pytest-benchmark", "httpserver": "pytest-httpserver",
    "httpx_mock": "pytest-httpx", "requests_mock": "requests-mock", "respx_mock": "respx",
    "freezer": "pytest-freezer", "time_machine": "time-machine", "aioresponses": "aioresponses",
    "snapshot": "syrupy", "xprocess": "pytest-xprocess", "anyio_backend": "anyio",
    "event_loop": "pytest-asyncio", "django_db_setup": "pytest-django",
    "django_user_model": "pytest-django", "admin_client": "pytest-django",
    "celery_app": "celery", "celery_worker": "celery", "datadir": "pytest-datadir",
    "shared_datadir": "pytest-datadir", "fs": "pyfakefs",
}


def _missing_plugins(report: ProbeReport) -> str:
    """``mocker (pytest-mock), benchmark (pytest-benchmark)`` when every error of the run
    (none failed) is a set-up error for a fixture in ``PLUGIN_FIXTURES``, else ""."""
    errors = [f for f in report.failures if f.outcome == "error"]
    if (not errors or len(errors) != report.error_count or report.failure_count
            or any(f.when != "setup" or f.missing_fixture not in PLUGIN_FIXTURES for f in errors)):
        return ""
    names = sorted({f.missing_fixture for f in errors if f.missing_fixture})
    return ", ".join(f"{n} ({PLUGIN_FIXTURES[n]})" for n in names)


def _no_failure(result: "RunResult", report: ProbeReport) -> "Verdict":
    """No test failed: a pass with a finished session, else why nothing is proven."""
    rc = result.returncode
    assert rc is not None
    status = _status(result)
    if report.exitstatus == 5 or (report.collected == 0 and report.session_finished):
        return _verdict("other", "other.no-tests",
                        f"{status}: pytest collected no tests ({report.counts_text()})")
    if rc == 0 and report.session_finished and report.done == 0:
        # --collect-only, or every item deselected at run time: nothing was tested.
        return _verdict("other", "other.no-tests",
                        f"exit 0 but pytest ran none of the {report.collected} tests it collected")
    if not report.session_finished:
        where = f" while running {running_text(report)}" if report.running else ""
        if rc < 0:
            return _verdict("other", "other.signal", f"{status}{where}; {_progress(report)}")
        return _verdict("other", "other.session-incomplete",
                        f"{status} but the pytest session did not finish{where}; {_progress(report)}")
    if rc == 0 and _nothing_passed(report):
        # found on markupsafe: a conftest that marks every test skip merged broken code; one
        # that marks every test xfail hides broken code the same way (each failure "expected")
        what = "every test was skipped" if not report.counts.get("xfailed") else "no test passed"
        return _verdict("other", "other.no-tests",
                        f"exit 0 but {what} ({report.counts_text()}): nothing was shown to work")
    if rc == 0:
        return _verdict("passed", "passed.exit-0", f"exit 0: {report.summary_text()}")
    if rc < 0:
        return _verdict("other", "other.signal", f"{status} after the session ended: "
                        f"{report.counts_text()}")
    meaning = {2: ("other.interrupted", "interrupted"), 3: ("other.internal-error", "internal error"),
               4: ("other.usage-error", "usage error")}.get(report.exitstatus if report.exitstatus
                                                             is not None else rc)
    if meaning is not None:
        detail = f": {report.internal_error[:200]}" if report.internal_error else ""
        return _verdict("other", meaning[0], f"{status} (pytest: {meaning[1]}; "
                        f"{report.counts_text()}){detail}")
    return _verdict("other", "other.exit-status",
                    f"{status} but the pytest session reported no failed test "
                    f"({report.counts_text()})")


#: Counts that say a test (or subtest) passed: what an exit 0 needs to show that code works.
_PASSED = ("passed", "xpassed", "subtests passed")
#: Counts of tests that ended without passing, yet with pytest's exit 0.
_NOT_PASSED = ("skipped", "xfailed")


def _nothing_passed(report: ProbeReport) -> bool:
    """Tests ended skipped or as expected failures, and none passed: pytest exits 0, and
    nothing was shown to work (a conftest that marks every test skip, or xfail)."""
    counts = report.counts
    return any(counts.get(k, 0) for k in _NOT_PASSED) and not any(counts.get(k, 0) for k in _PASSED)


def timeout_cause(result: "RunResult", verdict: "Verdict") -> "Verdict":
    """Why the runner's deadline fired: ``timeout.hung``, ``timeout.starved`` or
    ``timeout.deadline`` (kind ``timeout``, infra), on the runner's facts (issue 11).

    Hung first: a test had been running for ``RETEST_HUNG_RUNNING_SHARE`` of the budget while
    the tree was idle (below ``RETEST_IDLE_CORES``) most of that test's time: the median of the
    run's timeline samples in that span (a busy start-up before the hang does not hide it),
    else the whole run's mean. An idle tree asked for no CPU, so it is never starved. Then
    starved: the tree was not idle and the machine was overloaded by others (PSI cpu ``some``
    over the run at or above ``RETEST_STARVED_PSI_SHARE`` with processes outside the tree
    using at least half of ``RETEST_STARVED_FOREIGN_SHARE`` of the cores, or those processes
    using ``RETEST_STARVED_FOREIGN_SHARE`` of the cores and more CPU than the tree).
    Otherwise ``timeout.deadline``, with the pressure figures quoted all the same.
    """
    if verdict.kind != "timeout" or not result.timed_out or result.pressure is None:
        return verdict
    from dataclasses import replace

    from .config import ForensicsSettings

    settings = ForensicsSettings.from_env()
    p = result.pressure
    failed = _failed_before(result)
    hung = _hung_test(result, settings.hung_running_share)
    busy_test = ""
    if hung is not None:
        cores, where = _tree_cores_while(result, hung)
        stack = _stack_of(result, hung)
        ran = (f"{hung.nodeid}{' (' + hung.worker + ')' if hung.worker else ''} had been "
               f"running {hung.running_s:.1f} s of the {result.timeout_s:g} s budget")
        if cores < settings.idle_cores:
            return replace(verdict, rule="timeout.hung", evidence="runner",
                           reason=f"{verdict.reason}; hung: {ran} while the tree was idle "
                                  f"({cores:.2f} cores {where})"
                                  f"{'; its stack: ' + stack if stack else ''}{failed}")
        # busy all along (a loop that never ends, or a test that is that slow): not hung, but
        # that one test is what the budget went to
        busy_test = (f"; one test took most of it: {ran}, busy ({cores:.2f} cores {where})"
                     f"{'; its stack: ' + stack if stack else ''}")
    else:
        idle = _idle_before_tests(result, settings)
        if idle is not None:
            return replace(verdict, rule="timeout.hung", evidence="runner",
                           reason=f"{verdict.reason}; hung: {idle}{failed}")
    starved = _starved_why(p, settings) if p.tree_cores >= settings.idle_cores else None
    if starved is not None and hung is None:
        late = _late_hang(result, settings)
        if late is not None:
            return replace(verdict, rule="timeout.hung", evidence="runner",
                           reason=f"{verdict.reason}; hung: {late}; the machine was also "
                                  f"starved ({starved}), which delayed the tests before it: "
                                  f"{p.text()}{failed}")
    if starved is not None:
        return replace(verdict, rule="timeout.starved", evidence="runner",
                       reason=f"{verdict.reason}; the machine was starved ({starved}): {p.text()}; "
                              f"top CPU users outside the tree: {p.hogs_text()}{busy_test}{failed}")
    return replace(verdict, rule="timeout.deadline",
                   reason=f"{verdict.reason}; neither starved nor hung: {p.text()}{busy_test}"
                          f"{failed}")


def pytest_timeout_cause(result: "RunResult", verdict: "Verdict") -> "Verdict":
    """A per-test pytest-timeout on a machine that others starved: ``timeout.test-starved``
    (kind ``timeout``, infra), not ``red.test-timeout``.

    The suite's own timeout measures wall time, so a starved machine trips it as surely as the
    runner's deadline (the incident this package exists for, one level down). Each test that
    pytest-timeout stopped is judged over its own span (its interval, or its running time for
    the thread method, which ends the session), on the timeline's samples in that span: a
    test that was idle asked for no CPU, so the load is not why it did not finish, and the
    verdict stays red (a hang); a busy test whose tree waited for a CPU at least
    ``RETEST_STARVED_PSI_SHARE`` of its span is infra (where PSI is not read, the CPU used
    outside the tree decides, as for ``timeout_cause``). Every such test must be starved and
    busy; one hang keeps the run red. Without the probe (no spans), the pressure evidence, or a
    sample inside each span, the verdict is left as it is.
    """
    p, report = result.pressure, result.probe
    if verdict.rule != "red.test-timeout" or p is None or report is None:
        return verdict
    spans = _timed_out_spans(result, report)
    if not spans:
        return verdict
    from dataclasses import replace

    from .config import ForensicsSettings
    from .proc_group import Verdict

    settings = ForensicsSettings.from_env()
    windows = [(name, _window(p, start, end)) for name, start, end in spans]
    judged = [(name, w) for name, w in windows if w is not None]
    if len(judged) < len(windows):  # a test shorter than a sample: nothing to judge it on
        return verdict
    idle = [(name, w) for name, w in judged if w.tree_cores < settings.idle_cores]
    if idle:
        name, w = idle[0]
        if _window_starved(w, settings) is None and _starved_why(p, settings) is None:
            return verdict
        return replace(verdict, reason=f"{verdict.reason}; the machine was starved, but {name} "
                       f"was idle while it ran ({w.tree_cores:.2f} cores {w.where}): a hang, not "
                       f"the load")
    starved = [(name, w, _window_starved(w, settings, psi_decides=True)) for name, w in judged]
    if any(why is None for _, _, why in starved):
        return verdict
    name, w, why = starved[0]
    more = f" (and {len(starved) - 1} more)" if len(starved) > 1 else ""
    return Verdict("timeout", "timeout.test-starved", infra=True, evidence="runner",
                   reason=f"{verdict.reason}; the machine was starved while {name}{more} ran "
                          f"({why}, {w.where}): the tree got {w.tree_cores:.2f} cores "
                          f"and processes outside it used {w.foreign_cores:.2f} of {p.cores}; "
                          f"{p.text()}; top CPU users outside the tree: {p.hogs_text()}")


class _Window:
    """The pressure figures over one span of the run."""

    __slots__ = ("tree_cores", "foreign_cores", "foreign_share", "cpu_some", "where")

    def __init__(self, tree_cores: float, foreign_cores: float, foreign_share: float,
                 cpu_some: Optional[float], where: str) -> None:
        self.tree_cores, self.foreign_cores, self.foreign_share = tree_cores, foreign_cores, foreign_share
        self.cpu_some, self.where = cpu_some, where


def _whole_run(p: "Pressure") -> _Window:
    return _Window(p.tree_cores, p.foreign_cpu_s / p.wall_s if p.wall_s else 0.0, p.foreign_share,
                   p.cpu_some_share(), "over the run")


def _timed_out_spans(result: "RunResult", report: ProbeReport) -> list[tuple[str, float, float]]:
    """(test id, start, end) in seconds from the run's start of each test that pytest-timeout
    stopped: a failure with its message (signal method) at its interval, else the tests
    running when its thread method ended the session."""
    spans: list[tuple[str, float, float]] = []
    if report.ended_at is not None:
        run_start = report.ended_at - result.duration_s
        stopped = {f.nodeid for f in report.failures
                   if f.outcome in ("failed", "error") and _PYTEST_TIMEOUT_MESSAGE.search(f.message or "")}
        for i in report.intervals:
            if i.nodeid in stopped and i.outcome in ("failed", "error"):
                start = max(i.started_at - run_start, 0.0)
                spans.append((i.nodeid, start, start + i.duration_s))
    if not spans and not report.session_finished:
        spans = [(r.nodeid, max(result.duration_s - r.running_s, 0.0), result.duration_s)
                 for r in report.running]
    return spans


def _window(p: "Pressure", start: float, end: float) -> Optional[_Window]:
    """The tree's median cores, the mean cores used outside it and the mean PSI cpu ``some``
    of the timeline's samples inside [start, end]; None without such a sample (the whole
    run's figures would count pytest's start-up and the other tests as this test's)."""
    inside = [x for x in p.samples if start + _sample_step(p) <= x.t <= end
              and x.tree_cores is not None and x.busy_cores is not None]
    if not inside:
        return None
    psi = [x.cpu_some for x in inside if x.cpu_some is not None]
    foreign = statistics.fmean(max((x.busy_cores or 0.0) - (x.tree_cores or 0.0), 0.0)
                               for x in inside)
    return _Window(statistics.median(x.tree_cores or 0.0 for x in inside), foreign,
                   foreign / p.cores if p.cores else 0.0,
                   statistics.fmean(psi) if psi else None,
                   f"over its {end - start:.1f} s, {len(inside)} samples")


def _window_starved(w: _Window, settings: "ForensicsSettings", *,
                    psi_decides: bool = False) -> Optional[str]:
    """Why the machine counts as starved by others over a span (the run, or one test's), or
    None. PSI shows that tasks waited; the CPU used outside the tree shows it was not the
    tree's own oversubscription (an xdist -n 8 on 2 cores waits for itself): at least half
    the threshold. ``psi_decides``: where PSI was read, only the first test counts (the tree
    waited for a CPU at least that share of the span, so it ran at most half as fast as it
    could): a test that the load slowed by less would have missed its timeout anyway."""
    if (w.cpu_some is not None and w.cpu_some >= settings.starved_psi_share
            and w.foreign_share >= settings.starved_foreign_share / 2):
        return f"PSI cpu some {w.cpu_some:.0%} >= {settings.starved_psi_share:.0%}"
    if psi_decides and w.cpu_some is not None:
        return None
    if w.foreign_share >= settings.starved_foreign_share and w.foreign_cores > w.tree_cores:
        return (f"processes outside the tree used {w.foreign_share:.0%} of the cores >= "
                f"{settings.starved_foreign_share:.0%}")
    return None


def _late_hang(result: "RunResult", settings: "ForensicsSettings") -> Optional[str]:
    """On a starved machine: a test idle since it started, for half the hung share of the
    budget, is hung all the same. The load slowed the tests before it, so it started late and
    ran less of the budget than the share asks, but an idle test asked for no CPU: the load
    is not why it did not finish, and a retry on an idle machine hangs again. Why, or None."""
    test = _hung_test(result, settings.hung_running_share / 2)
    if test is None:
        return None
    cores, where = _tree_cores_while(result, test)
    if cores >= settings.idle_cores:
        return None
    stack = _stack_of(result, test)
    return (f"{test.nodeid}{' (' + test.worker + ')' if test.worker else ''} had been running "
            f"{test.running_s:.1f} s of the {result.timeout_s:g} s budget while the tree was idle "
            f"({cores:.2f} cores {where}){'; its stack: ' + stack if stack else ''}")


def _failed_before(result: "RunResult") -> str:
    """``; tests had failed before the deadline (1 failed, 16 passed): tests/t.py::t``, or ""."""
    report = result.probe
    if report is None:
        return ""
    failed = report.failure_count + report.error_count + len(report.collection_errors)
    if not failed:
        return ""
    return (f"; tests had failed before the deadline ({report.counts_text()}): "
            f"{failures_text(report.collection_errors + report.failures, failed)}")


def _idle_before_tests(result: "RunResult", settings: "ForensicsSettings") -> Optional[str]:
    """The session started but no test ever did (a module that blocks at import, a session
    fixture that waits forever), with the tree idle over the run: why, with the stack of the
    process that was stuck; None otherwise."""
    report, p = result.probe, result.pressure
    if (report is None or p is None or not report.session_started or report.running
            or report.done or p.tree_cores >= settings.idle_cores):
        return None
    where = "during collection" if report.collected is None else "before the first test"
    dumps = list(getattr(result, "diagnostics", ()) or ())
    stack = str(dumps[0].summary()) if dumps else ""
    return (f"the session sat idle {where}, no test had started ({p.tree_cores:.2f} cores over "
            f"the run){'; its stack: ' + stack if stack else ''}")


def _starved_why(p: "Pressure", settings: "ForensicsSettings") -> Optional[str]:
    """Why the machine counts as starved by others during the run, or ``None``."""
    return _window_starved(_whole_run(p), settings)


def _tree_cores_while(result: "RunResult", test: "RunningTest") -> tuple[float, str]:
    """The tree's median cores while ``test`` ran up to the deadline (the timeline's samples
    inside that span), and where that came from; the whole run's mean without such samples."""
    p = result.pressure
    assert p is not None and result.timeout_s is not None
    since = result.timeout_s - test.running_s
    inside = [x.tree_cores for x in p.samples
              if x.tree_cores is not None and since + _sample_step(p) <= x.t <= result.timeout_s]
    if inside:  # the median: idle most of that time (xdist's start-up may fall inside it)
        return statistics.median(inside), f"median over its last {result.timeout_s - since:.1f} s"
    return p.tree_cores, "over the run"


def _sample_step(p: "Pressure") -> float:
    """The timeline's interval (the first sample's span is shorter: skip one step's worth)."""
    times = [x.t for x in p.samples]
    return min((b - a for a, b in zip(times, times[1:])), default=0.5)


def _hung_test(result: "RunResult", share: float) -> "Optional[RunningTest]":
    report = result.probe
    if report is None or not report.running or not result.timeout_s:
        return None
    longest = max(report.running, key=lambda r: r.running_s)
    return longest if longest.running_s >= share * result.timeout_s else None


def _stack_of(result: "RunResult", test: "RunningTest") -> str:
    """The innermost frames of the dump of the process that ran ``test`` (the diagnostic
    stage), one line: ``File "t.py", line 3 in test_x <- ...``; "" without a dump."""
    for dump in getattr(result, "diagnostics", ()) or ():
        if dump.nodeid == test.nodeid:
            return str(dump.summary())
    return ""


def lock_holder(result: "RunResult", verdict: "Verdict") -> "Verdict":
    """A git lock-busy verdict names the lock's holder (pid, command line, age) or says the
    lock is stale (no live process has it open: a dead run left it), read from /proc now."""
    if verdict.rule != "lock-busy.git-lock":
        return verdict
    from dataclasses import replace

    from . import lockholder

    path = lockholder.lock_path_in(result.stderr) or lockholder.lock_path_in(result.stdout)
    if path is None:
        return verdict
    return replace(verdict, reason=f"{verdict.reason}; {lockholder.describe(path).text()}")
