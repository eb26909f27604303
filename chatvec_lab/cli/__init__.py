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

from chatvec_lab.cli import behaviour, course, merge, weights
from chatvec_lab.cli.arguments import Command, join_negative_numbers
from chatvec_lab.errors import ChatVecError, OneLineParser, one_line

# every command, in the order ``chatvec --help`` lists them
COMMANDS: dict[str, Command] = {**weights.COMMANDS, **merge.COMMANDS, **behaviour.COMMANDS, **course.COMMANDS}


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
    missing = sorted({f for f in re.findall(r"--[a-z][a-z-]*", message) if f not in own})
    if not missing:
        return message
    elsewhere = sorted(name for name, p in sub.items()
                       if name != command and all(f in {o for a in p._actions for o in a.option_strings} for f in missing))
    where = f" (it is a flag of: {', '.join('chatvec ' + n for n in elsewhere)}; or use the Python API)" if elsewhere \
        else " (use the Python API)"
    return f"{message} [note: chatvec {command} has no {', '.join(missing)}{where}]"


def main(argv=None) -> int:
    from chatvec_lab.io.output import Interrupted

    argv = join_negative_numbers(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. `chatvec info … | head -1`: the reader has what it wanted
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except ChatVecError as e:
        print(f"chatvec {args.command}: error: {flags_of_this_command(one_line(e), parser, args.command)}",
              file=sys.stderr)
        return 2
    except (ValueError, OSError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"chatvec {args.command}: error: {one_line(msg)}", file=sys.stderr)
        return 2
    except RecursionError:  # a file nested so deeply that a parser outside the lab gave up
        print(f"chatvec {args.command}: error: an input file is nested too deeply to be read (JSON thousands of "
              "levels deep?)", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        print(f"chatvec {args.command}: interrupted by {signal.Signals(signum).name}; no partial output was left",
              file=sys.stderr)
        return 128 + signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
