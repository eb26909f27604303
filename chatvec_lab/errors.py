"""Errors with one-line messages that say which file or tensor and why, and the parser that prints them."""
import argparse


class ChatVecError(Exception):
    """Base class: bad input that the user can fix. The CLI prints the message, exit code 2."""


class SourceError(ChatVecError):
    """A model or vector could not be opened or read (missing, corrupt, unsafe format)."""


class MismatchError(ChatVecError):
    """Two models or vectors do not fit together (names, shapes, architectures)."""


class NonFiniteError(ChatVecError):
    """A tensor holds NaN or Inf."""


class OutputError(ChatVecError):
    """The output path exists, or cannot be written."""


class UsageError(ChatVecError, ValueError):
    """An argument of the wrong type or value (a bad regex, layers that are not a list of integers …)."""


class NotFound(SourceError, FileNotFoundError):
    """A file or folder the user named does not exist (still a FileNotFoundError for older callers)."""


class UnknownName(UsageError, KeyError):
    """A name that is not among the choices (a vector, a toy model, a pair): the message lists them."""

    __str__ = Exception.__str__  # KeyError would quote the message


class Unavailable(ChatVecError, RuntimeError):
    """An optional package, model weights or data that this machine lacks; the message says how to get them."""


def require_bool(**flags) -> None:
    """Refuse a flag that is not a bool: ``overwrite="no"`` is truthy, and would replace a folder."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise UsageError(f"{name} must be True or False, not {value!r}")


def one_line(message) -> str:
    """A message on one line (paths and tensor names stay readable in a terminal and in logs)."""
    return " ".join(str(message).split())


class OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line, like every other refusal (``--help`` still shows the usage)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")
