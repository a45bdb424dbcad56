"""A branch that changes an extension module's C source is tested only if the suite loads it.

Found on MarkupSafe: the gate's worktree holds sources only, the package falls back to pure
Python, the extension's tests skip, and a branch that breaks ``_speedups.c`` merged. Now such a
pass is held (``other.native-not-built``) unless ``MERGE_RETEST_SETUP_COMMAND`` built the
extension in the worktree, in which case the suite tests it for real.
"""

from __future__ import annotations

import shutil
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from gitrepo import Repo
from test_gate_tree import checkout, make_venv, pip_install_editable
from retest.merge_gate import GateDecision, GateMetrics, retest_branch

def _compiler_works() -> bool:
    """A C compiler answers (the one ``CC`` names, else gcc or cc), and Python.h is there."""
    import os
    import subprocess

    if not Path(sysconfig.get_paths()["include"], "Python.h").exists():
        return False
    for cc in ([os.environ["CC"]] if os.environ.get("CC") else ["gcc", "cc"]):
        path = shutil.which(cc.split()[0])
        if path and subprocess.run([path, "--version"], capture_output=True, timeout=30).returncode == 0:
            return True
    return False


pytestmark = pytest.mark.skipif(
    not _compiler_works(),
    reason="building the test's extension needs a C compiler and the Python headers")

SPEEDUPS_C = textwrap.dedent("""\
    #define PY_SSIZE_T_CLEAN
    #include <Python.h>

    static PyObject *double_it(PyObject *self, PyObject *arg) {
        long v = PyLong_AsLong(arg);
        if (v == -1 && PyErr_Occurred()) return NULL;
        return PyLong_FromLong(v * 2);
    }

    static PyMethodDef methods[] = {{"double_it", double_it, METH_O, NULL}, {NULL, NULL, 0, NULL}};
    static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "_speedups", NULL, -1, methods};
    PyMODINIT_FUNC PyInit__speedups(void) { return PyModule_Create(&mod); }
""")
BROKEN_C = SPEEDUPS_C.replace("v * 2", "v * 3")
INIT = textwrap.dedent("""\
    try:
        from ._speedups import double_it
        NATIVE = True
    except ImportError:  # not built: the pure-Python fallback, as MarkupSafe does
        def double_it(v):
            return v * 2
        NATIVE = False
""")
TESTS = textwrap.dedent("""\
    import pytest

    import fastpkg


    def test_double():
        assert fastpkg.double_it(21) == 42


    @pytest.mark.skipif(not fastpkg.NATIVE, reason="the extension is not built")
    def test_native_double():
        from fastpkg._speedups import double_it
        assert double_it(4) == 8
""")
SETUP_PY = textwrap.dedent("""\
    from setuptools import Extension, setup

    setup(ext_modules=[Extension("fastpkg._speedups", ["src/fastpkg/_speedups.c"])])
""")
PYPROJECT = textwrap.dedent("""\
    [build-system]
    requires = ["setuptools>=64"]
    build-backend = "setuptools.build_meta"

    [project]
    name = "fastpkg"
    version = "1.0"

    [tool.setuptools]
    package-dir = {"" = "src"}

    [tool.setuptools.packages.find]
    where = ["src"]
""")


@pytest.fixture(scope="module")
def native_project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Repo, Path]:
    root = tmp_path_factory.mktemp("native")
    repo = checkout(root, {"pyproject.toml": PYPROJECT, "setup.py": SETUP_PY,
                           "src/fastpkg/__init__.py": INIT, "src/fastpkg/_speedups.c": SPEEDUPS_C,
                           "tests/test_fast.py": TESTS, ".gitignore": "*.so\nbuild/\n*.egg-info/\n"})
    repo.branch("breaks-c", {"src/fastpkg/_speedups.c": BROKEN_C}, "triple instead of double")
    repo.branch("docs", {"README.md": "fastpkg\n"}, "docs")
    repo.branch("c-syntax", {"src/fastpkg/_speedups.c": SPEEDUPS_C + "this is not C\n"}, "typo")
    python = make_venv(root / "venv")
    pip_install_editable(python, repo.path, repo.env)
    return repo, python


def gate(repo: Repo, branch: str, python: Path, **env: str) -> GateDecision:
    command = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs"]
    return retest_branch(repo.path, branch, task_id=f"{branch}-{len(env)}", command=command,
                         env=dict(repo.env, **env), metrics=GateMetrics(), timeout=120)


def test_a_changed_extension_the_suite_never_built_is_held(native_project: tuple[Repo, Path]) -> None:
    repo, python = native_project
    decision = gate(repo, "breaks-c", python)
    assert (decision.action, decision.verdict, decision.rule) == ("hold", "other", "other.native-not-built")
    assert "src/fastpkg/_speedups.c" in decision.reason and decision.alert
    assert decision.evidence["tree"]["native_changed"] == ["src/fastpkg/_speedups.c"]
    assert decision.evidence["tests"]["counts"] == {"passed": 1, "skipped": 1}


def test_a_branch_without_native_changes_still_merges(native_project: tuple[Repo, Path]) -> None:
    repo, python = native_project
    decision = gate(repo, "docs", python)
    assert (decision.action, decision.verdict) == ("merge", "passed"), decision.reason


def test_a_set_up_step_builds_it_and_the_suite_tests_it(native_project: tuple[Repo, Path]) -> None:
    repo, python = native_project
    setup = f"{python} setup.py -q build_ext --inplace"
    decision = gate(repo, "breaks-c", python, MERGE_RETEST_SETUP_COMMAND=setup)
    assert (decision.action, decision.verdict, decision.rule) == ("rollback", "red", "red.tests-failed")
    failed = [f["nodeid"] for f in decision.evidence["tests"]["failures"]]
    assert failed == ["tests/test_fast.py::test_double", "tests/test_fast.py::test_native_double"]
    compiled = decision.evidence["tests"]["compiled"]["fastpkg"]
    assert compiled and compiled[0].startswith(decision.evidence["worktree"])
    assert decision.evidence["setup"]["returncode"] == 0


def test_a_set_up_step_that_fails_holds(native_project: tuple[Repo, Path]) -> None:
    repo, python = native_project
    setup = f"{python} setup.py -q build_ext --inplace"
    decision = gate(repo, "c-syntax", python, MERGE_RETEST_SETUP_COMMAND=setup)
    assert (decision.action, decision.verdict, decision.rule) == ("hold", "other", "other.setup-failed")
    assert "exit 1" in decision.reason and "error" in decision.evidence["setup"]["output_tail"]
    assert "suite_ran" not in decision.evidence  # the suite never started


def test_the_checkout_itself_has_the_extension_built(native_project: tuple[Repo, Path]) -> None:
    """Precondition of the first test: the developer's editable install is native."""
    repo, python = native_project
    import subprocess

    done = subprocess.run([str(python), "-c", "import fastpkg; print(fastpkg.NATIVE)"],
                          capture_output=True, text=True, timeout=60, cwd="/")
    assert done.stdout.strip() == "True", (done.stdout, done.stderr, sys.executable)
