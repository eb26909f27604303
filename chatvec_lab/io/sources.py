"""Open a model's weights lazily, tensor by tensor, wherever they live.

``open_weights(spec)`` accepts a hub id, a local folder of (sharded) ``*.safetensors``, a single
``.safetensors`` file, an in-memory ``torch.nn.Module`` or state dict, or an already open source.
Only the tensor asked for is read, so memory holds one tensor at a time, not the model.
Pickled weights (``.bin``, ``.pt``) are refused unless ``allow_pickle=True``, and are then loaded
with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import mmap
import os
import re
import weakref
import zipfile
from pathlib import Path
from typing import Iterator, Mapping

import torch

from chatvec_lab.errors import SourceError
from chatvec_lab.io.formats import (itemsize, json_type, numel, open_regular, read_header, read_json_object, sha256_handle,
                                 short_repr)
from chatvec_lab.io.paging import MappedPages

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class WeightSource(Mapping):
    """A read-only, lazy map from tensor name to tensor."""

    description: str = "weights"
    folder: Path | None = None  # where config.json and the tokenizer live, if anywhere

    def keys(self) -> list[str]:  # type: ignore[override]
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, name: str) -> torch.dtype:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:  # type: ignore[override]
        raise NotImplementedError

    reads_ranges = False  # whether read_into can read part of a tensor without reading all of it

    def read_into(self, name: str, start: int, out: memoryview) -> None:
        """Copy bytes [start, start + len(out)) of tensor ``name``'s data (row-major) into ``out``."""
        raise NotImplementedError(f"{type(self).__name__} does not read parts of tensors")

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._key_set():
            raise KeyError(name)
        return self.get(name)

    def _key_set(self) -> set[str]:
        if not hasattr(self, "_keys_cache"):
            self._keys_cache = set(self.keys())
        return self._keys_cache

    def __contains__(self, name: object) -> bool:
        return name in self._key_set()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def numel(self) -> int:
        total = 0
        for name in self.keys():
            n = 1
            for d in self.shape(name):
                n *= d
            total += n
        return total

    def nbytes(self) -> int:
        return sum(numel(self.shape(n)) * itemsize(self.dtype(n)) for n in self.keys())

    @property
    def config(self) -> dict | None:
        if getattr(self, "_config", None) is not None:
            return self._config
        if self.folder and (self.folder / "config.json").exists():
            return read_json_object(self.folder / "config.json", "model config")
        return None

    def fingerprint(self, hash_files: bool = True) -> dict:
        return {"source": self.description}

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description}: {len(self)} tensors>"


def _close_handles(handles: dict) -> None:
    for handle in handles.values():
        handle.close()


