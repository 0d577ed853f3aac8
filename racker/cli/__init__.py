"""The racker command. The only module that prints for people and calls exit.

Exit status: a command run in a machine passes its own status through;
racker's own failures exit 125 (as docker and podman do), so scripts can
tell "racker failed" from "your command failed".
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

from racker import __version__, errors, proc, redact, store
from racker.cli import host, images, machines, reports

EXIT_RACKER_FAILED = 125


VM_VERBS = ("promote", "vm")


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The full parser; the promote and vm commands only when argv may use them.

    Building those imports the promote package (about 25 ms), which every
    `racker run` would otherwise pay. racker's own options take no values,
    so the first word that is not an option is the command.
    """
    parser = argparse.ArgumentParser(prog="racker", description="Boot OS images under systemd-nspawn and QEMU, and test that they work.")
    parser.add_argument("--version", action="version", version=f"racker {__version__}")
    parser.add_argument("--debug", action="store_true", help="log every command and show tracebacks")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")

    def verb(name: str, func, help: str) -> argparse.ArgumentParser:  # type: ignore[no-untyped-def]
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    host.add_commands(verb, sub)
    images.add_commands(verb, sub)
    machines.add_commands(verb, sub)
    reports.add_commands(verb, sub)

    command = next((word for word in (argv or []) if not word.startswith("-")), None)
    if argv is None or command is None or command in VM_VERBS:
        from racker.cli import vm as cli_vm

        cli_vm.add_commands(verb, sub)
    return parser


def _command_and_options(parser: argparse.ArgumentParser, argv: list[str], args: argparse.Namespace) -> argparse.Namespace:
    """Split what follows IMAGE (or NAME) into options and the command; never take an option for the command.

        racker run IMAGE -- CMD ARGS            racker run IMAGE --name x -t -- CMD ARGS
        racker run IMAGE CMD ARGS               (CMD does not start with -; any -- after it is CMD's own)
        racker run IMAGE                        (a login shell)

    Verbs that take a command declare command_follows = (dest, what, usage) with their `command` REMAINDER.
    """
    if getattr(args, "command", None) is None:
        return args
    dest, what, usage = args.command_follows
    after = _words_after(argv, getattr(args, dest), args.command)
    if not after or not after[0].startswith("-"):
        args.command = after
        return args
    if after[0] == "--":
        args.command = after[1:]
        return args
    if "--" not in after:
        raise errors.RackerError(f"{after[0]!r} follows {what}: put options before {what}, or the command after --", hint=usage)
    cut = after.index("--")
    head = argv[: len(argv) - len(after)]  # ends with the IMAGE (or NAME)
    options, command = after[:cut], after[cut + 1 :]
    reparsed = parser.parse_args([*head[:-1], *options, head[-1]])
    if getattr(reparsed, dest) != head[-1] or reparsed.command:
        stray = getattr(reparsed, dest) if getattr(reparsed, dest) != head[-1] else reparsed.command[0]
        raise errors.RackerError(f"only options may come between {what} and --, not {stray!r}", hint=usage)
    reparsed.command = command
    return reparsed


def _words_after(argv: list[str], value: str, remainder: list[str]) -> list[str]:
    """Every word after the IMAGE (or NAME) as typed: argparse's REMAINDER, with the `--` that some
    Python versions drop from its start put back."""
    start = len(argv) - len(remainder)
    if argv[start - 1] != value and argv[start - 1] == "--" and argv[start - 2] == value:
        start -= 1
    return argv[start:]


def _raise_interrupted(signum: int, _frame: object) -> None:
    raise errors.Interrupted(signum)


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line as main() reads it; RackerError for a misplaced option (argparse exits for the rest)."""
    parser = build_parser(argv)
    return _command_and_options(parser, argv, parser.parse_args(argv))


def _print_error(error: errors.RackerError) -> int:
    # Every message names its URLs redacted already; this is the last guard before the terminal.
    print(f"racker: error: {redact.text(str(error))}", file=sys.stderr)
    if error.hint:
        print(redact.text(error.hint), file=sys.stderr)
    return EXIT_RACKER_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse(argv)
    except errors.RackerError as error:
        return _print_error(error)
    proc.DEBUG = proc.DEBUG or args.debug
    store.narrow_umask()
    # SIGINT and SIGTERM unwind the stack, so every `finally` and `with` cleans
    # up. SIGINT explicitly: a shell starts background jobs with it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("racker: interrupted", file=sys.stderr)
        return 130
    except errors.Interrupted as interrupted:
        print("racker: interrupted", file=sys.stderr)
        return 128 + interrupted.signum
    except errors.RackerError as error:
        if args.debug:
            raise
        return _print_error(error)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
