"""One run's timeline, built from its ``RunResult`` in one place, bounded for the ledger (issue 16).

What ``retest serve``'s decision page draws, as plain JSON (``TIMELINE_VERSION``), times in
seconds from the run's start:

* ``tests``: each finished test (the probe's ``ProbeReport.intervals``) and each test still
  running at the end (``ProbeReport.running``, outcome ``running``): nodeid, xdist worker,
  ``start_s``, ``duration_s``, outcome;
* ``pressure``: the run's pressure samples (``Pressure.to_dict()["samples"]``, read
  defensively: a ``Pressure`` without samples gives an empty list, drawn as "no samples"), the
  whole-run figures, and the foreign CPU consumers;
* ``stages``: deadline -> diagnostic stage -> SIGTERM -> SIGKILL (only when escalated) -> end,
  as ``proc_group`` runs them: the stage is ``RETEST_DIAGNOSE_S`` capped at half the grace and
  SIGTERM follows it; SIGKILL comes a grace after the deadline;
* ``sweep``: processes killed at the deadline, swept after the command exited, the leaks;
* ``diagnostics``: the stacks dumped at the deadline (pid, worker, test, text).

The run's start is not in ``RunResult``; it is ``ProbeReport.ended_at`` less the deadline (a
run that timed out: the report is summed up to the deadline) or less the run's duration.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Mapping, Optional

from . import config

log = logging.getLogger(__name__)

__all__ = ["TIMELINE_VERSION", "from_result", "bounded", "samples", "STAGES"]

TIMELINE_VERSION = 1
#: Stack text kept per dump, before any size bound applies.
STACK_CHARS = 8000
#: Leaks named in the sweep.
LEAKS_MAX = 20
#: Stage names, in the order the runner goes through them.
STAGES = ("deadline", "diagnose", "sigterm", "sigkill", "end")


def _num(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def samples(pressure: Any) -> list[dict[str, Optional[float]]]:
    """The pressure samples of a ``Pressure.to_dict()`` (or of a timeline's ``pressure``):
    ``[{"t", "cpu_some", "busy_cores", "tree_cores"}]`` with ``t`` a number, others a
    number or ``None``; ``[]`` for anything else (no samples yet, or a malformed field)."""
    raw = pressure.get("samples") if isinstance(pressure, Mapping) else None
    if not isinstance(raw, list):
        return []
    out: list[dict[str, Optional[float]]] = []
    for sample in raw[:240]:
        if not isinstance(sample, Mapping) or _num(sample.get("t")) is None:
            continue
        out.append({"t": _num(sample.get("t")), "cpu_some": _num(sample.get("cpu_some")),
                    "busy_cores": _num(sample.get("busy_cores")),
                    "tree_cores": _num(sample.get("tree_cores"))})
    return out


def _stages(result: Any, grace_s: float) -> list[dict[str, Any]]:
    end = round(float(result.duration_s), 3)
    if not result.timed_out or result.timeout_s is None:
        return [{"name": "end", "t": end}]
    deadline = float(result.timeout_s)
    # proc_group._diagnostic_stage: the stage is taken out of the grace, at most half of it,
    # and only where the probe ran (it dumps the probe's processes).
    diagnose = min(config.ForensicsSettings.from_env().diagnose_s, grace_s / 2) \
        if result.probe is not None else 0.0
    stages: list[dict[str, Any]] = [{"name": "deadline", "t": round(deadline, 3)}]
    if diagnose > 0:
        stages.append({"name": "diagnose", "t": round(deadline, 3),
                       "until": round(deadline + diagnose, 3)})
    stages.append({"name": "sigterm", "t": round(deadline + max(diagnose, 0.0), 3)})
    if result.escalated:
        stages.append({"name": "sigkill", "t": round(deadline + grace_s, 3)})
    stages.append({"name": "end", "t": end})
    return stages


def _tests(report: Any, run_start: float) -> list[dict[str, Any]]:
    tests = [{"nodeid": i.nodeid, "worker": i.worker, "start_s": round(i.started_at - run_start, 3),
              "duration_s": round(i.duration_s, 3), "outcome": i.outcome}
             for i in report.intervals]
    ended = report.ended_at if report.ended_at is not None else run_start
    tests += [{"nodeid": r.nodeid, "worker": r.worker,
               "start_s": round(ended - r.running_s - run_start, 3),
               "duration_s": round(r.running_s, 3), "outcome": "running"}
              for r in report.running]
    return tests


def from_result(result: Any, *, grace_s: float,
                max_bytes: Optional[int] = None) -> Optional[dict[str, Any]]:
    """The timeline of ``result`` (a ``proc_group.RunResult``), at most ``max_bytes`` of JSON
    (default ``RETEST_TIMELINE_MAX_BYTES``); ``None`` (logged) if it cannot be built: a page
    is never worth a gate's decision."""
    try:
        return _build(result, grace_s, max_bytes)
    except Exception:
        log.exception("retest: the run's timeline could not be built; the decision has none")
        return None


def _build(result: Any, grace_s: float, max_bytes: Optional[int]) -> dict[str, Any]:
    report = result.probe
    pressure = result.pressure.to_dict() if result.pressure is not None else None
    doc: dict[str, Any] = {
        "version": TIMELINE_VERSION,
        "duration_s": round(float(result.duration_s), 3),
        "timeout_s": result.timeout_s,
        "timed_out": bool(result.timed_out),
        "grace_s": grace_s,
        "escalated": bool(result.escalated),
        "tests": [],
        "tests_dropped": 0,
        "workers": [],
        "pressure": None,
        "foreign": [],
        "stages": _stages(result, grace_s),
        "sweep": {"killed_at_deadline": result.killed_at_deadline,
                  "swept_after_exit": result.swept_after_exit,
                  "leak_count": getattr(result, "leak_count", len(result.leaks)),
                  "leaks": [_leak(leak) for leak in result.leaks[:LEAKS_MAX]]},
        "diagnostics": [{"pid": d.pid, "worker": d.worker, "nodeid": d.nodeid,
                         "summary": d.summary(), "text": d.text[:STACK_CHARS],
                         "truncated": bool(d.truncated or len(d.text) > STACK_CHARS)}
                        for d in result.diagnostics],
        "truncated": False,
    }
    if report is not None:
        ended = report.ended_at
        if ended is not None:
            span = result.timeout_s if result.timed_out and result.timeout_s else result.duration_s
            doc["tests"] = _tests(report, ended - float(span))
        doc["tests_dropped"] = report.intervals_dropped
        doc["workers"] = sorted({str(t["worker"] or "main") for t in doc["tests"]})
    if pressure is not None:
        doc["pressure"] = {"samples": samples(pressure), "cores": pressure.get("cores"),
                           "tree_share": pressure.get("tree_share"),
                           "foreign_share": pressure.get("foreign_share"),
                           "cpu_some_share": ((pressure.get("psi") or {}).get("cpu") or {}).get("some_share")}
        doc["foreign"] = list(pressure.get("foreign") or [])
    limit = config.TimelineSettings.from_env().max_bytes if max_bytes is None else max_bytes
    return bounded(doc, limit)


def _leak(leak: Any) -> dict[str, Any]:
    to_dict = getattr(leak, "to_dict", None)
    if callable(to_dict):
        value = to_dict()
        if isinstance(value, dict):
            return value
    return {"text": str(leak)}


def _size(doc: Mapping[str, Any]) -> int:
    return len(json.dumps(doc, sort_keys=True, default=str).encode())


def _need(test: Mapping[str, Any]) -> tuple[bool, float]:
    """Sort key, least needed first: passing and skipped tests, shortest first."""
    return test["outcome"] not in ("passed", "skipped"), test["duration_s"]


def bounded(doc: dict[str, Any], max_bytes: int) -> dict[str, Any]:
    """``doc`` cut to at most ``max_bytes`` of JSON, saying so (``truncated``, ``tests_dropped``).

    What goes first is what the page needs least: passing tests (the shortest first), then
    stack text beyond a head, then the other tests, then samples, hogs and leaks. The stages
    and the whole-run figures always stay.
    """
    if _size(doc) <= max_bytes:
        return doc
    out = dict(doc, truncated=True)
    tests = sorted(out.get("tests") or [], key=_need)
    kept_from = 0
    stacks_cut = False
    while _size(out) > max_bytes and kept_from < len(tests):
        if not stacks_cut and _need(tests[kept_from])[0]:  # only failing tests left
            out["diagnostics"] = [dict(d, text=d["text"][:1000], truncated=True)
                                  for d in out.get("diagnostics") or []]
            stacks_cut = True
            continue
        kept_from += max((len(tests) - kept_from) // 4, 1)
        out["tests"] = sorted(tests[kept_from:], key=lambda t: t["start_s"])
        out["tests_dropped"] = int(doc.get("tests_dropped") or 0) + kept_from
    if _size(out) > max_bytes:
        out["diagnostics"] = [dict(d, text="", truncated=True) for d in out.get("diagnostics") or []]
        out["foreign"] = (out.get("foreign") or [])[:3]
        if isinstance(out.get("pressure"), dict):
            out["pressure"] = dict(out["pressure"], samples=[])
        out["sweep"] = dict(out.get("sweep") or {}, leaks=[])
    return out
