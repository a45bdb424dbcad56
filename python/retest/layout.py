"""Where a repository's own code is imported from: its import roots, packages, and the proof.

The merge gate runs the suite in a throw-away worktree, but the suite's venv usually has the
project installed *editable* from the developer's checkout (a ``.pth`` path entry or a
setuptools ``__editable__`` finder): left alone, ``import pkg`` finds the original checkout's
``src/pkg`` and the gate tests the wrong tree. ``import_roots`` finds the worktree's roots as
the project declares them (pyproject ``[tool.setuptools]`` ``package-dir``/``packages.find``,
hatch, poetry, flit/pdm conventions, ``setup.cfg``, a ``setup.py``'s literal ``package_dir``;
else ``src/`` if it holds packages; else the root); the gate puts them first on ``PYTHONPATH``, which precedes every ``.pth`` entry and
site-packages, and comes before the editable finders (they sit after ``PathFinder`` on
``sys.meta_path``). ``top_level_packages`` names the repository's packages for the probe, which
records where each was imported from; ``prove`` checks every origin is inside the worktree.
"""

from __future__ import annotations

import configparser
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Optional, Sequence

log = logging.getLogger(__name__)

__all__ = ["import_roots", "top_level_packages", "TreeProof", "prove", "ProofStatus",
           "native_sources", "untested_native_code"]

#: Sources of compiled extension modules: a change to one is tested only if the suite loaded
#: a module built from the worktree.
NATIVE_SUFFIXES = (".c", ".h", ".cc", ".cpp", ".cxx", ".hh", ".hpp", ".pyx", ".pxd", ".pxi",
                   ".rs", ".f", ".f90")

#: ``proven``: every imported package of the repository came from the worktree;
#: ``wrong-tree``: one came from elsewhere; ``not-imported``: the suite imported none of them;
#: ``unavailable``: no probe events (not pytest, or the probe is off).
ProofStatus = Literal["proven", "wrong-tree", "not-imported", "unavailable"]

#: Directories at a flat root that are never the project's importable package.
_NOT_PACKAGES = frozenset({"tests", "test", "testing", "docs", "doc", "examples", "example",
                           "benchmarks", "bench", "scripts", "tools", "build", "dist", "venv",
                           ".venv", "node_modules", "site-packages"})
#: Modules at a flat root that are tooling, not the project's code.
_NOT_MODULES = frozenset({"conftest", "noxfile", "fabfile", "tasks", "dodo", "manage", "conf",
                          "setup", "versioneer", "runtests", "run_tests"})
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MAX_PACKAGES = 50


def _load_toml(path: str) -> dict[str, Any]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef,import-not-found,unused-ignore]
        except ImportError:
            return {}
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, ValueError) as err:
        log.debug("layout: %s not readable as TOML: %s", path, err)
        return {}
    return data if isinstance(data, dict) else {}


