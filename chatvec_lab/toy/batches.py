"""The toy family's text, made trainable: one byte-level BPE tokenizer with a chat template for every member, and the
streams of training batches its members read.

``LMStream`` gives random windows of a token stream (pre-training); ``MixedStream`` draws each sequence from one of
several streams by share (a little German in the base, English replay in CP); ``ChatStream`` gives dialogues with
labels on the assistant's replies only (``encode_conversation``: loss on nothing else).
"""
from __future__ import annotations

import random
from collections import Counter

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


# ---------------------------------------------------------------- tokenizer

def build_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|end|>", pad_token="<|pad|>", unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[:4])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def extend_tokenizer(tokenizer, german: list[str], n_new: int):
    """Add the most frequent German words that the shared vocabulary splits into 3+ pieces."""
    counts = Counter(w for text in german for w in text.split() if w.isalpha() and len(w) > 4)
    new = []
    for word, _ in counts.most_common():
        piece = " " + word
        if len(tokenizer(piece, add_special_tokens=False)["input_ids"]) >= 3:
            new.append(piece)
        if len(new) == n_new:
            break
    from tokenizers import AddedToken
    tokenizer.add_tokens([AddedToken(p, normalized=False) for p in new])
    return new


# ---------------------------------------------------------------- data

class LMStream:
    """Random windows from a token stream built from documents joined by <|endoftext|>."""

    def __init__(self, tokenizer, docs: list[str], seq_len: int, seed: int):
        eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        ids: list[int] = []
        for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
            ids.extend(enc)
            ids.append(eot)
        self.ids = torch.tensor(ids, dtype=torch.long)
        self.seq_len = seq_len
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(self.ids) - self.seq_len - 1, (n,), generator=self.gen)
        x = torch.stack([self.ids[s:s + self.seq_len] for s in starts.tolist()])
        return x, x.clone()


class MixedStream:
    def __init__(self, streams: list[tuple[LMStream, float]], seed: int):
        self.streams = streams
        self.rng = random.Random(seed)

    def batch(self, n: int):
        xs = []
        for _ in range(n):
            r, acc = self.rng.random(), 0.0
            for stream, share in self.streams:
                acc += share
                if r <= acc:
                    break
            xs.append(stream.batch(1)[0])
        x = torch.cat(xs)
        return x, x.clone()


def encode_conversation(tokenizer, messages: list[dict], max_len: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 outside assistant replies), consistent with CHAT_TEMPLATE."""
    ids, labels = [], []
    for m in messages:
        head = tokenizer(f"<|{m['role']}|>\n", add_special_tokens=False)["input_ids"]
        body = tokenizer(m["content"] + "<|end|>", add_special_tokens=False)["input_ids"]
        tail = tokenizer("\n", add_special_tokens=False)["input_ids"]
        ids += head + body + tail
        train = m["role"] == "assistant"
        labels += [-100] * len(head) + (body if train else [-100] * len(body)) + [-100] * len(tail)
    return ids[:max_len], labels[:max_len]


class ChatStream:
    def __init__(self, tokenizer, conversations: list[list[dict]], max_len: int, seed: int):
        self.pad = tokenizer.pad_token_id
        self.items = [encode_conversation(tokenizer, c, max_len) for c in conversations]
        self.rng = random.Random(seed)

    def batch(self, n: int):
        chosen = [self.rng.choice(self.items) for _ in range(n)]
        width = max(len(ids) for ids, _ in chosen)
        x = torch.full((n, width), self.pad, dtype=torch.long)
        y = torch.full((n, width), -100, dtype=torch.long)
        for i, (ids, labels) in enumerate(chosen):
            x[i, :len(ids)] = torch.tensor(ids)
            y[i, :len(labels)] = torch.tensor(labels)
        return x, y
