"""What the checks measure with: the toy family, the prompts, the held-out text, vectors and turn ends.

The exercises sit below the toy package in the import layers (tests/test_layers.py), so the toy family, the
prompts and the held-out text are found here as ``toy.path()``, ``prompt_sets()`` and ``heldout_texts()`` find them
(tests/test_exercises.py checks that they agree).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch


def toy_path(member: str) -> Path:
    """The folder of a member of the default toy family (as ``toy.path(member)``)."""
    from chatvec_lab.io.resources import data_dir

    env = os.environ.get("CHATVEC_TOY_DIR")
    folder = (Path(env) if env else data_dir() / "toy") / member
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"toy model {member!r} is missing at {folder}; pass the models to the check "
                                "(base=BASE, chat=CHAT, ...)")
    return folder


def prompt_set(name: str) -> list[str]:
    """A German prompt set of the package's data: "chat" or "offensive" (as toy.evaluate.prompt_sets)."""
    from chatvec_lab.io.resources import data_dir
    from chatvec_lab.behaviour.sweep import read_prompts

    return read_prompts(data_dir() / "prompts" / f"{name}_de.txt")


def heldout_text(language: str) -> list[str]:
    """The held-out sentences of a language (as toy.evaluate.heldout_texts)."""
    from chatvec_lab.io.resources import data_dir

    text = (data_dir() / "heldout" / f"{language}.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def vector_of(base, other):
    """The vector ``other − base`` (a ``ChatVector``)."""
    from chatvec_lab.core.vector import ChatVector

    return ChatVector.from_models(base, other)


def raw_tensor(path, name: str) -> torch.Tensor:
    """One tensor of a model as it is stored (its own dtype)."""
    from chatvec_lab.io.sources import open_weights

    return open_weights(path).get(name)


def load_tokenizer(path):
    """The tokenizer of a model folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def chat_prompts(n: int) -> list[str]:
    """The first ``n`` German chat prompts."""
    return prompt_set("chat")[:n]


def turn_end_rate(cp, vector, coefficient, prompts, seed: int, max_new_tokens: int, device=None,
                  dtype="auto") -> float:
    """The share of replies of ``cp + coefficient·vector`` to ``prompts`` that end their turn, the model on
    ``device`` in ``dtype`` (as ``apply_to_model`` takes them: None leaves it on the CPU; ``auto`` dtype is the
    checkpoint's own)."""
    from chatvec_lab.core.apply import apply_to_model
    from chatvec_lab.behaviour.generation import generate

    model, _ = apply_to_model(cp, [(vector, coefficient)], device=device, dtype=dtype)
    out = generate(model, load_tokenizer(cp), prompts, seed=seed, max_new_tokens=max_new_tokens)
    return float(out["ended_turn"].mean())


def cosine_of(a: torch.Tensor, b: torch.Tensor) -> float:
    """The cosine of two tensors, flattened, in float64."""
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))