def _get(doc: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def _declared_pyproject(root: str) -> list[str]:
    """Root directories the pyproject declares (relative), in its tools' own terms."""
    doc = _load_toml(os.path.join(root, "pyproject.toml"))
    tool = _get(doc, "tool") or {}
    found: list[str] = []
    package_dir = _get(tool, "setuptools", "package-dir")
    if isinstance(package_dir, dict) and isinstance(package_dir.get(""), str):
        found.append(package_dir[""])
    found += _strings(_get(tool, "setuptools", "packages", "find", "where"))
    for target in ("wheel", "sdist"):
        for pkg in _strings(_get(tool, "hatch", "build", "targets", target, "packages")):
            found.append(os.path.dirname(pkg.rstrip("/")) or ".")
    for entry in _get(tool, "poetry", "packages") or []:
        if isinstance(entry, dict) and isinstance(entry.get("from"), str):
            found.append(entry["from"])
    package_dir_pdm = _get(tool, "pdm", "build", "package-dir")
    if isinstance(package_dir_pdm, str):
        found.append(package_dir_pdm)
    return found


def _declared_setup_cfg(root: str) -> list[str]:
    parser = configparser.ConfigParser()
    try:
        parser.read(os.path.join(root, "setup.cfg"), encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError) as err:
        log.debug("layout: setup.cfg not readable: %s", err)
        return []
    found: list[str] = []
    package_dir = parser.get("options", "package_dir", fallback="")
    for line in package_dir.replace(";", "\n").splitlines():
        key, _, value = line.partition("=")
        if value.strip() and not key.strip():
            found.append(value.strip())
    where = parser.get("options.packages.find", "where", fallback="").strip()
    if where:
        found.append(where)
    return found


#: A setup.py larger than this is not read for its package_dir.
_SETUP_PY_MAX = 1 << 20


def _declared_setup_py(root: str) -> list[str]:
    """Root directories a ``setup.py`` declares with literals: ``setup(package_dir={"":
    "lib"})``, ``packages=find_packages("lib")`` / ``find_packages(where="lib")`` (pyyaml
    declares ``lib`` only there). Read as a syntax tree, never run; anything computed is
    not understood (the probe's checkout check still catches a suite that left the tree)."""
    import ast

    try:
        with open(os.path.join(root, "setup.py"), "rb") as f:
            source = f.read(_SETUP_PY_MAX + 1)
        if len(source) > _SETUP_PY_MAX:
            return []
        tree = ast.parse(source)
    except (OSError, SyntaxError, ValueError):
        return []
    found: list[str] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
        for kw in node.keywords:
            if name == "setup" and kw.arg == "package_dir" and isinstance(kw.value, ast.Dict):
                for key, value in zip(kw.value.keys, kw.value.values):
                    if (isinstance(key, ast.Constant) and key.value == ""
                            and isinstance(value, ast.Constant) and isinstance(value.value, str)):
                        found.append(value.value)
            if name in ("find_packages", "find_namespace_packages") and kw.arg == "where" \
                    and isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str):
                found.append(kw.value.value)
        if name in ("find_packages", "find_namespace_packages") and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            found.append(node.args[0].value)
    return [f for f in found if f not in ("", ".")]


def inside(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or below it, symlinks resolved."""
    try:
        return os.path.commonpath([os.path.realpath(path), os.path.realpath(root)]) == \
            os.path.realpath(root)
    except ValueError:
        return False


def import_roots(root: str) -> list[str]:
    """The worktree's import roots, absolute, in declaration order; always non-empty."""
    root = os.path.abspath(root)
    roots: list[str] = []
    for rel in _declared_pyproject(root) + _declared_setup_cfg(root) + _declared_setup_py(root):
        path = os.path.normpath(os.path.join(root, rel))
        if inside(path, root) and os.path.isdir(path) and path not in roots:
            roots.append(path)
    src = os.path.join(root, "src")
    if not roots and _packages_in(src, flat=False):
        roots.append(src)
    # The root itself only for a flat layout: a src layout exists to keep it off the path.
    return roots or [root]


def _packages_in(directory: str, *, flat: bool) -> list[str]:
    """Importable top-level names in ``directory``: packages (``__init__.py``) and modules."""
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError:
        return []
    names: list[str] = []
    for entry in entries:
        name = entry.name
        if entry.is_dir(follow_symlinks=False):
            if (_IDENT.match(name) and not (flat and name in _NOT_PACKAGES)
                    and os.path.isfile(os.path.join(entry.path, "__init__.py"))):
                names.append(name)
        elif (name.endswith(".py") and _IDENT.match(name[:-3])
                and not (flat and name[:-3] in _NOT_MODULES) and name != "setup.py"):
            names.append(name[:-3])
    return names


def top_level_packages(roots: Sequence[str], root: str) -> list[str]:
    """The repository's own top-level packages under ``roots`` (bounded; tests excluded)."""
    names: list[str] = []
    for directory in roots:
        flat = os.path.abspath(directory) == os.path.abspath(root)
        for name in _packages_in(directory, flat=flat):
            if name not in names and not name.startswith("test_") and not name.endswith("_test"):
                names.append(name)
    return names[:_MAX_PACKAGES]


def pythonpath(roots: Iterable[str], existing: Optional[str]) -> str:
    """``PYTHONPATH`` with ``roots`` first (the worktree's code wins over installed copies)."""
    parts = list(roots) + ([existing] if existing else [])
    return os.pathsep.join(parts)


@dataclass(frozen=True)
class TreeProof:
    """Whether the suite imported the repository's packages from the tested worktree."""

    status: ProofStatus
    worktree: str
    roots: tuple[str, ...] = ()
    #: package -> the first place it was imported from
    imported: dict[str, str] = field(default_factory=dict)
    #: package -> a place outside the worktree it was imported from
    outside: dict[str, str] = field(default_factory=dict)
    rootdir: Optional[str] = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "worktree": self.worktree, "roots": list(self.roots),
                "imported": dict(self.imported), "outside": dict(self.outside),
                "rootdir": self.rootdir, "note": self.note}

    def reason(self) -> str:
        """Why the verdict cannot stand (wrong-tree only)."""
        name, place = next(iter(self.outside.items()))
        if name == "<rootdir>":
            return (f"pytest's rootdir {place} is outside the rebased worktree {self.worktree}: "
                    f"the suite did not test the rebased tree; the verdict cannot stand")
        more = len(self.outside) - 1
        return (f"the suite imported {name} from {place}, outside the rebased worktree "
                f"{self.worktree}{f' (and {more} more package(s))' if more else ''}: it did not "
                f"test the rebased tree; the verdict cannot stand")


