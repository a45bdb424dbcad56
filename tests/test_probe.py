"""The pytest probe: real pytest runs report their own facts, and verdicts rest on them.

Every run here is a real pytest process (plain and with xdist) under both backends; the
assertions are on the verdict, its evidence source, and the test ids the events name.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers_proc import suite_env
from helpers_proc import write_suite as write
from retest import probe, proc_group
from retest.probe import ProbeReport

PY = sys.executable

PASSING = "def test_one():\n    pass\n\n\ndef test_two():\n    assert 1 + 1 == 2\n"
FAILING = textwrap.dedent("""
    def test_ok():
        pass


    def test_locked():
        raise AssertionError("sqlite3.OperationalError: database is locked")
""")


def pytest_run(root: Path, backend: str, *args: str, timeout: float = 120,
               **env: str) -> proc_group.RunResult:
    return proc_group.run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=root,
                          env=suite_env(**env), timeout=timeout, backend=backend, grace=2)


# --------------------------------------------------------------------------- argv detection


@pytest.mark.parametrize("argv, position", [
    (["pytest", "-q"], 1),
    (["/v/bin/pytest"], 1),
    (["py.test", "x"], 1),
    (["python", "-m", "pytest", "-q"], 3),
    (["/usr/bin/python3.11", "-X", "dev", "-W", "error", "-m", "pytest"], 7),
    (["python3", "-mpytest", "-x"], 2),
    (["python", "-m", "coverage", "run", "--branch", "-m", "pytest", "-q"], 7),
    (["coverage", "run", "-m", "pytest"], 4),
    (["/v/bin/coverage", "run", "--rcfile", ".coveragerc", "--source=src", "-p", "-m", "pytest"], 8),
    (["python", "-m", "coverage", "run", "--omit", "x/*", "-m", "pytest", "-x"], 8),
    (["coverage", "run", "-m", "unittest"], None),
    (["coverage", "run", "tests/run.py"], None),
    (["coverage", "report"], None),
    (["python", "-m", "pip", "install", "pytest"], None),
    (["python", "script.py", "-m", "pytest"], None),
    (["python", "-c", "import pytest; pytest.main()"], None),
    (["sh", "-c", "pytest"], None),
    (["tox", "-e", "py"], None),
    (["pytestish"], None),
])
def test_the_probe_goes_where_pytest_arguments_start(argv: list[str], position: object) -> None:
    assert probe.pytest_position(argv) == position
    assert probe.pytest_position(tuple(argv)) == position  # run() passes a tuple
    injected = probe.inject(argv)
    if position is None:
        assert injected == argv
    else:
        assert injected == [*argv[:position], "-p", "retest_probe", *argv[position:]]


# --------------------------------------------------------------------------- reading events


def test_a_torn_last_line_and_unknown_events_are_ignored(tmp_path: Path) -> None:
    channel = probe.Channel()
    try:
        with open(channel.path, "ab") as f:
            f.write(b'{"ev":"session_start","t":1,"pytest":"9"}\n{"ev":"future_kind","x":1}\n')
            f.write(b'not json\n{"ev":"report","nodeid":"t.py::a","when":"call","outcome":"fai')
        first = channel.poll()
        assert [e["ev"] for e in first] == ["session_start", "future_kind"]
        with open(channel.path, "ab") as f:
            f.write(b'led","message":"boom"}\n')
        assert [e["ev"] for e in channel.poll()] == ["report"]
        report = ProbeReport.from_events(channel.events, ended_at=2)
        assert report.session_started and not report.session_finished
        assert report.failed_ids == ["t.py::a"] and report.failures[0].message == "boom"
    finally:
        channel.close()
    assert not os.path.exists(channel.dir)


def test_tests_still_running_are_timed_to_the_end() -> None:
    events = [
        {"ev": "session_start", "t": 100.0},
        {"ev": "test_start", "t": 101.0, "worker": "gw0", "nodeid": "a.py::slow"},
        {"ev": "test_start", "t": 102.0, "worker": "gw1", "nodeid": "a.py::quick"},
        {"ev": "report", "t": 103.0, "worker": "gw1", "nodeid": "a.py::quick", "when": "call",
         "outcome": "passed"},
    ]
    report = ProbeReport.from_events(events, ended_at=111.0)
    assert [(r.nodeid, r.worker, r.running_s) for r in report.running] == [("a.py::slow", "gw0", 10.0)]
    assert report.done == 1


def test_a_crashed_xdist_worker_ends_its_test() -> None:
    # xdist reports a test whose worker died with when="???" and never sends its call report.
    events = [
        {"ev": "session_start", "t": 100.0},
        {"ev": "test_start", "t": 101.0, "worker": "gw1", "nodeid": "a.py::exits"},
        {"ev": "report", "t": 102.0, "worker": "gw1", "nodeid": "a.py::exits", "when": "???",
         "outcome": "failed", "message": "worker 'gw1' crashed while running 'a.py::exits'"},
        {"ev": "session_end", "t": 103.0, "exitstatus": 1, "counts": {"failed": 1}},
    ]
    report = ProbeReport.from_events(events, ended_at=111.0)
    assert report.running == () and report.done == 1
    assert (report.failure_count, report.error_count) == (1, 0)


# --------------------------------------------------------------------------- real runs


def test_failing_tests_are_red_from_events_with_their_ids(backend: str, tmp_path: Path) -> None:
    """A failure message that mentions a lock is still a red test, not lock-busy (issue 9)."""
    result = pytest_run(write(tmp_path, {"test_a.py": FAILING}), backend)
    verdict = proc_group.classify(result)
    assert (verdict.kind, verdict.rule, verdict.evidence) == ("red", "red.tests-failed", "events")
    assert result.probe is not None and result.probe.failed_ids == ["test_a.py::test_locked"]
    assert "test_a.py::test_locked" in verdict.reason
    assert result.probe.counts == {"failed": 1, "passed": 1}
    assert result.probe.failures[0].message is not None
    assert "database is locked" in result.probe.failures[0].message


def test_a_passing_suite_passes_on_events(backend: str, tmp_path: Path) -> None:
    result = pytest_run(write(tmp_path, {"test_a.py": PASSING}), backend)
    verdict = proc_group.classify(result)
    assert (verdict.kind, verdict.rule, verdict.evidence) == ("passed", "passed.exit-0", "events")
    assert result.probe is not None and result.probe.session_finished
    assert (result.probe.collected, result.probe.done, result.probe.exitstatus) == (2, 2, 0)
    assert verdict.reason.startswith("exit 0: 2 passed in ")


def test_xdist_reports_every_test_with_its_worker(backend: str, tmp_path: Path) -> None:
    pytest.importorskip("xdist")
    files = {f"test_{i}.py": FAILING.replace("test_locked", f"test_bad_{i}") for i in range(3)}
    result = pytest_run(write(tmp_path, files), backend, "-p", "xdist", "-n", "2")
    verdict = proc_group.classify(result)
    assert (verdict.kind, verdict.rule, verdict.evidence) == ("red", "red.tests-failed", "events")
    assert result.probe is not None
    assert sorted(result.probe.failed_ids) == [f"test_{i}.py::test_bad_{i}" for i in range(3)]
    assert {f.worker for f in result.probe.failures} <= {"gw0", "gw1"}
    assert result.probe.workers == 2 and result.probe.collected == 6 and result.probe.done == 6


def test_a_test_that_kills_its_xdist_worker_is_a_failed_test(backend: str, tmp_path: Path) -> None:
    pytest.importorskip("xdist")
    files = {"test_a.py": "import os\n\n\ndef test_ok():\n    pass\n\n\ndef test_exits():\n    os._exit(1)\n"}
    result = pytest_run(write(tmp_path, files), backend, "-p", "xdist", "-n", "2")
    verdict = proc_group.classify(result)
    assert (verdict.kind, verdict.rule, verdict.evidence) == ("red", "red.tests-failed", "events")
    assert result.probe is not None and result.probe.counts == {"failed": 1, "passed": 1}
    assert [(f.nodeid, f.outcome) for f in result.probe.failures] == [("test_a.py::test_exits", "failed")]
    assert result.probe.running == ()


def test_subtests_and_setup_errors_are_counted(backend: str, tmp_path: Path) -> None:
    if not hasattr(pytest, "Subtests"):
        pytest.skip("pytest < 9 has no built-in subtests")
    suite = textwrap.dedent("""
        import pytest

        def test_sub(subtests):
            for i in range(3):
                with subtests.test(msg=str(i)):
                    assert i != 2

        @pytest.fixture
        def broken():
            raise RuntimeError("set-up failed")

        def test_err(broken):
            pass
    """)
    result = pytest_run(write(tmp_path, {"test_s.py": suite}), backend)
    verdict = proc_group.classify(result)
    assert verdict.kind == "red" and verdict.evidence == "events"
    assert result.probe is not None
    assert result.probe.counts.get("subtests passed") == 2
    assert result.probe.error_count == 1
    assert any(f.subtest for f in result.probe.failures)
    assert "test_s.py::test_err" in [f.nodeid for f in result.probe.failures if f.outcome == "error"]


def test_a_failed_subtest_is_named_as_pytest_names_it(backend: str, tmp_path: Path) -> None:
    """Found on tomli: three failed subtests of one test read ``test_valid, test_valid,
    test_valid``; pytest says ``SUBFAILED[escapes]``. unittest's subTest and pytest's
    ``subtests`` fixture alike."""
    if not hasattr(pytest, "Subtests"):
        pytest.skip("pytest < 9 has no built-in subtests")
    suite = textwrap.dedent("""
        import unittest

        class T(unittest.TestCase):
            def test_u(self):
                with self.subTest("escapes"):
                    self.assertEqual(1, 2)
                with self.subTest(case=3):
                    self.assertTrue(False)

        def test_p(subtests):
            with subtests.test(msg="common-12"):
                assert False
    """)
    result = pytest_run(write(tmp_path, {"test_s.py": suite}), backend)
    verdict = proc_group.classify(result)
    assert verdict.rule == "red.tests-failed"
    assert result.probe is not None
    named = [f.nodeid for f in result.probe.failures if f.subtest]
    assert named == ["test_s.py::T::test_u [escapes]", "test_s.py::T::test_u (case=3)",
                     "test_s.py::test_p [common-12]"]
    assert "test_s.py::T::test_u [escapes]" in verdict.reason


def test_a_collection_error_is_red_naming_the_file(backend: str, tmp_path: Path) -> None:
    files = {"test_ok.py": PASSING, "test_broken.py": "import no_such_module_here\n"}
    result = pytest_run(write(tmp_path, files), backend)
    verdict = proc_group.classify(result)
    assert (verdict.kind, verdict.rule, verdict.evidence) == ("red", "red.collection-error", "events")
    assert "test_broken.py" in verdict.reason
    assert result.probe is not None and result.probe.collection_errors[0].nodeid == "test_broken.py"


def test_no_tests_is_other_no_tests(backend: str, tmp_path: Path) -> None:
    result = pytest_run(write(tmp_path, {"README": "no tests\n"}), backend)
    verdict = proc_group.classify(result)
    assert (verdict.kind, verdict.rule) == ("other", "other.no-tests")


def test_collect_only_is_not_a_pass(backend: str, tmp_path: Path) -> None:
    result = pytest_run(write(tmp_path, {"test_a.py": PASSING}), backend, "--collect-only")
    assert result.returncode == 0
    verdict = proc_group.classify(result)
    assert (verdict.kind, verdict.rule) == ("other", "other.no-tests")
    assert "none of the 2 tests" in verdict.reason


def test_no_tests_is_other_even_when_warnings_are_errors(backend: str, tmp_path: Path) -> None:
    """filterwarnings=error turns pytest's 'no files in testpaths' warning into a crash (exit 1)."""
    ini = "[pytest]\ntestpaths = tests\nfilterwarnings =\n    error\n"
    result = pytest_run(write(tmp_path, {"pytest.ini": ini}), backend)
    assert result.returncode == 1
    verdict = proc_group.classify(result)
    assert (verdict.kind, verdict.rule) == ("other", "other.no-tests")


