"""pytest fails before its session starts: the branch's code, or the machine's?

Found on click: a branch that breaks ``src/click/formatting.py``, which ``conftest.py``
imports, made pytest exit 4 before its session, and the gate held it as
``other.environment`` (a person asked) instead of rolling it back. On pluggy, which pytest
itself imports, the same exit was 1 with a Python traceback. Now the probe reports the
exception itself (its class, the file it was raised in, the module it could not import), or
the interpreter's traceback is read when pytest failed before the probe could load, and the
gate rolls back (``red.startup-error``) only what is proven to be the branch's own code: a
syntax or name error in a file of the worktree, a module or name of the project's own that
the branch no longer has. A third-party module missing, a git-ignored module missing or any
other exception is still held.

Every case is a real git repository whose checkout is installed editable in a suite venv.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gitrepo import Repo
from test_gate_tree import checkout, gate, make_venv, pip_install_editable

INIT = "from .core import add\n"
CORE = "def add(a, b):\n    return a + b\n"
CONFTEST = textwrap.dedent("""\
    import pytest

    import mypkg


    @pytest.fixture
    def two():
        return mypkg.add(1, 1)
""")
TESTS = "def test_two(two):\n    assert two == 2\n"
#: The project's own pytest plugin (as pytest-* projects ship one), loaded with ``-p``.
PLUGIN = "import pytest\n\n\n@pytest.fixture\ndef three():\n    return 3\n"
PYPROJECT = textwrap.dedent("""\
    [build-system]
    requires = ["setuptools>=64"]
    build-backend = "setuptools.build_meta"

    [project]
    name = "mypkg"
    version = "1.0"

    [tool.setuptools.packages.find]
    where = ["src"]
