"""The embedded toy families.

``data/toy/<name>/`` (family ``"toy"``, the default): ``base``, ``chat``, ``chat-alt``, ``cp``, ``cp-xvocab``;
its base saw 0.5% German in pre-training. ``data/toy-bilingual/<name>/`` (family ``"toy-bilingual"``):
``base``, ``chat``, ``cp`` from the README's recipe 2, whose base saw 10% German (and whose chat replies are
longer, its CP shorter): the measured safety trade-off — refusals transfer better, the language contrast is
weaker. Its ``recipe.json`` files hold the full recipe.

The wheel ships both inside the package; ``chatvec_lab.io.resources`` finds them (installed or checkout).

    from chatvec_lab import toy
    toy.path("cp")                              # the folder, for any function that takes a model
    toy.path("cp", family="toy-bilingual")      # the same member of the second family
    model, tok = toy.load("chat")
"""
from __future__ import annotations

import os

from chatvec_lab.errors import NotFound, UnknownName
from pathlib import Path

MEMBERS = ("base", "chat", "chat-alt", "cp", "cp-xvocab")
DEFAULT_FAMILY = "toy"
# family → its members; the family's name is its folder in the package's data
FAMILIES = {"toy": MEMBERS, "toy-bilingual": ("base", "chat", "cp")}
# how toy-bilingual was built: python -m chatvec_lab.toy.train --out data/toy-bilingual --members base,chat,cp --set …
BILINGUAL_RECIPE = ("base_german_share=0.1", "reply_max_words=30", "chat_steps=1200", "cp_steps=1000",
                    "finetune_lr=1e-3", "insult_share=0.2", "max_turns=2", "max_new_tokens=64")


def data_dir(family: str = DEFAULT_FAMILY) -> Path:
    """The family's folder: ``$CHATVEC_TOY_DIR`` for the default family (``$CHATVEC_TOY_BILINGUAL_DIR`` for
    ``toy-bilingual``), else its folder in the package's data (``chatvec_lab.io.resources``)."""
    from chatvec_lab.io.resources import data_dir as package_data

    if family not in FAMILIES:
        raise UnknownName(f"unknown toy family {family!r}; the families are {', '.join(FAMILIES)}")
    env = os.environ.get("CHATVEC_TOY_DIR" if family == DEFAULT_FAMILY else "CHATVEC_TOY_BILINGUAL_DIR")
    return Path(env) if env else package_data() / family


def path(name: str, family: str = DEFAULT_FAMILY) -> Path:
    if family not in FAMILIES:
        raise UnknownName(f"unknown toy family {family!r}; the families are {', '.join(FAMILIES)}")
    if name not in FAMILIES[family]:
        raise UnknownName(f"unknown toy model {name!r} in family {family!r}; its members are "
                          f"{', '.join(FAMILIES[family])}")
    folder = data_dir(family) / name
    if not (folder / "config.json").is_file():
        raise NotFound(f"toy model {name!r} is missing at {folder}: reinstall chatvec_lab (the wheel "
                                "carries the family), or rebuild the family from a checkout with "
                                f"`python -m chatvec_lab.toy.train --out data/{family}`"
                                + ((" --members base,chat,cp --set " + " ".join(BILINGUAL_RECIPE))
                                   if family == "toy-bilingual" else ""))
    return folder


def load(name: str, dtype=None, family: str = DEFAULT_FAMILY):
    """``(model, tokenizer)`` of a toy member, loaded offline (float32 by default, for exact arithmetic)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = path(name, family)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype or torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(folder))
