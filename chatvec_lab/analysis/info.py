"""``chatvec info``: what a vector or a checkpoint holds."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

import torch

from chatvec_lab.io.naming import parse
from chatvec_lab.io.formats import itemsize, numel, read_json_object
from chatvec_lab.io.sources import open_weights
from chatvec_lab.core.metadata import METADATA_FILE


NORM_CHUNK_ELEMENTS = 1 << 22  # a norm reads this many values at a time (16 MiB of float32), whatever the tensor


def tensor_norm(source, name: str) -> float:
    """The L2 norm of one tensor, streamed: a file is read in chunks of ``NORM_CHUNK_ELEMENTS`` values into one
    reused buffer (never mapped whole, never converted whole), squares summed in float64."""
    dtype, shape = source.dtype(name), tuple(source.shape(name))
    if not dtype.is_floating_point:
        return math.nan
    n, size, total = numel(shape), itemsize(dtype), 0.0
    step = NORM_CHUNK_ELEMENTS
    if getattr(source, "reads_ranges", False):
        buf = bytearray(min(n, step) * size)
        for first in range(0, n, step):
            count = min(step, n - first)
            view = memoryview(buf)[:count * size]
            source.read_into(name, first * size, view)
            chunk = torch.frombuffer(view, dtype=dtype, count=count)
            total += float(torch.linalg.vector_norm(chunk, dtype=torch.float64) ** 2)
    else:  # in memory already (a state dict, a pickle)
        flat = source.get(name).reshape(-1)
        for first in range(0, n, step):
            total += float(torch.linalg.vector_norm(flat[first:first + step], dtype=torch.float64) ** 2)
    return math.sqrt(total)


def describe(path, norms: bool = True) -> tuple[dict, pd.DataFrame]:
    """``(summary, table)``: one table row per tensor with shape, dtype, layer, module and (optionally) norm.
    Headers only, and each norm streamed tensor by tensor in chunks (``tensor_norm``): memory stays at one chunk
    whatever the checkpoint."""
    source = open_weights(path)
    folder = Path(path) if Path(str(path)).is_dir() else source.folder
    meta: dict = {"path": str(path)}
    if folder and (folder / METADATA_FILE).is_file():
        meta["kind"] = "chat vector"
        meta.update(read_json_object(folder / METADATA_FILE, "chat vector metadata"))
        if isinstance(meta.get("vocabulary"), list):  # thousands of tokens: say how many
            meta["vocabulary"] = f"{len(meta['vocabulary'])} tokens"
    else:
        meta["kind"] = "checkpoint"
        cfg = source.config or {}
        for key in ("model_type", "architectures", "vocab_size", "hidden_size", "num_hidden_layers",
                    "tie_word_embeddings", "torch_dtype", "dtype"):
            if key in cfg:
                meta[key] = cfg[key]
    meta["tensors"] = len(source)
    meta["parameters"] = source.numel()
    meta["bytes"] = source.nbytes()
    rows = []
    for name in source.keys():
        info = parse(name)
        row = {"name": name, "shape": tuple(source.shape(name)), "dtype": str(source.dtype(name)).replace("torch.", ""),
               "layer": info.layer, "module": info.module}
        if norms:
            row["norm"] = tensor_norm(source, name)
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(table):
        table["layer"] = table["layer"].astype("Int64")
    if norms and len(table):
        meta["total_norm"] = float(math.sqrt((table["norm"].fillna(0) ** 2).sum()))
    return meta, table