class SafetensorsSource(WeightSource):
    """Tensors from one or more safetensors files, read one at a time.

    Each tensor gets its own private, copy-on-write memory map of just its bytes (small ones a plain
    read): no copy through a buffer, writes never reach the file, and the map goes when the tensor
    does, so the process holds only the tensors it is working on, whatever the shard size.
    """

    MAP_AT_LEAST = 1 << 20  # bytes; smaller tensors are read, mapping them costs more than copying
    POPULATE_AT_MOST = 1 << 26  # bytes; larger mapped tensors are faulted in block by block (see paged_rows)

    def __init__(self, files: list[Path], folder: Path | None = None, description: str | None = None,
                 revision: str | None = None):
        self.files = [Path(f) for f in files]
        self.folder = folder
        self.description = description or str(folder or self.files[0])
        self.revision = revision
        self._where: dict[str, tuple[Path, int, int]] = {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        # each file is opened once and read through that descriptor from then on: a file replaced or deleted
        # meanwhile (another run's --overwrite, say) is not mixed into this one
        self._handles = {}
        # closed by close(), or when this source is garbage collected: never left to the interpreter (an unclosed
        # file is a ResourceWarning); maps already made keep their own descriptor
        self._closer = weakref.finalize(self, _close_handles, self._handles)
        try:
            for f in self.files:
                handle = self._handles[f] = open_regular(f, buffering=0)
                data_start, tensors = read_header(handle, f)
                for name, (dtype, shape, begin, end) in tensors.items():
                    if name in self._where:
                        raise SourceError(f"tensor {name!r} appears in both {self._where[name][0].name} and "
                                          f"{f.name}")
                    self._where[name] = (f, data_start + begin, end - begin)
                    self._meta[name] = (shape, dtype)
        except BaseException:
            self._closer()
            raise

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][1]

    def file_of(self, name: str) -> Path:
        return self._where[name][0]

    def get(self, name: str) -> torch.Tensor:
        where = self._where.get(name)
        if where is None:
            raise KeyError(f"{self.description} has no tensor {name!r}")
        path, offset, nbytes = where
        shape, dtype = self._meta[name]
        if nbytes >= self.MAP_AT_LEAST and offset % itemsize(dtype) == 0:  # elements must be aligned
            return self._map(self._handles[path], path, offset, nbytes, shape, dtype, name)
        buf = bytearray(nbytes)
        self.read_into(name, 0, memoryview(buf))
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    reads_ranges = True

    def read_into(self, name: str, start: int, out: memoryview) -> None:
        where = self._where.get(name)
        if where is None:
            raise KeyError(f"{self.description} has no tensor {name!r}")
        path, offset, nbytes = where
        if start < 0 or start + len(out) > nbytes:
            raise ValueError(f"bytes {start}..{start + len(out)} are outside tensor {name!r} ({nbytes} bytes)")
        try:
            fd = self._handles[path].fileno()
            done = 0
            while done < len(out):
                n = os.preadv(fd, [out[done:]], offset + start + done)
                if not n:
                    raise SourceError(f"truncated safetensors file {path}: tensor {name!r} ends past the file")
                done += n
        except OSError as e:
            raise SourceError(f"cannot read tensor {name!r} from {path}: {e}") from None

    @classmethod
    def _map(cls, handle, path: Path, offset: int, nbytes: int, shape, dtype, name: str) -> torch.Tensor:
        import warnings

        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            if os.fstat(handle.fileno()).st_size < offset + nbytes:
                raise SourceError(f"truncated safetensors file {path}: tensor {name!r} ends past the file")
            mapped = mmap.mmap(handle.fileno(), offset + nbytes - start, access=mmap.ACCESS_COPY, offset=start)
        except OSError as e:
            raise SourceError(f"cannot read tensor {name!r} from {path}: {e}") from None
        pages = MappedPages(mapped, offset - start, whole=nbytes <= cls.POPULATE_AT_MOST)
        if pages.whole:
            pages.populate(0, nbytes)  # now, in the prefetching thread, which overlaps the caller's work
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tensor = torch.frombuffer(mapped, dtype=dtype, count=nbytes // itemsize(dtype),
                                      offset=offset - start).reshape(shape)
        tensor.mapped_pages = pages
        return tensor

    def fingerprint(self, hash_files: bool = True) -> dict:
        out: dict = {"source": self.description}
        if self.revision:
            out["revision"] = self.revision
        if self.folder is not None:
            out["path"] = str(Path(self.folder).resolve())
        if hash_files:
            out["sha256"] = {f.name: sha256_handle(self._handles[f]) for f in self.files}
        return out

    def close(self) -> None:
        self._closer()



class TensorDictSource(WeightSource):
    """An in-memory state dict or module (tensors are not copied)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], description: str = "in-memory tensors",
                 folder: Path | None = None):
        self.tensors = dict(tensors)
        self.description = description
        self.folder = folder

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name].detach()


def module_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's persistent tensors, tied duplicates removed as a checkpoint would save them."""
    seen: dict[int, str] = {}
    out = {}
    for name, tensor in module.state_dict().items():
        key = tensor.data_ptr() if tensor.numel() else id(tensor)
        if key in seen:
            continue
        seen[key] = name
        out[name] = tensor
    return out


