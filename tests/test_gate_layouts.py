"""Layouts the gate's import roots may miss, and the probe's check that catches them anyway.

Found on pyyaml: its package lives in ``lib/``, declared only in setup.py
(``package_dir={"": "lib"}``). The gate did not read setup.py, found no package at the
worktree's top, and the suite imported ``yaml`` from the developer's checkout through the
editable install: a branch that broke ``lib/yaml/constructor.py`` merged as green. Now a
setup.py's literal ``package_dir`` is read, and, whatever the roots, the probe names every
module the suite loaded from the developer's checkout: such a run is ``other.wrong-tree``.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gitrepo import Repo
from test_gate_tree import BROKEN, GOOD, TESTS, checkout, gate, make_venv, pip_install_editable

SETUP_PY = textwrap.dedent("""\
    from setuptools import setup

    setup(name="calcpkg", version="1.0", packages=["calcpkg"], package_dir={{"": {where}}})
""")


#: As pyyaml has it: a build system, no [project] table, the layout in setup.py.
BUILD = '[build-system]\nrequires = ["setuptools>=64"]\nbuild-backend = "setuptools.build_meta"\n'


def lib_project(root: Path, where: str) -> tuple[Repo, Path]:
    repo = checkout(root, {"setup.py": SETUP_PY.format(where=where), "pyproject.toml": BUILD,
                           "lib/calcpkg/__init__.py": GOOD, "tests/test_calc.py": TESTS})
    repo.branch("breaks-add", {"lib/calcpkg/__init__.py": BROKEN}, "break add")
    python = make_venv(root / "venv")
    pip_install_editable(python, repo.path, repo.env)
    return repo, python


@pytest.fixture(scope="module")
def literal(tmp_path_factory: pytest.TempPathFactory) -> tuple[Repo, Path]:
    return lib_project(tmp_path_factory.mktemp("setup-py-literal"), '"lib"')


def test_a_setup_py_package_dir_is_an_import_root(literal: tuple[Repo, Path]) -> None:
    repo, python = literal
    decision = gate(repo, "main", python)
    assert (decision.action, decision.rule) == ("merge", "passed.exit-0"), decision.reason
    proof = decision.evidence["tree"]
    assert proof["status"] == "proven"
    assert proof["imported"]["calcpkg"].endswith("/wt/lib/calcpkg/__init__.py")


def test_a_broken_branch_of_a_setup_py_layout_rolls_back(literal: tuple[Repo, Path]) -> None:
    repo, python = literal
    decision = gate(repo, "breaks-add", python)
    assert (decision.action, decision.rule) == ("rollback", "red.tests-failed"), decision.reason


def test_a_layout_the_roots_miss_is_caught_by_what_the_suite_imported(tmp_path: Path) -> None:
    """``package_dir`` computed at run time cannot be read: the roots miss ``lib/``, the suite
    imports the checkout's copy, and the probe says so: held, never merged."""
    repo, python = lib_project(tmp_path, '"li" + "b"')
    for branch in ("main", "breaks-add"):
        decision = gate(repo, branch, python)
        assert (decision.action, decision.rule) == ("hold", "other.wrong-tree"), decision.reason
        assert f"the suite imported calcpkg from {repo.path}/lib/calcpkg/__init__.py" \
            in decision.reason
        assert decision.evidence["tests"]["imported_outside"]["calcpkg"] == \
            f"{repo.path}/lib/calcpkg/__init__.py"
