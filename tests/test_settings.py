"""Issue 13.2: one settings layer. Every setting has a type, a range and a default; any value
gives no crash, at most one warning, and a value inside the documented range."""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from retest import config, merge_gate
from retest.config import SETTINGS, Setting
from retest.ledger import Ledger

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_warnings() -> None:
    config._forget_warnings()


def in_range(setting: Setting, value: Any, raw: str) -> bool:
    """Is ``value`` one the docs allow for ``setting`` (given the raw text it came from)?"""
    if setting.kind == "bool":
        return isinstance(value, bool)
    if setting.kind in ("int", "float"):
        kind = int if setting.kind == "int" else float
        return isinstance(value, kind) and math.isfinite(value) and \
            setting.minimum <= value <= setting.maximum
    if setting.kind == "choice":
        return value in setting.choices
    if setting.kind == "path":
        return value is None or os.path.isabs(value)
    if setting.kind == "command":  # kept as given or the default; the gate refuses a bad one
        return value is None or value in (raw, setting.default)
    return isinstance(value, str)


def numbers_around(setting: Setting) -> st.SearchStrategy[str]:
    """Text of numbers at, just inside and past the bounds, huge, negative, non-finite."""
    special = ["1e23", "-1e23", "99999999999999999999999", "-0", "nan", "inf", "-inf", "1e-400",
               "0x10", "1_000", " 7 ", "5s", ""]
    if setting.minimum is not None:
        for bound in (setting.minimum, setting.maximum):
            special += [repr(bound), str(int(bound)), repr(bound * 2 + 1), repr(bound - 1),
                        repr(-bound - 1), str(int(bound) + 1)]
    return st.one_of(st.sampled_from(special), st.integers().map(str),
                     st.floats(allow_nan=True, allow_infinity=True).map(repr))


def values(setting: Setting) -> st.SearchStrategy[str]:
    return st.one_of(st.text(), numbers_around(setting),
                     st.sampled_from(["true", "FALSE", "On", "0", "1", "-1", "hold", "ROLLBACK",
                                      "debug", "'unbalanced", '""', "/abs/path", "rel/path"]))


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_value_of_any_setting_is_one_warning_at_most_and_in_range(
        setting: Setting, data: st.DataObject, caplog: pytest.LogCaptureFixture) -> None:
    raw = data.draw(values(setting))
    if "\x00" in raw:
        raw = raw.replace("\x00", "")  # an environment cannot hold NUL
    value, problem = setting.parse(raw)  # never raises
    assert in_range(setting, value, raw), (raw, value)
    if problem is None and raw.strip() and setting.kind in ("int", "float"):
        assert float(raw.strip()) == value  # accepted as written (str.strip's whitespace too)

    config._forget_warnings()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        config.RunnerSettings.from_env({setting.name: raw})
        gate = config.GateSettings.from_env({setting.name: raw})
        if setting.name in config.RESOLVED_PER_GATE:  # validated by the gate, per call
            resolved = merge_gate._resolve_retest_timeout(
                gate.retest_timeout_raw, gate.grace_s, gate.reaper_max_running_s)
            assert 0 < resolved and resolved + gate.grace_s < gate.reaper_max_running_s
        else:
            config.read(setting.name, {setting.name: raw})
    if setting.name in config.RESOLVED_PER_GATE:
        assert len(caplog.records) <= 1, [r.getMessage() for r in caplog.records]
        return
    warnings = [r for r in caplog.records if setting.name in r.getMessage()]
    assert len(warnings) <= 1, [r.getMessage() for r in warnings]
    assert bool(warnings) == (problem is not None), (raw, problem)
    if setting.secret and raw.strip():
        assert raw.strip() not in caplog.text or len(raw.strip()) < 3
    assert gate.recent_decisions <= 1000 and gate.ledger_busy_timeout_s <= 3600


def test_the_committed_docs_and_env_example_are_generated_from_the_declarations() -> None:
    assert (ROOT / "docs" / "settings.md").read_text() == config.markdown_table()
    assert (ROOT / ".env.example").read_text() == config.env_example()
    for setting in SETTINGS:
        assert f"`{setting.name}`" in config.markdown_table()
        assert f"{setting.name}=" in config.env_example()


def test_every_setting_read_in_the_package_is_declared() -> None:
    """Each variable the package (or setup.py) reads by name is in SETTINGS."""
    import re

    read_by_name = re.compile(r'(?:\.get|read|env_bool|_setting)\(\s*"((?:RETEST|MERGE|COVERAGE|REAPER|SUBPROCESS)_[A-Z_]+)"')
    used = set()
    for path in [*(ROOT / "python" / "retest").glob("*.py"), ROOT / "setup.py"]:
        used |= set(read_by_name.findall(path.read_text()))
    assert used and used - set(config.BY_NAME) == set()


