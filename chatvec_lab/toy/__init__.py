"""The embedded toy family in ``data/toy/<name>/``: ``base``, ``chat``, ``chat-alt``, ``cp``, ``cp-xvocab``.

The wheel ships it inside the package; ``chatvec_lab.resources`` finds it (installed or checkout).

    from chatvec_lab import toy
    toy.path("cp")            # the folder, for any function that takes a model
    model, tok = toy.load("chat")
"""
from __future__ import annotations

import os

from chatvec_lab.errors import NotFound, UnknownName
from pathlib import Path

MEMBERS = ("base", "chat", "chat-alt", "cp", "cp-xvocab")


def data_dir() -> Path:
    """``$CHATVEC_TOY_DIR``, else the ``toy`` folder of the package's data (``chatvec_lab.resources``)."""
    from chatvec_lab.resources import data_dir as package_data

    env = os.environ.get("CHATVEC_TOY_DIR")
    return Path(env) if env else package_data() / "toy"


def path(name: str) -> Path:
    if name not in MEMBERS:
        raise UnknownName(f"unknown toy model {name!r}; the family is {', '.join(MEMBERS)}")
    folder = data_dir() / name
    if not (folder / "config.json").is_file():
        raise NotFound(f"toy model {name!r} is missing at {folder}: reinstall chatvec_lab (the wheel "
                                "carries the family), or rebuild the family from a checkout with "
                                "`python -m chatvec_lab.toy.train --out data/toy`")
    return folder


def load(name: str, dtype=None):
    """``(model, tokenizer)`` of a toy member, loaded offline (float32 by default, for exact arithmetic)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = path(name)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype or torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(folder))
