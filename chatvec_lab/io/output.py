"""Writing outputs: paths checked before any work, folders and files that appear whole or not at all.

``check_output_path`` refuses an output that exists (unless overwritten), that is, holds or sits in an input,
or that cannot be written, before any work. ``atomic_folder`` / ``atomic_file`` give a temporary folder (file)
beside the output that becomes it only when complete, never replacing what appeared meanwhile; killed runs'
leftovers are cleaned up and signals interrupt cleanly. What goes into the folder (sharded safetensors) is
written by :mod:`chatvec_lab.io.shards`.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
import sys
from pathlib import Path
from typing import Iterable, Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows
    fcntl = None

from chatvec_lab.errors import OutputError, require_bool
from chatvec_lab.io.signals import Interrupted, check_interrupted, received_signal, signals_held, signals_interrupt  # noqa: F401 (re-exported)

log = logging.getLogger("chatvec_lab")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _check_clear_of_inputs(out, target: Path, inputs: Iterable) -> None:
    for inp in inputs:
        if inp is None:
            continue
        real = Path(inp).expanduser().resolve()
        for o in {target, target.resolve()}:
            how = "is" if o == real else "is inside" if _inside(o, real) else "contains" if _inside(real, o) else None
            if how:
                raise OutputError(f"output {out!s} {how} the input {inp!s}: choose an output outside every input")


def check_clear_of_inputs(path, inputs: Iterable) -> Path:
    """Refuse a folder this run writes into (a cache, say) that is, contains or sits inside one of ``inputs``."""
    if not isinstance(path, (str, os.PathLike)) or isinstance(path, bytes):
        raise OutputError(f"the path must be a str or os.PathLike, not {type(path).__name__}")
    try:
        target = Path(path).expanduser().absolute()
        target = target.parent.resolve() / target.name
        _check_clear_of_inputs(path, target, inputs)
    except (OSError, ValueError) as e:
        raise OutputError(f"cannot write to {path!s}: {getattr(e, 'strerror', None) or e}") from None
    return target


def check_separate_outputs(outputs: Iterable[tuple]) -> None:
    """Refuse two outputs of one run (``(path, flag)`` pairs; a path of None is skipped) that are the same path or
    one inside the other: the second would fail, or destroy the first, after all the run's work."""
    given = [(path, flag) for path, flag in outputs if path is not None]
    try:
        resolved = [Path(path).expanduser().resolve() for path, _ in given]
    except (OSError, RuntimeError) as e:  # a loop of links …
        raise OutputError(f"cannot write to {' / '.join(str(p) for p, _ in given)}: {e}") from None
    for i, (a, flag_a) in enumerate(given):
        for j, (b, flag_b) in enumerate(given[i + 1:], i + 1):
            ra, rb = resolved[i], resolved[j]
            if ra == rb or ra in rb.parents or rb in ra.parents:
                raise OutputError(f"{flag_a} {a} and {flag_b} {b} overlap: give each output its own path")


def check_output_path(out, overwrite: bool, inputs: Iterable = (), folder: bool = True, flag: str = "") -> Path:
    """Fail before any work if ``out`` may not be written: it exists (unless ``overwrite``), it is, contains or sits
    inside one of ``inputs``, its folder cannot be written, or (a file) it is spelled as a folder. Returns the
    absolute output path. ``folder``: the output is a folder (else a file); ``flag``: named in the messages."""
    if not isinstance(out, (str, os.PathLike)) or isinstance(out, bytes):
        raise OutputError(f"the output must be a path (str or os.PathLike), not {type(out).__name__}")
    require_bool(overwrite=overwrite)
    if not folder and str(out).endswith(tuple(sep for sep in (os.sep, os.altsep) if sep)):
        # Path() would drop the separator, and a file named like the folder would be written
        raise OutputError(f"{(flag + ' ') if flag else ''}{out} ends in a path separator, but the output is a file: "
                          f"name the file (e.g. {out}table.csv)")
    try:
        return _check_output_path(out, overwrite, inputs, folder)
    except (OSError, ValueError) as e:  # a component too long, a NUL byte, a loop of links …
        raise OutputError(f"cannot write to {out!s}: {getattr(e, 'strerror', None) or e}") from None


