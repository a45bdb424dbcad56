"""The backend is chosen in one place, visibly; the extension is a real multi-phase module."""

from __future__ import annotations

import importlib.util
import logging
import sys

import pytest

from retest import proc_group


def test_kill_switch_selects_the_prior_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUBPROCESS_TREE_KILL_ENABLED", "false")
    assert proc_group.backend_status() == ("subprocess", "SUBPROCESS_TREE_KILL_ENABLED=false")
    result = proc_group.run([sys.executable, "-c", "print('hi')"])
    assert result.backend == "subprocess"
    assert result.stdout.strip() == b"hi"


def test_kill_switch_garbage_keeps_the_default(monkeypatch: pytest.MonkeyPatch, native: str) -> None:
    monkeypatch.setenv("SUBPROCESS_TREE_KILL_ENABLED", "perhaps")
    assert proc_group.backend_status()[0] == "native"


def test_native_by_default(native: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SUBPROCESS_TREE_KILL_ENABLED", raising=False)
    assert proc_group.run(["true"]).backend == "native"


def test_missing_extension_falls_back_and_logs_once_at_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(proc_group, "_native", None)
    monkeypatch.setattr(proc_group, "_native_error", "cannot import retest._proc_group: test")
    monkeypatch.setattr(proc_group, "_logged_fallback", set())
    monkeypatch.delenv("SUBPROCESS_TREE_KILL_ENABLED", raising=False)
    with caplog.at_level(logging.INFO, logger="retest.proc_group"):
        first = proc_group.run(["true"])
        second = proc_group.run(["true"])
    assert first.backend == second.backend == "subprocess"
    assert first.returncode == second.returncode == 0
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "cannot import" in errors[0].getMessage()
    # classify still works without the extension: the pure-Python twin answers
    assert proc_group.classify(first).kind == "passed"


def test_forcing_an_unavailable_native_backend_is_a_value_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proc_group, "_native", None)
    with pytest.raises(ValueError):
        proc_group.run(["true"], backend="native")
    with pytest.raises(ValueError):
        proc_group.run(["true"], backend="fast")


def test_extension_uses_multi_phase_init(native: str) -> None:
    """Two module objects from one spec: only multi-phase init gives independent instances."""
    from retest import _proc_group

    spec = importlib.util.find_spec("retest._proc_group")
    assert spec is not None and spec.origin == _proc_group.__file__
    second = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(second)  # type: ignore[union-attr]
    assert second is not _proc_group
    assert second.PROTOCOL == _proc_group.PROTOCOL
    chunks: list[tuple[str, bytes]] = []
    shepherd = proc_group._shepherd_path
    assert shepherd is not None
    raw = second.run(shepherd.encode(), [b"echo", b"again"], None, None, None, 5.0, 1.0, 1 << 20,
                     lambda s, c: chunks.append((s, c)), -1, None, False)
    assert raw["returncode"] == 0 and raw["stdout"] == b"again\n"
    assert chunks == [("stdout", b"again\n")]
