"""Build of retest: the ``retest._proc_group`` extension and its ``_retest_shepherd`` helper.

On Linux a failed build fails the install loudly, saying what to install (a C compiler, the
Python headers) or how to do without (issue 14). ``RETEST_PURE_PYTHON=1`` opts out of the
native runner explicitly: the package then installs without it and ``run()`` uses the
``subprocess`` backend (logged once at ERROR when it is first used).

The shepherd is built without any libc by default (issue 15): ``ext/nolibc.c`` gives it its
own ``_start`` and system-call layer, so a run pays no libc start-up (a static glibc spends
~0.6 ms per start in CPU-feature probing on a VM). ``RETEST_SHEPHERD_LIBC`` picks another
build (``musl`` when musl-gcc is installed, ``glibc``); sanitizer builds always link the
shepherd against glibc, dynamically, since the sanitizer runtimes need a libc.

The shepherd is linked stripped (``-s``): it ships in every wheel, and its symbols only
matter to a debugger. ``RETEST_STRIP=0`` keeps them; sanitizer builds always do.
"""

import os
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CFLAGS = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-fvisibility=hidden"]
if os.environ.get("RETEST_WERROR", "").strip().lower() in ("1", "true", "yes", "on"):
    CFLAGS.append("-Werror")
SANITIZE = os.environ.get("RETEST_SANITIZE", "")  # e.g. "address,undefined" for the CI check
if SANITIZE:
    CFLAGS += [f"-fsanitize={SANITIZE}", "-fno-omit-frame-pointer", "-O1", "-g"]
STRIP = [] if SANITIZE or os.environ.get("RETEST_STRIP") == "0" else ["-s"]

#: What a failed native build says, after its own error (issue 14: a bare "No such file or
#: directory: 'gcc'" told nobody what to do).
HOW_TO_FIX = """\
retest: the native runner (a C extension and a small static helper) could not be built.
  It needs a C compiler and the Python headers. On Debian/Ubuntu:
      apt-get install gcc python3-dev          (Fedora/RHEL: dnf install gcc python3-devel)
  or install a prebuilt manylinux wheel (no compiler needed), or install without the
  native runner (no process-tree containment; run() uses the subprocess backend):
      RETEST_PURE_PYTHON=1 pip install retest"""


def native_build_failed(why):
    """Stop the build with ``why`` and what to do about it."""
    sys.exit(f"retest: {why}\n{HOW_TO_FIX}")

EXT_SOURCES = ["ext/_proc_group.c", "ext/run.c", "ext/capture.c", "ext/tailpipe.c",
               "ext/classify.c", "ext/cgroup.c",
               "ext/evidence.c", "ext/pool.c", "ext/fingerprint.c", "ext/child.c"]
SHEPHERD_SOURCES = ["ext/shepherd.c", "ext/cgroup.c"]
#: The no-libc shepherd: its own runtime, nothing from the system but the headers. No stack
#: protector or fortify wrappers (they call into libc), no PIE (no self-relocation needed),
#: no builtins in nolibc.c (gcc would turn its memcpy loop into a call to memcpy).
NOLIBC_SOURCES = [*SHEPHERD_SOURCES, "ext/nolibc.c"]
NOLIBC_FLAGS = ["-ffreestanding", "-fno-builtin", "-fno-tree-loop-distribute-patterns",
                "-fno-stack-protector", "-fno-pie", "-no-pie", "-fno-asynchronous-unwind-tables",
                "-U_FORTIFY_SOURCE", "-static", "-nostdlib"]
NOLIBC_MACHINES = ("x86_64", "aarch64")


