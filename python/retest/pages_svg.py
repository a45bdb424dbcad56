"""The decision page's timeline, drawn as SVG on the server (issue 16.2): no script, no assets.

Lanes, top to bottom, on one time axis (seconds from the run's start): one per xdist worker
with a bar per test (coloured by outcome, its nodeid in a ``<title>`` tooltip), the pressure
lane (PSI cpu ``some``, the tree's cores and the machine's busy cores as shares of the cores,
from the samples; "no samples" without them), the foreign CPU consumers' share over the run,
and the kill stages as vertical marks across every lane (deadline, diagnostic stage, SIGTERM,
SIGKILL, end) with the sweep at the end. Every text is escaped (``html.escape``, quotes too):
test ids and command lines are the suite's.
"""

from __future__ import annotations

import html
import math
from typing import Any, Mapping, Optional, Sequence

from . import timeline as _timeline

__all__ = ["render", "OUTCOME_COLOURS"]

WIDTH = 1000
LABEL_W = 120
RIGHT_PAD = 20
AXIS_H = 24
LANE_H = 22
PRESSURE_H = 70
FOREIGN_H = 22
STAGES_H = 56

OUTCOME_COLOURS = {"passed": "#3a9a4a", "failed": "#d0342c", "error": "#e07b00",
                   "skipped": "#9a9a9a", "running": "#7b3fbf"}
STAGE_COLOURS = {"deadline": "#d0342c", "diagnose": "#e0b000", "sigterm": "#e07b00",
                 "sigkill": "#7a0000", "end": "#222222"}
