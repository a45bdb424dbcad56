"""Keep secret values of the environment out of everything retest writes or serves.

A variable whose *name* contains ``TOKEN``, ``SECRET``, ``PASSWORD`` or ``KEY`` (any case:
``GITHUB_TOKEN``, ``AWS_SECRET_ACCESS_KEY``, ``DB_PASSWORD``, ``api_key``) holds a secret; its
*value* must never reach a log line, a ``--json`` document, an alert, a decision's evidence or
the status endpoint, even when the suite under test prints its whole environment.

Where it is applied (one place per way in, see docs/gate.md "Security"):

* the gate's untrusted text (the suite's output, a failed git command's output, error
  messages) is redacted where it becomes evidence, before it is classified, truncated,
  recorded in the ledger or sent as an alert (``merge_gate``, ``gitops.git``);
* log records of the gate (``RedactingFilter`` on its loggers; the CLI puts it on its
  handlers, which see every ``retest.*`` record);
* what the CLI prints with ``--json`` and its verdict line, and what ``retest serve`` answers.

Values shorter than ``MIN_SECRET_CHARS`` and plain booleans (``true``, ``off``...) are left
alone: masking every ``1`` or ``true`` would destroy the evidence and hide nothing.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import Counter
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Mapping, Optional

__all__ = [
    "MASK",
    "MIN_SECRET_CHARS",
    "is_secret_name",
    "secret_values",
    "redact",
    "redact_bytes",
    "redact_obj",
    "RedactingFilter",
    "FILTER",
    "install",
]

MASK = "***"
MIN_SECRET_CHARS = 4
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|KEY", re.IGNORECASE)
#: Values that are settings, not secrets (``SOME_KEY_ENABLED=true``).
_NOT_SECRETS = frozenset({"true", "false", "yes", "no", "on", "off", "none", "null"})


def is_secret_name(name: str) -> bool:
    """True if an environment variable called ``name`` holds a secret."""
    return bool(_SECRET_NAME.search(name))


def secret_values(environ: Optional[Mapping[str, str]] = None) -> frozenset[str]:
    """The values of the secret variables of ``environ`` (default ``os.environ``)."""
    source = os.environ if environ is None else environ
    return frozenset(
        value for name, value in source.items()
        if isinstance(name, str) and isinstance(value, str) and is_secret_name(name)
        and len(value) >= MIN_SECRET_CHARS and value.strip().lower() not in _NOT_SECRETS
    )


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

    Redact the object, never its serialization: a secret equal to a JSON token would
    otherwise corrupt the document.
    """
    ordered = _longest_first(secrets)
    if not ordered:
        return obj

    def walk(value: Any) -> Any:
        if isinstance(value, str):
            return redact(value, ordered)
        if isinstance(value, dict):
            return {walk(k): walk(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(walk(v) for v in value)
        return value

    return walk(obj)


class RedactingFilter(logging.Filter):
    """Redacts the secrets of ``os.environ``, and of any ``covering()`` block, from records.

    On a logger it sees that logger's own records; on a handler, every record the handler
    emits (``logging`` consults a logger's filters only for records logged on it, not for
    records propagated from its children).
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
        if not secrets:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: let logging report it as usual
            return True
        record.msg, record.args = redact(message, secrets), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, secrets)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, secrets)
        return True


#: The one filter every part of retest installs (its ``covering()`` registry is shared).
FILTER = RedactingFilter()


def install(target: "logging.Logger | logging.Handler") -> None:
    """Add ``FILTER`` to a logger or handler, once."""
    if FILTER not in target.filters:
        target.addFilter(FILTER)
