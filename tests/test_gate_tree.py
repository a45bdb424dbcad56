"""The gate tests the rebased tree, and proves it: src and flat layouts with real editable installs.

Each module fixture builds what a developer has: a real git repository (the checkout) and a
suite venv into which that checkout is installed *editable* with pip (setuptools' static
``.pth`` for the src layout, its ``__editable__`` finder for the flat layout). A branch that
breaks the code must roll back although the installed copy is green; a branch that is green
must merge; a suite that imports the package from outside the worktree is held
(``other.wrong-tree``), never merged; a venv without pytest is held, never rolled back.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path
from typing import Any

import pytest

from gitrepo import Repo, gate_env
from retest import layout
from retest.merge_gate import GateDecision, GateMetrics, retest_branch

PY = sys.executable

GOOD = "def add(a, b):\n    return a + b\n"
BROKEN = "def add(a, b):\n    return a - b\n"
TESTS = textwrap.dedent("""\
    from calcpkg import add


    def test_add():
        assert add(2, 3) == 5


    def test_add_zero():
        assert add(0, 0) == 0
""")
SRC_PYPROJECT = textwrap.dedent("""\
    [build-system]
    requires = ["setuptools>=64"]
    build-backend = "setuptools.build_meta"

    [project]
    name = "calcpkg"
    version = "1.0"

    [tool.setuptools]
    package-dir = {"" = "src"}

    [tool.setuptools.packages.find]
    where = ["src"]

    [tool.pytest.ini_options]
    testpaths = ["tests"]
    filterwarnings = ["error"]
""")
FLAT_PYPROJECT = textwrap.dedent("""\
    [build-system]
    requires = ["setuptools>=64"]
    build-backend = "setuptools.build_meta"

    [project]
    name = "calcpkg"
    version = "1.0"

    [tool.setuptools]
    packages = ["calcpkg"]
""")
#: A conftest that puts the developer's checkout first, as hard-coded paths in real suites do.
STRAY_CONFTEST = textwrap.dedent("""\
    import os
    import sys

    sys.path.insert(0, os.path.join(os.environ["PROJECT_CHECKOUT"], "src"))
    for name in [m for m in sys.modules if m == "calcpkg" or m.startswith("calcpkg.")]:
        del sys.modules[name]
""")


def _site_packages(venv: Path) -> Path:
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return venv / "lib" / version / "site-packages"


def make_venv(venv: Path, *, with_test_deps: bool = True) -> Path:
    """A suite venv; ``with_test_deps``: pytest & co. visible through a ``.pth`` line."""
    subprocess.run([PY, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    if with_test_deps:
        (_site_packages(venv) / "_suite_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin" / "python"


def pip_install_editable(python: Path, project: Path, env: dict[str, str]) -> None:
    """``pip install -e`` as a developer does, offline (the build backend is already here)."""
    pip_env = dict(env, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    pip_env.pop("PYTHONPATH", None)
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps",
                           "--no-build-isolation", "-e", str(project)],
                          env=pip_env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]


def checkout(root: Path, files: dict[str, str]) -> Repo:
    path = root / "checkout"
    path.mkdir(parents=True)
    repo = Repo(path, gate_env(root / "home"))
    repo.git("init", "-q", "-b", "main")
    repo.commit(files, "initial: calcpkg and its tests")
    return repo


@pytest.fixture(scope="module")
def src_project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Repo, Path]:
    root = tmp_path_factory.mktemp("src-layout")
    repo = checkout(root, {"pyproject.toml": SRC_PYPROJECT, "src/calcpkg/__init__.py": GOOD,
                           "tests/test_calc.py": TESTS})
    repo.branch("breaks-add", {"src/calcpkg/__init__.py": BROKEN}, "break add")
    repo.branch("docs-only", {"README.md": "calcpkg\n"}, "docs")
    repo.branch("stray-conftest", {"tests/conftest.py": STRAY_CONFTEST}, "conftest with a path")
    repo.git("switch", "-q", "-c", "drops-tests")
    repo.git("rm", "-q", "-r", "tests")
    repo.git("commit", "-q", "-m", "drop the tests")
    repo.git("switch", "-q", "main")
    python = make_venv(root / "venv")
    pip_install_editable(python, repo.path, repo.env)
    return repo, python


@pytest.fixture(scope="module")
def flat_project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Repo, Path]:
    root = tmp_path_factory.mktemp("flat-layout")
    repo = checkout(root, {"pyproject.toml": FLAT_PYPROJECT, "calcpkg/__init__.py": GOOD,
                           "tests/test_calc.py": TESTS})
    repo.branch("breaks-add", {"calcpkg/__init__.py": BROKEN}, "break add")
    python = make_venv(root / "venv")
    pip_install_editable(python, repo.path, repo.env)
    return repo, python


def gate(repo: Repo, branch: str, python: Path, *args: str, **env: str) -> GateDecision:
    suite_env = dict(repo.env, **env)
    command = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    return retest_branch(repo.path, branch, task_id=f"{branch}-{len(args)}-{len(env)}",
                         command=command, env=suite_env, metrics=GateMetrics(), timeout=120)


def installed_copy_is_green(repo: Repo, python: Path) -> None:
    """Precondition: outside the gate, the venv imports the checkout (main, green)."""
    done = subprocess.run([str(python), "-c", "import calcpkg; print(calcpkg.__file__)"],
                          capture_output=True, text=True, timeout=60, cwd="/")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(str(repo.path))


def tree(decision: GateDecision) -> dict[str, Any]:
    proof = decision.evidence["tree"]
    assert isinstance(proof, dict)
    return proof


def test_src_layout_editable_install_broken_branch_rolls_back(src_project: tuple[Repo, Path]) -> None:
    """Issue 9: the suite used to import the checkout's src/ and merge broken code."""
    repo, python = src_project
    installed_copy_is_green(repo, python)
    decision = gate(repo, "breaks-add", python)
    assert (decision.action, decision.verdict, decision.rule) == ("rollback", "red", "red.tests-failed")
    tests = decision.evidence["tests"]
    assert sorted(f["nodeid"] for f in tests["failures"]) == ["tests/test_calc.py::test_add"]
    proof = tree(decision)
    assert proof["status"] == "proven"
    assert proof["imported"]["calcpkg"].startswith(decision.evidence["worktree"])
    assert proof["roots"] == [os.path.join(decision.evidence["worktree"], "src")]


