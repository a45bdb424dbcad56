"""The probe's events and the output rules agree on real pytest runs (issue 9).

``tests/corpus/<pytest line>/<case>/`` holds runs of pytest 7, 8 and 9 recorded by
``tools/make_corpus.py`` (regenerate with it; do not edit by hand). For every stored run:

* both output twins (``_classify_py`` and the native ``_proc_group.classify``) give the same
  answer, and it is the one recorded;
* the verdict on the events (``ProbeReport.from_events``) has the output's kind, rule and
  infra, except where ``DIFFERENCES`` names the case, both answers and why; and it is recorded;
* the failing test ids the events name are those of pytest's own ``FAILED``/``ERROR`` short
  summary lines, and the counts the events carry are those of pytest's summary line.

A live test records a few cases afresh with the installed pytest and checks the same, and that
they still match what the corpus stored for that pytest line, so the corpus cannot silently rot.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

import pytest

from retest import _classify_py, probe, proc_group
from retest.probe import ProbeReport

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).resolve().parent / "corpus"
LINES = ("7", "8", "9")
CORPUS_MAX_BYTES = 1024 * 1024


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_corpus", ROOT / "tools" / "make_corpus.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_corpus"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


make_corpus = _load_generator()

#: Cases where the events' verdict is not the output's: case -> (output (kind, rule), events
#: (kind, rule), why). Both sides are asserted; everything else must agree on kind and rule.
DIFFERENCES: dict[str, tuple[tuple[str, str], tuple[str, str], str]] = {
    "timeout-signal": (
        ("red", "red.tests-failed"), ("red", "red.test-timeout"),
        "the output sees an ordinary failure; the events carry pytest-timeout's message in it, "
        "which proves the per-test timeout (red either way)"),
    "os-exit": (
        ("red", "red.exit-1"), ("other", "other.session-incomplete"),
        "exit 1 with no summary reads as pytest's 'tests failed' from the output alone; the "
        "events prove no test failed and the session never ended, so the 1 is not pytest's "
        "status and red has no proof"),
}

CASE_DIRS = sorted(p.parent for p in CORPUS.glob("*/*/meta.json"))


def load(case_dir: Path) -> Any:
    """A stored case as the generator's ``Recording``."""
    events = [json.loads(line) for line in (case_dir / "events.jsonl").read_text().splitlines()
              if line.strip()]
    return make_corpus.Recording(
        stdout=(case_dir / "stdout.txt").read_bytes(),
        stderr=(case_dir / "stderr.txt").read_bytes(),
        events=events,
        meta=json.loads((case_dir / "meta.json").read_text()),
    )


def as_result(rec: Any, probe: Optional[ProbeReport] = None) -> proc_group.RunResult:
    meta = rec.meta
    return make_corpus.rebuild(meta["args"], meta["returncode"], rec.stdout, rec.stderr,
                               meta["timed_out"], probe)


def _case_id(case_dir: Path) -> str:
    return f"{case_dir.parent.name}/{case_dir.name}"


@pytest.fixture(params=CASE_DIRS, ids=_case_id)
def stored(request: pytest.FixtureRequest) -> Any:
    return load(request.param)


# --------------------------------------------------------------------------- what pytest printed

#: A short-summary line: ``FAILED id - msg``, ``ERROR id``, pytest 9's ``SUBFAILED(i=1) id``,
#: pytest-subtests' ``(i=1) SUBFAIL id``.
# pytest 9: "SUBFAILED[msg](k=v) id"; pytest-subtests: "[msg] (k=v) SUBFAIL id".
_SHORT_LINE = re.compile(r"^(?P<pre>(?:\[[^\]]*\] )?(?:\([^)]*\) )?)(?P<sub>SUB)?(FAILED|FAIL|ERROR)"
                         r"(?P<post>(?:\[[^\]]*\])?(?:\([^)]*\))?) (\S+)")
_LABEL = re.compile(r" (?:\[[^\]]*\] ?)?(?:\([^)]*\))?$")
_SHORT_HEADER = b" short test summary info "


