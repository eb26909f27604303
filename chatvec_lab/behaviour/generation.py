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
    import jinja2

    if chat_template is not None and not isinstance(chat_template, str):
        raise UsageError(f"chat_template must be a Jinja template (str), not {type(chat_template).__name__}")
    try:
        enc = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                            chat_template=chat_template)
    except jinja2.TemplateError as e:  # a syntax error, or the template's own raise_exception on this conversation
        where = "given" if chat_template is not None else f"of {getattr(tokenizer, 'name_or_path', 'the tokenizer')}"
        raise UsageError(f"the chat template {where} fails on this conversation: {type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    if isinstance(enc, dict) or hasattr(enc, "keys"):
        enc = enc["input_ids"]
    return list(enc)


class _FiniteScores:
    """A logits processor that stops generation with a NonFiniteError when the model overflows: NaN or +Inf among
    its scores (-Inf alone is top-k's mask), or a residual stream whose mean square (what a normalisation layer
    computes) is NaN/Inf: the norm then turns it into zeros, so the scores of an overflowed model look finite
    (uniform gibberish). Weights
    scaled by a huge coefficient do that. The hooks only read, at the last position of each row; one check a step."""

    def __init__(self, model):
        self.flag = None
        self.handles = [m.register_forward_pre_hook(self._watch) for m in model.modules()
                        if "norm" in type(m).__name__.lower() and not any(True for _ in m.children())]

    def _watch(self, module, args):
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() >= 2:
            last = (x[:, -1] if x.dim() == 3 else x).float()
            bad = ~torch.isfinite(last.pow(2).mean(-1)).all()  # what the norm computes: x² overflows before x does
            self.flag = bad if self.flag is None else self.flag | bad

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()

    def __call__(self, input_ids, scores):
        bad = torch.isnan(scores).any() or torch.isposinf(scores).any() or (~torch.isfinite(scores)).all(dim=-1).any()
        if self.flag is not None:
            bad = bad | self.flag
            self.flag = None
        if bool(bad):
            from chatvec_lab.errors import NonFiniteError

            raise NonFiniteError("the model overflows to NaN/Inf as it generates (its weights are out of range: a "
                                 "coefficient too large?): no reply can be sampled")
        return scores


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
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ends = turn_end_ids(tokenizer)
    stops = stop_ids(model, tokenizer)
    rows = []
    finite = _FiniteScores(model)
    try:
        _generate_batches(model, tokenizer, prompts, conversations, encoded, rows, finite, pad, ends, stops,
                          max_new_tokens, do_sample, temperature, top_k, top_p, seed, batch_size)
    finally:
        finite.close()
    return pd.DataFrame(rows)


def _generate_batches(model, tokenizer, prompts, conversations, encoded, rows, finite, pad, ends, stops,
                      max_new_tokens, do_sample, temperature, top_k, top_p, seed, batch_size) -> None:
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start:start + batch_size]
        width = max(len(e) for e in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, e in enumerate(batch):  # left padding, so every reply starts at the same column
            ids[i, width - len(e):] = torch.tensor(e)
            mask[i, width - len(e):] = 1
        torch.manual_seed((seed * 1_000_003 + start) % 2**64)  # torch takes 64 bits: a huge seed wraps, as negatives do
        kwargs = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad,
                      logits_processor=LogitsProcessorList([finite]))
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

