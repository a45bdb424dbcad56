"""The ``retest`` command line: ``retest run``, ``retest gate``, ``retest serve``.

What it prints itself (``--json`` documents, verdict lines, log records) never holds the
values of secret environment variables (``retest.redact``): masked in the untrusted fields
only (the command's output before it is classified, its argv, a decision's branch and
reason...), never in the verdict, rule, action or keys. ``retest run`` without ``--json`` or
``--quiet`` streams the command's own output through unchanged.

Usage errors (an unknown option, a bad duration or signal, no command, a gate's repository
or branch that does not exist) exit 2 with the sub-command's own usage, as argparse does;
125 stays "internal error" (DESIGN.md). ``retest run`` also takes GNU ``timeout``'s options
and ``retest run DURATION CMD`` as a drop-in; the differences are in README.md.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import os
import re
import signal
import sys
from typing import NoReturn, Optional, Sequence

from . import __version__, probe, proc_group, progress, redact
from .config import LOG_LEVELS

log = logging.getLogger("retest")

#: Exit statuses of ``retest run``, as GNU ``timeout``.
EXIT_TIMEOUT = 124
EXIT_INTERNAL = 125
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127
#: ``--fail-on-leak``: the command exited 0 but left processes behind.
EXIT_LEAKED = 1
#: A usage error (argparse's own status): not 125, which GNU ``timeout`` also uses for its
#: usage errors but DESIGN.md keeps for "internal error".
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose sub-commands report unknown arguments with their own usage.

    Plain argparse hands a sub-parser's leftovers up to the top-level parser, so ``retest run
    --bogus`` printed ``retest``'s usage, not ``retest run``'s.
    """

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        parsed, extras = super().parse_known_args(args, namespace)
        if extras and self.prog != "retest":
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


#: GNU ``timeout``'s duration suffixes.
_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(?P<number>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?|inf(?:inity)?)"
                       r"(?P<unit>[smhd]?)$", re.IGNORECASE)