def short_summary(stdout: bytes) -> Optional[list[tuple[str, str]]]:
    """``(failed | error, test id)`` for each line of pytest's short test summary (None: the
    output has none)."""
    head, found, tail = stdout.partition(_SHORT_HEADER)
    if not found:
        return None
    named = []
    for line in tail.decode("utf-8", "replace").splitlines()[1:]:
        match = _SHORT_LINE.match(line)
        if match:
            # the probe writes "[msg] (k=v)", as pytest-subtests does; pytest 9 "[msg](k=v)"
            label = (match["post"] or match["pre"]).strip().replace("](", "] (")
            nodeid = f"{match[5]} {label}" if match["sub"] and label else match[5]
            named.append(("error" if match[3] == "ERROR" else "failed", nodeid))
    return named


#: pytest prints ``1 error``/``2 errors`` and ``1 warning``/``2 warnings`` for one stats key.
_STATS_KEY = {"errors": "error", "warning": "warnings"}


def summary_counts(stdout: bytes, stderr: bytes) -> Optional[dict[str, int]]:
    """The counts of pytest's summary line, keyed as pytest's stats (None: no summary line)."""
    summary = _classify_py._find_summary(stdout) or _classify_py._find_summary(stderr)
    if summary is None:
        return None
    body = summary.text.rsplit(" in ", 1)[0]
    if body == "no tests ran":
        return {}
    counts = {}
    for item in body.split(", "):
        number, _, words = item.partition(" ")
        last = words.rpartition(" ")[2]
        key = words[: len(words) - len(last)] + _STATS_KEY.get(last, last)
        counts[key] = int(number)
    return counts


# --------------------------------------------------------------------------- the checks


def output_verdicts(rec: Any) -> tuple[tuple[Any, ...], ...]:
    """The output-only answer of each twin that is here (Python always, native when built)."""
    meta = rec.meta
    is_pytest = probe.is_pytest_argv(meta["args"])
    call = (rec.stdout, rec.stderr, meta["returncode"], meta["timed_out"], None, False, 0,
            is_pytest)
    answers = [_classify_py.classify(*call)]
    try:
        from retest import _proc_group
    except ImportError:
        pass
    else:
        answers.append(_proc_group.classify(*call))
    return tuple(tuple(a) for a in answers)


def check_output(rec: Any) -> proc_group.Verdict:
    """Both twins agree, and ``classify`` without the probe says what they say."""
    answers = output_verdicts(rec)
    assert len(set(answers)) == 1, answers
    verdict = proc_group.classify(as_result(rec))
    assert (verdict.kind, verdict.rule, verdict.reason, verdict.infra) == answers[0]
    assert verdict.evidence == "output"
    return verdict


def check_events(rec: Any, output: proc_group.Verdict) -> proc_group.Verdict:
    """The events' verdict agrees with the output's, or differs only as DIFFERENCES says."""
    verdict = proc_group.classify(as_result(rec, make_corpus.replay(rec.events)))
    assert verdict.evidence == "events", verdict
    expected = DIFFERENCES.get(rec.meta["case"])
    if expected is not None:
        assert ((output.kind, output.rule), (verdict.kind, verdict.rule)) == expected[:2]
    else:
        assert (verdict.kind, verdict.rule) == (output.kind, output.rule), (output, verdict)
    assert verdict.infra == output.infra, (output, verdict)
    return verdict


def check_ids_and_counts(rec: Any) -> None:
    """The events name the tests and counts pytest's own summary shows."""
    report = make_corpus.replay(rec.events)
    named = short_summary(rec.stdout)
    if named is not None and not any(isinstance(e.get("subtest"), str) for e in rec.events):
        # recorded before the probe named subtests by their label: compare the test ids
        named = [(outcome, _LABEL.sub("", nodeid)) for outcome, nodeid in named]
    if named is not None:
        from_events = [(f.outcome, f.nodeid) for f in (*report.failures, *report.collection_errors)]
        assert collections.Counter(from_events) == collections.Counter(named)
    counts = summary_counts(rec.stdout, rec.stderr)
    if counts is not None:
        assert report.session_finished
        assert report.counts == counts
        assert report.exitstatus == rec.meta["returncode"]
    elif report.session_started:
        # No summary line: pytest died in a test (os._exit, a signal).
        assert not report.session_finished and report.running


