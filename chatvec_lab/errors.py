"""Errors with one-line messages that say which file or tensor and why, the parser that prints them, and the
one check that values are finite (no NaN, no ±Inf)."""
import argparse
import math


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


class ChatVecWarning(UserWarning):
    """Something the user should know that does not stop the run (a cache that could not be written, say). The CLI
    prints it as one ``chatvec CMD: warning: …`` line."""


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


def count_nonfinite(values) -> int:
    """How many of ``values`` (a tensor, or one number) are NaN or ±Inf; 0 for a tensor of integers.

    The lab's one finite check. A tensor's sum is finite only if every value is, so a finite tensor costs one cheap
    pass; the exact count is made only when the sum is not finite (a sum can also overflow while every value is
    finite: then the count is 0). A number stands for itself, or for a tensor it sums up (a largest |value|, a sum
    of squares): 1 when it is not finite."""
    if not hasattr(values, "is_floating_point"):
        return 0 if math.isfinite(values) else 1
    if not values.is_floating_point() or bool(values.sum().isfinite()):
        return 0
    return int((~values.isfinite()).sum())


def check_finite(values, what: str) -> None:
    """Raise a :class:`NonFiniteError` if ``values`` (see :func:`count_nonfinite`) are not all finite: "``what``
    holds 3 NaN/Inf values" for a tensor; for a number, which cannot say how many, "``what`` holds NaN/Inf values".
    ``what`` names the tensor and where it comes from, e.g. "tensor 'w' in the vector"."""
    bad = count_nonfinite(values)
    if bad:
        how_many = f" {bad}" if hasattr(values, "is_floating_point") else ""
        raise NonFiniteError(f"{what} holds{how_many} NaN/Inf values")


def clip(text: str, limit: int = 200) -> str:
    """``text`` for a one-line message: at most ``limit`` characters (a hostile file's value, quoted, stays short)."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


def one_line(message) -> str:
    """A message on one line (paths and tensor names stay readable in a terminal and in logs); control characters
    (a terminal's escape sequences from a tampered file, say) are shown escaped, never sent to the terminal."""
    text = " ".join(str(message).split())
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line, like every other refusal (``--help`` still shows the usage)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")