#: What a mistyped duration looks like (``15x``, ``-1``, ``1..5m``), as opposed to a command name.
_DURATION_LIKE = re.compile(r"^\s*[-+]?(?:[0-9]|\.[0-9])|^\s*inf(?:inity)?[smhd]?$", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """Seconds in ``text``: a number with an optional ``s``/``m``/``h``/``d`` suffix, as GNU
    ``timeout`` reads it (``inf`` too); ``ValueError`` otherwise. ``0`` means no deadline."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"invalid time interval {text!r}")
    value = float(match["number"]) * _DURATION_UNITS[match["unit"].lower()]
    if math.isnan(value):
        raise ValueError(f"invalid time interval {text!r}")
    return value


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_signal(text: str) -> signal.Signals:
    """A signal by number or by name, with or without ``SIG``, any case (as GNU ``timeout -s``)."""
    name = text.strip().upper()
    try:
        if name.isdigit():
            return signal.Signals(int(name))
        return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
    except (KeyError, ValueError):
        raise ValueError(f"{text!r}: invalid signal") from None


def _signal(text: str) -> signal.Signals:
    try:
        return parse_signal(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0: {text!r}")
    return value


def _grace(text: str) -> float:
    value = _duration(text)
    if value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be finite: {text!r}")
    return value


def _add_run_parser(sub: "argparse._SubParsersAction[_Parser]") -> None:
    p = sub.add_parser(
        "run",
        help="run a command as a contained process tree",
        usage="%(prog)s [options] [DURATION] [--] CMD [ARG...]",
        description="Run CMD in its own session under the runner. Exit status: CMD's own; "
        "124 when the deadline fired (137 when SIGKILL was needed, as GNU timeout); 125 "
        "internal error; 126 cannot execute; 127 not found; 2 usage error. GNU timeout's "
        "options and 'retest run DURATION CMD' work too. DURATION: a number with an optional "
        "suffix s, m, h or d; 0 means no deadline.",
    )
    p.add_argument("--timeout", type=_duration, default=None, metavar="DURATION",
                   help="deadline (default: none; 0: none)")
    p.add_argument("--grace", "-k", "--kill-after", dest="grace", type=_grace, default=None,
                   metavar="DURATION",
                   help="from the stop signal to SIGKILL (default: RETEST_KILL_GRACE_S or 5s)")
    p.add_argument("--signal", "-s", type=_signal, default=None, metavar="SIG",
                   help="the signal sent to the whole tree at the deadline (default: TERM)")
    p.add_argument("--preserve-status", action="store_true",
                   help="exit with CMD's own status even when the deadline fired (128+N if killed)")
    p.add_argument("--foreground", action="store_true",
                   help="accepted for GNU timeout compatibility; the tree is still contained")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="say on stderr which signals were sent to the tree")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object with the verdict and the run's figures on stdout")
    p.add_argument("--quiet", "-q", action="store_true",
                   help="do not stream the command's output (it is still captured)")
    p.add_argument("--fail-on-leak", action="store_true", default=None,
                   help="fail a run that passed but left processes behind (verdict "
                   "other.leaked-processes, exit 1; default: RETEST_FAIL_ON_LEAK)")
    p.add_argument("--no-progress", action="store_true",
                   help="no live progress line for a pytest command (drawn only on a terminal)")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="[DURATION] [--] CMD [ARG...]")
    p.set_defaults(func=_cmd_run, parser=p)


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


def run_exit_status(result: proc_group.RunResult, *, preserve_status: bool = False,
                    stop_signal: Optional[int] = None) -> int:
    """Map a run to ``retest run``'s exit status (as GNU ``timeout``).

    At the deadline: 124, or 137 when SIGKILL ended it (``-s KILL``, or something outlived
    the grace): GNU ``timeout`` sends that SIGKILL to its own process group and dies of it.
    ``preserve_status``: the command's own status instead, as ``--preserve-status``.
    """
    if result.timed_out and not preserve_status:
        if result.escalated or stop_signal == signal.SIGKILL:
            return 128 + signal.SIGKILL
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


def _run_usage_error(args: argparse.Namespace, message: str) -> NoReturn:
    parser: argparse.ArgumentParser = args.parser
    parser.error(message)


def _deadline_and_command(args: argparse.Namespace) -> tuple[Optional[float], list[str]]:
    """``[DURATION] [--] CMD...`` as GNU ``timeout`` reads it; ``0`` is no deadline."""
    command = list(args.command)
    timeout: Optional[float] = args.timeout
    if command and command[0] != "--" and _DURATION_LIKE.match(command[0]):
        if args.timeout is not None:
            _run_usage_error(args, f"a deadline is given twice: --timeout and {command[0]!r}")
        try:
            timeout = parse_duration(command.pop(0))
        except ValueError as err:
            _run_usage_error(args, str(err))
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        _run_usage_error(args, "no command given")
    return (None if timeout == 0 else timeout), command


def _say_signals(result: proc_group.RunResult, stop_signal: int, grace: Optional[float]) -> None:
    """``-v``: what GNU ``timeout -v`` says, told once the run is over (the shepherd sends the
    signals; the caller learns of them in its final report)."""
    name = signal.Signals(stop_signal).name[3:]
    command = result.args[0] if result.args else "?"
    if result.timed_out:
        print(f"retest: sent signal {name} to command {command!r} and its tree at the deadline "
              f"({result.killed_at_deadline} processes)", file=sys.stderr)
        if result.escalated:
            after = f"the {grace:g}s grace" if grace is not None else "the grace"
            print(f"retest: sent signal KILL to command {command!r} after {after}", file=sys.stderr)
    elif result.swept_after_exit:
        print(f"retest: sent signal {name} to {result.swept_after_exit} processes left behind "
              f"by command {command!r}", file=sys.stderr)


def _cmd_run(args: argparse.Namespace) -> int:
    timeout, command = _deadline_and_command(args)
    stream: Optional[proc_group.OutputCallback] = None if (args.quiet or args.json) else _stream
    live = None
    if not args.no_progress and progress.wanted(sys.stderr) and probe.is_pytest_argv(command):
        live = progress.Progress(sys.stderr)
        stream = _around_progress(live, stream)
    try:
        result = proc_group.run(command, timeout=timeout, grace=args.grace, on_output=stream,
                                on_event=live.on_event if live is not None else None,
                                stop_signal=args.signal)
    finally:
        if live is not None:
            live.clear()
    status = run_exit_status(result, preserve_status=args.preserve_status, stop_signal=args.signal)
    if args.verbose:
        _say_signals(result, args.signal or signal.SIGTERM, args.grace)
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
GATE_EXIT_USAGE = EXIT_USAGE


def _add_gate_parser(sub: "argparse._SubParsersAction[_Parser]") -> None:
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
    p.set_defaults(func=_cmd_gate, parser=p)


def _gate_usage_problem(repo: str, refs: Sequence[tuple[str, str]]) -> Optional[str]:
    """What is wrong with the command line's repository or refs, for a person at a terminal.

    ``retest_branch`` itself answers a missing branch with a decision (hold + alert), as an
    embedded caller needs; on the command line it is a typo, said plainly, exit 2.
    """
    from . import gitops

    for what, ref in refs:  # before any git process: a hostile name never reaches git
        try:
            gitops.validate_ref(ref, what)
        except gitops.InvalidRef as err:
            return str(err)
    if not os.path.isdir(repo):
        return f"no such directory: {repo}"
    env = gitops.git_env()
    try:
        gitops.common_dir(repo, env, timeout=30)
    except gitops.GitError:
        return f"not a git repository: {repo}"
    for what, ref in refs:
        try:
            gitops.rev_parse(repo, ref, env, timeout=30)
        except gitops.GitError:
            return f"no such {what} in {repo}: {ref!r}"
    return None


def _cmd_gate(args: argparse.Namespace) -> int:
    from . import config, merge_gate
    from .ledger import Ledger

    problem = _gate_usage_problem(args.repo, [("branch", args.branch), ("target branch", args.onto)])
    if problem is not None:
        args.parser.error(problem)
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


def _add_serve_parser(sub: "argparse._SubParsersAction[_Parser]") -> None:
    p = sub.add_parser(
        "serve",
        help="serve the read-only merge-gate status: GET / and /decision/ID (pages), GET /queue "
             "(JSON), GET /metrics (Prometheus)",
        description="Serve the queue page (GET /), each decision's page with its timeline "
                    "(GET /decision/ID, .json for JSON), GET /queue and GET /metrics from the "
                    "shared ledger until SIGTERM/SIGINT.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8765, help="port (default: 8765; 0: any free port)")
    p.add_argument("--ledger", default=None, metavar="PATH",
                   help="the SQLite ledger to read (default: RETEST_LEDGER_URL's PostgreSQL "
                   "ledger, else RETEST_LEDGER_PATH or the XDG default)")
    p.add_argument("--port-file", default=None, metavar="PATH",
                   help="once listening, write {host, port, pid} as JSON to PATH (atomically)")
    p.set_defaults(func=_cmd_serve, parser=p)


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
    print(f"retest serve: listening on http://{host}:{port} (GET / for people, GET /queue, GET /metrics)",
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
    parser = _Parser(
        prog="retest",
        description="Re-run a test suite as a contained process tree; gate merges on the verdict. "
        "Usage errors exit 2.",
    )
    parser.add_argument("--version", action="version", version=f"retest {__version__}")
    parser.add_argument("--log-level", default=None, type=_log_level,
                        help="logging level: DEBUG, INFO, WARNING, ERROR or CRITICAL "
                        "(default: RETEST_LOG_LEVEL or WARNING)")
    sub = parser.add_subparsers(dest="subcommand", metavar="{run,gate,serve}", parser_class=_Parser)
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
        return EXIT_USAGE
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
