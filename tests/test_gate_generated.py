"""A package that imports a file its build writes at install time, which git ignores.

Found on humanize (hatch-vcs writes ``src/humanize/_version.py``, listed in .gitignore): the
gate's worktree never had the file, every suite failed to collect, and the gate rolled back
every branch, the target's own head included, as red code. Now a version file the project
declares in pyproject.toml (setuptools-scm, hatch-vcs, pdm-backend) is copied from the
checkout, where the editable install wrote it; one that cannot be had, or a git-ignored
module of the project's the suite could not import for another reason, holds the task
(``other.generated-missing``) instead of rolling it back.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from test_gate_tree import checkout, gate
from gitrepo import Repo
from retest import layout

PYPROJECT = textwrap.dedent("""\
    [build-system]
    requires = ["hatchling", "hatch-vcs"]
    build-backend = "hatchling.build"

    [project]
    name = "verpkg"
    dynamic = ["version"]

    [tool.hatch.version]
    source = "vcs"

    [tool.hatch.build.hooks.vcs]
    version-file = "src/verpkg/_version.py"
""")
INIT = "from ._version import __version__\n\n\ndef add(a, b):\n    return a + b\n"
BROKEN = INIT.replace("a + b", "a - b")
TESTS = ("import verpkg\n\n\ndef test_add():\n    assert verpkg.add(2, 3) == 5\n\n\n"
         "def test_version():\n    assert verpkg.__version__\n")
VERSION = "__version__ = version = '1.2.3.dev4'\n"
PY = Path(sys.executable)


def project(root: Path, pyproject: str) -> Repo:
    repo = checkout(root, {"pyproject.toml": pyproject, ".gitignore": "src/verpkg/_version.py\n",
                           "src/verpkg/__init__.py": INIT, "tests/test_verpkg.py": TESTS})
    repo.branch("green", {"README.md": "verpkg\n"}, "docs")
    repo.branch("red", {"src/verpkg/__init__.py": BROKEN}, "break add")
    return repo


@pytest.fixture()
def installed(tmp_path: Path) -> Repo:
    """The checkout as an editable install leaves it: the version file written, ignored."""
    repo = project(tmp_path, PYPROJECT)
    (repo.path / "src/verpkg/_version.py").write_text(VERSION)
    assert repo.git("status", "--porcelain") == ""  # ignored: git does not see it
    return repo


def test_each_backends_version_file_declaration_is_read(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(textwrap.dedent("""\
        [tool.setuptools_scm]
        version_file = "src/a/_version.py"
        write_to = "src/a/_version.py"
        [tool.hatch.build.hooks.vcs]
        version-file = "b/_version.py"
        [tool.pdm.version]
        source = "scm"
        write_to = "../outside/_version.py"
    """))
    assert layout.generated_files(str(tmp_path)) == ["src/a/_version.py", "b/_version.py"]
    assert layout.generated_files(str(tmp_path / "none")) == []


def test_a_declared_version_file_is_copied_and_green_merges(installed: Repo) -> None:
    decision = gate(installed, "green", PY)

    assert (decision.action, decision.rule) == ("merge", "passed.exit-0"), decision.reason
    (entry,) = decision.evidence["generated"]
    assert entry["path"] == "src/verpkg/_version.py"
    assert entry["copied_from"] == str(installed.path / "src/verpkg/_version.py")


def test_with_the_version_file_a_red_branch_still_rolls_back(installed: Repo) -> None:
    decision = gate(installed, "red", PY)

    assert (decision.action, decision.rule) == ("rollback", "red.tests-failed"), decision.reason
    assert "test_add" in decision.reason


@pytest.mark.parametrize("declared", [True, False])
def test_a_generated_module_nobody_can_provide_holds_rather_than_rolls_back(
        tmp_path: Path, declared: bool) -> None:
    """Not installed, so the checkout has no copy either (declared); or written by a build
    step the gate cannot read (a setup.py's setuptools-scm, say: not declared). Every branch
    would fail the same way: hold, with what to do, never rollback."""
    pyproject = PYPROJECT if declared else PYPROJECT.split("[tool.hatch.version]")[0]
    repo = project(tmp_path, pyproject)

    decision = gate(repo, "green", PY)

    assert (decision.action, decision.verdict, decision.rule) == (
        "hold", "other", "other.generated-missing"), decision.reason
    assert "src/verpkg/_version.py is git-ignored" in decision.reason
    assert "MERGE_RETEST_SETUP_COMMAND" in decision.reason
    if declared:
        assert "missing" in decision.evidence["generated"][0]


def test_a_missing_module_git_tracks_is_still_red(tmp_path: Path) -> None:
    """The safeguard is only for ignored files: a branch that imports a module of the
    project's that does not exist is broken code."""
    repo = project(tmp_path, PYPROJECT.split("[tool.hatch.version]")[0])
    (repo.path / "src/verpkg/_version.py").write_text(VERSION)
    repo.git("add", "-f", "src/verpkg/_version.py")
    repo.git("commit", "-q", "-m", "track the version file")
    repo.branch("imports-nothing", {"src/verpkg/__init__.py": "from .nothing import x\n" + INIT},
                "import a module that does not exist")

    decision = gate(repo, "imports-nothing", PY)

    assert (decision.action, decision.verdict) == ("rollback", "red"), decision.reason


def test_a_branch_cannot_make_the_copy_write_outside_the_worktree(installed: Repo,
                                                                 tmp_path: Path) -> None:
    """The version file's path comes from the branch's pyproject.toml, and the branch may
    commit a symlink on it: the copy never follows one out of the worktree."""
    outside = tmp_path / "outside"
    outside.mkdir()
    installed.git("switch", "-q", "-c", "escapes")
    (installed.path / "gen").symlink_to(outside, target_is_directory=True)
    installed.git("add", "gen")
    (installed.path / "pyproject.toml").write_text(
        PYPROJECT.replace("src/verpkg/_version.py", "gen/_version.py"))
    installed.git("commit", "-q", "-am", "a version file behind a symlink")
    installed.git("switch", "-q", "main")
    (installed.path / "gen").mkdir()  # the checkout's own copy, where the install wrote it
    (installed.path / "gen/_version.py").write_text(VERSION)

    decision = gate(installed, "escapes", PY)

    assert list(outside.iterdir()) == []  # nothing written through the symlink
    assert "generated" not in decision.evidence  # a path that resolves outside is no candidate
    assert decision.action != "merge"
