"""The backend is chosen in one place, visibly; the extension is a real multi-phase module."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

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


def test_a_pure_python_install_says_so_not_circular_import(tmp_path: Path) -> None:
    """Issue 14: a RETEST_PURE_PYTHON=1 install (no extension in the package) reported
    "cannot import name '_proc_group' from partially initialized module ... (most likely due
    to a circular import)". A copy of the package without the native files stands for it."""
    package = Path(proc_group.__file__).resolve().parent
    shutil.copytree(package, tmp_path / "retest",
                    ignore=shutil.ignore_patterns("_proc_group*.so", "_retest_shepherd", "__pycache__"))
    code = ("from retest import proc_group; import json; r = proc_group.run(['true']); "
            "print(json.dumps([*proc_group.backend_status(), r.backend, r.returncode]))")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    env.pop("SUBPROCESS_TREE_KILL_ENABLED", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    backend, why, used, returncode = json.loads(done.stdout)
    assert (backend, used, returncode) == ("subprocess", "subprocess", 0)
    assert "installed without its native runner" in why and "RETEST_PURE_PYTHON=1" in why
    assert "circular" not in why and "circular" not in done.stderr
    assert "installed without its native runner" in done.stderr  # the one ERROR line says why


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
                     lambda s, c: chunks.append((s, c)), -1, None, False, 15, False, None, 8)
    assert raw["returncode"] == 0 and raw["stdout"] == b"again\n"
    assert chunks == [("stdout", b"again\n")]