def _check_output_path(out, overwrite: bool, inputs: Iterable, folder: bool) -> Path:
    given = Path(out).expanduser()
    if "\0" in str(given):
        raise OutputError(f"output {out!r} holds a NUL character")
    if given.name in ("", ".", ".."):
        raise OutputError(f"output {out!s} does not name a new folder")
    if len(os.fsencode(given.name)) > NAME_MAX:
        raise OutputError(f"output name {given.name[:40]}… is longer than {NAME_MAX} bytes")
    target = given.absolute().parent.resolve() / given.name
    _check_clear_of_inputs(out, target, inputs)
    if os.path.lexists(target):
        if not overwrite:
            raise OutputError(f"output {out!s} already exists (pass overwrite=True / --overwrite to replace it)")
        if target.is_symlink():
            raise OutputError(f"output {out!s} is a symbolic link: remove it, or name the folder it points to")
        if not _same_kind(target, folder):  # a device, FIFO or socket is never swapped away, not even for a moment
            raise OutputError(f"output {out!s} exists and is not a {'folder' if folder else 'regular file'}: "
                              "it is not replaced")
        if os.path.ismount(target):
            raise OutputError(f"output {out!s} is a mount point: it cannot be replaced")
    probe = given.absolute().parent
    while not os.path.lexists(probe):
        probe = probe.parent
    if probe.is_symlink() and not probe.exists():
        raise OutputError(f"cannot write to {out!s}: {probe} is a dangling symbolic link")
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to {out!s}: {probe} is not a writable folder")
    return target


# ------------------------------------------------------------------ publishing a finished folder

NAME_MAX = 255
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux's renameat2: True when done, False where this system or file system lacks it; OSError otherwise."""
    fn = _libc_renameat2()
    if fn is None:
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


@functools.lru_cache(maxsize=1)
def _libc_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, or another libc
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def _appeared(out: Path) -> OutputError:
    return OutputError(f"output {out} appeared while this run was writing: it was left untouched, "
                       "and nothing was written (pass overwrite=True / --overwrite to replace it)")


def publish(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``, which must not exist: never replaces anything, even in a race."""
    try:
        if _renameat2(tmp, out, _RENAME_NOREPLACE):
            return
    except FileExistsError:
        raise _appeared(out) from None
    if os.path.lexists(out):
        raise _appeared(out)
    try:
        if tmp.is_dir():  # a plain rename never replaces a non-empty folder or a file with a folder
            os.rename(tmp, out)
        else:  # a hard link never replaces anything
            os.link(tmp, out)
            os.unlink(tmp)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise _appeared(out) from None
        raise


def replace(tmp: Path, out: Path) -> None:
    """Swap the finished ``tmp`` (a folder or a file) with the existing ``out`` of the same kind, atomically where
    the system can, then delete the old one. What is swapped out is checked after the swap: if it turns out to be
    something else (a link, say, that appeared meanwhile), it is swapped back and left untouched.
    If ``out`` is gone meanwhile, ``tmp`` is simply published."""
    if not os.path.lexists(out):
        return publish(tmp, out)
    folder = tmp.is_dir()
    if _renameat2(tmp, out, _RENAME_EXCHANGE):
        if not _same_kind(tmp, folder):  # tmp now holds what was at ``out``
            _renameat2(tmp, out, _RENAME_EXCHANGE)
            raise _not_replaced(out, folder)
        _remove(tmp)
        return
    if not _same_kind(out, folder):
        raise _not_replaced(out, folder)
    aside = _temp_name(out, "old")
    os.rename(out, aside)
    try:
        publish(tmp, out)
    except BaseException:
        os.rename(aside, out)
        raise
    _remove(aside)


def _same_kind(path: Path, folder: bool) -> bool:
    """A real folder (or regular file) of the expected kind: no link, device, FIFO, socket or mount point."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return False
    return (stat.S_ISDIR(mode) if folder else stat.S_ISREG(mode)) and not os.path.ismount(path)


def _not_replaced(out: Path, folder: bool) -> OutputError:
    return OutputError(f"output {out} became something other than a {'folder' if folder else 'file'} while this run "
                       "was writing: it was left untouched, and nothing was written")


# ------------------------------------------------------------------ temporary folders and their leftovers

def _stem(name: str) -> str:
    """The output's name as used in its temporary folders' names: shortened (with a hash) to fit NAME_MAX."""
    if len(os.fsencode(name)) <= 180:
        return name
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:12]
    return name[:40] + "~" + digest


