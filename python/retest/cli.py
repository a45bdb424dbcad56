"""The ``retest`` command line: ``retest run``, ``retest gate``, ``retest serve``.

What it prints itself (``--json`` documents, verdict lines, log records) never holds the
values of secret environment variables (``retest.redact``): masked in the untrusted fields
only (the command's output before it is classified, its argv, a decision's branch and
reason...), never in the verdict, rule, action or keys. ``retest run`` without ``--json`` or
``--quiet`` streams the command's own output through unchanged.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sys
from typing import Optional, Sequence

from . import probe, proc_group, progress, redact
from .config import LOG_LEVELS

log = logging.getLogger("retest")

#: Exit statuses of ``retest run``, as GNU ``timeout``.
EXIT_TIMEOUT = 124
EXIT_INTERNAL = 125
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127
#: ``--fail-on-leak``: the command exited 0 but left processes behind.
EXIT_LEAKED = 1


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
    p.add_argument("--fail-on-leak", action="store_true", default=None,
                   help="fail a run that passed but left processes behind (verdict "
                   "other.leaked-processes, exit 1; default: RETEST_FAIL_ON_LEAK)")
    p.add_argument("--no-progress", action="store_true",
                   help="no live progress line for a pytest command (drawn only on a terminal)")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")
    p.set_defaults(func=_cmd_run)


class _OutputClosed(Exception):
    """Our stdout or stderr is a pipe whose reader went away (``retest run ... | head``)."""


def _stream(stream: str, chunk: bytes) -> None:
    target = sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer
    try:
        target.write(chunk)
        target.flush()
    except BrokenPipeError as err:
        # Raising from on_output makes run() take the tree down before it propagates.
        raise _OutputClosed(stream) from err


def _around_progress(live: "progress.Progress",
                     stream: Optional[proc_group.OutputCallback]) -> Optional[proc_group.OutputCallback]:
    """The output callback with the progress line cleared before each chunk and redrawn after."""
    if stream is None:
        return None

    def write(name: str, chunk: bytes) -> None:
        live.clear()
        stream(name, chunk)
        if chunk.endswith(b"\n"):
            live.redraw()

    return write


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
    stream: Optional[proc_group.OutputCallback] = None if (args.quiet or args.json) else _stream
    live = None
    if not args.no_progress and progress.wanted(sys.stderr) and probe.is_pytest_argv(command):
        live = progress.Progress(sys.stderr)
        stream = _around_progress(live, stream)
    try:
        result = proc_group.run(command, timeout=args.timeout, grace=args.grace, on_output=stream,
                                on_event=live.on_event if live is not None else None)
    finally:
        if live is not None:
            live.clear()
    status = run_exit_status(result)
    # Masked before it is classified: the reason quotes the output, never the secrets in it.
    result = redact.redact_result(result, redact.FILTER.secrets())
    verdict = proc_group.classify(result, fail_on_leak=args.fail_on_leak)
    if verdict.rule == "other.leaked-processes":
        status = EXIT_LEAKED
    if args.json:
        doc = result.to_dict()
        doc.update(verdict=verdict.kind, rule=verdict.rule, reason=verdict.reason,
                   infra=verdict.infra, evidence=verdict.evidence, exit_status=status)
        print(json.dumps(doc, sort_keys=True))
    print(f"retest: {verdict.kind} ({verdict.rule}): {verdict.reason} "
          f"[{result.duration_s:.2f}s, backend={result.backend}, containment={result.containment}, "
          f"exit={status}]", file=sys.stderr)
    return status


#: Exit statuses of ``retest gate``, one per action (merge and skip-merge are success).
GATE_EXIT_STATUS = {
    "merge": 0,
    "skip-merge": 0,
    "rollback": 1,
    "hold": 3,
    "requeue": 75,  # EX_TEMPFAIL: try again later
}
GATE_EXIT_USAGE = 2


def _add_gate_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser(
        "gate",
        help="re-test a branch rebased onto its target and decide: merge, rollback, requeue, hold",
        description="Rebase BRANCH onto ONTO in a temporary detached worktree (your checkout is "
        "never touched, nothing is pushed), run MERGE_RETEST_COMMAND there under the runner, "
        "classify the run and route it. Exit status: 0 merge or skip-merge, 1 rollback, "
        "3 hold, 75 requeue, 2 usage error.",
    )
    p.add_argument("--repo", required=True, metavar="PATH", help="the git repository")
    p.add_argument("--branch", required=True, metavar="B", help="the branch to re-test")
    p.add_argument("--onto", default="main", metavar="REF", help="the target branch (default: main)")
    p.add_argument("--validated-sha", default=None, metavar="SHA",
                   help="the commit CI/tester/staging validated (enables skip-when-current)")
    p.add_argument("--task", default=None, metavar="ID",
                   help="task id keying retry budgets and alerts (default: the branch name)")
    p.add_argument("--timeout", default=None, metavar="S",
                   help="re-test deadline in seconds (default: MERGE_RETEST_TIMEOUT_S or 900)")
    p.add_argument("--command", default=None, metavar="CMD",
                   help="the suite, split like a shell would but never run by one "
                   "(default: MERGE_RETEST_COMMAND or 'python -m pytest -q')")
    p.add_argument("--ledger", default=None, metavar="PATH",
                   help="a SQLite ledger (default: RETEST_LEDGER_URL's PostgreSQL ledger, else "
                   "RETEST_LEDGER_PATH or $XDG_STATE_HOME/retest/ledger.sqlite3)")
    p.add_argument("--json", action="store_true", help="print the decision as one JSON object")
    p.set_defaults(func=_cmd_gate)


def _cmd_gate(args: argparse.Namespace) -> int:
    from . import config, merge_gate
    from .ledger import Ledger

    settings = config.GateSettings.from_env()
    ledger = Ledger(args.ledger, busy_timeout_s=settings.ledger_busy_timeout_s) if args.ledger else None
    try:
        # Issue 12: SIGTERM/SIGINT/SIGHUP remove the worktree and release the lock before exit.
        with merge_gate.exit_cleanly_on_signals():
            decision = merge_gate.retest_branch(
                args.repo, args.branch, onto=args.onto, task_id=args.task,
                validated_sha=args.validated_sha, command=args.command, timeout=args.timeout,
                settings=settings, ledger=ledger,
            )
    except merge_gate.GateSignalled as stop:
        print(f"retest gate: {stop}; the worktree was cleaned up and the lock released",
              file=sys.stderr)
        return 128 + stop.signum
    doc = redact.redact_decision(decision.to_dict(), redact.FILTER.secrets())
    if args.json:
        print(json.dumps(doc, sort_keys=True))
    else:
        print(f"retest gate: {doc['action']} -> {doc['stage']} ({doc['verdict']}, {doc['rule']}): "
              f"{doc['reason']} [attempt {doc['attempt']}, {decision.duration_s:.2f}s"
              f"{', alert sent' if decision.alert else ''}]")
    return GATE_EXIT_STATUS.get(decision.action, EXIT_INTERNAL)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0..65535: {text!r}")
    return value


def _add_serve_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser(
        "serve",
        help="serve the read-only merge-gate status: GET /queue (JSON), GET /metrics (Prometheus)",
        description="Serve GET /queue and GET /metrics from the shared ledger until SIGTERM/SIGINT.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8765, help="port (default: 8765; 0: any free port)")
    p.add_argument("--ledger", default=None, metavar="PATH",
                   help="the SQLite ledger to read (default: RETEST_LEDGER_URL's PostgreSQL "
                   "ledger, else RETEST_LEDGER_PATH or the XDG default)")
    p.add_argument("--port-file", default=None, metavar="PATH",
                   help="once listening, write {host, port, pid} as JSON to PATH (atomically)")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    from . import config, status
    from .ledger import Ledger, LedgerBackend, open_ledger

    settings = config.GateSettings.from_env()
    # --ledger PATH: that SQLite file; else the configured backend (RETEST_LEDGER_URL or SQLite).
    ledger: LedgerBackend = Ledger(args.ledger, busy_timeout_s=settings.ledger_busy_timeout_s) \
        if args.ledger else open_ledger()
    try:
        server = status.make_server(args.host, args.port, ledger=ledger)
    except OSError as err:
        print(f"retest serve: cannot listen on {args.host}:{args.port}: {err.strerror}", file=sys.stderr)
        return EXIT_INTERNAL
    bound = server.server_address
    host = bound[0] if isinstance(bound[0], str) else bound[0].decode()
    port = int(bound[1])
    print(f"retest serve: listening on http://{host}:{port} (GET /queue, GET /metrics)",
          file=sys.stderr, flush=True)
    if args.port_file:
        tmp = f"{args.port_file}.tmp.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump({"host": host, "port": port, "pid": os.getpid()}, handle)
        os.replace(tmp, args.port_file)
    status.serve_forever(server)
    return 0


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"not one of {', '.join(LOG_LEVELS)}: {text!r}")
    return level


def _configure_logging(level: Optional[str]) -> None:
    """Logging for the CLI, every handler masked; an invalid RETEST_LOG_LEVEL is one warning."""
    from . import config

    logging.basicConfig(level=level or "WARNING", format="%(levelname)s %(name)s: %(message)s")
    # On the handlers: a logger's own filters never see records propagated from its children.
    for handler in logging.getLogger().handlers:
        redact.install(handler)
    redact.install(log)
    if level is None:  # read after the handlers exist, so its own warning is shown
        logging.getLogger().setLevel(config.log_level())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retest",
        description="Re-run a test suite as a contained process tree; gate merges on the verdict.",
    )
    parser.add_argument("--log-level", default=None, type=_log_level,
                        help="logging level: DEBUG, INFO, WARNING, ERROR or CRITICAL "
                        "(default: RETEST_LOG_LEVEL or WARNING)")
    sub = parser.add_subparsers(dest="subcommand", metavar="{run,gate,serve}")
    _add_run_parser(sub)
    _add_gate_parser(sub)
    _add_serve_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The CLI; never exits 1 unless the command's own outcome is 1 (``retest gate``:
    rollback): a crash is 125, whatever it was (issue 13)."""
    try:
        return _main(argv)
    except SystemExit:
        raise  # argparse: 2 for usage errors, 0 for --help
    except KeyboardInterrupt:
        print("retest: interrupted", file=sys.stderr)
        return 130
    except BaseException:  # an exit status must never read as a rollback
        try:
            log.exception("retest: internal error")
        except BaseException:
            pass
        return EXIT_INTERNAL


def _main(argv: Optional[Sequence[str]]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.log_level)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except (_OutputClosed, BrokenPipeError):
        # As GNU tools that die of SIGPIPE: quietly, with 128 + SIGPIPE (the tree is down).
        # Python would still flush the dead stream at exit and complain: point both at null.
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.dup2(null, sys.stderr.fileno())
        os.close(null)
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt:
        print("retest: interrupted", file=sys.stderr)
        return 130
    except Exception:  # an internal error is exit 125, never a traceback-less crash
        log.exception("retest %s: internal error", args.subcommand)
        return EXIT_INTERNAL