@pytest.mark.parametrize("wrapper", [["-m", "coverage", "run"],
                                     ["-m", "coverage", "run", "--rcfile", "/dev/null", "--branch"]])
def test_a_suite_under_coverage_is_probed_and_proven(src_project: tuple[Repo, Path],
                                                     wrapper: list[str]) -> None:
    """Found on tomli: under ``coverage run -m pytest`` the probe was never injected (run()
    passes argv as a tuple, which the coverage check compared with a list), so the tree was
    never proven and a pass merged on the output's word alone."""
    repo, python = src_project
    command = [str(python), *wrapper, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    for branch, action in (("breaks-add", "rollback"), ("docs-only", "merge")):
        decision = retest_branch(repo.path, branch, task_id=f"cov-{branch}-{len(wrapper)}",
                                 command=command, env=repo.env, metrics=GateMetrics(),
                                 timeout=120)
        assert decision.action == action, decision.reason
        assert tree(decision)["status"] == "proven"
        assert decision.evidence["verdict_evidence"] == "events"


def test_src_layout_green_branch_merges_with_proof(src_project: tuple[Repo, Path]) -> None:
    repo, python = src_project
    decision = gate(repo, "docs-only", python)
    assert (decision.action, decision.verdict) == ("merge", "passed")
    assert tree(decision)["status"] == "proven"
    assert decision.evidence["tests"]["counts"] == {"passed": 2}


def test_flat_layout_editable_finder_broken_branch_rolls_back(flat_project: tuple[Repo, Path]) -> None:
    repo, python = flat_project
    installed_copy_is_green(repo, python)
    # The plain `pytest` entry point does not put the cwd on sys.path: only PYTHONPATH helps.
    pytest_script = python.parent / "pytest"
    pytest_script.write_text(f"#!{python}\nimport sys, pytest\nsys.exit(pytest.console_main())\n")
    pytest_script.chmod(0o755)
    for command in ([str(pytest_script), "-q", "-p", "no:cacheprovider"],
                    [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider"]):
        decision = retest_branch(repo.path, "breaks-add", task_id=command[0], command=command,
                                 env=repo.env, metrics=GateMetrics(), timeout=120)
        assert (decision.action, decision.rule) == ("rollback", "red.tests-failed"), decision.reason
        assert tree(decision)["status"] == "proven"
        assert tree(decision)["roots"] == [decision.evidence["worktree"]]


def test_xdist_workers_prove_the_tree_too(src_project: tuple[Repo, Path]) -> None:
    pytest.importorskip("xdist")
    repo, python = src_project
    decision = gate(repo, "breaks-add", python, "-p", "xdist", "-n", "2")
    assert (decision.action, decision.rule) == ("rollback", "red.tests-failed")
    assert decision.evidence["tests"]["failures"][0]["worker"] in ("gw0", "gw1")
    assert tree(decision)["status"] == "proven"


def test_a_suite_that_imports_the_checkout_is_held_not_merged(src_project: tuple[Repo, Path]) -> None:
    repo, python = src_project
    decision = gate(repo, "stray-conftest", python, PROJECT_CHECKOUT=str(repo.path))
    assert (decision.action, decision.verdict, decision.rule) == ("hold", "other", "other.wrong-tree")
    assert decision.alert
    outside = tree(decision)["outside"]["calcpkg"]
    assert outside.startswith(str(repo.path / "src" / "calcpkg"))
    assert outside in decision.reason


def test_without_the_probe_the_worktree_still_wins(src_project: tuple[Repo, Path]) -> None:
    repo, python = src_project
    decision = gate(repo, "breaks-add", python, RETEST_PROBE_ENABLED="false")
    assert (decision.action, decision.verdict) == ("rollback", "red")
    assert tree(decision)["status"] == "unavailable"
    assert decision.evidence["tests"] is None


def test_no_tests_with_warnings_as_errors_is_held(src_project: tuple[Repo, Path]) -> None:
    """Issue 9: with tests/ deleted, filterwarnings=error made this red.exit-1 (a rollback)."""
    repo, python = src_project
    decision = gate(repo, "drops-tests", python)
    assert (decision.action, decision.verdict, decision.rule) == ("hold", "other", "other.no-tests")


def test_a_venv_without_pytest_holds_and_never_rolls_back(src_project: tuple[Repo, Path],
                                                          tmp_path: Path) -> None:
    """Issue 9: `No module named pytest`, exit 1, was red.exit-1: green code rolled back."""
    repo, _ = src_project
    bare = make_venv(tmp_path / "bare", with_test_deps=False)
    # No PYTHONPATH of the test run either: it may hold an installed retest's site-packages.
    decision = gate(repo, "docs-only", bare, PYTHONPATH="")
    assert "No module named pytest" in decision.reason, decision.reason
    assert (decision.action, decision.verdict, decision.rule) == ("hold", "other", "other.environment")
    assert "No module named pytest" in decision.reason


def test_import_roots_follow_the_declarations(tmp_path: Path) -> None:
    cases = {
        "setuptools": ('[tool.setuptools]\npackage-dir = {"" = "lib"}\n', "lib"),
        "find": ('[tool.setuptools.packages.find]\nwhere = ["code"]\n', "code"),
        "hatch": ('[tool.hatch.build.targets.wheel]\npackages = ["source/pkg"]\n', "source"),
        "poetry": ('[tool.poetry]\npackages = [{include = "pkg", from = "python"}]\n', "python"),
        "escape": ('[tool.setuptools]\npackage-dir = {"" = "../outside"}\n', "."),
        "broken": ("[tool.setuptools\n", "."),
    }
    for name, (pyproject, expected) in cases.items():
        root = tmp_path / name
        (root / expected / "pkg").mkdir(parents=True, exist_ok=True)
        (root / expected / "pkg" / "__init__.py").write_text("")
        (root / "pyproject.toml").write_text(pyproject)
        assert layout.import_roots(str(root)) == [os.path.normpath(root / expected)], name
    cfg = tmp_path / "cfg"
    (cfg / "src" / "pkg").mkdir(parents=True)
    (cfg / "src" / "pkg" / "__init__.py").write_text("")
    (cfg / "setup.cfg").write_text("[options]\npackage_dir =\n    =src\n")
    assert layout.import_roots(str(cfg)) == [str(cfg / "src")]
    undeclared = tmp_path / "undeclared"
    (undeclared / "src" / "mod_pkg").mkdir(parents=True)
    (undeclared / "src" / "mod_pkg" / "__init__.py").write_text("")
    (undeclared / "tests").mkdir()
    (undeclared / "tests" / "__init__.py").write_text("")
    (undeclared / "flatpkg").mkdir()
    (undeclared / "flatpkg" / "__init__.py").write_text("")
    for module in ("single.py", "setup.py", "conftest.py", "noxfile.py", "test_x.py"):
        (undeclared / module).write_text("")
    assert layout.import_roots(str(undeclared)) == [str(undeclared / "src")]
    assert layout.top_level_packages([str(undeclared)], str(undeclared)) == ["flatpkg", "single"]
