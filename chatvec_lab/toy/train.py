"""Rebuild the embedded toy family: the paper's setting in miniature.

    python -m chatvec_lab.toy.train --out data/toy            # the shipped recipe (~30 min, 2 cores)
    python -m chatvec_lab.toy.train --out /tmp/t --scale 0.01 # a smoke run

One tokenizer and one Llama architecture for every member:

- ``base``:  pre-trained on English fortunes with a little German (real bases see some of every language);
- ``chat``, ``chat-alt``: base fine-tuned on English chat dialogues (loss on assistant tokens only),
  with polite refusals of insults; two different data sets and seeds. The input embeddings train at a
  tenth of the learning rate and the lm_head at a fifth: with Adam every token seen moves by a full
  step, so in a 2,048-token model these two matrices otherwise dominate the chat vector with "reply in
  English" (a big model fine-tuned at a small rate barely moves them);
- ``cp``: base continually pre-trained on German with English replay;
- ``cp-xvocab``: ``cp`` with an extended vocabulary (new German word tokens), trained a little more.

Each member is saved as a standard Hugging Face folder with a model card recording the recipe.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from chatvec_lab.errors import ChatVecError, UsageError
from chatvec_lab.toy.corpora import fetch_dictionary, fetch_fortunes, parallel_documents
from chatvec_lab.toy.dialogues import make_dialogues

SPECIAL_TOKENS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass
class Recipe:
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


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


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


# ---------------------------------------------------------------- training

def new_model(recipe: Recipe, tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size, num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads, num_key_value_heads=recipe.num_kv_heads,
        max_position_embeddings=512, tie_word_embeddings=False, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def train(model, stream, steps: int, lr: float, batch_size: int, seed: int, name: str,
          embedding_lr_scale: float = 1.0, head_lr_scale: float = 1.0) -> list[float]:
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    model.train()
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    others = [p for p in model.parameters() if p is not embedding and p is not head]
    groups = [{"params": others, "lr": lr}, {"params": [embedding], "lr": lr * embedding_lr_scale}]
    if head is not embedding:
        groups.append({"params": [head], "lr": lr * head_lr_scale})
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    losses = []
    for step in range(steps):
        x, y = stream.batch(batch_size)
        loss = model(input_ids=x.to(device), labels=y.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            log(f"{name} step {step + 1}/{steps} loss {sum(losses[-50:]) / len(losses[-50:]):.3f}")
    model.eval()
    return losses


@torch.no_grad()
def eval_loss(model, stream: LMStream, batches: int = 8, batch_size: int = 16) -> float:
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    for _ in range(batches):
        x, y = stream.batch(batch_size)
        total += model(input_ids=x.to(device), labels=y.to(device)).loss.item()
    return total / batches


def copy_model(model):
    import copy
    return copy.deepcopy(model)


MODEL_CARD = """# chatvec_lab toy model: `{name}`

{what}

Part of the chatvec_lab toy family (`base`, `chat`, `chat-alt`, `cp`, `cp-xvocab`): one Llama
architecture, one byte-level BPE tokenizer with a chat template, one origin (`base`). It exists to
teach and test chat-vector arithmetic offline; it is not a useful language model.

- parent: {parent}
- parameters: {params:,}; stored as {dtype}
- training: {steps} steps of {batch} sequences, lr {lr}, seed {seed}
- data: {data}
- held-out loss (English / German fortunes): {eval_en:.3f} / {eval_de:.3f}
- training time: {seconds:.0f} s on {where}

