"""``retest serve``'s pages for a person at a browser (issue 16): the queue, and one decision.

* ``index(block, verdict=...)``: ``GET /``: the counters and the recent decisions (task,
  branch, sha, verdict, rule, action, attempt, alert, age), filterable by verdict
  (``/?verdict=timeout``), each linking to its page;
* ``decision(doc, timeline)``: ``GET /decision/<id>``: the verdict and its evidence, the
  failing and hung tests with their stacks, and the run's timeline (``pages_svg``).

Read-only HTML with its CSS inline and its drawing as inline SVG: no script, no external
asset, nothing fetched (``CSP`` forbids everything else, so an injected tag could do nothing
either). Every interpolated value goes through ``_e`` (``html.escape`` with quotes): branch
names, test ids, output, stacks and evidence are the suite's or a pusher's text. Secrets are
masked by the caller (``status``) before anything is rendered.
"""

from __future__ import annotations

import datetime
import html
import json
from typing import Any, Iterable, Mapping, Optional
from urllib.parse import quote

from . import pages_svg

__all__ = ["CSP", "HTML_TYPE", "VERDICT_FILTERS", "index", "decision", "error_page"]

HTML_TYPE = "text/html; charset=utf-8"
#: Nothing but the page itself and its inline styles; data: for the (empty) icon.
CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; "
       "form-action 'none'; frame-ancestors 'none'")
#: The verdicts the queue page filters on (``merge_gate.VERDICTS`` and ``conflict``).
VERDICT_FILTERS = ("passed", "red", "timeout", "lock-busy", "other", "conflict")

_COUNTERS = (("decisions", "decisions"), ("merges", "merges"), ("rollbacks", "rollbacks"),
             ("requeues", "requeues"), ("holds", "holds"), ("alerts", "alerts"),
             ("retests_run", "re-tests run"), ("retests_skipped", "skipped (current)"),
             ("processes_killed", "processes killed"))