""")

#: branch -> (files it changes, the file the reason names, what the reason says)
RED = {
    "syntax": ({"src/mypkg/core.py": "def add(a, b):\n    return (a + b\n"},
               "SyntaxError in src/mypkg/core.py:2"),
    "conftest-syntax": ({"tests/conftest.py": CONFTEST + "def broken(:\n"},
                        "SyntaxError in tests/conftest.py:9"),
    "name": ({"src/mypkg/core.py": CORE + "X = undefined_name\n"},
             "NameError in src/mypkg/core.py:3: name 'undefined_name' is not defined"),
    "renamed": ({"src/mypkg/core.py": "def plus(a, b):\n    return a + b\n"},
                "ImportError in src/mypkg/__init__.py:1: cannot import name 'add' from "
                "'mypkg.core' (src/mypkg/core.py)"),
    "indent": ({"src/mypkg/core.py": "def add(a, b):\nreturn a + b\n"},
               "IndentationError in src/mypkg/core.py:2"),
}
HELD = {
    "third-party": {"tests/conftest.py": "import not_installed_anywhere_xyz\n" + CONFTEST},
    "env-var": {"tests/conftest.py": "import os\n\nDSN = os.environ['GATE_TEST_DSN_XYZ']\n" + CONFTEST},
    "generated": {"src/mypkg/__init__.py": "from ._version import v\n" + INIT,
                  ".gitignore": "src/mypkg/_version.py\n"},
}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Repo, Path]:
    root = tmp_path_factory.mktemp("startup")
    repo = checkout(root, {"pyproject.toml": PYPROJECT, "src/mypkg/__init__.py": INIT,
                           "src/mypkg/plugin.py": PLUGIN,
                           "src/mypkg/core.py": CORE, "tests/conftest.py": CONFTEST,
                           "tests/test_two.py": TESTS})
    for name, (files, _) in RED.items():
        repo.branch(name, files)
    for name, files in HELD.items():
        repo.branch(name, files)
    repo.branch("plugin-broken", {"src/mypkg/plugin.py": PLUGIN + "def broken(:\n"})
    repo.git("switch", "-q", "-c", "deleted")
    repo.git("rm", "-q", "src/mypkg/core.py")
    repo.git("commit", "-q", "-m", "drop core.py")
    repo.git("switch", "-q", "main")
    python = make_venv(root / "venv")
    pip_install_editable(python, repo.path, repo.env)
    return repo, python


def test_main_merges(project: tuple[Repo, Path]) -> None:
    repo, python = project
    decision = gate(repo, "main", python)
    assert (decision.action, decision.rule) == ("merge", "passed.exit-0"), decision.reason


@pytest.mark.parametrize("branch", sorted(RED))
def test_the_branchs_code_breaking_start_up_rolls_back(project: tuple[Repo, Path],
                                                       branch: str) -> None:
    repo, python = project
    decision = gate(repo, branch, python)
    assert (decision.action, decision.verdict, decision.rule) == (
        "rollback", "red", "red.startup-error"), decision.reason
    assert RED[branch][1] in decision.reason
    assert "pytest could not start (exit 4): loading tests/conftest.py: " in decision.reason
    assert decision.evidence["verdict_evidence"] == "events"
    error = decision.evidence["tests"]["startup_error"]
    assert (error["stage"], error["source"]) == ("conftest", "events")


def test_a_deleted_module_of_the_project_rolls_back(project: tuple[Repo, Path]) -> None:
    repo, python = project
    decision = gate(repo, "deleted", python)
    assert (decision.action, decision.rule) == ("rollback", "red.startup-error"), decision.reason
    assert ("ModuleNotFoundError in src/mypkg/__init__.py:1: No module named 'mypkg.core' "
            "(the branch has no module mypkg.core)") in decision.reason


def test_the_projects_own_pytest_plugin_breaking_rolls_back(project: tuple[Repo, Path]) -> None:
    """A pytest plugin project (``-p mypkg.plugin``, or its entry point): pytest 9 exits 3,
    ``Error while loading plugin``, before any hook of the probe runs."""
    repo, python = project
    assert gate(repo, "main", python, "-p", "mypkg.plugin").action == "merge"
    decision = gate(repo, "plugin-broken", python, "-p", "mypkg.plugin")
    assert (decision.action, decision.rule) == ("rollback", "red.startup-error"), decision.reason
    assert "SyntaxError in src/mypkg/plugin.py:7" in decision.reason


def test_under_xdist_too(project: tuple[Repo, Path]) -> None:
    repo, python = project
    decision = gate(repo, "syntax", python, "-p", "xdist", "-n", "2")
    assert (decision.action, decision.rule) == ("rollback", "red.startup-error"), decision.reason


@pytest.mark.parametrize("branch, rule, says", [
    ("third-party", "other.environment", "No module named 'not_installed_anywhere_xyz'"),
    ("env-var", "other.environment", "KeyError"),
    ("generated", "other.generated-missing", "src/mypkg/_version.py is git-ignored"),
])
def test_what_the_branch_cannot_be_blamed_for_is_held(project: tuple[Repo, Path], branch: str,
                                                      rule: str, says: str) -> None:
    repo, python = project
    decision = gate(repo, branch, python)
    assert (decision.action, decision.verdict, decision.rule) == ("hold", "other", rule), \
        decision.reason
    assert says in decision.reason


def test_a_dependency_of_pytest_itself_is_read_from_the_traceback(tmp_path: Path) -> None:
    """pytest imports iniconfig before any plugin: a branch of iniconfig that does not parse
    crashes the interpreter (exit 1) before the probe exists. Its traceback is read."""
    import iniconfig

    source = Path(iniconfig.__file__).parent
    files = {f"src/iniconfig/{p.name}": p.read_text() for p in source.glob("*.py")}
    files["pyproject.toml"] = PYPROJECT.replace("mypkg", "iniconfig")
    files["testing/test_ini.py"] = ("from iniconfig import IniConfig\n\n\ndef test_parse():\n"
                                    "    assert IniConfig('x', data='[a]\\nb=1\\n')['a']['b'] == '1'\n")
    repo = checkout(tmp_path, files)
    broken = files["src/iniconfig/__init__.py"] + "\ndef broken(:\n    pass\n"
    repo.branch("broken", {"src/iniconfig/__init__.py": broken})
    lines = broken.count("\n") - 1
    python = make_venv(tmp_path / "venv")

    assert gate(repo, "main", python).action == "merge"
    decision = gate(repo, "broken", python)
    assert (decision.action, decision.rule) == ("rollback", "red.startup-error"), decision.reason
    assert f"pytest could not start (exit 1): SyntaxError in src/iniconfig/__init__.py:{lines}" \
        in decision.reason
    assert decision.evidence["verdict_evidence"] == "output"


@pytest.mark.parametrize("where", ["conftest", "collection"])
def test_a_compiled_module_the_worktree_never_built_is_held(tmp_path: Path, where: str) -> None:
    """The module's C source is in the worktree, nothing built it there: every branch would
    fail the same way, so the set-up is at fault (``other.native-not-built``), not the code."""
    files = {"pyproject.toml": PYPROJECT, "src/mypkg/__init__.py": INIT, "src/mypkg/core.py": CORE,
             "src/mypkg/_speedups.c": "/* the extension */\n", "tests/test_two.py": TESTS,
             "tests/conftest.py": CONFTEST}
    if where == "conftest":
        files["src/mypkg/__init__.py"] = "from . import _speedups\n" + INIT
    else:
        files["tests/test_fast.py"] = "from mypkg import _speedups\n\n\ndef test_x():\n    pass\n"
    repo = checkout(tmp_path, files)
    python = make_venv(tmp_path / "venv")
    decision = gate(repo, "main", python)
    assert (decision.action, decision.rule) == ("hold", "other.native-not-built"), decision.reason
    assert "mypkg._speedups, a compiled module of the project: its source " \
           "src/mypkg/_speedups.c is not built" in decision.reason


def test_a_module_the_checkout_has_built_is_held(tmp_path: Path) -> None:
    """No source beside it (a Rust or Cython build elsewhere), but the developer's checkout
    has the built module where the package imports it from: not the branch's fault."""
    files = {"pyproject.toml": PYPROJECT, "src/mypkg/__init__.py": "from . import _fast\n" + INIT,
             "src/mypkg/core.py": CORE, "tests/test_two.py": TESTS, "tests/conftest.py": CONFTEST,
             ".gitignore": "*.so\n"}
    repo = checkout(tmp_path, files)
    (repo.path / "src/mypkg/_fast.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF")
    python = make_venv(tmp_path / "venv")
    decision = gate(repo, "main", python)
    assert (decision.action, decision.rule) == ("hold", "other.native-not-built"), decision.reason
    assert "the checkout has it built (src/mypkg/_fast.cpython-311-x86_64-linux-gnu.so)" \
        in decision.reason