def test_pytest_not_importable_is_an_environment_fault(backend: str, tmp_path: Path) -> None:
    """A suite venv without pytest must not roll green code back (issue 9)."""
    venv = tmp_path / "bare"
    subprocess.run([PY, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    result = proc_group.run([str(venv / "bin" / "python"), "-m", "pytest", "-q"], cwd=tmp_path,
                            env=suite_env(), timeout=60, backend=backend)
    assert result.returncode == 1
    verdict = proc_group.classify(result)
    assert (verdict.kind, verdict.rule, verdict.evidence) == ("other", "other.environment", "events")
    assert "No module named pytest" in verdict.reason


def test_a_deadline_names_the_tests_running_at_it(backend: str, tmp_path: Path) -> None:
    suite = "import time\n\ndef test_quick():\n    pass\n\ndef test_hangs():\n    time.sleep(600)\n"
    result = pytest_run(write(tmp_path, {"test_h.py": suite}), backend, timeout=6)
    assert result.timed_out
    verdict = proc_group.classify(result)
    # Which of the refined timeout rules (issue 11) depends on the machine: the kind does not.
    assert (verdict.kind, verdict.evidence) == ("timeout", "runner")
    assert verdict.rule in ("timeout.deadline", "timeout.hung", "timeout.starved")
    assert result.probe is not None
    assert [r.nodeid for r in result.probe.running] == ["test_h.py::test_hangs"]
    assert "test_h.py::test_hangs" in verdict.reason and "1 of 2 tests done" in verdict.reason


def test_a_test_that_exits_the_interpreter_is_not_a_pass(backend: str, tmp_path: Path) -> None:
    suite = "import os\n\ndef test_a():\n    pass\n\ndef test_exit():\n    os._exit(0)\n"
    result = pytest_run(write(tmp_path, {"test_x.py": suite}), backend)
    assert result.returncode == 0
    verdict = proc_group.classify(result)
    assert (verdict.kind, verdict.rule) == ("other", "other.session-incomplete")
    assert "test_x.py::test_exit" in verdict.reason


def test_the_probe_can_be_turned_off(backend: str, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, {"test_a.py": FAILING})
    monkeypatch.setenv("RETEST_PROBE_ENABLED", "false")  # a setting of the caller, not the suite
    off = pytest_run(tmp_path, backend)
    assert off.probe is None
    monkeypatch.delenv("RETEST_PROBE_ENABLED")
    env_off = proc_group.run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=tmp_path,
                             env=suite_env(), timeout=60, backend=backend, probe=False)
    assert env_off.probe is None
    verdict = proc_group.classify(off)
    assert (verdict.kind, verdict.evidence) == ("red", "output")


def test_the_probe_does_not_change_the_outcome(backend: str, tmp_path: Path) -> None:
    """Same exit status and same summary with and without the probe, even with -W error."""
    write(tmp_path, {"test_a.py": FAILING, "test_b.py": PASSING})
    for extra in ((), ("-W", "error")):
        on = pytest_run(tmp_path, backend, *extra)
        off = proc_group.run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra],
                             cwd=tmp_path, env=suite_env(), timeout=60, backend=backend,
                             probe=False)
        assert on.returncode == off.returncode == 1
        last = [ln.split(" in ")[0] for ln in (on.stdout.decode().splitlines()[-1],
                                               off.stdout.decode().splitlines()[-1])]
        assert last[0] == last[1] == "1 failed, 3 passed"