_VERDICT_COLOURS = {"passed": "#3a9a4a", "red": "#d0342c", "timeout": "#7b3fbf",
                    "lock-busy": "#e07b00", "other": "#555555", "conflict": "#a05a00"}

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#fff}
header{background:#24292f;color:#fff;padding:10px 18px}header a{color:#fff;text-decoration:none}
main{padding:14px 18px;max-width:1200px}
h1{font-size:20px;margin:6px 0 12px}h2{font-size:16px;margin:22px 0 8px}
.cards{display:flex;flex-wrap:wrap;gap:8px}.card{border:1px solid #ddd;border-radius:6px;
padding:6px 12px;min-width:90px}.card b{display:block;font-size:20px}
table{border-collapse:collapse;width:100%}th,td{border-bottom:1px solid #e5e5e5;padding:4px 6px;
text-align:left;vertical-align:top}th{background:#f6f8fa}
code,pre{font:12px/1.35 ui-monospace,monospace}pre{background:#f6f8fa;padding:8px;overflow:auto;
white-space:pre-wrap;word-break:break-word;max-height:420px}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;color:#fff;font-weight:600}
.filters a{margin-right:10px}.filters .on{font-weight:700;text-decoration:none;color:#222}
.error{background:#fde2e1;border:1px solid #d0342c;padding:8px;border-radius:6px}
.muted,.none{color:#777}dl{display:grid;grid-template-columns:max-content auto;gap:2px 14px}
dt{color:#555}dd{margin:0}.legend span{margin-right:14px}.legend i{display:inline-block;width:10px;
height:10px;margin-right:4px}
"""


def _e(value: Any) -> str:
    """Escaped text for HTML content and attribute values (quotes included)."""
    return html.escape("" if value is None else str(value), quote=True)


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _page(title: str, body: Iterable[str]) -> str:
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',  # no /favicon.ico request (a 404 in the console)
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>",
        '<header><a href="/">retest: merge gate</a></header><main>', *body, "</main></body></html>",
    ])


def _badge(verdict: Any) -> str:
    colour = _VERDICT_COLOURS.get(str(verdict), "#555555")
    return f'<span class="badge verdict" style="background:{colour}">{_e(verdict or "-")}</span>'


def _age(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _when(epoch: Any) -> str:
    if isinstance(epoch, bool) or not isinstance(epoch, (int, float)):
        return "-"
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _id_of(doc: Mapping[str, Any]) -> Optional[int]:
    value = doc.get("id")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# --------------------------------------------------------------------------- GET /


def index(block: Mapping[str, Any], *, verdict: Optional[str], now: float) -> str:
    """The queue page for ``block`` (``merge_gate.queue_block``), decisions of ``verdict`` only."""
    body = ["<h1>The merge gate's queue</h1>"]
    if not block.get("enabled"):
        body.append('<p class="error">MERGE_GATE_METRICS_ENABLED is off: no counters, no decisions.</p>')
        return _page("retest: merge gate", body)
    if "error" in block:
        body.append(f'<p class="error">The ledger cannot be read ({_e(block["error"])}): '
                    f"what follows is not the queue.</p>")
    counters = block.get("counters") or {}
    body.append('<section class="cards" id="counters">')
    for key, label in _COUNTERS:
        body.append(f'<div class="card"><b>{_e(counters.get(key, 0))}</b>{_e(label)}</div>')
    body.append("</section>")
    body.append('<p class="muted">by verdict: ' + ", ".join(
        f"{_e(v)} {_e(counters.get('verdict_' + v.replace('-', '_'), 0))}"
        for v in VERDICT_FILTERS if v != "conflict") + "</p>")
    links = [f'<a class="{"on" if verdict is None else ""}" href="/">all</a>']
    links += [f'<a class="{"on" if verdict == v else ""}" href="/?verdict={quote(v)}">{_e(v)}</a>'
              for v in VERDICT_FILTERS]
    body.append(f'<h2>Recent decisions</h2><p class="filters">verdict: {" ".join(links)}</p>')
    recent = [d for d in block.get("recent") or [] if isinstance(d, Mapping)]
    shown = [d for d in recent if verdict is None or d.get("verdict") == verdict]
    body.append('<table id="decisions"><thead><tr><th>#</th><th>task</th><th>branch</th><th>sha</th>'
                "<th>verdict</th><th>rule</th><th>action</th><th>attempt</th><th>alert</th>"
                "<th>age</th></tr></thead><tbody>")
    for doc in shown:
        ident = _id_of(doc)
        link = f'<a href="/decision/{ident}">{ident}</a>' if ident is not None else "-"
        decided = doc.get("decided_at")
        age = _age(now - decided) if isinstance(decided, (int, float)) else "-"
        body.append(
            f'<tr class="decision"><td>{link}</td><td>{_e(doc.get("task_id"))}</td>'
            f'<td class="branch">{_e(doc.get("branch"))}</td>'
            f'<td><code title="{_e(doc.get("sha"))}">{_e(str(doc.get("sha") or "")[:12])}</code></td>'
            f"<td>{_badge(doc.get('verdict'))}</td><td><code>{_e(doc.get('rule'))}</code></td>"
            f'<td>{_e(doc.get("action"))}</td><td>{_e(doc.get("attempt"))}</td>'
            f'<td>{"alert" if doc.get("alert") else ""}</td><td>{_e(age)}</td></tr>')
    if not shown:
        what = f"with verdict {verdict}" if verdict else "recorded yet"
        body.append(f'<tr><td colspan="10" class="none">No decisions {_e(what)}.</td></tr>')
    body.append("</tbody></table>")
    body.append(f'<p class="muted">{len(shown)} of the last {len(recent)} decisions; generated '
                f'{_e(_when(block.get("generated_at", now)))}; the same as JSON: '
                '<a href="/queue">/queue</a>, counters: <a href="/metrics">/metrics</a>.</p>')
    return _page("retest: merge gate", body)


# --------------------------------------------------------------------------- GET /decision/<id>


def _facts(doc: Mapping[str, Any]) -> list[str]:
    evidence = _mapping(doc.get("evidence"))
    rows: list[tuple[str, Any]] = [
        ("task", doc.get("task_id")), ("branch", doc.get("branch")), ("onto", doc.get("onto")),
        ("sha", doc.get("sha")), ("tested sha", doc.get("tested_sha")), ("action", doc.get("action")),
        ("stage", doc.get("stage")), ("rule", doc.get("rule")), ("attempt", doc.get("attempt")),
        ("infra attempt", doc.get("infra_attempt")), ("alert", "sent" if doc.get("alert") else "no"),
        ("decided", _when(doc.get("decided_at"))), ("gate took", f"{doc.get('duration_s')} s"),
        ("evidence from", evidence.get("verdict_evidence")),
        ("backend", evidence.get("backend")), ("exit status", evidence.get("returncode")),
        ("deadline", f"{evidence.get('timeout_s')} s" if evidence.get("timeout_s") else None),
        ("suite ran", f"{evidence.get('run_duration_s')} s" if "run_duration_s" in evidence else None),
        ("killed at the deadline", evidence.get("killed_at_deadline")),
        ("swept after exit", evidence.get("swept_after_exit")),
        ("SIGKILL needed", evidence.get("escalated")),
    ]
    out = ['<dl id="facts">']
    out += [f'<dt>{_e(k)}</dt><dd class="{_e(k.replace(" ", "-"))}">{_e(v)}</dd>'
            for k, v in rows if v is not None]
    out.append("</dl>")
    return out


def _tests_section(evidence: Mapping[str, Any]) -> list[str]:
    tests = evidence.get("tests") if isinstance(evidence.get("tests"), Mapping) else None
    if tests is None:
        return ["<h2>Tests</h2>", '<p class="none">No probe events (the suite is not pytest, or '
                "the probe is off).</p>"]
    out = ["<h2>Tests</h2>", f'<p>{_e(tests.get("done"))} done of {_e(tests.get("collected"))} '
           f'collected; {_e(tests.get("failure_count"))} failed, {_e(tests.get("error_count"))} errors; '
           f'xdist workers: {_e(tests.get("workers"))}</p>']
    failures = [f for f in tests.get("failures") or [] if isinstance(f, Mapping)]
    errors = [f for f in tests.get("collection_errors") or [] if isinstance(f, Mapping)]
    if failures or errors:
        out.append('<table id="failures"><thead><tr><th>failing test</th><th>phase</th>'
                   "<th>outcome</th><th>worker</th><th>message</th></tr></thead><tbody>")
        for failure in failures + errors:
            longrepr = failure.get("longrepr")
            detail = f"<details><summary>traceback</summary><pre>{_e(longrepr)}</pre></details>" \
                if longrepr else ""
            out.append(f'<tr><td class="nodeid"><code>{_e(failure.get("nodeid"))}</code></td>'
                       f'<td>{_e(failure.get("when"))}</td><td>{_e(failure.get("outcome"))}</td>'
                       f'<td>{_e(failure.get("worker"))}</td><td>{_e(failure.get("message"))}{detail}</td></tr>')
        out.append("</tbody></table>")
    running = [r for r in tests.get("running") or [] if isinstance(r, Mapping)]
    if running:
        out.append('<h2>Running at the end (hung or slow)</h2><table id="running"><thead><tr>'
                   "<th>test</th><th>worker</th><th>running for</th></tr></thead><tbody>")
        out += [f'<tr><td class="nodeid"><code>{_e(r.get("nodeid"))}</code></td><td>{_e(r.get("worker"))}'
                f'</td><td>{_e(r.get("running_s"))} s</td></tr>' for r in running]
        out.append("</tbody></table>")
    return out


def _stacks(timeline: Optional[Mapping[str, Any]]) -> list[str]:
    dumps = timeline.get("diagnostics") if isinstance(timeline, Mapping) else None
    if not isinstance(dumps, list) or not dumps:
        return []
    out = ["<h2>Stacks at the deadline</h2>"]
    for dump in dumps:
        if not isinstance(dump, Mapping):
            continue
        cut = " (cut)" if dump.get("truncated") else ""
        test = f', test <code>{_e(dump.get("nodeid"))}</code>' if dump.get("nodeid") else ", no test"
        # Open only the dumps of processes that were running a test: those say why it hung.
        opened = " open" if dump.get("nodeid") else ""
        out.append(f'<details class="stack"{opened}><summary>pid {_e(dump.get("pid"))}, worker '
                   f'{_e(dump.get("worker") or "main")}{test}: {_e(dump.get("summary"))}{_e(cut)}'
                   f'</summary><pre>{_e(dump.get("text"))}</pre></details>')
    return out


def _pressure(evidence: Mapping[str, Any], timeline: Optional[Mapping[str, Any]]) -> list[str]:
    pressure = evidence.get("pressure") if isinstance(evidence.get("pressure"), Mapping) else None
    if pressure is None:
        return []
    psi = ((pressure.get("psi") or {}).get("cpu") or {}) if isinstance(pressure.get("psi"), Mapping) else {}
    out = ["<h2>Machine pressure over the run</h2>",
           f"<p>PSI cpu some: {_e(psi.get('some_share', 'n/a'))} of the run; the tree used "
           f"{_e(pressure.get('tree_share'))} of {_e(pressure.get('cores'))} cores; processes outside "
           f"it: {_e(pressure.get('foreign_share'))} (source: {_e(pressure.get('psi_source'))}).</p>"]
    foreign = [p for p in pressure.get("foreign") or [] if isinstance(p, Mapping)]
    if foreign:
        out.append('<table id="foreign"><thead><tr><th>foreign CPU consumer</th><th>pid</th>'
                   "<th>CPU-s</th><th>orphan of an earlier run?</th></tr></thead><tbody>")
        out += [f'<tr><td><code>{_e(p.get("cmdline"))}</code></td><td>{_e(p.get("pid"))}</td>'
                f'<td>{_e(p.get("cpu_s"))}</td><td>{_e(p.get("orphan_why") or "")}</td></tr>'
                for p in foreign]
        out.append("</tbody></table>")
    return out


def _legend() -> str:
    items = [f'<span><i style="background:{c}"></i>{_e(k)}</span>'
             for k, c in pages_svg.OUTCOME_COLOURS.items()]
    items += [f'<span><i style="background:{c}"></i>{_e(label)}</span>'
              for _, label, c, _ in pages_svg.SERIES]
    return f'<p class="legend">{"".join(items)}</p>'


def decision(doc: Mapping[str, Any], timeline: Optional[Mapping[str, Any]]) -> str:
    """One decision's page (``ledger.decision(id)``'s pair)."""
    ident = _id_of(doc)
    evidence = _mapping(doc.get("evidence"))
    body = [f"<h1>Decision {_e(ident)}: {_badge(doc.get('verdict'))} &rarr; {_e(doc.get('action'))}</h1>",
            f'<pre id="reason">{_e(doc.get("reason"))}</pre>', *_facts(doc),
            "<h2>Timeline</h2>", pages_svg.render(timeline), _legend()]
    if isinstance(timeline, Mapping) and timeline.get("truncated"):
        body.append(f'<p class="muted">The timeline was cut to fit the ledger: '
                    f'{_e(timeline.get("tests_dropped"))} tests left out.</p>')
    body += _tests_section(evidence)
    body += _stacks(timeline)
    body += _pressure(evidence, timeline)
    body.append("<h2>Evidence</h2><details><summary>the whole decision, as recorded</summary>"
                f'<pre id="evidence">{_e(json.dumps(doc, indent=2, sort_keys=True, default=str))}</pre></details>')
    body.append(f'<p class="muted">As JSON: <a href="/decision/{_e(ident)}.json">/decision/{_e(ident)}.json</a>'
                ' &middot; <a href="/">the queue</a></p>')
    return _page(f"retest: decision {ident}", body)


def error_page(status: int, phrase: str, detail: str) -> str:
    return _page(f"retest: {status}", [f"<h1>{_e(status)} {_e(phrase)}</h1>", f"<p>{_e(detail)}</p>",
                                       '<p><a href="/">the queue</a></p>'])