def prove(worktree: str, roots: Sequence[str], packages: Sequence[str],
          imports: Optional[dict[str, list[str]]], rootdir: Optional[str],
          from_checkout: Optional[dict[str, str]] = None) -> TreeProof:
    """Check the probe's import origins (``imports``) against ``worktree``; ``from_checkout``:
    modules the probe saw loaded from the developer's checkout (any package, any layout: the
    roots may have missed one, as setup.py's ``package_dir`` once did for pyyaml)."""
    base = dict(worktree=worktree, roots=tuple(roots), rootdir=rootdir)
    if imports is None:
        return TreeProof("unavailable", note="no probe events: the command is not pytest or "
                         "the probe is off", **base)  # type: ignore[arg-type]
    outside: dict[str, str] = {}
    imported: dict[str, str] = {}
    if rootdir and not inside(rootdir, worktree):
        outside["<rootdir>"] = rootdir
    for name in packages:
        places = imports.get(name) or []
        if places:
            imported[name] = places[0]
        stray = [p for p in places if not inside(p, worktree)]
        if stray:
            outside[name] = stray[0]
    for name, place in (from_checkout or {}).items():
        if not inside(place, worktree) and len(outside) < 10:
            outside.setdefault(name, place)
    if outside:
        return TreeProof("wrong-tree", imported=imported, outside=outside, **base)  # type: ignore[arg-type]
    if not imported:
        note = ("the suite imported none of the repository's packages"
                if packages else "no top-level package found in the worktree")
        return TreeProof("not-imported", imported=imported, note=note, **base)  # type: ignore[arg-type]
    return TreeProof("proven", imported=imported, **base)  # type: ignore[arg-type]


def native_sources(changed: Iterable[str]) -> list[str]:
    """The paths among ``changed`` that are sources of compiled extension modules."""
    return [path for path in changed if path.lower().endswith(NATIVE_SUFFIXES)]


def untested_native_code(worktree: str, changed_native: Sequence[str],
                         compiled: Optional[dict[str, list[str]]]) -> Optional[str]:
    """Why the branch's native code was not tested, or None.

    The branch changes extension sources, but the suite loaded no compiled module of the
    repository from the worktree: the worktree holds sources only (nothing built them), so a
    package that falls back to pure Python, or skips what needs the extension, passes without
    its changed native code ever running. ``compiled is None``: no probe, nothing to say.
    """
    if not changed_native or compiled is None:
        return None
    built_here = [f for files in compiled.values() for f in files if inside(f, worktree)]
    if built_here:
        return None
    shown = ", ".join(changed_native[:3]) + (f" and {len(changed_native) - 3} more"
                                              if len(changed_native) > 3 else "")
    return (f"the branch changes native sources ({shown}) but the suite loaded no compiled "
            f"module built in the rebased worktree: the changed native code was not tested "
            f"(set MERGE_RETEST_SETUP_COMMAND to build it, e.g. "
            f"'python setup.py build_ext --inplace')")


