"""Keep secret values of the environment out of everything retest writes or serves.

A variable whose *name* contains ``TOKEN``, ``SECRET``, ``PASSWORD`` or ``KEY`` (any case:
``GITHUB_TOKEN``, ``AWS_SECRET_ACCESS_KEY``, ``DB_PASSWORD``, ``api_key``) holds a secret; its
*value* must never reach a log line, a ``--json`` document, an alert, a decision's evidence or
the status endpoint, even when the suite under test prints its whole environment.

Only untrusted text is masked, at the place it comes in: the command's output (before it is
classified or cut to a tail), a failed git command's output, exception text, the argv and
spawn error of a run, and the fields of a decision that quote the caller's input (branch,
onto, task id) or any of the above (reason, the evidence's output tail...). The fixed
vocabulary is never masked: verdict kinds, rule ids, actions, stages, evidence-source names
and JSON keys stay as they are whatever the secrets are (``API_TOKEN=passed`` must not turn a
verdict into ``***``). The untrusted fields are named in one place, below
(``DECISION_UNTRUSTED``, ``EVIDENCE_UNTRUSTED``, ``RESULT_UNTRUSTED``): a new field that
quotes untrusted text must be added there.

Where it is applied (one place per way in, see docs/gate.md "Security"):

* a run's result (``redact_result``): ``retest run`` and the gate mask it as it returns;
  ``gitops.git`` masks a failed git command's output;
* a decision's untrusted fields (``redact_decision``): the gate masks the reason and the
  evidence as it routes; the CLI, the alert payload, the ledger and ``retest serve`` mask the
  fields that quote the caller's input (branch, onto, task id) by name;
* log records (``RedactingFilter``): the whole message, except the arguments the code marks
  ``Clean`` (vocabulary, or text already masked at its source).

A value shorter than ``MIN_SECRET_CHARS`` is not masked: masking a short word everywhere
destroys the evidence (``test`` in ``pytest``) and hides little. It is reported instead, once
per variable name per process, by name and length, never by value. Plain booleans (``true``,
``off``...) are settings, not secrets: neither masked nor reported.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import threading
from collections import Counter
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Mapping, Optional, TypeVar

__all__ = [
    "MASK",
    "MIN_SECRET_CHARS",
    "DECISION_UNTRUSTED",
    "EVIDENCE_UNTRUSTED",
    "RESULT_UNTRUSTED",
    "Clean",
    "is_secret_name",
    "secret_values",
    "redact",
    "redact_bytes",
    "redact_obj",
    "redact_fields",
    "redact_decision",
    "redact_result",
    "RedactingFilter",
    "FILTER",
    "install",
]

log = logging.getLogger(__name__)

MASK = "***"
#: Shorter values are not masked (and reported once by name): see the module docstring.
MIN_SECRET_CHARS = 8
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|KEY", re.IGNORECASE)
#: Values that are settings, not secrets (``SOME_KEY_ENABLED=true``).
_NOT_SECRETS = frozenset({"true", "false", "yes", "no", "on", "off", "none", "null"})

#: Fields of a decision document (``GateDecision.to_dict()``, its ledger summary, the alert
#: payload) that hold untrusted text. The others are vocabulary, numbers, shas and keys.
DECISION_UNTRUSTED = ("reason", "branch", "onto", "task_id", "pressure")
#: Fields of a decision's ``evidence`` that hold untrusted text.
#: ``pressure`` and ``lock`` quote the command lines of other processes.
EVIDENCE_UNTRUSTED = ("output_tail", "spawn_error", "worktree", "skip", "oom", "pressure", "lock")
#: Fields of a ``RunResult`` that hold untrusted text (bytes or str).
RESULT_UNTRUSTED = ("args", "stdout", "stderr", "spawn_error", "leaks")


class Clean(str):
    """A log argument ``RedactingFilter`` leaves as it is: vocabulary (a rule id, an action),
    or text whose untrusted parts were masked at their source (an alert payload)."""

    __slots__ = ()


def is_secret_name(name: str) -> bool:
    """True if an environment variable called ``name`` holds a secret."""
    return bool(_SECRET_NAME.search(name))


_reported_lock = threading.Lock()
_reported: set[str] = set()


def _report_short(name: str, length: int) -> None:
    """Warn once per process that ``name``'s value is too short to mask (never the value)."""
    with _reported_lock:
        if name in _reported:
            return
        # Before logging: the warning passes through RedactingFilter, which asks again.
        _reported.add(name)
    log.warning("retest: the value of %s is too short to mask safely (%d characters); "
                "it is not masked", Clean(name), length)


def secret_values(environ: Optional[Mapping[str, str]] = None) -> frozenset[str]:
    """The values of the secret variables of ``environ`` (default ``os.environ``).

    A secret-named variable whose value is shorter than ``MIN_SECRET_CHARS`` is left out and
    reported once by name; an empty or boolean value is left out silently.
    """
    source = os.environ if environ is None else environ
    found = set()
    for name, value in list(source.items()):
        if not (isinstance(name, str) and isinstance(value, str) and is_secret_name(name)):
            continue
        if not value.strip() or value.strip().lower() in _NOT_SECRETS:
            continue
        if len(value) < MIN_SECRET_CHARS:
            _report_short(name, len(value))
            continue
        found.add(value)
    return frozenset(found)


def _longest_first(secrets: Iterable[str]) -> list[str]:
    # Longest first: a secret that contains another is masked whole, not in pieces.
    return sorted({s for s in secrets if s}, key=lambda s: (-len(s), s))


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every occurrence of each secret replaced by ``***``."""
    for secret in _longest_first(secrets):
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def redact_bytes(data: bytes, secrets: Iterable[str]) -> bytes:
    """``redact`` for raw output: each secret's UTF-8 bytes replaced by ``***``."""
    for secret in _longest_first(secrets):
        raw = secret.encode("utf-8", "surrogateescape")
        if raw in data:
            data = data.replace(raw, MASK.encode())
    return data


