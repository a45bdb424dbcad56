"""Record real pytest runs, with the probe's events, for ``tests/test_corpus.py`` (issue 9).

For each pytest line (7, 8, 9) this makes a throw-away venv with pytest, pytest-xdist,
pytest-timeout and (before pytest 9, which has subtests built in) pytest-subtests, writes a
handful of tiny suites, runs each through ``retest.proc_group.run`` exactly as the gate does
(the probe injected by ``run()`` itself, its events taken from ``on_event``) and stores, in
``tests/corpus/<pytest line>/<case>/``:

* ``stdout.txt``, ``stderr.txt``: the bytes pytest printed, with the machine-specific paths
  (the suite's directory, the venv, the home directory, the base interpreter's prefix)
  replaced by ``<rootdir>``, ``<venv>``, ``<home>`` and ``<python>``, and thread idents in
  pytest-timeout's and faulthandler's stack dumps by ``<ident>``;
* ``events.jsonl``: the probe's events in file order, the same paths replaced;
* ``meta.json``: the command (as ``RunResult.args``), exit status, ``timed_out``, the versions
  installed, and the verdicts observed: from the output alone and from the events.

Plugin autoloading is off (``PYTEST_DISABLE_PLUGIN_AUTOLOAD=1``): each case loads the plugins
it needs with ``-p``, so ``meta.json`` says exactly what ran.

    python tools/make_corpus.py                 # all three lines into tests/corpus
    python tools/make_corpus.py --lines 9 --keep # one line, keep the venv and suites

Needs retest installed in the running interpreter (``pip install -e .``) and pip access.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from retest import proc_group
from retest.probe import ProbeReport

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "corpus"

#: pip requirements per pytest line: plugin versions that declare support for that pytest.
TOOLCHAINS: dict[str, tuple[str, ...]] = {
    "7": ("pytest==7.4.4", "pytest-xdist==3.5.0", "pytest-timeout==2.3.1", "pytest-subtests==0.13.1"),
    "8": ("pytest==8.3.5", "pytest-xdist==3.6.1", "pytest-timeout==2.3.1", "pytest-subtests==0.15.0"),
    "9": ("pytest==9.2.0", "pytest-xdist==3.8.0", "pytest-timeout==2.4.0"),
}
DISTRIBUTIONS = ("pytest", "pytest-xdist", "pytest-timeout", "pytest-subtests", "pluggy", "execnet")

XDIST = ("-p", "xdist.plugin")
TIMEOUT = ("-p", "pytest_timeout")
NO_CACHE = ("-p", "no:cacheprovider")
#: The runner's own deadline for one case: far above any case, so none ever reaches it.
RUN_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Case:
    """One tiny suite and the pytest arguments it runs with."""

    name: str
    files: dict[str, str]
    args: tuple[str, ...]
    #: Needs the ``subtests`` fixture (a plugin before pytest 9).
    subtests: bool = False
    #: Arguments of a first run whose cache the recorded run reads (``--lf``); None: no first run.
    before: Optional[tuple[str, ...]] = None
    #: Pass the suite's directory as the path argument (off: pytest reads ``testpaths``).
    with_path: bool = True


MIXED = """
    def test_a():
        pass

    def test_b():
        assert 1 + 1 == 3

    def test_c():
        pass
"""

TWO_FILES = {"test_one.py": MIXED, "test_two.py": "def test_d():\n    pass\n\n\ndef test_e():\n    pass\n"}

EXITING = """
    import os

    def test_quick():
        pass

    def test_exits():
        os._exit(1)
