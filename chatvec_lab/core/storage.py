"""A saved vector's folder: written whole (float32 safetensors shards, ``chatvec.json``, ``base_config.json``) and
opened back, strictly checked.

Saving streams: each tensor is read in blocks of rows, checked finite and written block by block, so memory stays
at a few blocks whatever the tensors' sizes, and the folder appears only when complete. Opening reads the
metadata and the base's config and checks them (:func:`chatvec_lab.core.metadata.check_vector_metadata`) before
any tensor is read.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import torch

from chatvec_lab.core.metadata import BASE_CONFIG_FILE, METADATA_FILE, check_vector_metadata
from chatvec_lab.errors import MismatchError, SourceError, check_finite, require_bool
from chatvec_lab.io.formats import json_type, read_json_object
from chatvec_lab.io.output import atomic_folder, write_json
from chatvec_lab.io.shards import DEFAULT_SHARD_BYTES, ShardedSafetensorsWriter
from chatvec_lab.io.sources import WeightSource, open_weights


def save_vector(vector, path, overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                progress: bool = False) -> Path:
    """Write ``vector`` (a ``ChatVector``) as float32 safetensors shards + ``chatvec.json`` atomically; returns the
    folder.

    Each tensor is streamed in blocks of rows, checked and written block by block: memory stays at a few
    blocks whatever the tensors' sizes (no tensor is ever whole in memory)."""
    from tqdm.auto import tqdm

    require_bool(overwrite=overwrite, progress=progress)
    if not vector.shapes:
        raise MismatchError("the vector holds no tensor: there is nothing to save")
    plan = [(n, s, torch.float32) for n, s in vector.shapes.items()]

    def checked(name: str) -> Iterator[torch.Tensor]:
        # copy=False: each block is written before the next is asked for, so views and reused buffers do
        for _, block in vector.blocks(name, copy=False):
            check_finite(block, f"tensor {name!r} in the vector")
            yield block

    with atomic_folder(path, overwrite, inputs=vector.input_paths()) as tmp:
        writer = ShardedSafetensorsWriter(tmp, plan, prefix="vector", max_shard_bytes=max_shard_bytes)
        try:
            for name in tqdm(vector.names, desc="vector", unit="tensor", disable=not progress):
                writer.write_blocks(name, checked(name))
            shards = writer.close()
        except BaseException:
            writer.abort()  # close the shard before the folder goes
            raise
        write_json(tmp / METADATA_FILE, {**vector.metadata, "shards": shards})
        if vector.base_config:
            write_json(tmp / BASE_CONFIG_FILE, vector.base_config)
    return Path(path)


def open_saved(path) -> tuple[WeightSource, dict, dict, dict | None]:
    """A saved vector's folder as ``(weights, shapes, metadata, base_config)``, its metadata checked (lazily: no
    tensor is read)."""
    if not isinstance(path, (str, os.PathLike)) or isinstance(path, bytes):
        raise SourceError(f"a saved vector is opened from its folder (str or os.PathLike), "
                          f"not {type(path).__name__}")
    path = Path(path)
    meta_file = path / METADATA_FILE
    if not meta_file.exists():
        raise SourceError(f"{path} is not a saved chat vector (no {METADATA_FILE}); "
                          "to build one from two models use ChatVector.from_models / `chatvec extract`")
    metadata = read_json_object(meta_file, "chat vector metadata")
    source = open_weights(path)
    base_file = path / BASE_CONFIG_FILE
    base_config = read_json_object(base_file, "base model config") if base_file.exists() else None
    if base_config is not None and not isinstance(base_config.get("model_type", ""), str):
        raise SourceError(f"bad base model config {base_file}: 'model_type' is "
                          f"{json_type(base_config['model_type'])}, not a string")
    shapes = {n: source.shape(n) for n in source.keys()}
    check_vector_metadata(metadata, shapes, meta_file, files=getattr(source, "files", None))
    return source, shapes, metadata, base_config