def test_a_nested_pytest_does_not_write_into_the_channel(backend: str, tmp_path: Path) -> None:
    """The probe removes the channel from the environment: a suite's own pytest runs stay out."""
    inner = tmp_path / "inner"
    write(inner, {"test_inner.py": "def test_inner_fails():\n    assert False\n"})
    outer = textwrap.dedent(f"""
        import subprocess, sys

        def test_outer():
            subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "retest_probe",
                            "-p", "no:cacheprovider", {str(inner)!r}], timeout=60)
    """)
    result = pytest_run(write(tmp_path / "outer", {"test_outer.py": outer}), backend,
                        str(tmp_path / "outer"))
    verdict = proc_group.classify(result)
    assert (verdict.kind, verdict.evidence) == ("passed", "events")
    assert result.probe is not None and result.probe.failed_ids == []


def test_on_event_sees_events_live(backend: str, tmp_path: Path) -> None:
    seen: list[str] = []
    result = proc_group.run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                            cwd=write(tmp_path, {"test_a.py": PASSING}), env=suite_env(),
                            timeout=60, backend=backend, on_event=lambda e: seen.append(e["ev"]))
    assert result.returncode == 0
    assert seen[0] == "session_start" and seen[-1] == "session_end"
    assert seen.count("test_start") == 2


