"""``chatvec info``: what a vector or a checkpoint holds."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from chatvec_lab.naming import parse
from chatvec_lab.formats import read_json_object
from chatvec_lab.sources import open_weights
from chatvec_lab.vector import METADATA_FILE


def describe(path, norms: bool = True) -> tuple[dict, pd.DataFrame]:
    """``(summary, table)``: one table row per tensor with shape, dtype, layer, module and (optionally) norm."""
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
            t = source.get(name)
            row["norm"] = float(t.reshape(-1).double().norm()) if t.is_floating_point() else math.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(table):
        table["layer"] = table["layer"].astype("Int64")
    if norms and len(table):
        meta["total_norm"] = float(math.sqrt((table["norm"].fillna(0) ** 2).sum()))
    return meta, table