def test_a_plugin_of_an_entry_point_breaking_rolls_back(tmp_path: Path) -> None:
    """As found on pytest-mock: the project's plugin is loaded from its pytest11 entry point
    (an editable install), before any conftest; pytest 9 names the entry points' group."""
    pyproject = PYPROJECT + '\n[project.entry-points.pytest11]\nmypkg = "mypkg.plugin"\n'
    repo = checkout(tmp_path, {"pyproject.toml": pyproject, "src/mypkg/__init__.py": INIT,
                               "src/mypkg/core.py": CORE, "src/mypkg/plugin.py": PLUGIN,
                               "tests/test_three.py": "def test_three(three):\n    assert three == 3\n"})
    repo.branch("plugin-broken", {"src/mypkg/plugin.py": "import mypkg.gone\n" + PLUGIN})
    python = make_venv(tmp_path / "venv")
    pip_install_editable(python, repo.path, repo.env)

    autoload = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": ""}
    assert gate(repo, "main", python, **autoload).action == "merge"
    decision = gate(repo, "plugin-broken", python, **autoload)
    assert (decision.action, decision.rule) == ("rollback", "red.startup-error"), decision.reason
    assert ("ModuleNotFoundError in src/mypkg/plugin.py:1: No module named 'mypkg.gone' "
            "(the branch has no module mypkg.gone)") in decision.reason