def test_the_events_are_bounded(backend: str, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETEST_PROBE_MAX_BYTES", "200000")
    many = "import pytest\n\n@pytest.mark.parametrize('i', range(3000))\ndef test_many(i):\n" \
           "    assert i % 2, 'x' * 400\n"
    result = pytest_run(write(tmp_path, {"test_m.py": many}), backend, "--tb=no")
    assert result.probe is not None and result.probe.session_finished
    assert result.probe.dropped_events > 0
    assert result.probe.counts == {"failed": 1500, "passed": 1500}
    assert proc_group.classify(result).kind == "red"
    assert len(result.probe.failures) <= probe.FAILURES_MAX


def test_to_dict_carries_the_tests(tmp_path: Path, backend: str) -> None:
    result = pytest_run(write(tmp_path, {"test_a.py": FAILING}), backend)
    doc = json.loads(json.dumps(result.to_dict()))
    assert doc["tests"]["failures"][0]["nodeid"] == "test_a.py::test_locked"
    assert doc["tests"]["counts"] == {"failed": 1, "passed": 1}


def test_intervals_record_each_finished_test_bounded_and_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 16: when each test ran, on which worker, and how it ended; the last N only."""
    from retest import probe as probe_module

    events = [{"ev": "session_start", "t": 100.0}]
    for i in range(5):
        worker = f"gw{i % 2}"
        events += [{"ev": "test_start", "t": 100.0 + i, "worker": worker, "nodeid": f"t.py::test_{i}"},
                   {"ev": "report", "t": 100.5 + i, "worker": worker, "nodeid": f"t.py::test_{i}",
                    "when": "call", "outcome": "failed" if i == 3 else "passed", "duration": 0.4},
                   {"ev": "report", "t": 100.6 + i, "worker": worker, "nodeid": f"t.py::test_{i}",
                    "when": "teardown", "outcome": "passed"}]
    events.append({"ev": "test_start", "t": 106.0, "worker": "gw1", "nodeid": "t.py::test_hangs"})
    monkeypatch.setattr(probe_module, "INTERVALS_MAX", 3)
    report = probe_module.ProbeReport.from_events(events, ended_at=110.0)
    assert [(i.nodeid, i.worker, i.started_at, i.duration_s, i.outcome) for i in report.intervals] == [
        ("t.py::test_2", "gw0", 102.0, 0.5, "passed"), ("t.py::test_3", "gw1", 103.0, 0.5, "failed"),
        ("t.py::test_4", "gw0", 104.0, 0.5, "passed")]
    assert report.intervals_dropped == 2 and report.ended_at == 110.0
    assert [r.nodeid for r in report.running] == ["t.py::test_hangs"]
    masked = report.redacted(lambda text: text.replace("test_3", "***"))
    assert masked.intervals[1].nodeid == "t.py::***"
    assert "intervals" not in report.to_dict()  # the decision's evidence is unchanged


# --------------------------------------------------------------------------- start-up errors


def test_a_conftest_that_fails_to_import_reports_what_it_raised(backend: str, tmp_path: Path) -> None:
    """pytest exits 4 before pytest_configure: the probe's hook wrapper sees the exception
    pytest wraps, and reports the file that does not parse, not pytest's text."""
    root = write(tmp_path, {"conftest.py": "import helper\n", "helper.py": "def f(:\n    pass\n",
                            "test_a.py": PASSING})
    result = pytest_run(root, backend)
    assert result.returncode == 4
    error = result.probe.startup_error
    assert error is not None
    assert (error.stage, error.type, error.category) == ("conftest", "SyntaxError", "syntax")
    assert (error.file, error.line) == (str(root / "helper.py"), 1)
    assert error.conftest == str(root / "conftest.py")
    assert str(root / "conftest.py") in error.frames
    verdict = proc_group.classify(result)
    assert (verdict.kind, verdict.rule, verdict.evidence) == ("other", "other.environment", "events")
    assert f"SyntaxError at {root / 'helper.py'}:1" in verdict.reason


def test_an_import_error_reports_the_module_and_its_file(backend: str, tmp_path: Path) -> None:
    root = write(tmp_path, {"conftest.py": "from helper import gone\n", "helper.py": "x = 1\n",
                            "test_a.py": PASSING})
    error = pytest_run(root, backend).probe.startup_error
    assert error is not None
    assert (error.type, error.category, error.module) == ("ImportError", "import", "helper")
    assert error.module_file == str(root / "helper.py")
    assert (error.file, error.line) == (str(root / "conftest.py"), 1)


def test_a_pytest_configure_that_raises_is_reported(backend: str, tmp_path: Path) -> None:
    conftest = "def pytest_configure(config):\n    undefined_thing()\n"
    result = pytest_run(write(tmp_path, {"conftest.py": conftest, "test_a.py": PASSING}), backend)
    assert result.returncode == 3  # pytest: internal error
    error = result.probe.startup_error
    assert error is not None
    assert (error.stage, error.type, error.category) == ("configure", "NameError", "name")
    assert (error.file, error.line) == (str(tmp_path / "conftest.py"), 2)


def test_a_passing_run_reports_no_start_up_error(backend: str, tmp_path: Path) -> None:
    result = pytest_run(write(tmp_path, {"conftest.py": "import os\n", "test_a.py": PASSING}), backend)
    assert result.returncode == 0
    assert result.probe.session_finished and result.probe.startup_error is None
    assert result.probe.to_dict()["startup_error"] is None


TRACEBACK = textwrap.dedent('''\
    Traceback (most recent call last):
      File "/v/bin/pytest", line 5, in <module>
        from pytest import console_main
      File "<frozen importlib._bootstrap>", line 1176, in _find_and_load
      File "/w/src/pluggy/__init__.py", line 3, in <module>
        from ._hooks import HookimplMarker
      File "/w/src/pluggy/_hooks.py", line 10
        def broken(
                  ^
    SyntaxError: '(' was never closed
''')


def test_a_python_traceback_is_read_innermost_first() -> None:
    error = probe.startup_error_from_traceback("noise\n" + TRACEBACK)
    assert error is not None
    assert (error.stage, error.type, error.category, error.source) == (
        "traceback", "SyntaxError", "syntax", "output")
    assert (error.file, error.line) == ("/w/src/pluggy/_hooks.py", 10)
    assert error.frames == ("/v/bin/pytest", "/w/src/pluggy/__init__.py", "/w/src/pluggy/_hooks.py")
    assert error.message == "'(' was never closed"


@pytest.mark.parametrize("last, module, module_file, category", [
    ("ModuleNotFoundError: No module named 'pluggy._gone'", "pluggy._gone", None, "import"),
    ("ImportError: cannot import name 'x' from 'pluggy._hooks' (/w/src/pluggy/_hooks.py)",
     "pluggy._hooks", "/w/src/pluggy/_hooks.py", "import"),
    ("NameError: name 'y' is not defined", None, None, "name"),
    ("mypkg.errors.ConfigError: bad", None, None, "other"),
])
def test_a_tracebacks_last_exception_is_sorted(last: str, module: str, module_file: str,
                                              category: str) -> None:
    text = TRACEBACK.replace("SyntaxError: '(' was never closed", last)
    first = ("Traceback (most recent call last):\n  File \"/a.py\", line 1, in <module>\n"
             "KeyError: 'x'\n\nDuring handling of the above exception, another exception occurred:\n\n")
    error = probe.startup_error_from_traceback(first + text)
    assert error is not None
    assert (error.module, error.module_file, error.category) == (module, module_file, category)
    assert error.type == last.split(":")[0]


@pytest.mark.parametrize("text", [
    "",
    "ERROR: usage: pytest [options]\n",
    TRACEBACK + "".join(f"the process went on, line {i}\n" for i in range(30)),
    "Traceback (most recent call last):\n  File \"/a.py\", line 1, in <module>\n",
])
def test_no_traceback_or_one_the_process_outlived_is_not_read(text: str) -> None:
    assert probe.startup_error_from_traceback(text) is None


def test_a_plugin_that_fails_to_import_reports_what_it_raised(backend: str, tmp_path: Path) -> None:
    """``-p name`` (or an entry point) whose module does not parse: pytest 9 prints it and
    exits 3 before any hook runs; earlier ones let it escape. Either way, it is reported."""
    from _pytest import config as _config

    root = write(tmp_path, {"myplugin.py": "import helper\n", "helper.py": "def f(:\n",
                            "test_a.py": PASSING})
    result = pytest_run(root, backend, "-p", "myplugin", PYTHONPATH=str(root))
    assert result.returncode != 0
    error = result.probe.startup_error
    assert error is not None, result.stderr[-2000:]
    if hasattr(_config, "print_plugin_import_error"):
        assert (error.stage, error.plugin) == ("plugin", "myplugin")
    else:
        assert error.stage == "uncaught"
    assert (error.type, error.category) == ("SyntaxError", "syntax")
    assert (error.file, error.line) == (str(root / "helper.py"), 1)
    assert b"Error while loading plugin" in result.stderr or b"SyntaxError" in result.stderr


def test_a_suite_whose_every_test_skips_is_not_a_pass(backend: str, tmp_path: Path) -> None:
    """Found on markupsafe: a conftest that marks every test skip made broken code merge on
    ``exit 0: 80 skipped``. Nothing was tested: ``other.no-tests``."""
    conftest = textwrap.dedent("""
        import pytest

        def pytest_collection_modifyitems(items):
            for item in items:
                item.add_marker(pytest.mark.skip(reason="not here"))
    """)
    result = pytest_run(write(tmp_path, {"conftest.py": conftest, "test_a.py": PASSING}), backend)
    assert result.returncode == 0
    verdict = proc_group.classify(result)
    assert (verdict.kind, verdict.rule, verdict.evidence) == ("other", "other.no-tests", "events")
    assert "every test was skipped (2 skipped): nothing was shown to work" in verdict.reason


@pytest.mark.parametrize("strict", [False, True])
def test_a_suite_whose_every_test_is_an_expected_failure_is_not_a_pass(
        backend: str, tmp_path: Path, strict: bool) -> None:
    """A conftest that marks every test xfail hides broken code as surely as one that skips
    them: each failure is "expected" and pytest exits 0 (strict or not: the tests do fail).
    No test passed: ``other.no-tests``."""
    conftest = textwrap.dedent(f"""
        import pytest

        def pytest_collection_modifyitems(items):
            for item in items:
                item.add_marker(pytest.mark.xfail(reason="later", strict={strict}))
    """)
    broken = "def test_a():\n    assert 1 == 2\n\n\ndef test_b():\n    raise ValueError\n"
    result = pytest_run(write(tmp_path, {"conftest.py": conftest, "test_a.py": broken}), backend)
    assert result.returncode == 0
    verdict = proc_group.classify(result)
    assert (verdict.kind, verdict.rule, verdict.evidence) == ("other", "other.no-tests", "events")
    assert "no test passed (2 xfailed): nothing was shown to work" in verdict.reason


#: pytest 8.4 and later fail an async test that no plugin runs (earlier ones skip it).
NEEDS_ASYNC_FAILURE = pytest.mark.skipif(
    tuple(map(int, re.match(r"(\d+)\.(\d+)", pytest.__version__).groups())) < (8, 4),  # type: ignore[union-attr]
    reason="pytest < 8.4 skips an async test it cannot run, it does not fail it")
ASYNC_SUITE = ("import asyncio\n\n\nasync def test_a():\n    await asyncio.sleep(0)\n\n\n"
               "def test_b():\n    pass\n")


@NEEDS_ASYNC_FAILURE
def test_async_tests_without_an_async_plugin_are_the_environment(backend: str, tmp_path: Path) -> None:
    """A venv without the suite's pytest-asyncio (or anyio...): pytest fails every async
    test as unsupported, on every branch, main included. Not red: ``other.environment``."""
    result = pytest_run(write(tmp_path, {"test_a.py": ASYNC_SUITE}), backend)
    assert result.returncode == 1 and result.probe is not None
    assert result.probe.async_plugins == ()
    verdict = proc_group.classify(result)
    assert (verdict.kind, verdict.rule, verdict.evidence) == ("other", "other.environment", "events")
    assert "every failed test is an async test that no installed plugin runs" in verdict.reason
    assert "failed: test_a.py::test_a" in verdict.reason


@NEEDS_ASYNC_FAILURE
def test_an_async_test_that_the_loaded_plugin_did_not_take_is_red(backend: str, tmp_path: Path) -> None:
    """An async plugin is loaded (a stand-in here: a plugin module named like one, which takes
    no test, as pytest-asyncio's strict mode takes none without its marker): an async test
    that fails as unsupported is the suite's own fault. Red, and the plugin is named."""
    root = write(tmp_path, {"test_a.py": ASYNC_SUITE, "fake_asyncio_runner.py": "# takes nothing\n"})
    result = pytest_run(root, backend, "-p", "fake_asyncio_runner", PYTHONPATH=str(root))
    assert result.probe is not None and result.probe.async_plugins == ("fake_asyncio_runner",)
    verdict = proc_group.classify(result)
    assert (verdict.kind, verdict.rule) == ("red", "red.tests-failed"), verdict.reason


def test_a_real_failure_beside_an_unsupported_async_test_is_red(backend: str, tmp_path: Path) -> None:
    suite = ASYNC_SUITE.replace("def test_b():\n    pass", "def test_b():\n    assert 1 == 2")
    verdict = proc_group.classify(pytest_run(write(tmp_path, {"test_a.py": suite}), backend))
    assert (verdict.kind, verdict.rule) == ("red", "red.tests-failed"), verdict.reason


def test_errors_for_fixtures_of_uninstalled_plugins_are_the_environment(backend: str,
                                                                        tmp_path: Path) -> None:
    """A venv without pytest-mock (or pytest-benchmark): every test that asks for ``mocker``
    errors at set-up on every branch. Not red: ``other.environment``, naming the plugins."""
    suite = ("def test_a(mocker):\n    pass\n\n\ndef test_b():\n    pass\n\n\n"
             "def test_c(benchmark):\n    pass\n")
    result = pytest_run(write(tmp_path, {"test_a.py": suite}), backend)
    assert result.returncode == 1 and result.probe is not None
    assert [(f.missing_fixture, f.message) for f in result.probe.failures] == [
        ("mocker", "fixture 'mocker' not found"), ("benchmark", "fixture 'benchmark' not found")]
    verdict = proc_group.classify(result)
    assert (verdict.kind, verdict.rule, verdict.evidence) == ("other", "other.environment", "events")
    assert "benchmark (pytest-benchmark), mocker (pytest-mock)" in verdict.reason


@pytest.mark.parametrize("suite", [
    "def test_a(mokcer):\n    pass\n",  # the suite's own typo
    "def test_a(mocker):\n    pass\n\n\ndef test_b():\n    assert 1 == 2\n",  # and a real failure
    "def test_a(mocker):\n    pass\n\n\ndef test_b(db_session):\n    pass\n",  # a project fixture
], ids=["typo", "beside-a-failure", "beside-a-project-fixture"])
def test_other_fixture_errors_stay_red(backend: str, tmp_path: Path, suite: str) -> None:
    verdict = proc_group.classify(pytest_run(write(tmp_path, {"test_a.py": suite}), backend))
    assert verdict.kind == "red" and verdict.rule in ("red.test-errors", "red.tests-failed"), \
        verdict.reason


def test_an_expected_failure_beside_a_passing_test_is_a_pass(backend: str, tmp_path: Path) -> None:
    suite = ("import pytest\n\n\n@pytest.mark.xfail\ndef test_x():\n    assert 0\n\n\n"
             "def test_r():\n    pass\n")
    verdict = proc_group.classify(pytest_run(write(tmp_path, {"test_a.py": suite}), backend))
    assert (verdict.kind, verdict.rule) == ("passed", "passed.exit-0"), verdict.reason


def test_one_test_run_beside_skipped_ones_is_a_pass(backend: str, tmp_path: Path) -> None:
    suite = "import pytest\n\n\n@pytest.mark.skip\ndef test_s():\n    pass\n\n\ndef test_r():\n    pass\n"
    verdict = proc_group.classify(pytest_run(write(tmp_path, {"test_a.py": suite}), backend))
    assert (verdict.kind, verdict.rule) == ("passed", "passed.exit-0"), verdict.reason
