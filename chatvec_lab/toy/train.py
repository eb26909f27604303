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

The recipe is in ``toy/recipe.py``; the tokenizer and the batches in ``toy/batches.py``; this module trains the
members and saves them.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from chatvec_lab.errors import ChatVecError
from chatvec_lab.toy.batches import ChatStream, LMStream, MixedStream, build_tokenizer, extend_tokenizer
from chatvec_lab.toy.corpora import fetch_dictionary, fetch_fortunes, parallel_documents
from chatvec_lab.toy.dialogues import make_dialogues
from chatvec_lab.toy.recipe import Recipe


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


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
