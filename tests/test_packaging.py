"""Installing without a compiler says what to do (issue 14), from the checkout or the sdist."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _setuptools_reads_our_pyproject() -> bool:
    """setup.py is run directly: the interpreter's setuptools must read PEP 639's license."""
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 77


@pytest.mark.skipif(not (REPO / "setup.py").exists(), reason="needs the source tree (checkout or sdist)")
@pytest.mark.skipif(not _setuptools_reads_our_pyproject(), reason="needs setuptools >= 77 (the test extra)")
@pytest.mark.parametrize("cc", ["retest-no-such-cc", "/bin/false"], ids=["missing", "failing"])
def test_a_build_without_a_working_compiler_says_what_to_install(tmp_path: Path, cc: str) -> None:
    tree = tmp_path / "src"
    shutil.copytree(REPO, tree, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "wheelhouse", "*.so", "_retest_shepherd", "__pycache__"))
    env = dict(os.environ, CC=cc, RETEST_SHEPHERD_LIBC="glibc")
    env.pop("RETEST_PURE_PYTHON", None)
    done = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    said = done.stderr
    assert "apt-get install gcc python3-dev" in said and "RETEST_PURE_PYTHON=1" in said
    assert ("not on PATH" in said) if cc.startswith("retest-") else ("building the extension failed" in said)
