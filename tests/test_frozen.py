"""retest._frozen: a result made in one step is the one its dataclass's __init__ makes."""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any

import pytest

from retest import _frozen, pressure, proc_group
from retest.proc_group import RunResult


def _values() -> dict[str, Any]:
    return {"args": ("/bin/true", "é"), "returncode": 0, "stdout": b"out", "stderr": b"",
            "timed_out": False, "duration_s": 0.25, "spawn_error": None, "backend": "native",
            "pid": 4242, "leaks": ((7, "sleep 30", 0.5),), "leak_count": 1, "containment": "cgroup"}


def test_maker_makes_what_init_makes() -> None:
    made, init = proc_group._new_result(_values()), RunResult(**_values())
    assert type(made) is RunResult
    assert made == init and hash(made) == hash(init) and repr(made) == repr(init)
    assert list(vars(made).items()) == list(vars(init).items())  # the field order too
    assert pickle.dumps(made) == pickle.dumps(init)
    assert made.to_dict(with_output=True) == init.to_dict(with_output=True)
    assert dataclasses.replace(made, returncode=1) == dataclasses.replace(init, returncode=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.returncode = 1  # type: ignore[misc]


def test_maker_calls_default_factories() -> None:
    make = _frozen.maker(pressure.Pressure)
    values: dict[str, Any] = {"wall_s": 1.0, "cores": 2, "tree_cpu_s": 0.5, "tree_share": 0.25}
    first, second = make(values), make(values)
    assert first == pressure.Pressure(**values) and first.psi == {}
    assert first.psi is not second.psi  # a new dict each, as the default_factory makes


def test_maker_refuses_what_init_refuses() -> None:
    with pytest.raises(TypeError):
        proc_group._new_result({**_values(), "no_such_field": 1})
    values = _values()
    del values["stdout"]
    with pytest.raises(TypeError):
        proc_group._new_result(values)


def test_maker_refuses_a_class_whose_init_does_more() -> None:
    @dataclasses.dataclass(frozen=True)
    class Checked:
        value: int

        def __post_init__(self) -> None:
            assert self.value >= 0

    @dataclasses.dataclass
    class Mutable:
        value: int

    for cls in (Checked, Mutable):
        with pytest.raises(TypeError):
            _frozen.maker(cls)