def redact_obj(obj: Any, secrets: Iterable[str]) -> Any:
    """A copy of a JSON-like value (dicts, lists, tuples, strings) with its strings redacted.

    For untrusted values only (the fields named above): it masks dict keys too. Redact the
    object, never its serialization: a secret equal to a JSON token would otherwise corrupt
    the document.
    """
    ordered = _longest_first(secrets)
    if not ordered:
        return obj

    def walk(value: Any) -> Any:
        if isinstance(value, str):
            return redact(value, ordered)
        if isinstance(value, bytes):
            return redact_bytes(value, ordered)
        if isinstance(value, dict):
            return {walk(k): walk(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(walk(v) for v in value)
        return value

    return walk(obj)


def redact_fields(doc: Mapping[str, Any], fields: Iterable[str],
                  secrets: Iterable[str]) -> dict[str, Any]:
    """A copy of ``doc`` with the values of ``fields`` redacted; keys and other values as is."""
    ordered = _longest_first(secrets)
    out = dict(doc)
    if ordered:
        for name in fields:
            if name in out:
                out[name] = redact_obj(out[name], ordered)
    return out


def redact_decision(doc: Mapping[str, Any], secrets: Iterable[str]) -> dict[str, Any]:
    """A decision document with its untrusted fields (and its evidence's) redacted."""
    ordered = _longest_first(secrets)
    out = redact_fields(doc, DECISION_UNTRUSTED, ordered)
    if isinstance(out.get("evidence"), Mapping):
        out["evidence"] = redact_fields(out["evidence"], EVIDENCE_UNTRUSTED, ordered)
    return out


_Result = TypeVar("_Result")


def redact_result(result: _Result, secrets: Iterable[str]) -> _Result:
    """A ``RunResult`` with its untrusted fields redacted: before the classifier quotes a
    line of its output or anything cuts it to a tail, so that no cut leaves half a secret."""
    ordered = _longest_first(secrets)
    if not ordered:
        return result
    changes = {name: redact_obj(getattr(result, name), ordered) for name in RESULT_UNTRUSTED}
    report = getattr(result, "probe", None)
    if report is not None:  # the suite's own events: test ids, messages, tracebacks, paths
        changes["probe"] = report.redacted(lambda text: redact(text, ordered))
    return dataclasses.replace(result, **changes)  # type: ignore[type-var]


class RedactingFilter(logging.Filter):
    """Redacts the secrets of ``os.environ``, and of any ``covering()`` block, from records.

    On a logger it sees that logger's own records; on a handler, every record the handler
    emits (``logging`` consults a logger's filters only for records logged on it, not for
    records propagated from its children). The whole message is masked (a format string may
    hold untrusted text too), except the arguments marked ``Clean``: so a verdict's log line
    keeps its rule id and action whatever the secrets are.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._extra: Counter[str] = Counter()

    @contextmanager
    def covering(self, secrets: Iterable[str]) -> Iterator[None]:
        """Also redact ``secrets`` (e.g. of an ``env=`` passed to the gate) inside the block."""
        added = [s for s in set(secrets) if s]
        with self._lock:
            self._extra.update(added)
        try:
            yield
        finally:
            with self._lock:
                self._extra.subtract(added)
                self._extra += Counter()  # drop counts that reached zero

    def secrets(self) -> frozenset[str]:
        with self._lock:
            extra = frozenset(self._extra)
        return secret_values() | extra

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = self.secrets()
        done: frozenset[str] = getattr(record, _DONE, frozenset())
        if secrets <= done:  # none, or already masked by this filter on the logger
            return True
        try:
            message = _masked_message(record, secrets)
        except Exception:  # a broken format string: let logging report it as usual
            return True
        record.msg, record.args = message, None
        setattr(record, _DONE, secrets)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, secrets)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, secrets)
        return True


#: The record attribute that holds the secrets a record was masked for: a record filtered on
#: its logger and again on a handler is masked once, so its ``Clean`` arguments stay whole.
_DONE = "_retest_redacted"


class _Placeholder:
    """Stands in for a ``Clean`` argument while the rest of a message is masked.

    Its text holds NUL, which no environment value can: no secret can match across it.
    """

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __str__(self) -> str:
        return f"\0{self.index}s\0"

    def __repr__(self) -> str:
        return f"\0{self.index}r\0"


def _masked_message(record: logging.LogRecord, secrets: Iterable[str]) -> str:
    """The record's message with secrets masked everywhere but in its ``Clean`` arguments."""
    args = record.args
    clean: list[Clean] = []

    def hold(value: Any) -> Any:
        if isinstance(value, Clean):
            clean.append(value)
            return _Placeholder(len(clean) - 1)
        return value

    if isinstance(args, tuple):
        record.args = tuple(hold(a) for a in args)
    elif isinstance(args, Mapping):
        record.args = {k: hold(v) for k, v in args.items()}
    try:
        message = redact(record.getMessage(), secrets)
    finally:
        record.args = args
    for index, value in enumerate(clean):
        message = message.replace(f"\0{index}s\0", str(value)).replace(f"\0{index}r\0", repr(value))
    return message


#: The one filter every part of retest installs (its ``covering()`` registry is shared).
FILTER = RedactingFilter()


def install(target: "logging.Logger | logging.Handler") -> None:
    """Add ``FILTER`` to a logger or handler, once."""
    if FILTER not in target.filters:
        target.addFilter(FILTER)
