"""The coverage gate: line coverage of the suite, measured with coverage.py through the runner.

``measure_coverage()`` runs ``COVERAGE_GATE_COMMAND`` (default ``python -m coverage run -m
pytest -q``) then ``python -m coverage json`` through ``proc_group.run`` (so a hanging suite is
killed as a whole tree at the deadline) and returns the total percentage with the suite's
verdict. The data file and the JSON report go to a private temporary folder (never into the
repository) through ``COVERAGE_FILE``. It never raises for a runtime fault: a missing
coverage.py, a failed report or a timed-out suite are in the result.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

from . import config, gitops, proc_group
from .merge_gate import _resolve_retest_timeout

log = logging.getLogger(__name__)

__all__ = ["CoverageResult", "measure_coverage"]


@dataclass(frozen=True)
class CoverageResult:
    """Line coverage of one suite run."""

    #: Total line coverage in percent, ``None`` when no report could be made.
    percent: Optional[float]
    #: The suite's verdict (``passed``, ``red``, ``timeout``, ...) from ``proc_group.classify``.
    verdict: proc_group.Verdict
    #: The suite passed and ``percent >= min_percent``.
    passed_threshold: bool
    min_percent: float
    covered_lines: Optional[int]
    num_statements: Optional[int]
    #: Why there is no percentage (report failed, no data), else ``None``.
    report_error: Optional[str]
    duration_s: float
    run: proc_group.RunResult

    def to_dict(self) -> dict[str, Any]:
        return {
            "percent": self.percent,
            "verdict": self.verdict.kind,
            "rule": self.verdict.rule,
            "reason": self.verdict.reason,
            "passed_threshold": self.passed_threshold,
            "min_percent": self.min_percent,
            "covered_lines": self.covered_lines,
            "num_statements": self.num_statements,
            "report_error": self.report_error,
            "duration_s": round(self.duration_s, 3),
            "run": self.run.to_dict(),
        }


def measure_coverage(
    repo_path_or_cwd: Union[str, "os.PathLike[str]", None] = None,
    *,
    command: Union[str, Sequence[str], None] = None,
    timeout: Optional[float] = None,
    min_percent: Optional[float] = None,
    env: Optional[Mapping[str, str]] = None,
    settings: Optional[config.GateSettings] = None,
) -> CoverageResult:
    """Measure line coverage of the suite in ``repo_path_or_cwd`` (default: the current folder).

    ``command`` must run the suite under ``coverage run`` (a string is split with ``shlex``;
    default ``COVERAGE_GATE_COMMAND``). ``timeout``: seconds (default ``MERGE_RETEST_TIMEOUT_S``,
    resolved as the merge gate does). ``min_percent``: the threshold (default
    ``COVERAGE_GATE_MIN_PERCENT``, 0).
    """
    started = time.monotonic()
    base_env = dict(os.environ if env is None else env)
    settings = settings or config.GateSettings.from_env(base_env)
    cwd = os.path.abspath(os.fspath(repo_path_or_cwd)) if repo_path_or_cwd is not None else os.getcwd()
    threshold = settings.coverage_min_percent if min_percent is None else float(min_percent)
    timeout_s = _resolve_retest_timeout(
        timeout if timeout is not None else settings.retest_timeout_raw,
        settings.grace_s, settings.reaper_max_running_s,
    )
    workdir = tempfile.mkdtemp(prefix="retest-coverage-")
    try:
        child_env = {k: v for k, v in base_env.items() if k not in gitops.REDIRECTING_ENV}
        child_env["COVERAGE_FILE"] = os.path.join(workdir, ".coverage")
        # Not probed: coverage would measure the probe plugin itself as the project's code
        # (retest outside site-packages: an editable install), and the percentage is the point.
        result = proc_group.run(config.command_argv(command, settings.coverage_command,
                                                   settings.coverage_command_is_default), timeout=timeout_s, grace=settings.grace_s,
                                cwd=cwd, env=child_env, backend=gitops.backend_for(base_env),
                                probe=False)
        verdict = proc_group.classify(result)
        percent, covered, statements, error = _report(workdir, cwd, child_env, settings)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    passed = verdict.kind == "passed" and percent is not None and percent >= threshold
    outcome = CoverageResult(
        percent=percent, verdict=verdict, passed_threshold=passed, min_percent=threshold,
        covered_lines=covered, num_statements=statements, report_error=error,
        duration_s=time.monotonic() - started, run=result,
    )
    log.info("coverage gate: %s%% (threshold %s%%), suite %s (%s)",
             "?" if percent is None else f"{percent:.2f}", threshold, verdict.kind, verdict.rule)
    return outcome


def _report(
    workdir: str, cwd: str, env: Mapping[str, str], settings: config.GateSettings
) -> tuple[Optional[float], Optional[int], Optional[int], Optional[str]]:
    """``coverage json`` of the data file; ``(percent, covered, statements, error)``."""
    if not os.path.exists(env["COVERAGE_FILE"]):
        return None, None, None, "no coverage data was written (the suite did not run under coverage)"
    out = os.path.join(workdir, "coverage.json")
    report = proc_group.run(
        [sys.executable, "-m", "coverage", "json", "-q", "-o", out, "--ignore-errors"],
        cwd=cwd, env=env, timeout=settings.git_timeout_s, backend=gitops.backend_for(env),
    )
    if not report.ok:
        detail = report.spawn_error or report.stderr.decode("utf-8", "replace").strip()[-300:] \
            or report.stdout.decode("utf-8", "replace").strip()[-300:]
        return None, None, None, f"coverage json failed (exit {report.returncode}): {detail}"
    try:
        with open(out, encoding="utf-8") as handle:
            totals = json.load(handle)["totals"]
        return (float(totals["percent_covered"]), int(totals["covered_lines"]),
                int(totals["num_statements"]), None)
    except (OSError, ValueError, KeyError, TypeError) as err:
        return None, None, None, f"coverage report unreadable: {type(err).__name__}: {err}"