@pytest.mark.parametrize("name, raw, expected, warned", [
    ("RETEST_LEDGER_BUSY_TIMEOUT_S", "1e23", 3600.0, True),   # SQLite would turn it off
    ("RETEST_LEDGER_BUSY_TIMEOUT_S", "2147484", 3600.0, True),
    ("RETEST_KILL_GRACE_S", "0", 0.0, False),                 # meaningful: SIGKILL at once
    ("MERGE_GATE_INFRA_RETRY_BACKOFF_S", "-60", 0.0, True),
    ("MERGE_GATE_LOCK_WAIT_S", "-5", 0.0, True),
    ("REAPER_MAX_RUNNING_S", "1e23", 604800.0, True),
    ("RETEST_CAPTURE_LIMIT_BYTES", "99999999999999999999999", 1024 ** 3, True),
    ("MERGE_GATE_RECENT_DECISIONS", "99999999999999999999999", 1000, True),
    ("RETEST_LOG_LEVEL", "abc", "WARNING", True),
    ("RETEST_LOG_LEVEL", "info", "INFO", False),
    ("RETEST_PURE_PYTHON", "true", True, False),
])
def test_the_values_issue_13_found(name: str, raw: str, expected: Any, warned: bool,
                                   caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="retest.config"):
        assert config.read(name, {name: raw}) == expected
    assert (name in caplog.text) == warned
    if warned:
        assert "using" in caplog.text


def test_a_relative_ledger_path_is_refused_for_the_default(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    env = {"RETEST_LEDGER_PATH": "ledger.sqlite3", "HOME": str(tmp_path)}
    with caplog.at_level(logging.WARNING, logger="retest.config"):
        path = config.GateSettings.from_env(env).ledger_path
    assert path == config.default_ledger_path(env) and os.path.isabs(path)
    assert "RETEST_LEDGER_PATH" in caplog.text and "absolute" in caplog.text


def test_a_huge_busy_timeout_still_waits(tmp_path: Path) -> None:
    settings = config.GateSettings.from_env({"RETEST_LEDGER_BUSY_TIMEOUT_S": "1e23"})
    ledger = Ledger(str(tmp_path / "l.sqlite3"), busy_timeout_s=settings.ledger_busy_timeout_s)
    conn = ledger._connect()
    try:
        (busy_ms,) = conn.execute("PRAGMA busy_timeout").fetchone()
    finally:
        conn.close()
    assert busy_ms == 3600 * 1000


def test_a_huge_capture_limit_runs(tmp_path: Path) -> None:
    env = dict(os.environ, RETEST_CAPTURE_LIMIT_BYTES="99999999999999999999999")
    proc = subprocess.run([sys.executable, "-m", "retest", "run", "--json", "--", "echo", "hi"],
                          env=env, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["verdict"] == "passed"
    assert b"RETEST_CAPTURE_LIMIT_BYTES" in proc.stderr and b"Traceback" not in proc.stderr


def test_huge_recent_decisions_still_serve_the_queue(tmp_path: Path) -> None:
    settings = config.GateSettings.from_env({"MERGE_GATE_RECENT_DECISIONS": "99999999999999999999999"})
    ledger = Ledger(str(tmp_path / "l.sqlite3"), busy_timeout_s=1)
    ledger.record_decision({"action": "merge"}, {"decisions": 1})
    block = merge_gate.queue_block(ledger=ledger, settings=settings)
    assert "error" not in block and len(block["recent"]) == 1


def test_an_unbalanced_command_is_kept_so_the_gate_refuses_it(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="retest.config"):
        settings = config.GateSettings.from_env({"MERGE_RETEST_COMMAND": "'unbalanced"})
    assert settings.retest_command == "'unbalanced" and "refused" in caplog.text
    with pytest.raises(ValueError):
        config.command_argv(None, settings.retest_command, settings.retest_command_is_default)
    with pytest.raises(ValueError):
        shlex.split(settings.retest_command)


def test_a_secret_command_is_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="retest.config"):
        config.GateSettings.from_env({"MERGE_GATE_ALERT_COMMAND": "curl 'https://x/?token=s3cr3t-value"})
    assert "MERGE_GATE_ALERT_COMMAND" in caplog.text and "s3cr3t-value" not in caplog.text


def test_setup_py_honours_pure_python_true() -> None:
    env = dict(os.environ, RETEST_PURE_PYTHON="true")
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env,
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert b"building without the native runner" in proc.stderr


def test_runner_settings_are_cached_only_while_their_variables_stay(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache key holds every variable RunnerSettings reads, and a change is seen at once."""
    seen: list[str] = []
    real = config.read
    monkeypatch.setattr(config, "read", lambda name, environ=None: seen.append(name) or real(name, environ))
    config.RunnerSettings._read(None)
    assert sorted(seen) == sorted(config._RUNNER_NAMES)
    monkeypatch.setattr(config, "read", real)
    monkeypatch.setenv("RETEST_KILL_GRACE_S", "3")
    assert config.RunnerSettings.from_env().grace_s == 3.0
    assert config.RunnerSettings.from_env() is config.RunnerSettings.from_env()  # cached
    monkeypatch.setenv("RETEST_KILL_GRACE_S", "4")
    assert config.RunnerSettings.from_env().grace_s == 4.0
    assert config.RunnerSettings.from_env({"RETEST_KILL_GRACE_S": "6"}).grace_s == 6.0