#: Where pyproject.toml declares a version file that the build backend writes at install time
#: from the VCS (and that is git-ignored, so a fresh worktree lacks it): setuptools-scm,
#: hatch-vcs's build hook, pdm-backend's scm source.
_VERSION_FILE_KEYS = (
    ("tool", "setuptools_scm", "version_file"),
    ("tool", "setuptools_scm", "write_to"),
    ("tool", "hatch", "build", "hooks", "vcs", "version-file"),
    ("tool", "pdm", "version", "write_to"),
)


def generated_files(root: str) -> list[str]:
    """The files the project declares its build writes at install time (a VCS version file),
    relative to ``root`` and inside it, in declaration order."""
    doc = _load_toml(os.path.join(root, "pyproject.toml"))
    found: list[str] = []
    for keys in _VERSION_FILE_KEYS:
        for rel in _strings(_get(doc, *keys)):
            rel = os.path.normpath(rel)
            if not os.path.isabs(rel) and inside(os.path.join(root, rel), root) \
                    and rel not in found:
                found.append(rel)
    return found


_NO_MODULE = re.compile(r"No module named '([A-Za-z_][A-Za-z0-9_.]*)'|cannot import name "
                        r"'([A-Za-z_][A-Za-z0-9_]*)' from (?:partially initialized module )?"
                        r"'([A-Za-z_][A-Za-z0-9_.]*)'")


def missing_modules(texts: Iterable[Optional[str]]) -> list[str]:
    """The module names of every ``No module named 'x.y'`` in ``texts``, and ``x.y`` of every
    ``cannot import name 'y' from 'x'`` (``from . import _speedups``: the name may be a
    submodule), in order, once."""
    found: list[str] = []
    for text in texts:
        for module, name, parent in _NO_MODULE.findall(text or ""):
            name = module or f"{parent}.{name}"
            if name not in found:
                found.append(name)
    return found


def module_paths(module: str, roots: Sequence[str]) -> list[str]:
    """Where ``module`` would be under ``roots`` (``a/b.py`` or ``a/b/__init__.py``), for
    the roots whose package of it (``a``) exists: candidates for a module of the project."""
    parts = module.split(".")
    paths: list[str] = []
    for root in roots:
        if len(parts) < 2 or not os.path.isdir(os.path.join(root, *parts[:-1])):
            continue
        base = os.path.join(root, *parts)
        paths += [base + ".py", os.path.join(base, "__init__.py")]
    return paths


#: What a compiled extension module is built into (``_speedups.cpython-311-x86_64-linux-gnu.so``).
_COMPILED_SUFFIXES = (".so", ".pyd")


def compiled_module(module: str, roots: Sequence[str], elsewhere: Optional[str] = None,
                    worktree: Optional[str] = None) -> Optional[str]:
    """Why ``module`` (a module of the project that could not be imported) is a compiled
    extension that was not built where the suite ran, or None: a native source of its name
    next to where it would be (``_speedups.c``, ``.pyx``, ...), or, when ``elsewhere`` (the
    developer's checkout) is given, a built module of its name at the same place there."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    for root in roots:
        directory = os.path.join(root, *parts[:-1])
        if not os.path.isdir(directory):
            continue
        base = os.path.join(directory, parts[-1])
        for suffix in NATIVE_SUFFIXES:
            if os.path.isfile(base + suffix):
                return f"its source {os.path.relpath(base + suffix, worktree or root)} is not built"
        if elsewhere is None or worktree is None:
            continue
        there = os.path.join(elsewhere, os.path.relpath(directory, worktree))
        try:
            names = os.listdir(there)
        except OSError:
            continue
        for name in names:
            if name.startswith(parts[-1] + ".") and name.endswith(_COMPILED_SUFFIXES):
                return (f"the checkout has it built ({os.path.relpath(os.path.join(there, name), elsewhere)}), "
                        f"the worktree does not")
    return None