def test_a_missing_module_of_a_shared_namespace_package_is_held(tmp_path: Path) -> None:
    """``google.cloud.foo`` imports ``google.protobuf``: ``google`` is a namespace package
    the project shares with other distributions, so the missing module may be a third
    party's (the venv lacks a dependency): held, not rolled back. (A namespace package is
    never one of the project's packages the blame looks for: it has no ``__init__.py``.)"""
    repo = checkout(tmp_path, {
        "pyproject.toml": PYPROJECT.replace("mypkg", "nspkg-foo"),
        "src/nsx/foo/__init__.py": "import nsx.protobuf_like_dependency\n",
        "tests/conftest.py": "import nsx.foo\n", "tests/test_a.py": TESTS.replace("two", "x")})
    decision = gate(repo, "main", make_venv(tmp_path / "venv"))
    assert (decision.action, decision.rule) == ("hold", "other.environment"), decision.reason
    assert "No module named 'nsx.protobuf_like_dependency'" in decision.reason


@pytest.fixture(scope="module")
def with_helpers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Repo, Path]:
    """A project whose tests import a helper module of their own (``tests/helpers.py``)."""
    root = tmp_path_factory.mktemp("deps")
    tests = "from helpers import TWO\n\n\ndef test_two():\n    assert TWO == 2\n"
    repo = checkout(root, {"pyproject.toml": PYPROJECT, "src/mypkg/__init__.py": INIT,
                           "src/mypkg/core.py": CORE, "tests/helpers.py": "TWO = 2\n",
                           "tests/test_two.py": tests})
    repo.branch("new-dependency", {"tests/test_dep.py": "import not_installed_anywhere_xyz\n"})
    repo.branch("sub-conftest", {"tests/sub/conftest.py": "import not_installed_anywhere_xyz\n",
                                 "tests/sub/test_s.py": "def test_s():\n    pass\n"})
    repo.branch("dep-and-syntax", {"tests/test_dep.py": "import not_installed_anywhere_xyz\n",
                                   "tests/test_bad.py": "def f(:\n"})
    repo.branch("imports-in-a-test", {"tests/test_dep.py": "def test_dep():\n"
                                      "    import not_installed_anywhere_xyz\n"})
    repo.branch("import-and-failure", {"tests/test_dep.py": "def test_dep():\n"
                                       "    import not_installed_anywhere_xyz\n\n\n"
                                       "def test_bad():\n    assert 1 == 2\n"})
    repo.git("switch", "-q", "-c", "drops-helpers")
    repo.git("rm", "-q", "tests/helpers.py")
    repo.git("commit", "-q", "-m", "drop the helpers")
    repo.git("switch", "-q", "main")
    return repo, make_venv(root / "venv")


@pytest.mark.parametrize("branch", ["new-dependency", "sub-conftest"])
def test_a_third_party_module_missing_at_collection_is_held(with_helpers: tuple[Repo, Path],
                                                            branch: str) -> None:
    """Found on markupsafe and pyyaml: a test module, or a conftest below the top one, that
    imports a module the venv lacks was a collection error, red: every branch, main included,
    would have been rolled back for the venv's missing dependency."""
    repo, python = with_helpers
    decision = gate(repo, branch, python, "tests")
    assert (decision.action, decision.rule) == ("hold", "other.environment"), decision.reason
    assert "the suite's venv lacks not_installed_anywhere_xyz" in decision.reason