"""

CASES: tuple[Case, ...] = (
    Case("passing", {"test_ok.py": "def test_a():\n    pass\n\n\ndef test_b():\n    pass\n"}, NO_CACHE),
    Case("failing", {"test_mixed.py": MIXED}, NO_CACHE),
    Case("setup-error", {"test_fixtures.py": """
        import pytest

        @pytest.fixture
        def broken():
            raise RuntimeError("no database for this test")

        @pytest.fixture
        def leaky():
            yield
            raise RuntimeError("teardown left a file behind")

        def test_a():
            pass

        def test_b(broken):
            pass

        def test_c(leaky):
            pass
    """}, NO_CACHE),
    Case("collection-error", {
        "test_ok.py": "def test_a():\n    pass\n",
        "test_broken.py": "import no_such_module_for_retest\n\n\ndef test_b():\n    pass\n",
    }, NO_CACHE),
    Case("no-tests", {"helper.py": "VALUE = 1\n"}, NO_CACHE),
    Case("subtests", {"test_sub.py": """
        def test_a(subtests):
            for i in range(3):
                with subtests.test(i=i):
                    assert i != 1

        def test_b():
            pass
    """}, NO_CACHE, subtests=True),
    Case("exitfirst", {"test_x.py": """
        def test_a():
            pass

        def test_b():
            assert "first" == "failure"

        def test_c():
            assert "never" == "run"

        def test_d():
            pass
    """}, (*NO_CACHE, "-x")),
    # The cache provider on (the suite's own .pytest_cache): the first run records test_b.
    Case("last-failed", TWO_FILES, ("--lf",), before=()),
    Case("xdist", TWO_FILES, (*NO_CACHE, *XDIST, "-n", "2")),
    Case("timeout-signal", {"test_slow.py": """
        import time

        def test_quick():
            pass

        def test_slow():
            time.sleep(10)
    """}, (*NO_CACHE, *TIMEOUT, "--timeout=1", "--timeout-method=signal")),
    Case("timeout-thread", {"test_slow.py": """
        import time

        def test_quick():
            pass

        def test_slow():
            time.sleep(10)
    """}, (*NO_CACHE, *TIMEOUT, "--timeout=1", "--timeout-method=thread")),
    # A test that ends the interpreter: exit 1 that is not pytest's, then a crash by signal,
    # then the same exit inside an xdist worker (which xdist reports as a failed test).
    Case("os-exit", {"test_exit.py": EXITING}, NO_CACHE),
    Case("segfault", {"test_crash.py": """
        import ctypes

        def test_quick():
            pass

        def test_crash():
            ctypes.string_at(0)
    """}, NO_CACHE),
    Case("xdist-crash", {"test_exit.py": EXITING}, (*NO_CACHE, *XDIST, "-n", "2")),
    Case("testpaths-ini-error", {
        "pytest.ini": "[pytest]\ntestpaths = nothere\nfilterwarnings = error\n",
        "test_ok.py": "def test_a():\n    pass\n",
    }, NO_CACHE, with_path=False),
    Case("testpaths-cli-error", {
        "pytest.ini": "[pytest]\ntestpaths = nothere\n",
        "test_ok.py": "def test_a():\n    pass\n",
    }, (*NO_CACHE, "-W", "error"), with_path=False),
    Case("deselect", {"test_k.py": """
        def test_fast_a():
            pass

        def test_fast_b():
            pass

        def test_slow():
            assert False, "deselected, never run"
    """}, (*NO_CACHE, "-k", "not slow")),
    Case("deselect-all", {"test_k.py": "def test_a():\n    pass\n\n\ndef test_b():\n    pass\n"},
         (*NO_CACHE, "-k", "nothing_matches")),
)

CASES_BY_NAME = {case.name: case for case in CASES}


# --------------------------------------------------------------------------- environments


@dataclass(frozen=True)
class Toolchain:
    """An interpreter with one pytest line installed, and what it has."""

    line: str
    python: str
    #: The directory replaced by ``<venv>`` in what is stored (``None``: nothing to replace).
    venv: Optional[str]
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def has_builtin_subtests(self) -> bool:
        return int(self.versions.get("pytest", "0").split(".")[0]) >= 9


def installed_versions(python: str) -> dict[str, str]:
    """The versions of the distributions that matter, as ``python`` sees them."""
    script = textwrap.dedent(f"""
        import json
        from importlib import metadata
        found = {{}}
        for name in {list(DISTRIBUTIONS)!r}:
            try:
                found[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                pass
        print(json.dumps(found))
    """)
    out = subprocess.run([python, "-c", script], check=True, capture_output=True, timeout=60)
    return dict(json.loads(out.stdout))


def make_venv(line: str, where: Path) -> Toolchain:
    """A fresh venv holding ``TOOLCHAINS[line]`` (pytest-subtests skipped if it will not install)."""
    venv = where / f"venv-{line}"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    wanted = TOOLCHAINS[line]
    required = [r for r in wanted if not r.startswith("pytest-subtests")]
    subprocess.run([*pip, *required], check=True, timeout=600)
    for optional in (r for r in wanted if r.startswith("pytest-subtests")):
        if subprocess.run([*pip, optional], timeout=600).returncode != 0:
            print(f"make_corpus: {optional} did not install for pytest {line}; no subtests case",
                  file=sys.stderr)
    return Toolchain(line, python, str(venv), installed_versions(python))


def current_toolchain() -> Toolchain:
    """The running interpreter's pytest (the live test's toolchain)."""
    versions = installed_versions(sys.executable)
    venv = sys.prefix if sys.prefix != sys.base_prefix else None
    return Toolchain(versions.get("pytest", "0").split(".")[0], sys.executable, venv, versions)


# --------------------------------------------------------------------------- running a case


@dataclass(frozen=True)
class Recording:
    """One recorded run: normalised bytes, events and meta, ready to store or compare."""

    stdout: bytes
    stderr: bytes
    events: list[dict[str, Any]]
    meta: dict[str, Any]


def case_argv(case: Case, chain: Toolchain, args: Sequence[str]) -> Optional[list[str]]:
    """The command for ``case`` under ``chain``; None when ``chain`` cannot run it."""
    plugins: tuple[str, ...] = ()
    if case.subtests and not chain.has_builtin_subtests:
        if "pytest-subtests" not in chain.versions:
            return None
        plugins = ("-p", "pytest_subtests.plugin")
    return [chain.python, "-m", "pytest", *plugins, *args]


def suite_env(home: Path) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LC_ALL": "C",
        "COLUMNS": "80",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
    }


def write_suite(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(textwrap.dedent(text).lstrip("\n"))


#: pytest-timeout's ``Stack of MainThread (1403...)``, faulthandler's ``Current thread 0x7f...``.
_THREAD_IDENT = re.compile(rb"(Stack of [^\n]* \()[0-9]+(\))|((?:Current t|T)hread )0x[0-9a-f]+")


class Normaliser:
    """Replaces the paths that make a recording machine-specific, longest first."""

    def __init__(self, places: dict[str, Optional[str]]) -> None:
        pairs = [(os.path.realpath(path), mark) for mark, path in places.items() if path]
        pairs += [(path, mark) for mark, path in places.items() if path]
        self.pairs = sorted(set(pairs), key=lambda p: -len(p[0]))

    def text(self, text: str) -> str:
        for path, mark in self.pairs:
            text = text.replace(path, mark)
        return text

    def output(self, data: bytes) -> bytes:
        for path, mark in self.pairs:
            data = data.replace(os.fsencode(path), os.fsencode(mark))
        return _THREAD_IDENT.sub(lambda m: (m[1] or m[3]) + b"<ident>" + (m[2] or b""), data)

    def event(self, event: dict[str, Any]) -> dict[str, Any]:
        return json.loads(self.text(json.dumps(event)))


def verdict_doc(verdict: proc_group.Verdict) -> dict[str, Any]:
    return {"kind": verdict.kind, "rule": verdict.rule, "infra": verdict.infra,
            "evidence": verdict.evidence}


def record(case: Case, chain: Toolchain, workdir: Path) -> Optional[Recording]:
    """Run ``case`` under ``chain`` in ``workdir`` (made empty first); None if it cannot run."""
    argv = case_argv(case, chain, case.args)
    if argv is None:
        return None
    shutil.rmtree(workdir, ignore_errors=True)
    suite, home = workdir / "suite", workdir / "home"
    suite.mkdir(parents=True)
    home.mkdir()
    write_suite(suite, case.files)
    env = suite_env(home)
    path_arg = [str(suite)] if case.with_path else []
    if case.before is not None:
        first = case_argv(case, chain, case.before)
        assert first is not None
        proc_group.run([*first, *path_arg], cwd=suite, env=env, timeout=RUN_TIMEOUT_S, grace=2)
    events: list[dict[str, Any]] = []
    result = proc_group.run([*argv, *path_arg], cwd=suite, env=env, timeout=RUN_TIMEOUT_S,
                            grace=2, on_event=events.append)
    assert result.probe is not None, "run() did not inject the probe"
    replayed = ProbeReport.from_events(events)
    assert replayed.failed_ids == result.probe.failed_ids, "on_event missed events run() read"
    assert replayed.counts == result.probe.counts
    norm = Normaliser({"<rootdir>": str(suite), "<venv>": chain.venv, "<home>": str(home),
                       "<python>": sys.base_prefix})
    stdout, stderr = norm.output(result.stdout), norm.output(result.stderr)
    events = [norm.event(e) for e in events]
    rebuilt = rebuild(result.args, result.returncode, stdout, stderr, result.timed_out)
    output_verdict = proc_group.classify(rebuilt)
    events_verdict = proc_group.classify(dataclasses.replace(rebuilt, probe=replay(events)))
    live = proc_group.classify(result)
    assert (live.kind, live.rule) == (events_verdict.kind, events_verdict.rule), (live, events_verdict)
    meta = {
        "case": case.name,
        "pytest_line": chain.line,
        "versions": chain.versions,
        "python_version": "%d.%d.%d" % sys.version_info[:3],
        "args": [norm.text(a) for a in result.args],
        "returncode": result.returncode,
        "timed_out": result.timed_out,
        "before": [norm.text(a) for a in [*argv[:3], *case.before, *path_arg]]
        if case.before is not None else None,
        "output_verdict": verdict_doc(output_verdict),
        "events_verdict": verdict_doc(events_verdict),
    }
    return Recording(stdout, stderr, events, meta)


def replay(events: Sequence[dict[str, Any]]) -> ProbeReport:
    """The report on stored events, as of the last one (so replaying it never depends on now)."""
    times = [e["t"] for e in events if isinstance(e.get("t"), (int, float))]
    return ProbeReport.from_events(events, ended_at=max(times, default=0.0))


def rebuild(args: Iterable[str], returncode: Optional[int], stdout: bytes, stderr: bytes,
            timed_out: bool, probe: Optional[ProbeReport] = None) -> proc_group.RunResult:
    """A ``RunResult`` from what the corpus stores (the fields ``classify`` reads)."""
    return proc_group.RunResult(args=tuple(args), returncode=returncode, stdout=stdout,
                                stderr=stderr, timed_out=timed_out, duration_s=0.0,
                                spawn_error=None, backend="native", probe=probe)


def store(recording: Recording, target: Path) -> None:
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    (target / "stdout.txt").write_bytes(recording.stdout)
    (target / "stderr.txt").write_bytes(recording.stderr)
    (target / "events.jsonl").write_text(
        "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in recording.events))
    (target / "meta.json").write_text(json.dumps(recording.meta, indent=2) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", default=",".join(TOOLCHAINS), help="pytest lines, e.g. 7,8,9")
    parser.add_argument("--cases", default="", help="case names (default: all)")
    parser.add_argument("--out", type=Path, default=CORPUS)
    parser.add_argument("--keep", action="store_true", help="keep the venvs and suites")
    opts = parser.parse_args(argv)
    cases = [CASES_BY_NAME[n] for n in opts.cases.split(",") if n] or list(CASES)
    scratch = Path(tempfile.mkdtemp(prefix="retest-corpus-"))
    try:
        for line in opts.lines.split(","):
            chain = make_venv(line, scratch)
            print(f"pytest {line}: {chain.versions}")
            for case in cases:
                recording = record(case, chain, scratch / line / case.name)
                if recording is None:
                    print(f"  {case.name}: skipped (no plugin for it)")
                    continue
                store(recording, opts.out / line / case.name)
                out, ev = recording.meta["output_verdict"], recording.meta["events_verdict"]
                print(f"  {case.name:22} exit {recording.meta['returncode']:<3} output {out['rule']:22}"
                      f" events {ev['rule']}")
    finally:
        if opts.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
