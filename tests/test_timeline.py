"""The run timeline (issue 16.3): built from a real run's RunResult, bounded, drawn defensively."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

from retest import pages, pages_svg, proc_group, timeline


def _suite(tmp_path: Path) -> Path:
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_some.py").write_text(textwrap.dedent("""\
        import time


        def test_quick():
            pass


        def test_fails():
            assert False


        def test_hangs():
            time.sleep(30)
        """))
    return suite


def test_a_timed_out_run_gives_its_tests_stages_and_stacks(tmp_path: Path) -> None:
    result = proc_group.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(_suite(tmp_path))], timeout=4.0, grace=1.0, cwd=tmp_path)
    assert result.timed_out and result.probe is not None
    doc = timeline.from_result(result, grace_s=1.0)
    assert doc is not None
    outcomes = {t["nodeid"].rsplit("::", 1)[1]: t["outcome"] for t in doc["tests"]}
    assert outcomes == {"test_quick": "passed", "test_fails": "failed", "test_hangs": "running"}
    hung = next(t for t in doc["tests"] if t["outcome"] == "running")
    assert hung["start_s"] + hung["duration_s"] == 4.0 or abs(hung["start_s"] + hung["duration_s"] - 4.0) < 0.05
    assert all(0 <= t["start_s"] <= 4.0 for t in doc["tests"])
    assert [s["name"] for s in doc["stages"]][0] == "deadline" and doc["stages"][-1]["name"] == "end"
    assert doc["workers"] == ["main"]
    assert any("test_hangs" in (d["nodeid"] or "") for d in doc["diagnostics"])
    svg = pages_svg.render(doc)
    assert svg.count('class="test-bar"') == 3 and 'data-stage="deadline"' in svg


def test_bounded_drops_passing_tests_first_and_says_so() -> None:
    tests = [{"nodeid": f"t.py::test_{i}", "worker": "gw0", "start_s": i * 0.01, "duration_s": 0.01,
              "outcome": "passed"} for i in range(2000)]
    tests.append({"nodeid": "t.py::test_hangs", "worker": "gw1", "start_s": 1.0, "duration_s": 9.0,
                  "outcome": "running"})
    doc = {"version": 1, "tests": tests, "tests_dropped": 0, "stages": [{"name": "end", "t": 10.0}],
           "diagnostics": [{"pid": 1, "text": "x" * 50000}]}
    cut = timeline.bounded(doc, 20000)
    assert len(json.dumps(cut).encode()) <= 20000 and cut["truncated"]
    assert "t.py::test_hangs" in [t["nodeid"] for t in cut["tests"]]
    assert cut["tests_dropped"] == 2001 - len(cut["tests"]) > 0
    assert cut["stages"] == doc["stages"]
    assert timeline.bounded(doc, 10 ** 7) is doc


def test_samples_are_read_defensively_and_drawn() -> None:
    assert timeline.samples(None) == [] and timeline.samples({"samples": "no"}) == []
    assert timeline.samples({"samples": [{"t": "x"}, 3, {"t": 1, "cpu_some": True}]}) == \
        [{"t": 1.0, "cpu_some": None, "busy_cores": None, "tree_cores": None}]
    base = {"version": 1, "duration_s": 10.0, "tests": [], "stages": [{"name": "end", "t": 10.0}]}
    without = pages_svg.render(dict(base, pressure={"cores": 2, "samples": None}))
    assert 'class="no-samples"' in without and "<polyline" not in without
    points = [{"t": t, "cpu_some": 0.5, "busy_cores": 1.5, "tree_cores": 0.2} for t in range(10)]
    drawn = pages_svg.render(dict(base, pressure={"cores": 2, "samples": points}))
    assert drawn.count("<polyline") == 3 and "no-samples" not in drawn


def test_every_text_of_a_page_is_escaped() -> None:
    hostile = '"><script>alert(1)</script><img src=x onerror=alert(2)>'
    doc = {"id": 7, "verdict": hostile, "action": hostile, "branch": hostile, "reason": hostile,
           "evidence": {"tests": {"failures": [{"nodeid": hostile, "longrepr": hostile}],
                                  "running": [{"nodeid": hostile, "worker": hostile}]},
                        "pressure": {"foreign": [{"cmdline": hostile, "pid": 1}]}}}
    line = {"version": 1, "duration_s": 1.0, "tests": [{"nodeid": hostile, "worker": hostile,
                                                        "start_s": 0, "duration_s": 1, "outcome": hostile}],
            "stages": [{"name": hostile, "t": 0.5}], "foreign": [{"cmdline": hostile}],
            "diagnostics": [{"pid": hostile, "nodeid": hostile, "text": hostile, "summary": hostile}]}
    for page in (pages.decision(doc, line), pages.index({"enabled": True, "recent": [doc]}, verdict=None, now=0)):
        assert "<script" not in page and "<img" not in page and "&lt;script&gt;" in page
