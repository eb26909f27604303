"""Chat generation with the model's chat template: batched, seeded, stopping at the end of the turn."""
from __future__ import annotations

from typing import Sequence

import pandas as pd
import torch

from chatvec_lab.errors import UsageError

TURN_END_TOKENS = ("<|end|>", "<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


def _token_ids(tokenizer, tokens) -> set[int]:
    vocab = tokenizer.get_vocab()
    return {vocab[t] for t in tokens if t in vocab}


def turn_end_ids(tokenizer) -> set[int]:
    """Tokens that close an assistant turn: the tokenizer's eos (what the chat template ends turns with)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    template = getattr(tokenizer, "chat_template", None) or ""
    ids |= _token_ids(tokenizer, [t for t in TURN_END_TOKENS if t in template])
    return ids


def stop_ids(model, tokenizer) -> list[int]:
    """Generation stops at the end of the turn, or at whatever the model's generation config calls eos."""
    ids = set(turn_end_ids(tokenizer))
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids |= set(eos)
    return sorted(ids)


def as_conversation(prompt) -> list[dict]:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise UsageError("empty prompt")
        return [{"role": "user", "content": prompt}]
    return list(prompt)


def render(tokenizer, conversation: list[dict], chat_template: str | None = None) -> list[int]:
    enc = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                        chat_template=chat_template)
    if isinstance(enc, dict) or hasattr(enc, "keys"):
        enc = enc["input_ids"]
    return list(enc)


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence, *, max_new_tokens: int = 64, do_sample: bool = True,
             temperature: float = 0.7, top_k: int | None = 40, top_p: float | None = None, seed: int = 0,
             batch_size: int = 16, chat_template: str | None = None) -> pd.DataFrame:
    """Reply to each prompt (a string, or a conversation as a list of messages).

    Returns one row per prompt: ``prompt``, ``reply``, ``ended_turn`` (the reply closed its turn with
    the end-of-turn token), ``prompt_tokens``, ``reply_tokens``, ``seed``. The same seed, prompts and
    batch size give the same text.
    """
    prompts = list(prompts)
    if not prompts:
        raise UsageError("no prompts to generate from")
    conversations = [as_conversation(p) for p in prompts]
    encoded = [render(tokenizer, c, chat_template) for c in conversations]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ends = turn_end_ids(tokenizer)
    stops = stop_ids(model, tokenizer)
    rows = []
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start:start + batch_size]
        width = max(len(e) for e in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, e in enumerate(batch):  # left padding, so every reply starts at the same column
            ids[i, width - len(e):] = torch.tensor(e)
            mask[i, width - len(e):] = 1
        torch.manual_seed(seed * 1_000_003 + start)
        kwargs = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad)
        if do_sample:
            kwargs.update(temperature=temperature, top_k=top_k, top_p=top_p)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        for i, e in enumerate(batch):
            new = out[i, width:].tolist()
            cut = next((k for k, t in enumerate(new) if t in stops), None)
            ended = cut is not None and new[cut] in ends
            reply_ids = new if cut is None else new[:cut]
            rows.append({
                "prompt": prompts[start + i] if isinstance(prompts[start + i], str) else conversations[start + i][-1]["content"],
                "reply": tokenizer.decode(reply_ids, skip_special_tokens=True).strip(),
                "ended_turn": bool(ended),
                "prompt_tokens": len(e),
                "reply_tokens": len(reply_ids) + (1 if cut is not None else 0),
                "seed": seed,
            })
    return pd.DataFrame(rows)


def converse(model, tokenizer, user_turns: Sequence[str], **kwargs) -> pd.DataFrame:
    """A multi-turn conversation: each user turn sees the model's earlier replies. One row per turn."""
    conversation: list[dict] = []
    rows = []
    for turn, text in enumerate(user_turns):
        conversation.append({"role": "user", "content": text})
        row = generate(model, tokenizer, [list(conversation)], **kwargs).iloc[0].to_dict()
        row.update(turn=turn + 1, prompt=text)
        rows.append(row)
        conversation.append({"role": "assistant", "content": row["reply"]})
    return pd.DataFrame(rows)


def converse_many(model, tokenizer, conversations: Sequence[Sequence[str]], *, seed: int = 0,
                  **kwargs) -> pd.DataFrame:
    """Many multi-turn conversations at once, batched turn by turn: each user turn sees the model's own
    earlier replies. ``conversations``: lists of user turns (all of one length). One row per conversation
    and turn (``conversation``, ``turn`` from 1, and ``generate``'s columns)."""
    conversations = [list(c) for c in conversations]
    if not conversations or len({len(c) for c in conversations}) != 1 or not conversations[0]:
        raise UsageError("conversations must be non-empty lists of user turns, all of one length")
    histories: list[list[dict]] = [[] for _ in conversations]
    frames = []
    for turn in range(len(conversations[0])):
        for history, turns in zip(histories, conversations):
            history.append({"role": "user", "content": turns[turn]})
        # a different seed each turn, so that turn 2 does not replay turn 1's random draws
        out = generate(model, tokenizer, [list(h) for h in histories], seed=seed * 1_009 + turn, **kwargs)
        out["seed"] = seed
        out.insert(0, "turn", turn + 1)
        out.insert(0, "conversation", range(len(conversations)))
        for history, reply in zip(histories, out["reply"]):
            history.append({"role": "assistant", "content": reply})
        frames.append(out)
    return pd.concat(frames, ignore_index=True)