def test_a_third_party_module_missing_in_a_test_body_is_held(with_helpers: tuple[Repo, Path]) -> None:
    """The same missing dependency, imported inside the test: the test fails, not its module."""
    repo, python = with_helpers
    decision = gate(repo, "imports-in-a-test", python, "tests")
    assert (decision.action, decision.rule) == ("hold", "other.environment"), decision.reason
    assert "the suite's venv lacks not_installed_anywhere_xyz: 1 failed test of No module named" \
        in decision.reason


@pytest.mark.parametrize("branch, rule", [("drops-helpers", "red.collection-error"),
                                          ("dep-and-syntax", "red.collection-error"),
                                          ("import-and-failure", "red.tests-failed")])
def test_a_module_the_branch_removed_or_a_real_error_beside_it_stays_red(
        with_helpers: tuple[Repo, Path], branch: str, rule: str) -> None:
    repo, python = with_helpers
    decision = gate(repo, branch, python, "tests")
    assert (decision.action, decision.rule) == ("rollback", rule), decision.reason


#: A library of the environment whose API is deprecated (a stand-in for pytest 9's
#: ``PytestRemovedIn10Warning`` on a generator passed to ``parametrize``, found on dateutil).
OLDLIB = ("import warnings\n\n\ndef api():\n    warnings.warn('oldlib.api() is deprecated', "
          "DeprecationWarning, stacklevel=2)\n    return 2\n")
STRICT_PYPROJECT = PYPROJECT + "\n[tool.pytest.ini_options]\nfilterwarnings = [\"error\"]\n"


@pytest.fixture(scope="module")
def deprecated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Repo, Path]:
    """A suite with ``filterwarnings = error`` whose test module (and a test) calls a library
    API that the environment's newer version deprecates."""
    from test_gate_tree import _site_packages

    root = tmp_path_factory.mktemp("deprecated")
    old_use = "import oldlib\n\nTWO = oldlib.api()\n\n\ndef test_two():\n    assert TWO == 2\n"
    repo = checkout(root, {"pyproject.toml": STRICT_PYPROJECT, "src/mypkg/__init__.py": INIT,
                           "src/mypkg/core.py": CORE, "tests/test_old.py": old_use})
    repo.branch("docs", {"README.md": "More docs.\n"})
    repo.branch("new-use", {"tests/test_new.py": "import oldlib\n\nX = oldlib.api()\n\n\n"
                                                 "def test_new():\n    assert X == 2\n"})
    repo.branch("in-a-test", {"tests/test_old.py": "def test_two():\n    import oldlib\n"
                                                   "    assert oldlib.api() == 2\n"})
    python = make_venv(root / "venv")
    (_site_packages(root / "venv") / "oldlib.py").write_text(OLDLIB)
    return repo, python


def test_a_deprecation_the_environment_raises_in_untouched_code_is_held(
        deprecated: tuple[Repo, Path]) -> None:
    """Found on dateutil under pytest 9: its ``filterwarnings = error`` turned pytest's own new
    deprecation into a collection error on every branch, main included, and a docs change
    rolled back. The environment is newer than the suite: held, not red."""
    repo, python = deprecated
    decision = gate(repo, "docs", python, "tests")
    assert (decision.action, decision.rule) == ("hold", "other.environment"), decision.reason
    assert ("the environment is newer than the suite: 1 collection error (tests/test_old.py) is "
            "DeprecationWarning raised as an error by the suite's filterwarnings") in decision.reason


@pytest.mark.parametrize("branch, rule", [("new-use", "red.collection-error"),
                                          ("in-a-test", "red.tests-failed")])
def test_a_deprecation_the_branch_itself_meets_stays_red(deprecated: tuple[Repo, Path],
                                                         branch: str, rule: str) -> None:
    """The branch's own code calls the deprecated API (a file it touched is in the
    traceback): its to fix, red."""
    repo, python = deprecated
    decision = gate(repo, branch, python, "tests")
    assert (decision.action, decision.rule) == ("rollback", rule), decision.reason
