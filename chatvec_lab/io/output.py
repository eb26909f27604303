"""Writing outputs: atomic folders and streamed, sharded safetensors.

Every tensor's name, shape and dtype is known before any is computed (they come from the
target or the vector), so the shards and their headers are planned up front and each tensor is
written straight to disk as soon as it is ready: no shard is ever buffered in memory.
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
import signal
import stat
import sys
import threading
from pathlib import Path
from typing import Iterable, Iterator

import torch

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows
    fcntl = None

from chatvec_lab.errors import OutputError, UsageError, require_bool
from chatvec_lab.io.formats import ST_DTYPE_NAMES, itemsize, numel

DEFAULT_SHARD_BYTES = 4 * 1024**3
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


def check_output_path(out, overwrite: bool, inputs: Iterable = (), folder: bool = True) -> Path:
    """Fail before any work if ``out`` may not be written: it exists (unless ``overwrite``), it is, contains or sits
    inside one of ``inputs``, or its folder cannot be written. Returns the absolute output path.
    ``folder``: the output is a folder (else a file)."""
    if not isinstance(out, (str, os.PathLike)) or isinstance(out, bytes):
        raise OutputError(f"the output must be a path (str or os.PathLike), not {type(out).__name__}")
    require_bool(overwrite=overwrite)
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


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived while an output was being written (the folder was cleaned up)."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """Within the block, SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted`, so the temporary folder is cleaned
    up (inside :func:`_signals_held` they wait). Handlers set by the application, and signals it ignores (a run
    under ``nohup`` ignores SIGHUP), are left alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {}
    for name, default in (("SIGINT", signal.default_int_handler), ("SIGTERM", signal.SIG_DFL),
                          ("SIGHUP", signal.SIG_DFL)):
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) == default:
            saved[sig] = signal.signal(sig, _raise_interrupted)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


_HELD = {"depth": 0, "pending": None}  # Python runs signal handlers in the main thread only: a flag is enough


def _raise_interrupted(signum, frame):
    if _HELD["depth"]:
        _HELD["pending"] = _HELD["pending"] or signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Within the block a signal that would interrupt waits; it interrupts once the block is done."""
    _HELD["depth"] += 1
    try:
        yield
    finally:
        _HELD["depth"] -= 1
    if not _HELD["depth"] and _HELD["pending"]:
        signum, _HELD["pending"] = _HELD["pending"], None
        raise Interrupted(signum)


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
        with _signals_interrupt():
            target.parent.mkdir(parents=True, exist_ok=True)
            remove_leftovers(target)
            tmp, lock = _locked_temp(target, folder)
            yield tmp
            os.chmod(tmp, (0o777 if folder else 0o666) & ~_umask())
            with _signals_held():  # the swap and its clean-up happen whole: a signal waits until they are done
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
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


class ShardedSafetensorsWriter:
    """Write tensors, in a planned order, into shards ``{prefix}-0000i-of-0000n.safetensors``.

    ``plan`` lists ``(name, shape, dtype)``. Each tensor is given once, either

    * whole, ``write(name, tensor)``, in any order (tensors that arrive early wait in memory until
      their turn, so plan order = arrival order keeps memory at one tensor); or
    * as a stream of row blocks, ``write_blocks(name, blocks)``, when it is the next tensor of the plan:
      each block goes straight to the shard file, so memory stays at one block whatever the tensor's size.

    The bytes written are the same either way. ``close()`` writes the index json when there are several
    shards. A ``write_blocks`` that fails after writing part of its tensor leaves the shard incomplete:
    the writer then refuses further writes and ``close()`` (abandon its folder).
    """

    def __init__(self, folder: Path, plan: list[tuple[str, tuple[int, ...], torch.dtype]], prefix: str = "model",
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, metadata: dict[str, str] | None = None,
                 background: bool = False):
        if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
            raise UsageError(f"max_shard_bytes must be a positive integer, not {max_shard_bytes!r}")
        self.folder = Path(folder)
        self.pool = None
        self.inflight = None
        if background:  # file writes overlap the computation of the next tensor (one write in flight)
            from concurrent.futures import ThreadPoolExecutor
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatvec-write")
        self.prefix = prefix
        self.metadata = {"format": "pt", **(metadata or {})}
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for entry in plan:
            nbytes = numel(entry[1]) * itemsize(entry[2])
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += nbytes
        n = len(shards)
        self.shards = []
        for i, entries in enumerate(shards):
            fname = f"{prefix}.safetensors" if n == 1 else f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
            self.shards.append((fname, entries))
        self.order = [(fname, e) for fname, entries in self.shards for e in entries]
        self.expected = {e[0]: e for _, e in self.order}
        self.rank = {e[0]: i for i, (_, e) in enumerate(self.order)}
        self.position = 0
        self.pending: dict[str, torch.Tensor] = {}
        self.file = None
        self.current = None
        self.total_bytes = 0
        self.failed: str | None = None  # the tensor whose streamed write failed part-way

    def _open(self, fname: str, entries) -> None:
        header: dict = {"__metadata__": self.metadata}
        offset = 0
        for name, shape, dtype in entries:
            nbytes = numel(shape) * itemsize(dtype)
            header[name] = {"dtype": ST_DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.file = open(self.folder / fname, "wb")
        self.file.write(len(raw).to_bytes(8, "little"))
        self.file.write(raw)
        self.current = fname

    def _shard_for(self, fname: str) -> None:
        """Make ``fname`` the open shard (closing the previous one)."""
        if self.current != fname:
            if self.file:
                self.file.close()
            self._open(fname, dict(self.shards)[fname])

    def _check_usable(self) -> None:
        if self.failed is not None:
            raise ValueError(f"the write of tensor {self.failed!r} failed part-way: this writer's output is "
                             "incomplete and takes no more tensors")

    def write(self, name: str, tensor) -> None:
        """Write ``tensor`` whole; a tensor given as an iterable of row blocks is streamed (see :meth:`write_blocks`)."""
        if not isinstance(tensor, torch.Tensor):
            self._write_stream(name, tensor)
            return
        self._check_usable()
        if name not in self.expected:
            raise ValueError(f"tensor {name!r} is not in the write plan")
        _, shape, dtype = self.expected[name]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ValueError(f"tensor {name!r}: planned {tuple(shape)} {dtype}, got {tuple(tensor.shape)} {tensor.dtype}")
        self._wait()
        self.pending[name] = tensor
        if self.pool is None:
            self._drain()
        else:
            self.inflight = self.pool.submit(self._drain)

    def write_blocks(self, name: str, blocks: Iterable[torch.Tensor]) -> None:
        """Write tensor ``name`` from ``blocks``: consecutive blocks of its rows, in order (``b.shape[1:]`` equal
        to the tensor's ``shape[1:]``, their rows summing to ``shape[0]``; a 0-d tensor is one 0-d block), of
        its planned dtype. ``name`` must be the next tensor of the plan not yet written. Each block is written
        to the shard file before the next is asked for, so the blocks may be reused buffers or views.
        The blocks go through :meth:`write`, so a wrapper of ``write`` sees every tensor."""
        self.write(name, iter(blocks))

    def _write_stream(self, name: str, blocks) -> None:
        self._check_usable()
        if name not in self.expected:
            raise ValueError(f"tensor {name!r} is not in the write plan")
        if not isinstance(blocks, Iterable):
            raise TypeError(f"tensor {name!r}: expected a tensor or an iterable of row blocks, "
                            f"not {type(blocks).__name__}")
        self._wait()
        self._drain()  # tensors that arrived early and are next in line
        if name in self.pending or self.rank[name] < self.position:
            raise ValueError(f"tensor {name!r} was already written")
        nxt = self.order[self.position][1][0]
        if nxt != name:
            raise ValueError(f"tensor {name!r} cannot be streamed now: the next tensor of the write plan is "
                             f"{nxt!r} (streamed tensors are written in plan order)")
        fname, (_, shape, dtype) = self.order[self.position]
        shape = tuple(shape)
        rows, seen, done, started = (shape[0] if shape else None), 0, 0, False
        self._shard_for(fname)
        try:
            for block in blocks:
                if not isinstance(block, torch.Tensor):
                    raise ValueError(f"tensor {name!r}: a block must be a tensor, not {type(block).__name__}")
                bshape = tuple(block.shape)
                if block.dtype != dtype:
                    raise ValueError(f"tensor {name!r}: planned {dtype}, got a block of {block.dtype}")
                if rows is None:  # a 0-d tensor: one 0-d block
                    if bshape != ():
                        raise ValueError(f"tensor {name!r}: planned a 0-d tensor, got a block of shape {bshape}")
                    if seen:
                        raise ValueError(f"tensor {name!r}: planned a 0-d tensor, got more than one block")
                    seen = 1
                else:
                    if len(bshape) != len(shape) or bshape[1:] != shape[1:]:
                        raise ValueError(f"tensor {name!r}: planned {shape}, got a block of shape {bshape} "
                                         f"(blocks of rows have shape (rows, {', '.join(map(str, shape[1:]))}))")
                    if seen + bshape[0] > rows:
                        raise ValueError(f"tensor {name!r}: planned {rows} rows, the blocks give more "
                                         f"({seen + bshape[0]} so far)")
                    seen += bshape[0]
                t = block.detach().to("cpu").contiguous()
                if t.numel():
                    started = True
                    self.file.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
                    done += t.numel() * t.element_size()
                del t, block  # the producer may free or reuse it for the next block
            if rows is None and not seen:
                raise ValueError(f"tensor {name!r}: planned a 0-d tensor, the blocks give none")
            if rows is not None and seen != rows:
                raise ValueError(f"tensor {name!r}: planned {rows} rows {shape}, the blocks give {seen}")
        except BaseException:
            if started:  # part of the tensor is in the file: what follows would be misplaced
                self.failed = name
            raise
        self.total_bytes += done
        self.position += 1
        self._drain()

    def _drain(self) -> None:
        while self.position < len(self.order) and self.order[self.position][1][0] in self.pending:
            fname, (pname, _, _) = self.order[self.position]
            self._shard_for(fname)
            t = self.pending.pop(pname).detach().to("cpu").contiguous()
            data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
            self.file.write(memoryview(data))
            self.total_bytes += t.numel() * t.element_size()
            self.position += 1

    def _wait(self) -> None:
        if self.inflight is not None:
            self.inflight.result()
            self.inflight = None

    def abort(self) -> None:
        """Stop writing (after an error): wait for the write in flight and close the file."""
        try:
            self._wait()
        except Exception:
            pass
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        if self.file:
            self.file.close()
            self.file = None

    def close(self) -> list[str]:
        self._wait()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        self._check_usable()
        if self.position != len(self.order):
            missing = self.order[self.position][1][0]
            raise ValueError(f"write plan incomplete: tensor {missing!r} was never written")
        if self.file:
            self.file.close()
            self.file = None
        if len(self.shards) > 1:
            weight_map = {name: fname for fname, entries in self.shards for name, _, _ in entries}
            write_json(self.folder / f"{self.prefix}.safetensors.index.json",
                       {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map})
        return [fname for fname, _ in self.shards]


def source_paths(source) -> list[Path]:
    """The files and folder a weight source reads (none for tensors in memory): what an output must keep clear of."""
    paths = [*(getattr(source, "files", None) or []), getattr(source, "folder", None)]
    return [Path(p) for p in paths if p is not None]