def check_recorded(rec: Any, output: proc_group.Verdict, events: proc_group.Verdict) -> None:
    meta = rec.meta
    assert (output.kind, output.rule, output.infra) == tuple(
        meta["output_verdict"][k] for k in ("kind", "rule", "infra"))
    assert (events.kind, events.rule, events.infra) == tuple(
        meta["events_verdict"][k] for k in ("kind", "rule", "infra"))


# --------------------------------------------------------------------------- the stored corpus


def test_the_corpus_holds_every_case_of_every_line() -> None:
    stored_cases = {_case_id(p) for p in CASE_DIRS}
    wanted = {f"{line}/{case.name}" for line in LINES for case in make_corpus.CASES}
    assert stored_cases == wanted
    size = sum(f.stat().st_size for f in CORPUS.rglob("*") if f.is_file())
    assert size < CORPUS_MAX_BYTES


def test_the_twins_agree_and_match_the_record(stored: Any) -> None:
    output = check_output(stored)
    assert (output.kind, output.rule) == (stored.meta["output_verdict"]["kind"],
                                          stored.meta["output_verdict"]["rule"])


def test_events_and_output_agree(stored: Any) -> None:
    output = check_output(stored)
    events = check_events(stored, output)
    check_recorded(stored, output, events)


def test_events_name_what_pytest_printed(stored: Any) -> None:
    check_ids_and_counts(stored)


def test_every_difference_is_still_a_difference() -> None:
    """An entry of DIFFERENCES that no stored case needs any more goes."""
    metas = [json.loads((p / "meta.json").read_text()) for p in CASE_DIRS]
    needed = {m["case"] for m in metas if m["output_verdict"]["rule"] != m["events_verdict"]["rule"]}
    assert needed == set(DIFFERENCES)


def test_the_corpus_is_machine_neutral() -> None:
    """No path of the machine that recorded it (they are replaced by placeholders)."""
    for path in CORPUS.rglob("*"):
        if path.is_file():
            text = path.read_bytes()
            for place in (b"/tmp/", b"/home/", b"/root/", b"/work/"):
                assert place not in text, (path, place)


# --------------------------------------------------------------------------- live


LIVE_CASES = ("failing", "subtests", "timeout-signal", "xdist-crash", "collection-error", "os-exit")


@pytest.mark.parametrize("name", LIVE_CASES)
def test_live_run_agrees_and_matches_the_corpus(name: str, tmp_path: Path) -> None:
    pytest.importorskip("xdist")
    pytest.importorskip("pytest_timeout")
    chain = make_corpus.current_toolchain()
    rec = make_corpus.record(make_corpus.CASES_BY_NAME[name], chain, tmp_path)
    assert rec is not None
    output = check_output(rec)
    events = check_events(rec, output)
    check_recorded(rec, output, events)
    check_ids_and_counts(rec)
    stored_dir = CORPUS / chain.line / name
    if not stored_dir.is_dir():
        pytest.skip(f"no stored corpus for pytest {chain.line}")
    stored_meta = load(stored_dir).meta
    for key in ("output_verdict", "events_verdict", "returncode"):
        assert rec.meta[key] == stored_meta[key], key


def test_a_recording_round_trips_through_the_files(tmp_path: Path) -> None:
    chain = make_corpus.current_toolchain()
    rec = make_corpus.record(make_corpus.CASES_BY_NAME["setup-error"], chain, tmp_path / "run")
    make_corpus.store(rec, tmp_path / "stored")
    again = load(tmp_path / "stored")
    assert dataclasses.astuple(again) == dataclasses.astuple(rec)