SERIES = (("cpu_some", "PSI cpu some", "#d0342c", False),
          ("busy_cores", "machine busy cores", "#2f6fd0", True),
          ("tree_cores", "the tree's cores", "#3a9a4a", True))


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _f(value: Any, default: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return default
    return float(value)


def _span(doc: Mapping[str, Any]) -> float:
    """The axis's length: the run, the deadline and its grace, the last test, whichever is last."""
    ends = [_f(doc.get("duration_s")), 1.0]
    if doc.get("timed_out"):
        ends.append(_f(doc.get("timeout_s")) + _f(doc.get("grace_s")))
    ends += [_f(t.get("start_s")) + _f(t.get("duration_s")) for t in _tests(doc)]
    ends += [_f(s.get("until"), _f(s.get("t"))) for s in _stages(doc)]
    return max(ends) * 1.02


def _tests(doc: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    tests = doc.get("tests")
    return [t for t in tests if isinstance(t, Mapping)] if isinstance(tests, list) else []


def _stages(doc: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    stages = doc.get("stages")
    return [s for s in stages if isinstance(s, Mapping)] if isinstance(stages, list) else []


class _Axis:
    def __init__(self, span_s: float) -> None:
        self.span_s = max(span_s, 1e-3)
        self.plot_w = WIDTH - LABEL_W - RIGHT_PAD

    def x(self, t: float) -> float:
        return LABEL_W + max(min(t, self.span_s), 0.0) / self.span_s * self.plot_w

    def ticks(self) -> list[float]:
        raw = self.span_s / 8
        magnitude = 10 ** math.floor(math.log10(raw))
        step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
        return [i * step for i in range(int(self.span_s / step) + 1)]


def _axis(axis: _Axis, height: float) -> list[str]:
    out = ['<g class="axis" font-size="10" fill="#555">']
    for t in axis.ticks():
        x = axis.x(t)
        out.append(f'<line x1="{x:.1f}" y1="{AXIS_H - 4}" x2="{x:.1f}" y2="{height:.1f}" '
                   f'stroke="#e4e4e4"/>')
        out.append(f'<text x="{x:.1f}" y="{AXIS_H - 8}" text-anchor="middle">{t:g}s</text>')
    out.append("</g>")
    return out


def _worker_lanes(axis: _Axis, doc: Mapping[str, Any], top: float) -> tuple[list[str], float]:
    tests = _tests(doc)
    workers = sorted({str(t.get("worker") or "main") for t in tests})
    out: list[str] = []
    for row, worker in enumerate(workers):
        y = top + row * LANE_H
        out.append(f'<g class="worker-lane" data-worker="{_e(worker)}">')
        out.append(f'<rect x="0" y="{y:.1f}" width="{WIDTH}" height="{LANE_H}" '
                   f'fill="{"#fafafa" if row % 2 else "#f2f2f2"}"/>')
        out.append(f'<text x="6" y="{y + 15:.1f}" font-size="11" fill="#222">{_e(worker)}</text>')
        for test in tests:
            if str(test.get("worker") or "main") != worker:
                continue
            start, length = _f(test.get("start_s")), _f(test.get("duration_s"))
            outcome = str(test.get("outcome") or "")
            x0, x1 = axis.x(start), axis.x(start + length)
            colour = OUTCOME_COLOURS.get(outcome, "#555555")
            out.append(
                f'<rect class="test-bar" data-outcome="{_e(outcome)}" x="{x0:.1f}" y="{y + 3:.1f}" '
                f'width="{max(x1 - x0, 1.5):.1f}" height="{LANE_H - 6}" fill="{colour}" '
                f'stroke="#ffffff" stroke-width="0.5"><title>{_e(test.get("nodeid"))} ({_e(outcome)}, '
                f'{start:.2f}s + {length:.2f}s)</title></rect>')
        out.append("</g>")
    if not workers:
        out.append(f'<text x="6" y="{top + 15:.1f}" font-size="11" fill="#777">no test events '
                   f'(the probe did not run or no test started)</text>')
        return out, top + LANE_H
    return out, top + len(workers) * LANE_H


def _pressure_lane(axis: _Axis, doc: Mapping[str, Any], top: float) -> list[str]:
    pressure = doc.get("pressure") if isinstance(doc.get("pressure"), Mapping) else None
    points = _timeline.samples(pressure)
    cores = max(_f(pressure.get("cores") if pressure else None, 1.0), 1.0)
    out = [f'<g class="pressure-lane"><rect x="0" y="{top:.1f}" width="{WIDTH}" '
           f'height="{PRESSURE_H}" fill="#ffffff" stroke="#dddddd"/>',
           f'<text x="6" y="{top + 14:.1f}" font-size="11" fill="#222">CPU</text>',
           f'<text x="6" y="{top + 28:.1f}" font-size="9" fill="#777">share 0..1</text>']
    if not points:
        out.append(f'<text class="no-samples" x="{LABEL_W + 8}" y="{top + PRESSURE_H / 2 + 4:.1f}" '
                   f'font-size="11" fill="#777">no samples (whole-run figures below)</text></g>')
        return out
    for key, label, colour, per_core in SERIES:
        coords = []
        for point in points:
            value = point.get(key)
            if value is None:
                continue
            share = min(max(value / cores if per_core else value, 0.0), 1.0)
            coords.append(f"{axis.x(_f(point.get('t'))):.1f},{top + PRESSURE_H - 4 - share * (PRESSURE_H - 8):.1f}")
        if coords:
            out.append(f'<polyline class="series" data-series="{_e(key)}" fill="none" '
                       f'stroke="{colour}" stroke-width="1.5" points="{" ".join(coords)}">'
                       f'<title>{_e(label)}</title></polyline>')
    out.append("</g>")
    return out


def _foreign_lane(axis: _Axis, doc: Mapping[str, Any], top: float) -> list[str]:
    pressure = doc.get("pressure") if isinstance(doc.get("pressure"), Mapping) else {}
    share = min(max(_f(pressure.get("foreign_share") if pressure else None), 0.0), 1.0)
    listed = doc.get("foreign")
    foreign: list[Any] = listed if isinstance(listed, list) else []
    names = "; ".join(f"pid {_f(p.get('pid')):.0f} {p.get('cmdline', '')} {_f(p.get('cpu_s')):.1f} CPU-s"
                      for p in foreign[:5] if isinstance(p, Mapping)) or "none named"
    x0, x1 = axis.x(0), axis.x(_f(doc.get("duration_s")))
    height = max(share * (FOREIGN_H - 4), 1.0)
    return [f'<g class="foreign-lane"><text x="6" y="{top + 15:.1f}" font-size="11" fill="#222">foreign</text>',
            f'<rect x="{x0:.1f}" y="{top + FOREIGN_H - 2 - height:.1f}" width="{max(x1 - x0, 1):.1f}" '
            f'height="{height:.1f}" fill="#b0b0d8"><title>processes outside the tree: '
            f'{share:.0%} of the cores over the run; {_e(names)}</title></rect></g>']


def _stage_marks(axis: _Axis, doc: Mapping[str, Any], top: float, bottom: float) -> list[str]:
    out = ['<g class="stages" font-size="10">']
    label_row = 0
    for stage in _stages(doc):
        name = str(stage.get("name") or "")
        colour = STAGE_COLOURS.get(name, "#444444")
        x = axis.x(_f(stage.get("t")))
        if "until" in stage:
            x1 = axis.x(_f(stage.get("until")))
            out.append(f'<rect class="stage" data-stage="{_e(name)}" x="{x:.1f}" y="{top:.1f}" '
                       f'width="{max(x1 - x, 1):.1f}" height="{bottom - top:.1f}" fill="{colour}" '
                       f'fill-opacity="0.25"><title>{_e(name)} {_f(stage.get("t")):.2f}s .. '
                       f'{_f(stage.get("until")):.2f}s</title></rect>')
        else:
            out.append(f'<line class="stage" data-stage="{_e(name)}" x1="{x:.1f}" y1="{top:.1f}" '
                       f'x2="{x:.1f}" y2="{bottom:.1f}" stroke="{colour}" stroke-width="2" '
                       f'stroke-dasharray="{"5,3" if name == "deadline" else "none"}">'
                       f'<title>{_e(name)} at {_f(stage.get("t")):.2f}s</title></line>')
        anchor = "end" if x > WIDTH - 80 else "start"
        dx = -3 if anchor == "end" else 3
        # One row per stage: the stages of a kill are fractions of a second apart.
        out.append(f'<text x="{x + dx:.1f}" y="{bottom + 12 + 11 * label_row:.1f}" fill="{colour}" '
                   f'text-anchor="{anchor}">{_e(name)} {_f(stage.get("t")):.2f}s</text>')
        label_row += 1
    sweep = doc.get("sweep") if isinstance(doc.get("sweep"), Mapping) else {}
    swept = int(_f(sweep.get("swept_after_exit") if sweep else None))
    if swept:
        x = axis.x(_f(doc.get("duration_s")))
        out.append(f'<circle class="sweep" cx="{x:.1f}" cy="{top + 6:.1f}" r="5" fill="#222">'
                   f'<title>sweep: {swept} process(es) left after the command exited, killed</title></circle>')
    out.append("</g>")
    return out


def render(doc: Optional[Mapping[str, Any]]) -> str:
    """The ``<svg>`` of one timeline (``retest.timeline``), or a note that there is none."""
    if not isinstance(doc, Mapping):
        return '<p class="none">No timeline was kept for this decision (the suite did not run, ' \
               'or it is older than the ledger keeps).</p>'
    axis = _Axis(_span(doc))
    lanes, after_workers = _worker_lanes(axis, doc, AXIS_H)
    pressure_top = after_workers + 6
    pressure = _pressure_lane(axis, doc, pressure_top)
    foreign_top = pressure_top + PRESSURE_H + 4
    foreign = _foreign_lane(axis, doc, foreign_top)
    bottom = foreign_top + FOREIGN_H
    height = bottom + STAGES_H
    parts: Sequence[str] = [
        f'<svg id="timeline" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height:.0f}" '
        f'width="100%" role="img" aria-label="the run\'s timeline" font-family="sans-serif">',
        *_axis(axis, bottom), *lanes, *pressure, *foreign,
        *_stage_marks(axis, doc, AXIS_H - 4, bottom), "</svg>",
    ]
    return "\n".join(parts)