def _temp_name(out: Path, kind: str) -> Path:
    return out.parent / f".{_stem(out.name)}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _lock(path: Path) -> int | None:
    """Hold an exclusive lock on ``path`` (a temporary folder or file) for as long as the descriptor is open:
    the mark of a run still writing. None where locks are not to be had (then nothing is ever removed)."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0) | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


def remove_leftovers(out: Path) -> list[Path]:
    """Delete the temporary folders and files that runs writing ``out`` left when they were killed: those whose lock
    no process holds (a run still writing holds its lock, whatever its process id or namespace)."""
    pattern = re.compile(rf"^\.{re.escape(_stem(out.name))}\.partial-(\d+)-[0-9a-f]+$")
    removed = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    _restore_replaced(out, entries)
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or entry.is_symlink() or not os.path.lexists(entry):
            continue
        try:
            fd = _lock(entry)
        except OSError:
            continue  # held: a run is writing it
        if fd is None:
            continue
        try:
            _remove(entry)
        finally:
            os.close(fd)
        if not os.path.lexists(entry):
            removed.append(entry)
            log.warning("removed %s, left by an interrupted run (process %s)", entry, m.group(1))
    return removed


def _restore_replaced(out: Path, entries: list[Path]) -> None:
    """An old output moved aside by a replacement (where the system cannot swap atomically) whose process died:
    put back if nothing took its place, else (the new output was published) delete it."""
    pattern = re.compile(rf"^\.{re.escape(_stem(out.name))}\.old-(\d+)-[0-9a-f]+$")
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
            continue
        if os.path.lexists(out):
            _remove(entry)
            log.warning("removed %s, the previous output an interrupted run had replaced", entry)
        else:
            with contextlib.suppress(OSError):
                os.rename(entry, out)
                log.warning("restored %s from %s, moved aside by an interrupted run", out, entry)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_folder(out, overwrite: bool = False, inputs: Iterable = ()) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; it becomes ``out`` only if the block succeeds.

    Without ``overwrite`` nothing that exists at ``out`` at the end is replaced, even if it appeared during the
    run (:class:`OutputError`); with it, the old output is replaced only once the new one is complete. The output
    may not be, contain or sit inside any of ``inputs``. On any error, SIGINT, SIGTERM or SIGHUP the temporary
    folder is removed; folders left by killed runs on the same output are removed at the start. OS errors
    (disk full, read-only file system…) become one-line :class:`OutputError` errors."""
    with _publishing(out, overwrite, inputs, folder=True) as tmp:
        yield tmp


@contextlib.contextmanager
def atomic_file(out, overwrite: bool = False, inputs: Iterable = ()) -> Iterator[Path]:
    """Yield a temporary file name next to ``out``; the file written there becomes ``out`` if the block succeeds,
    with the promises of :func:`atomic_folder`."""
    with _publishing(out, overwrite, inputs, folder=False) as tmp:
        yield tmp


@contextlib.contextmanager
def _publishing(out, overwrite: bool, inputs: Iterable, folder: bool) -> Iterator[Path]:
    target = check_output_path(out, overwrite, inputs, folder=folder)
    tmp = lock = None
    created = _missing_parents(target)
    try:
        with signals_interrupt():
            target.parent.mkdir(parents=True, exist_ok=True)
            remove_leftovers(target)
            tmp, lock = _locked_temp(target, folder)
            yield tmp
            os.chmod(tmp, (0o777 if folder else 0o666) & ~_umask())
            check_interrupted()  # a signal whose exception was swallowed on the way: nothing is published
            with signals_held():  # the swap and its clean-up happen whole: a signal waits until they are done
                (replace if overwrite else publish)(tmp, target)
                tmp = created = None
    except OSError as e:
        raise OutputError(f"could not write {out!s}: {e.strerror or e}"
                          + (f" ({e.filename})" if e.filename else "") + "; nothing was written") from None
    finally:
        if tmp is not None:
            _remove(tmp)
        if lock is not None:
            os.close(lock)
        for folder_made in created or []:  # folders this run made for an output that never came
            with contextlib.suppress(OSError):
                folder_made.rmdir()


def _locked_temp(target: Path, folder: bool) -> tuple[Path, int | None]:
    """A new temporary folder (or file) for ``target``, locked before it takes its ``.partial-`` name: another run
    cleaning leftovers never finds it unlocked."""
    creating = _temp_name(target, "creating")
    if folder:
        creating.mkdir(mode=0o700)
    else:
        os.close(os.open(creating, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        lock = _lock(creating)
        tmp = _temp_name(target, "partial")
        os.rename(creating, tmp)
    except BaseException:
        _remove(creating)
        raise
    return tmp, lock


def _missing_parents(target: Path) -> list[Path]:
    """The output's parent folders that do not exist yet, deepest first."""
    missing = []
    parent = target.parent
    while not os.path.lexists(parent):
        missing.append(parent)
        parent = parent.parent
    return missing


def write_json(path: Path, data) -> None:
    """``data`` as indented JSON (keys in their order), for the small files beside an output's weights."""
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def source_paths(source) -> list[Path]:
    """The files and folder a weight source reads (none for tensors in memory): what an output must keep clear of."""
    paths = [*(getattr(source, "files", None) or []), getattr(source, "folder", None)]
    return [Path(p) for p in paths if p is not None]