def _load_pickles(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with open_regular(f) as handle:  # a FIFO or device is refused, not opened by torch.load
                if zipfile.is_zipfile(handle):  # the current format: memory-mapped, not read whole
                    data = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                else:  # the legacy format cannot be mapped: read from the file already opened
                    handle.seek(0)
                    data = torch.load(handle, map_location="cpu", weights_only=True)
        except SourceError:
            raise
        except Exception as e:
            raise SourceError(f"cannot load {f} with weights_only=True: {str(e).splitlines()[0]}") from None
        if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
            data = data["state_dict"]
        if not isinstance(data, dict):
            raise SourceError(f"{f} does not hold a state dict (found {type(data).__name__})")
        tensors.update({k: v for k, v in data.items() if isinstance(v, torch.Tensor)})
    return tensors


# ------------------------------------------------------------------ resolving a spec

INDEX_FILES = ("model.safetensors.index.json", "vector.safetensors.index.json")


def _plain_file_name(name: str) -> bool:
    return name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def read_shard_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a shard index: tensor name -> name of a shard file in the index's folder."""
    index_json = read_json_object(index, "shard index", strict=True)
    weight_map = index_json.get("weight_map")
    if not isinstance(weight_map, dict):
        found = json_type(weight_map) if "weight_map" in index_json else "missing"
        raise SourceError(f"bad shard index {index}: weight_map is {found}, not an object of tensor name to shard file")
    for name, shard in weight_map.items():
        if not (isinstance(shard, str) and _plain_file_name(shard)):
            raise SourceError(f"bad shard index {index}: tensor {short_repr(name)} is mapped to {short_repr(shard)}, "
                              "not the name of a file in the index's folder")
    return weight_map


def check_shard_index(source: SafetensorsSource, index: Path, weight_map: dict[str, str]) -> None:
    """Every tensor the index names is in the shard it names, and the shards hold no other: else which
    weights the checkpoint means is ambiguous."""
    for name, shard in weight_map.items():
        if name not in source:
            raise SourceError(f"{index} puts tensor {short_repr(name)} in {shard}, which does not hold it")
        if source.file_of(name).name != shard:
            raise SourceError(f"{index} puts tensor {short_repr(name)} in {shard}, but it is in "
                              f"{source.file_of(name).name}")
    for name in source.keys():
        if name not in weight_map:
            raise SourceError(f"{source.file_of(name).name} holds tensor {short_repr(name)}, which {index} does not name")


def _folder_files(folder: Path, allow_pickle: bool) -> tuple[str, list[Path], tuple[Path, dict] | None]:
    """``(kind, files, (index, weight_map) or None)`` of the weights in a folder."""
    for index_name in INDEX_FILES:
        index = folder / index_name
        if index.exists():
            weight_map = read_shard_index(index)
            if not weight_map:
                raise SourceError(f"bad shard index {index}: its weight_map names no tensor")
            files = sorted({folder / shard for shard in weight_map.values()})
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise SourceError(f"{index} names shard {missing[0]}, which is missing")
            prefix = index_name.split(".")[0]
            unlisted = sorted(f.name for f in folder.glob(f"{prefix}-*-of-*.safetensors") if f not in set(files))
            if unlisted:  # a shard of this checkpoint that its index forgot: the model would silently lack it
                raise SourceError(f"{index} does not list shard {unlisted[0]}, which lies beside it")
            return "safetensors", files, (index, weight_map)
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return "safetensors", files, None
    pickles = sorted(f for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES and f.is_file())
    if pickles:
        if not allow_pickle:
            raise SourceError(f"{folder} holds only pickled weights ({pickles[0].name}); pickles can run code: "
                              "pass allow_pickle=True (--allow-pickle) to load them with weights_only=True")
        return "pickle", pickles, None
    raise SourceError(f"no weights in {folder} (expected *.safetensors, optionally with an index json)")


def _open_folder(folder: Path, allow_pickle: bool, description: str, revision: str | None = None) -> WeightSource:
    kind, files, index = _folder_files(folder, allow_pickle)
    if kind == "pickle":
        return TensorDictSource(_load_pickles(files), description=description, folder=folder)
    source = SafetensorsSource(files, folder=folder, description=description, revision=revision)
    if index:
        check_shard_index(source, *index)
    return source


def _resolve_hub(repo_id: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover
        raise SourceError(f"{repo_id!r} is not a local path and huggingface_hub is not installed") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    patterns = ["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=offline))
    except Exception as first:
        if not offline:
            try:  # no network: fall back to the local cache
                return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                              local_files_only=True))
            except Exception:
                pass
        raise SourceError(f"{repo_id!r} is neither a local path nor a model in the local hub cache, and the hub "
                          f"could not be reached ({type(first).__name__})") from None


def open_weights(spec, allow_pickle: bool = False, revision: str | None = None) -> WeightSource:
    """Open weights lazily from a hub id, folder, ``.safetensors`` file, module or state dict."""
    if isinstance(spec, WeightSource):
        return spec
    if isinstance(spec, torch.nn.Module):
        return TensorDictSource(module_state(spec), description=f"in-memory {type(spec).__name__}",
                                folder=_module_folder(spec))
    if isinstance(spec, Mapping):
        bad = next((k for k, v in spec.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
        if bad is not None:
            raise SourceError(f"a state dict maps tensor names (str) to tensors; entry {bad!r} does not")
        return TensorDictSource(spec)
    if not isinstance(spec, (str, os.PathLike)):
        raise SourceError(f"cannot open weights from a {type(spec).__name__}")
    path = Path(spec).expanduser()
    if path.is_dir():
        return _open_folder(path, allow_pickle, description=str(path))
    if path.exists():  # a file, or a FIFO or device: open_regular refuses those without blocking
        if path.suffix == ".safetensors":
            return SafetensorsSource([path], folder=path.parent if (path.parent / "config.json").is_file() else None,
                                     description=str(path))
        if path.suffix in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise SourceError(f"{path} is a pickle, which can run code when loaded: pass allow_pickle=True "
                                  "(--allow-pickle) to load it with weights_only=True")
            return TensorDictSource(_load_pickles([path]), description=str(path))
        raise SourceError(f"{path}: not a weights file (expected .safetensors)")
    text = str(spec)
    if text.startswith((".", "/", "~")) or os.sep in text.strip("/").replace("/", "", 1) or not _HUB_ID.match(text):
        raise SourceError(f"no such file or folder: {text}")
    folder = _resolve_hub(text, revision)
    return _open_folder(folder, allow_pickle=False, description=text, revision=folder.name)


def _module_folder(module: torch.nn.Module) -> Path | None:
    name = getattr(getattr(module, "config", None), "_name_or_path", None)
    if name and Path(name).is_dir():
        return Path(name)
    return None


def model_folder(spec, revision: str | None = None) -> Path | None:
    """The folder holding config and tokenizer for a weights spec, if there is one."""
    if isinstance(spec, WeightSource):
        return spec.folder
    if isinstance(spec, torch.nn.Module):
        return _module_folder(spec)
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec).expanduser()
        if path.is_dir():
            return path
        if path.is_file():
            return path.parent if (path.parent / "config.json").is_file() else None
        if _HUB_ID.match(str(spec)):
            return _resolve_hub(str(spec), revision)
    return None


def refuse_saved_vector(source: WeightSource, role: str) -> None:
    """A saved chat vector's folder (it holds ``chatvec.json``) where a model belongs is one line: its tensors are
    differences, so ``chat − vector`` or ``vector + α·v`` would be meaningless numbers written without a word."""
    folder = getattr(source, "folder", None)
    if folder is not None and (Path(folder) / "chatvec.json").is_file():
        raise SourceError(f"{role} {folder} is a saved chat vector (it holds chatvec.json), not a model: give a "
                          "model folder or hub id here")