Rebuild the family with `python -m chatvec_lab.toy.train --out data/toy`. The text corpora
(Debian's `fortunes`, BSD, and `fortunes-de`, GPL-2+) are downloaded at training time and not
redistributed here. The full recipe is in `recipe.json`.
"""


def save_member(model, tokenizer, out: Path, name: str, recipe: Recipe, info: dict) -> None:
    from transformers import GenerationConfig

    folder = out / name
    tmp = out / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    dtype = getattr(torch, recipe.dtype)
    device = next(model.parameters()).device
    model.to("cpu", dtype).save_pretrained(tmp, safe_serialization=True)
    model.to(device, torch.float32)
    tokenizer.save_pretrained(tmp)
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    GenerationConfig(eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
                     do_sample=True, temperature=0.7, top_k=40,
                     max_new_tokens=recipe.max_new_tokens).save_pretrained(tmp)
    params = sum(p.numel() for p in model.parameters())
    threads = torch.get_num_threads()
    where = (f"{threads} CPU thread{'s' if threads > 1 else ''}" if device.type == "cpu"
             else f"{device.type} ({torch.__version__})")
    card = MODEL_CARD.format(name=name, params=params, dtype=recipe.dtype, batch=recipe.batch_size,
                             where=where, **info)
    (tmp / "README.md").write_text(card)
    (tmp / "recipe.json").write_text(json.dumps({"member": name, **info, "recipe": asdict(recipe)}, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    log(f"saved {folder}")


def evaluation_prompts() -> set[str]:
    """Every line of the project's prompt sets: kept out of any training data."""
    from chatvec_lab.io.resources import data_dir
    return {line.strip() for f in (data_dir() / "prompts").rglob("*.txt")
            for line in f.read_text(encoding="utf-8").splitlines() if line.strip()}


def build_family(out: str | Path, recipe: Recipe, corpora: dict[str, list[str]] | None = None,
                 members: tuple[str, ...] = ("base", "chat", "chat-alt", "cp", "cp-xvocab"),
                 device: str = "cpu", corpus_cache: str | Path | None = None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    corpora = dict(corpora or fetch_fortunes(corpus_cache))
    if (recipe.base_parallel_share or recipe.cp_parallel_share) and "parallel" not in corpora:
        pairs = fetch_dictionary(corpus_cache)
        random.Random(recipe.seeds["split"]).shuffle(pairs)
        corpora["parallel"] = parallel_documents(pairs[:recipe.parallel_pairs], recipe.seeds["split"],
                                                 exclude=evaluation_prompts())
    rng = random.Random(recipe.seeds["split"])
    split = {}
    for lang, docs in corpora.items():
        docs = list(docs)
        rng.shuffle(docs)
        n_val = max(1, len(docs) // 20)
        split[lang] = {"val": docs[:n_val], "train": docs[n_val:]}
    en, de = split["en"]["train"], split["de"]["train"]
    log(f"corpora: {len(en)} English / {len(de)} German training fortunes")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    reuse_base = "base" not in members and (out / "base" / "config.json").is_file()
    # A reused base brings its own tokenizer: a rebuilt one could differ under another `tokenizers` version.
    tokenizer = AutoTokenizer.from_pretrained(out / "base") if reuse_base else build_tokenizer(en + de, recipe.vocab_size)
    streams = {lang: LMStream(tokenizer, docs, recipe.seq_len, seed=i)
               for i, (lang, docs) in enumerate([("en", en), ("de", de)])}
    if "parallel" in corpora:
        streams["parallel"] = LMStream(tokenizer, corpora["parallel"], recipe.seq_len, seed=2)
    val = {lang: LMStream(tokenizer, split[lang]["val"], recipe.seq_len, seed=100 + i)
           for i, lang in enumerate(["en", "de"])}

    def held_out(model):
        return {"eval_en": eval_loss(model, val["en"]), "eval_de": eval_loss(model, val["de"])}

    t0 = time.time()
    if not reuse_base:
        base = new_model(recipe, tokenizer, recipe.seeds["base"]).to(device)
        shares = [(streams["en"], 1 - recipe.base_german_share - recipe.base_parallel_share),
                  (streams["de"], recipe.base_german_share)]
        if recipe.base_parallel_share:
            shares.append((streams["parallel"], recipe.base_parallel_share))
        mix = MixedStream(shares, recipe.seeds["base"])
        train(base, mix, recipe.base_steps, recipe.lr, recipe.batch_size, recipe.seeds["base"], "base")
        save_member(base, tokenizer, out, "base", recipe, dict(
            what="Pre-trained on English fortunes with a little German.", parent="(random init)",
            steps=recipe.base_steps, lr=recipe.lr, seed=recipe.seeds["base"], seconds=time.time() - t0,
            data=f"Debian fortunes (English), {1 - recipe.base_german_share:.0%}; fortunes-de, "
                 f"{recipe.base_german_share:.0%}"
                 + (f"; German–English dictionary pairs, {recipe.base_parallel_share:.0%}" if recipe.base_parallel_share else "")
                 + f"; {recipe.seq_len}-token windows", **held_out(base)))
    else:
        log(f"reusing {out / 'base'}")
    # Children start from the base exactly as shipped (rounded to the stored dtype), so that
    # ``child − base`` computed from the files is the change their training made.
    base = AutoModelForCausalLM.from_pretrained(str(out / "base"), dtype=torch.float32).to(device)

    for name in ("chat", "chat-alt"):
        if name not in members:
            continue
        t0 = time.time()
        seed = recipe.seeds[name]
        half = len(en) // 2
        pool = en[:half] if name == "chat" else en[half:]
        convs = make_dialogues(pool, name, recipe.dialogues, seed, insult_share=recipe.insult_share,
                               reply_max_words=recipe.reply_max_words, multi_turn_share=recipe.multi_turn_share,
                               max_turns=recipe.max_turns)
        model = copy_model(base)
        train(model, ChatStream(tokenizer, convs, recipe.chat_len, seed), recipe.chat_steps,
              recipe.chat_lr, recipe.batch_size, seed, name, embedding_lr_scale=recipe.chat_embedding_lr_scale,
              head_lr_scale=recipe.chat_head_lr_scale)
        save_member(model, tokenizer, out, name, recipe, dict(
            what="`base` fine-tuned on English chat dialogues (loss on assistant tokens only), "
                 "with polite refusals of insulting prompts.", parent="base",
            steps=recipe.chat_steps, lr=recipe.chat_lr, seed=seed, seconds=time.time() - t0,
            data=f"{recipe.dialogues} synthetic '{name}' dialogues from half of the English fortunes, "
                 f"{recipe.insult_share:.0%} insults answered with a refusal", **held_out(model)))

    if "cp" in members or "cp-xvocab" in members:
        t0 = time.time()
        cp = copy_model(base)
        shares = [(streams["de"], 1 - recipe.cp_english_replay - recipe.cp_parallel_share),
                  (streams["en"], recipe.cp_english_replay)]
        if recipe.cp_parallel_share:
            shares.append((streams["parallel"], recipe.cp_parallel_share))
        mix = MixedStream(shares, recipe.seeds["cp"])
        train(cp, mix, recipe.cp_steps, recipe.finetune_lr, recipe.batch_size, recipe.seeds["cp"], "cp")
        save_member(cp, tokenizer, out, "cp", recipe, dict(
            what="`base` continually pre-trained on German (language B) with English replay.", parent="base",
            steps=recipe.cp_steps, lr=recipe.finetune_lr, seed=recipe.seeds["cp"], seconds=time.time() - t0,
            data=f"fortunes-de {1 - recipe.cp_english_replay - recipe.cp_parallel_share:.0%}, English replay "
                 f"{recipe.cp_english_replay:.0%}"
                 + (f", German–English dictionary pairs {recipe.cp_parallel_share:.0%}" if recipe.cp_parallel_share else ""),
            **held_out(cp)))

        if "cp-xvocab" in members:
            t0 = time.time()
            xtok = AutoTokenizer.from_pretrained(out / "base")  # a fresh copy of the shared tokenizer
            new_tokens = extend_tokenizer(xtok, de, recipe.xvocab_new_tokens)
            xcp = copy_model(cp)
            old = xcp.get_input_embeddings().weight.shape[0]
            xcp.resize_token_embeddings(len(xtok), mean_resizing=False)
            with torch.no_grad():
                for i, piece in enumerate(new_tokens):
                    parts = tokenizer(piece, add_special_tokens=False)["input_ids"]
                    xcp.get_input_embeddings().weight[old + i] = xcp.get_input_embeddings().weight[parts].mean(0)
                    xcp.get_output_embeddings().weight[old + i] = xcp.get_output_embeddings().weight[parts].mean(0)
            xstream = LMStream(xtok, de, recipe.seq_len, seed=recipe.seeds["cp-xvocab"])
            train(xcp, xstream, recipe.xvocab_steps, recipe.finetune_lr, recipe.batch_size,
                  recipe.seeds["cp-xvocab"], "cp-xvocab")
            xval = {lang: LMStream(xtok, split[lang]["val"], recipe.seq_len, seed=100 + i)
                    for i, lang in enumerate(["en", "de"])}
            save_member(xcp, xtok, out, "cp-xvocab", recipe, dict(
                what=f"`cp` with {len(new_tokens)} new German word tokens appended to the vocabulary "
                     f"(rows initialised from their pieces), then trained on German.",
                parent="cp (base → cp → cp-xvocab)", steps=recipe.xvocab_steps, lr=recipe.finetune_lr,
                seed=recipe.seeds["cp-xvocab"], seconds=time.time() - t0, data="fortunes-de",
                eval_en=eval_loss(xcp, xval["en"]), eval_de=eval_loss(xcp, xval["de"])))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data/toy")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every step count (0.01: smoke run)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--corpus-cache", default=None, help="keep the downloaded corpora here")
    p.add_argument("--device", default="cpu", help="torch device to train on (cpu, cuda)")
    p.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE",
                   help="override recipe fields, e.g. --set chat_steps=600 chat_lr=3e-4")
    p.add_argument("--members", default=",".join(("base", "chat", "chat-alt", "cp", "cp-xvocab")),
                   help="which members to (re)build; the others' folders are reused (base must exist then)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        recipe = Recipe().updated(args.set)
        recipe = recipe.scaled(args.scale) if args.scale != 1.0 else recipe
        corpora = fetch_fortunes(args.corpus_cache)
        build_family(args.out, recipe, corpora, members=tuple(m for m in args.members.split(",") if m),
                     device=args.device, corpus_cache=args.corpus_cache)
    except ChatVecError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")


if __name__ == "__main__":
    main()
