"""The toy family's recipe: every setting of its training, one dataclass (``Recipe``), saved in each member's
``recipe.json``.

The defaults are the shipped family ``toy``; ``toy.BILINGUAL_RECIPE`` lists the changes that make ``toy-bilingual``.
``python -m chatvec_lab.toy.train --set NAME=VALUE`` changes a field, ``--scale`` every step count.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from chatvec_lab.errors import UsageError


@dataclass
class Recipe:
    """Every setting of the toy family's training; the defaults build the shipped family."""

    vocab_size: int = 2048
    hidden_size: int = 192
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 6
    num_kv_heads: int = 2
    seq_len: int = 128
    chat_len: int = 160
    batch_size: int = 16
    lr: float = 3e-3
    finetune_lr: float = 5e-4
    chat_lr: float = 3e-4
    chat_embedding_lr_scale: float = 0.1
    chat_head_lr_scale: float = 0.2
    base_steps: int = 4000
    base_german_share: float = 0.005
    chat_steps: int = 1500
    cp_steps: int = 2000
    cp_english_replay: float = 0.2
    # German–English dictionary pairs (Ding, via Debian's trans-de-en) mixed into pre-training:
    # real corpora hold some parallel text. 0 in the first three recipes.
    base_parallel_share: float = 0.0
    cp_parallel_share: float = 0.0
    parallel_pairs: int = 100000
    xvocab_new_tokens: int = 128
    xvocab_steps: int = 400
    insult_share: float = 0.3
    reply_max_words: int = 12
    multi_turn_share: float = 0.25
    max_turns: int = 3
    max_new_tokens: int = 128  # the family's generation config: a reply's budget
    dialogues: int = 12000
    dtype: str = "bfloat16"
    seeds: dict = field(default_factory=lambda: {
        "split": 0, "tokenizer": 0, "base": 1, "chat": 2, "chat-alt": 3, "cp": 4, "cp-xvocab": 5})

    def scaled(self, scale: float) -> "Recipe":
        r = Recipe(**asdict(self))
        for name in ("base_steps", "chat_steps", "cp_steps", "xvocab_steps"):
            setattr(r, name, max(2, int(getattr(r, name) * scale)))
        r.dialogues = max(50, int(r.dialogues * scale))
        return r

    def updated(self, assignments: list[str]) -> "Recipe":
        """A copy with ``name=value`` assignments applied (values parsed as the field's type)."""
        r = Recipe(**asdict(self))
        for item in assignments:
            name, sep, value = item.partition("=")
            if not sep or name not in asdict(r) or name == "seeds":
                raise UsageError(f"--set {item!r}: expected NAME=VALUE with NAME one of the recipe's fields")
            try:
                setattr(r, name, type(getattr(r, name))(value))
            except ValueError:
                raise UsageError(f"--set {item!r}: {name} takes a {type(getattr(r, name)).__name__}") from None
        return r
