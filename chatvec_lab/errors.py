"""Errors with one-line messages that say which file or tensor and why."""


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


def require_bool(**flags) -> None:
    """Refuse a flag that is not a bool: ``overwrite="no"`` is truthy, and would replace a folder."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise UsageError(f"{name} must be True or False, not {value!r}")
