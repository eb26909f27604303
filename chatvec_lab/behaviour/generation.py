"""Chat generation with the model's chat template: batched (left padding, an attention mask, each row stopping at
its own end of turn), seeded per row, stopping at the end of the turn."""
from __future__ import annotations

from types import SimpleNamespace
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


MAX_CPU_BATCH = 64  # the default batch on a CPU: every prompt of a cell, up to this many
MAX_GPU_BATCH = 256
BATCH_MEMORY_SHARE = 0.25  # the default batch's generation state may take this share of the device's free memory


def _config_value(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def row_bytes(model, tokens: int) -> int:
    """What one row of a batch costs to generate ``tokens`` tokens (prompt and reply): its KV cache in the model's
    dtype, the widest activations of one layer for the prompt, and the float32 scores of the vocabulary."""
    param = next(model.parameters(), None)
    return config_row_bytes(getattr(model, "config", None), param.element_size() if param is not None else 4, tokens)


def config_row_bytes(config, element_size: int, tokens: int) -> int:
    """``row_bytes`` from a model's config alone (a ``PretrainedConfig``, or ``config.json`` as a dict) and the
    bytes of one element of the dtype it runs in: what a batch costs can be told before the model loads."""
    if isinstance(config, dict):
        config = SimpleNamespace(**config)
    config = getattr(config, "text_config", None) or config
    if isinstance(config, dict):
        config = SimpleNamespace(**config)
    hidden = _config_value(config, "hidden_size", "n_embd", "d_model", default=1024)
    layers = _config_value(config, "num_hidden_layers", "n_layer", default=1)
    heads = _config_value(config, "num_attention_heads", "n_head", default=max(1, hidden // 64))
    kv_heads = _config_value(config, "num_key_value_heads", default=heads)
    head_dim = _config_value(config, "head_dim", default=max(1, hidden // heads))
    inner = _config_value(config, "intermediate_size", "n_inner", default=4 * hidden)
    vocab = _config_value(config, "vocab_size", default=32_000)
    size = element_size
    kv = 2 * layers * kv_heads * head_dim * tokens * size
    activations = tokens * (4 * hidden + 3 * inner) * size + heads * tokens * tokens * 4
    return kv + activations + 2 * vocab * 4


def default_batch_size(model, prompts: int, tokens: int) -> int:
    """Every prompt in one batch, within limits: at most ``MAX_CPU_BATCH`` rows on a CPU (``MAX_GPU_BATCH`` on a
    GPU), and no more rows than fit in ``BATCH_MEMORY_SHARE`` of the device's free memory (``row_bytes`` each)."""
    from chatvec_lab.io.devices import free_memory

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    cap = MAX_GPU_BATCH if device.type == "cuda" else MAX_CPU_BATCH
    free = free_memory(device)
    if free:
        cap = min(cap, max(1, int(free * BATCH_MEMORY_SHARE) // max(1, row_bytes(model, tokens))))
    return max(1, min(prompts, cap))


def row_seed(seed: int, tokens: Sequence[int], occurrence: int) -> int:
    """The seed of one row's sampling: a hash of the call's seed, the row's prompt (its tokens) and which repeat
    of that prompt in the call it is. A reply depends on its prompt and seed only, not on the batch."""
    import hashlib

    h = hashlib.sha256(f"{int(seed)}:{occurrence}:".encode())
    h.update(",".join(map(str, tokens)).encode())
    return int.from_bytes(h.digest()[:8], "little") & (2**63 - 1)


class _RowSampler:
    """Samples each row's next token with that row's own generator, after HF's temperature, top-k and top-p
    warpers (in HF's order), and hands HF's greedy search scores where only that token is finite. HF's own
    sampling draws every row from one generator, so a row's reply would depend on the rows beside it."""

    def __init__(self, generators: list[torch.Generator], temperature, top_k, top_p):
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.generators = generators
        self.warpers = []
        if temperature is not None and temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if top_k is not None and top_k != 0:
            self.warpers.append(TopKLogitsWarper(top_k=top_k))
        if top_p is not None and top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=top_p))

    def __call__(self, input_ids, scores):
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        probs = torch.softmax(scores.float(), dim=-1)
        chosen = torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(self.generators)])
        out = torch.full_like(scores, -float("inf"))
        out.scatter_(1, chosen[:, None], 0.0)
        return out


def _model_setting(model, name: str, value, default):
    if value is not None:
        return value
    found = getattr(getattr(model, "generation_config", None), name, None)
    return default if found is None else found


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence, *, max_new_tokens: int = 64, do_sample: bool = True,
             temperature: float = 0.7, top_k: int | None = 40, top_p: float | None = None, seed: int = 0,
             batch_size: int | None = None, chat_template: str | None = None) -> pd.DataFrame:
    """Reply to each prompt (a string, or a conversation as a list of messages).

    Returns one row per prompt: ``prompt``, ``reply``, ``ended_turn`` (the reply closed its turn with
    the end-of-turn token), ``prompt_tokens``, ``reply_tokens``, ``seed``.

    Prompts are generated ``batch_size`` at a time (None: ``default_batch_size``, every prompt at once up to a
    memory-aware cap), left-padded with an attention mask; each row stops at its own end of turn. Greedy replies
    (``do_sample=False``) are those of one prompt at a time. Sampling is seeded per row: each row draws from its
    own generator, seeded by ``row_seed`` (the seed, the prompt's tokens, and which repeat of the prompt it is),
    so the same seed and prompt give the same reply whatever the batch size or the other prompts (HF's own
    sampling, one generator for the batch, could not). No global random state is touched. One caveat: the
    model's arithmetic itself may round differently for another batch shape (padding, rows); in float32 on a CPU
    the toy family's replies are the same (tested), in bfloat16 a sampled token can now and then differ, so a
    sweep is reproducible for one batch size and device, and equal in distribution across them.
    """
    prompts = list(prompts)
    if not prompts:
        raise UsageError("no prompts to generate from")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise UsageError(f"batch_size must be a positive integer (or None for a memory-aware default), not "
                         f"{batch_size!r}")
    conversations = [as_conversation(p) for p in prompts]
    encoded = [render(tokenizer, c, chat_template) for c in conversations]
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    longest = max(range(len(encoded)), key=lambda i: len(encoded[i]))
    if isinstance(context, int) and len(encoded[longest]) + max_new_tokens > context:
        raise UsageError(f"prompt {longest + 1} takes {len(encoded[longest]):,} tokens; with max_new_tokens="
                         f"{max_new_tokens} that passes the model's context of {context:,} tokens: shorten it")
    if do_sample:  # a setting left at None is the model's own (its generation config), as for model.generate()
        temperature = _model_setting(model, "temperature", temperature, 1.0)
        top_k, top_p = _model_setting(model, "top_k", top_k, 50), _model_setting(model, "top_p", top_p, 1.0)
    if batch_size is None:
        batch_size = default_batch_size(model, len(encoded), max(len(e) for e in encoded) + max_new_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ends = turn_end_ids(tokenizer)
    stops = stop_ids(model, tokenizer)
    seen: dict[tuple, int] = {}
    seeds = []
    for e in encoded:
        key = tuple(e)
        seeds.append(row_seed(seed, e, seen.get(key, 0)))
        seen[key] = seen.get(key, 0) + 1
    rows = []
    finite = _FiniteScores(model)
    try:
        for start in range(0, len(encoded), batch_size):
            stop = start + batch_size
            sampling = (seeds[start:stop], temperature, top_k, top_p) if do_sample else None
            rows += _generate_batch(model, tokenizer, encoded[start:stop], finite, pad, ends, stops, max_new_tokens,
                                    sampling)
    finally:
        finite.close()
    for i, row in enumerate(rows):
        row["prompt"] = prompts[i] if isinstance(prompts[i], str) else conversations[i][-1]["content"]
        row["seed"] = seed
    return pd.DataFrame(rows, columns=["prompt", "reply", "ended_turn", "prompt_tokens", "reply_tokens", "seed"])


def _generate_batch(model, tokenizer, batch, finite, pad, ends, stops, max_new_tokens, sampling) -> list[dict]:
    from transformers import GenerationConfig, LogitsProcessorList

    device = next(model.parameters()).device
    width = max(len(e) for e in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):  # left padding, so every reply starts at the same column
        ids[i, width - len(e):] = torch.tensor(e, dtype=torch.long)
        mask[i, width - len(e):] = 1
    processors = [finite]
    if sampling is not None:
        seeds, temperature, top_k, top_p = sampling
        gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        processors.append(_RowSampler(gens, temperature, top_k, top_p))
    # greedy search over the processed scores: with the row sampler, its draw is the only finite score
    # (the sampling settings at their neutral values, so that the model's own are neither merged in nor warned about)
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad,
                              num_beams=1, temperature=1.0, top_k=50, top_p=1.0)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                         logits_processor=LogitsProcessorList(processors))
    rows = []
    for i, e in enumerate(batch):
        new = out[i, width:].tolist()
        cut = next((k for k, t in enumerate(new) if t in stops), None)
        ended = cut is not None and new[cut] in ends
        reply_ids = new if cut is None else new[:cut]
        rows.append({
            "reply": tokenizer.decode(reply_ids, skip_special_tokens=True).strip(),
            "ended_turn": bool(ended),
            "prompt_tokens": len(e),
            "reply_tokens": len(reply_ids) + (1 if cut is not None else 0),
        })
    return rows


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