class BuildWithShepherd(build_ext):
    """Build the extension, then the shepherd executable next to it."""

    def run(self):
        super().run()
        if not self.extensions:
            return
        self._build_shepherd()

    def build_extensions(self):
        self._check_toolchain()
        try:
            super().build_extensions()
        except Exception as err:  # CompileError, LinkError, DistutilsExecError: all say the same
            native_build_failed(f"building the extension failed: {err}")

    def _check_toolchain(self):
        """Fail early and plainly when the compiler or Python.h is missing."""
        compiler = getattr(self.compiler, "compiler_so", None) or ["cc"]
        if shutil.which(compiler[0]) is None:
            native_build_failed(f"no C compiler: {compiler[0]!r} is not on PATH")
        include = sysconfig.get_paths().get("include") or ""
        if not os.path.exists(os.path.join(include, "Python.h")):
            native_build_failed(f"the Python headers are missing: no Python.h in {include!r}")

    def _build_shepherd(self):
        ext_path = self.get_ext_fullpath("retest._proc_group")
        out_dir = os.path.dirname(os.path.abspath(ext_path))
        os.makedirs(out_dir, exist_ok=True)
        target = os.path.join(out_dir, "_retest_shepherd")
        libc = _setting("RETEST_SHEPHERD_LIBC")
        if not SANITIZE and libc == "none" and self._build_shepherd_without_libc(target):
            return
        if not SANITIZE and libc in ("none", "musl") and self._build_shepherd_with_musl(target):
            os.chmod(target, 0o755)
            return
        try:
            objects = self.compiler.compile(SHEPHERD_SOURCES, output_dir=self.build_temp,
                                            extra_postargs=CFLAGS)
        except Exception as err:
            native_build_failed(f"building the shepherd failed: {err}")
        if SANITIZE:
            # Sanitizer runtimes need the dynamic loader: the checked build links dynamically.
            self.compiler.link_executable(objects, target, extra_postargs=[f"-fsanitize={SANITIZE}"])
        else:
            # Static when possible: the shepherd runs once per command, and a static binary
            # skips the dynamic loader (measured: about 80 us of each run's spawn cost).
            try:
                self.compiler.link_executable(objects, target, extra_postargs=["-static", *STRIP])
            except Exception as err:  # no static libc: fall back to a dynamic link
                self.announce(f"static link of the shepherd failed ({err}); linking dynamically", 2)
                self.compiler.link_executable(objects, target, extra_postargs=STRIP)
        os.chmod(target, 0o755)

    def _build_shepherd_without_libc(self, target):
        """Link the shepherd with its own runtime (ext/nolibc.c) and no libc; return success.

        Checked before it is used: run without its control socket, a working shepherd exits
        125 at once. On another architecture, or with a compiler that cannot do it, the libc
        build is used instead (said on the build's output).
        """
        machine = os.uname().machine
        if machine not in NOLIBC_MACHINES:
            self.announce(f"no-libc shepherd: not written for {machine}; linking a libc", 2)
            return False
        compiler = (getattr(self.compiler, "compiler_so", None) or ["cc"])[0]
        cmd = [compiler, *CFLAGS, *NOLIBC_FLAGS, *STRIP, "-Iext", "-o", target, *NOLIBC_SOURCES,
               "-lgcc"]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=120)
            os.chmod(target, 0o755)
            check = subprocess.run([target], capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as err:
            detail = getattr(err, "stderr", b"") or b""
            self.announce(f"no-libc build of the shepherd failed ({err}: {detail[-500:]!r}); "
                          "linking a libc", 2)
            return False
        if check.returncode != 125:
            self.announce(f"no-libc shepherd failed its check (exit {check.returncode}); "
                          "linking a libc", 2)
            return False
        self.announce("shepherd linked without libc (ext/nolibc.c)", 2)
        return True

    def _build_shepherd_with_musl(self, target):
        """Link the shepherd statically against musl when musl-gcc is installed.

        A static glibc binary spends ~0.4 ms of every start in CPU-feature detection (CPUID,
        which traps to the hypervisor on a VM); musl's start-up does not: measured 1.45x
        instead of 1.9x the posix_spawn floor per run. Optional: without musl-gcc, or if it
        fails, the glibc build is used. Tried when RETEST_SHEPHERD_LIBC is musl, or when the
        default no-libc build is impossible here.
        """
        musl = shutil.which("musl-gcc")
        if not musl:
            return False
        cmd = [musl, "-static", *STRIP, *CFLAGS, "-Iext", "-o", target, *SHEPHERD_SOURCES]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as err:
            detail = getattr(err, "stderr", b"") or b""
            self.announce(f"musl build of the shepherd failed ({err}: {detail[-500:]!r}); "
                          "using glibc", 2)
            return False
        self.announce("shepherd linked statically with musl", 2)
        return True


def _setting(name):
    """A build setting read by retest.config itself (the package is not importable yet): one
    vocabulary everywhere, so RETEST_PURE_PYTHON=true means what =1 means (issue 13)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "python", "retest", "config.py")
    spec = importlib.util.spec_from_file_location("_retest_build_config", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module.read(name)


def extensions():
    if _setting("RETEST_PURE_PYTHON"):
        print("retest: RETEST_PURE_PYTHON: building without the native runner", file=sys.stderr)
        return []
    if not sys.platform.startswith("linux"):
        print(f"retest: the native runner needs Linux; {sys.platform} gets the subprocess backend",
              file=sys.stderr)
        return []
    return [
        Extension(
            "retest._proc_group",
            sources=EXT_SOURCES,
            depends=["ext/proc_group.h", "ext/protocol.h", "ext/cgroup.h", "ext/capture.h", "ext/tailpipe.h",
                     "ext/evidence.h", "ext/pidfd.h", "ext/fnv.h", "ext/keptfd.h"],
            extra_compile_args=CFLAGS,
            extra_link_args=[f"-fsanitize={SANITIZE}"] if SANITIZE else STRIP,
        )
    ]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildWithShepherd},
)
