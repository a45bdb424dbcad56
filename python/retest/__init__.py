"""retest: re-run a test suite as a contained process tree and gate a merge on the verdict."""

from .proc_group import RunResult, Verdict, classify, run

__all__ = ["RunResult", "Verdict", "classify", "run", "__version__"]
__version__ = "0.1.0"
