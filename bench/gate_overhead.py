#!/usr/bin/env python3
"""The merge gate's own cost per attempt (issue 12): gate wall time minus the suite's time.

Usage::

    python bench/gate_overhead.py --repo /path/to/clone [--onto master] [--runs 7] [--out bench/results.md]
    python bench/gate_overhead.py --smoke            # a generated small repository, 2 runs (CI)

For each repository (a real clone; the benchmark commits throw-away branches in it and deletes
them afterwards) it runs ``python -m retest gate`` as a process, as an orchestrator does, with
``--command true`` (a suite that costs ~1 ms), each attempt on a new one-file branch:

* ``kept``: the kept worktree, moved to each new commit (this release's default);
* ``temp``: ``MERGE_GATE_KEEP_WORKTREE_ENABLED=false``, a fresh ``git worktree add`` and
  removal per attempt (the prior behaviour);
* ``skip``: ``--validated-sha`` on a branch already on the target tip: skip-merge, proven
  before any checkout.

Overhead = the process's wall time minus ``evidence.run_duration_s`` (the suite's own time,
0 for a skip). The interpreter's start-up and imports are part of the overhead: they are part
of what a gate costs. The SQLite ledger lives in a private temporary folder. Variants
alternate (kept, temp, skip, kept, ...) so the machine's noise hits each alike; the report
gives the median and [min-max], and the first ``kept`` attempt (it builds the worktree) apart.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def git(repo: Path, *args: str, env: dict[str, str]) -> str:
    return subprocess.run(["git", "-c", "core.hooksPath=/dev/null", *args], cwd=repo, env=env,
                          check=True, capture_output=True, text=True).stdout.strip()


def branch_with_one_file(repo: Path, onto: str, name: str, env: dict[str, str]) -> str:
    """A branch off ``onto`` with one new file, made without touching the checkout."""
    blob = subprocess.run(["git", "hash-object", "-w", "--stdin"], cwd=repo, env=env, check=True,
                          input=f"# {name}\n", capture_output=True, text=True).stdout.strip()
    base_tree = git(repo, "rev-parse", f"{onto}^{{tree}}", env=env)
    index = Path(tempfile.mkdtemp()) / "index"
    idx_env = dict(env, GIT_INDEX_FILE=str(index))
    git(repo, "read-tree", base_tree, env=idx_env)
    git(repo, "update-index", "--add", "--cacheinfo", f"100644,{blob},retest_bench_{name}.txt",
        env=idx_env)
    tree = git(repo, "write-tree", env=idx_env)
    commit = git(repo, "commit-tree", tree, "-p", onto, "-m", f"bench {name}", env=env)
    git(repo, "update-ref", f"refs/heads/retest-bench/{name}", commit, env=env)
    return commit


def run_gate(repo: Path, branch: str, onto: str, env: dict[str, str], *extra: str) -> dict[str, Any]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "retest", "gate", "--repo", str(repo), "--branch",
                           branch, "--onto", onto, "--command", "true", "--json", *extra],
                          env=env, capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - started
    doc: dict[str, Any] = json.loads(proc.stdout)
    assert doc["action"] in ("merge", "skip-merge"), (doc["action"], doc["reason"])
    suite = float(doc.get("evidence", {}).get("run_duration_s") or 0.0)
    return {"wall": wall, "suite": suite, "overhead": wall - suite, "action": doc["action"],
            "checkout": doc.get("evidence", {}).get("checkout")}


def measure(repo: Path, onto: str, runs: int) -> dict[str, Any]:
    state = Path(tempfile.mkdtemp(prefix="retest-bench-state-"))
    # The gate is the installed retest (as an orchestrator runs it), its compiled runner included.
    env = dict(os.environ, RETEST_LEDGER_PATH=str(state / "ledger.sqlite3"),
               RETEST_LEDGER_URL="", MERGE_GATE_WORKTREE_DIR=str(state / "worktrees"),
               GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@localhost",
               GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@localhost")
    files = len(git(repo, "ls-tree", "-r", "--name-only", onto, env=env).splitlines())
    rows: dict[str, list[dict[str, Any]]] = {"kept-first": [], "kept": [], "temp": [], "skip": []}
    try:
        for i in range(runs + 1):
            for variant in ("kept", "temp", "skip"):
                name = f"{variant}-{i}"
                sha = branch_with_one_file(repo, onto, name, env)
                branch = f"retest-bench/{name}"
                if variant == "skip":
                    row = run_gate(repo, branch, onto, env, "--validated-sha", sha)
                elif variant == "temp":
                    row = run_gate(repo, branch, onto, dict(env, MERGE_GATE_KEEP_WORKTREE_ENABLED="false"))
                else:
                    row = run_gate(repo, branch, onto, env)
                rows["kept-first" if variant == "kept" and i == 0 else variant].append(row)
    finally:
        refs = git(repo, "for-each-ref", "--format=%(refname)", "refs/heads/retest-bench/", env=env)
        for ref in refs.splitlines():
            git(repo, "update-ref", "-d", ref, env=env)
        kept = [p for p in (state / "worktrees").glob("retest-gate-keep-*")]
        for path in kept:
            subprocess.run(["git", "worktree", "remove", "--force", "--force", str(path / "wt")],
                           cwd=repo, capture_output=True)
        subprocess.run(["git", "worktree", "prune"], cwd=repo, capture_output=True)
        subprocess.run(["rm", "-rf", str(state)])
    return {"repo": str(repo), "files": files, "rows": rows,
            "head": git(repo, "rev-parse", "--short", onto, env=env)}


def summary(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.3f} s [{min(values):.3f}-{max(values):.3f}]"


def render(results: list[dict[str, Any]], runs: int) -> str:
    lines = [f"| repository (files at the target) | kept worktree, moved (n={runs}) | first kept attempt "
             f"(builds it) | temporary worktree per attempt (prior) | skip-merge |",
             "|---|---|---|---|---|"]
    for r in results:
        rows = r["rows"]
        cells = [summary([x["overhead"] for x in rows[k]]) for k in ("kept", "kept-first", "temp", "skip")]
        lines.append(f"| {Path(r['repo']).name} @ {r['head']} ({r['files']:,} files) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def smoke_repo() -> Path:
    root = Path(tempfile.mkdtemp(prefix="retest-bench-smoke-"))
    env = dict(os.environ, GIT_AUTHOR_NAME="b", GIT_AUTHOR_EMAIL="b@l", GIT_COMMITTER_NAME="b",
               GIT_COMMITTER_EMAIL="b@l")
    subprocess.run(["git", "init", "-q", "-b", "main", str(root)], check=True)
    (root / "a.py").write_text("A = 1\n")
    git(root, "add", "a.py", env=env)
    git(root, "commit", "-q", "-m", "a", env=env)
    return root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", action="append", default=[], help="a clone to measure (repeatable)")
    parser.add_argument("--onto", default=None, help="the target branch (default: the checked-out one)")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--out", default=None, help="append the table to this file")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    repos = [Path(p).resolve() for p in args.repo] or ([smoke_repo()] if args.smoke else [])
    if not repos:
        parser.error("--repo PATH (or --smoke)")
    runs = 2 if args.smoke else args.runs
    results = []
    for repo in repos:
        onto = args.onto or subprocess.run(["git", "branch", "--show-current"], cwd=repo,
                                           capture_output=True, text=True, check=True).stdout.strip()
        results.append(measure(repo, onto, runs))
    table = render(results, runs)
    print(table)
    for r in results:
        print(json.dumps({"repo": r["repo"], **{k: [round(x["overhead"], 3) for x in v]
                                               for k, v in r["rows"].items()}}))
    if args.out:
        with open(args.out, "a", encoding="utf-8") as handle:
            handle.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
