"""The ``retest`` command line: ``retest run``, ``retest gate``, ``retest serve``."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from typing import Optional, Sequence

from . import proc_group

log = logging.getLogger("retest")

#: Exit statuses of ``retest run``, as GNU ``timeout``.
EXIT_TIMEOUT = 124
EXIT_INTERNAL = 125
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0: {text!r}")
    return value


def _add_run_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser(
        "run",
        help="run a command as a contained process tree",
        description="Run CMD in its own session under the runner. Exit status: CMD's own; "
        "124 when the deadline fired; 125 internal error; 126 cannot execute; 127 not found.",
    )
    p.add_argument("--timeout", type=_positive_float, default=None, metavar="S",
                   help="deadline in seconds (default: none)")
    p.add_argument("--grace", type=_positive_float, default=None, metavar="S",
                   help="seconds between SIGTERM and SIGKILL (default: RETEST_KILL_GRACE_S or 5)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object with the verdict and the run's figures on stdout")
    p.add_argument("--quiet", "-q", action="store_true",
                   help="do not stream the command's output (it is still captured)")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")
    p.set_defaults(func=_cmd_run)


def _stream(stream: str, chunk: bytes) -> None:
    target = sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer
    target.write(chunk)
    target.flush()


def run_exit_status(result: proc_group.RunResult) -> int:
    """Map a run to ``retest run``'s exit status (as GNU ``timeout``)."""
    if result.timed_out:
        return EXIT_TIMEOUT
    if result.returncode is None:
        # spawn_error starts with the stage that failed: "exec", "chdir", "spawn", ...
        if (result.spawn_error or "").startswith("exec "):
            return EXIT_NOT_FOUND if result.spawn_errno in (errno.ENOENT, errno.ENOTDIR) \
                else EXIT_CANNOT_EXECUTE
        return EXIT_INTERNAL
    if result.returncode < 0:
        return 128 - result.returncode
    return result.returncode


def _cmd_run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("retest run: no command given (usage: retest run [options] -- CMD [ARG...])",
              file=sys.stderr)
        return EXIT_INTERNAL
    stream = None if (args.quiet or args.json) else _stream
    result = proc_group.run(command, timeout=args.timeout, grace=args.grace, on_output=stream)
    verdict = proc_group.classify(result)
    status = run_exit_status(result)
    if args.json:
        doc = result.to_dict()
        doc.update(verdict=verdict.kind, rule=verdict.rule, reason=verdict.reason,
                   infra=verdict.infra, exit_status=status)
        print(json.dumps(doc, sort_keys=True))
    print(f"retest: {verdict.kind} ({verdict.rule}): {verdict.reason} "
          f"[{result.duration_s:.2f}s, backend={result.backend}, exit={status}]", file=sys.stderr)
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retest",
        description="Re-run a test suite as a contained process tree; gate merges on the verdict.",
    )
    parser.add_argument("--log-level", default=os.environ.get("RETEST_LOG_LEVEL", "WARNING"),
                        help="logging level (default: RETEST_LOG_LEVEL or WARNING)")
    sub = parser.add_subparsers(dest="subcommand", metavar="{run,gate,serve}")
    _add_run_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=str(args.log_level).upper(), format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("retest: interrupted", file=sys.stderr)
        return 130
    except Exception:  # an internal error is exit 125, never a traceback-less crash
        log.exception("retest %s: internal error", args.subcommand)
        return EXIT_INTERNAL
