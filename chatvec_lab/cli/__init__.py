"""The ``chatvec`` command line: parsing and dispatch.

    chatvec extract | apply | info | compare | merge | sweep | atlas | demo | notebooks

Each command lives in a module of this folder, by group: ``weights`` (extract, apply, info, compare), ``merge``,
``behaviour`` (sweep, atlas), ``course`` (demo, notebooks). A module lists its commands in ``COMMANDS``, name →
``Command(help, add_arguments, run)`` (``arguments.Command``); the shared argument types and options are in
``arguments``. Adding a command is one function pair in a module and one entry in its ``COMMANDS``.

``main`` turns every error the lab raises into one line, ``chatvec CMD: error: …``, and an exit code: 2 for an
error, 128 + the signal's number when interrupted, 141 when the reader of its output went away.
"""
from __future__ import annotations

import argparse
import contextlib
import re
import os
import signal
import sys
import warnings

from chatvec_lab.cli import behaviour, course, evaluate, merge, weights
from chatvec_lab.cli.arguments import Command, join_negative_numbers
from chatvec_lab.errors import ChatVecError, ChatVecWarning, OneLineParser, one_line

# every command, in the order ``chatvec --help`` lists them
COMMANDS: dict[str, Command] = {**weights.COMMANDS, **merge.COMMANDS, **behaviour.COMMANDS, **evaluate.COMMANDS,
                                 **course.COMMANDS}


def build_parser() -> argparse.ArgumentParser:
    """The ``chatvec`` parser: one subparser per command of ``COMMANDS``."""
    from chatvec_lab.version import __version__

    p = OneLineParser(prog="chatvec", description="Chat-vector arithmetic on language models.")
    p.add_argument("--version", action="version", version=f"chatvec_lab {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        parser = sub.add_parser(name, help=command.help)
        command.add_arguments(parser)
        parser.set_defaults(func=command.run)
    return p


def flags_of_this_command(message: str, parser, command: str) -> str:
    """The library's messages name the flag that fixes a problem; where this command has no such flag, say so
    (and where it lives) instead of sending the user to a flag that does not exist here."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    own = {o for a in sub[command]._actions for o in a.option_strings}
    missing = sorted({f for f in re.findall(r"(?<![\w/.-])--[a-z][a-z-]*", message) if f not in own})
    if not missing:
        return message
    elsewhere = sorted(name for name, p in sub.items()
                       if name != command and all(f in {o for a in p._actions for o in a.option_strings} for f in missing))
    where = f" (it is a flag of: {', '.join('chatvec ' + n for n in elsewhere)}; or use the Python API)" if elsewhere \
        else " (use the Python API)"
    return f"{message} [note: chatvec {command} has no {', '.join(missing)}{where}]"


def _one_line_warning(command: str, show):
    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, ChatVecWarning):
            print(f"chatvec {command}: warning: {one_line(message)}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)
    return showwarning


def main(argv=None) -> int:
    from chatvec_lab.io.signals import Interrupted, received_signal, signals_interrupt

    argv = join_negative_numbers(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "quiet", False):  # read when transformers / the hub client are first imported, below
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        with warnings.catch_warnings(), signals_interrupt():  # SIGTERM / SIGHUP end a command as SIGINT does
            warnings.showwarning = _one_line_warning(args.command, warnings.showwarning)
            args.func(args)
            if received_signal():  # its exception was lost on the way (raised inside a finaliser, say)
                raise Interrupted(received_signal())
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. `chatvec info … | head -1`: the reader has what it wanted
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        if received_signal():  # a signal that library code turned into another error
            return _interrupted(args.command, received_signal())
        if isinstance(e, ChatVecError):
            print(f"chatvec {args.command}: error: {flags_of_this_command(one_line(e), parser, args.command)}",
                  file=sys.stderr)
            return 2
        if isinstance(e, (ValueError, OSError, KeyError)):
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            print(f"chatvec {args.command}: error: {one_line(msg)}", file=sys.stderr)
            return 2
        if isinstance(e, RecursionError):  # a file nested so deeply that a parser outside the lab gave up
            print(f"chatvec {args.command}: error: an input file is nested too deeply to be read (JSON thousands "
                  "of levels deep?)", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt as e:
        return _interrupted(args.command, e.signum if isinstance(e, Interrupted) else signal.SIGINT)
    return 0


def _interrupted(command: str, signum: int) -> int:
    print(f"chatvec {command}: interrupted by {signal.Signals(signum).name}; nothing half-written was left "
          "(outputs finished before it stay)", file=sys.stderr)
    return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
