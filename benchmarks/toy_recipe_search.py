"""Screen candidate toy recipes quickly (how the third recipe was chosen).

    python benchmarks/toy_recipe_search.py --work /tmp/search --corpus-cache /tmp/corpora --device cuda

Trains ``base``, ``chat`` and ``cp`` for each variant below (variants with the same base settings share
one base), then measures CP, chat and CP + 1·CV on the project's *tuning* prompt sets
(``data/prompts/chat_de.txt``, ``offensive_de.txt``), 3 seeds, at the family's sampling settings and at
temperature 0.8 / top-p 0.9. The held-out prompt sets (``data/prompts/heldout/``) are never read here:
they judge only the recipe finally chosen.

On a GPU the variants run side by side (one process each). The numbers differ from a CPU build's (other
kernels, other rounding), so this only ranks recipes; the shipped family is rebuilt on CPU and measured
by ``python -m chatvec_lab.toy.evaluate``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

BASES = {f"g{share[2:]}": [f"base_german_share={share}"] for share in ("0.005", "0.01", "0.02", "0.03", "0.05")}
COMMON = ["reply_max_words=20", "chat_steps=1500", "cp_steps=2000", "insult_share=0.25", "max_turns=3"]
ROUND1 = {
    "A-g03": ("g03", COMMON),
    "B-g02": ("g02", COMMON),
    "C-g05": ("g05", COMMON),
    "D-g03-long-replies": ("g03", COMMON + ["reply_max_words=30"]),
    "E-g03-chat2500": ("g03", COMMON + ["chat_steps=2500"]),
    "F-g03-chatlr5e-4": ("g03", COMMON + ["chat_lr=0.0005"]),
    "G-g02-cp3000": ("g02", COMMON + ["cp_steps=3000"]),
    "H-g03-head-lr": ("g03", COMMON + ["chat_head_lr_scale=0.5"]),
}
# Round 1 (H100, 2026-11-26): no variant brought the chat model's German share below 0.7; shorter replies
# helped turn-ending most (30 → 20 words: CP + 1·CV 0.40 → 0.66); most replies that did not end were cut
# at 64 tokens. Round 2: much less German in the base, 12-word replies, 128 new tokens.
SHORT = COMMON + ["reply_max_words=12"]
ROUND2 = {
    "R2-g005": ("g005", SHORT),
    "R2-g01": ("g01", SHORT),
    "R2-g03": ("g03", SHORT),
    "R2-g005-cplr5e-4": ("g005", SHORT + ["finetune_lr=0.0005"]),
    "R2-g01-chat2000-head": ("g01", SHORT + ["chat_steps=2000", "chat_head_lr_scale=0.5"]),
    "R2-g03-8words": ("g03", COMMON + ["reply_max_words=8"]),
}
# Round 3 (CPU, 2026-11-26; results/toy_recipe_search_round3_cpu.csv, family sampling only, CP / chat / CP + CV):
# the shipped recipe plus German–English dictionary pairs (Debian's trans-de-en) in CP, and in base + CP, to see
# whether parallel text lets the refusal transfer. It did not: CP + 1·CV refused 0.07–0.14 of the tuning insults,
# the shipped recipe 0.10 on the same CPU evaluation; the refusals stayed mostly English.
BASES["g005-dict5"] = ["base_german_share=0.005", "base_parallel_share=0.05"]
ROUND3 = {
    "R3-cp-dict10": ("g005", ["cp_parallel_share=0.1"]),
    "R3-cp-dict30": ("g005", ["cp_parallel_share=0.3"]),
    "R3-base-dict5-cp-dict10": ("g005-dict5", ["base_parallel_share=0.05", "cp_parallel_share=0.1"]),
}
ROUNDS = {"1": ROUND1, "2": ROUND2, "3": ROUND3}
SAMPLING = {"family": dict(temperature=0.7, top_k=40), "t0.8-p0.9": dict(temperature=0.8, top_k=None, top_p=0.9)}
MODELS = ("CP", "chat", "CP+1CV", "CP+1.25CV")


def train(out: Path, members: str, settings: list[str], args) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "chatvec_lab.toy.train", "--out", str(out), "--members", members,
           "--corpus-cache", args.corpus_cache, "--device", args.device, "--threads", "1", "--scale", str(args.scale), "--set", *settings]
    return subprocess.Popen(cmd, stdout=open(out / f"train-{members.replace(',', '-')}.log", "w"),
                            stderr=subprocess.STDOUT)


def evaluate(folder: Path, device: str, max_new_tokens: int = 64, models=MODELS, sampling=SAMPLING) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatvec_lab import ChatVector, apply_to_model
    from chatvec_lab.behaviour.generation import generate
    from chatvec_lab.behaviour.scoring import LanguageScorer, RefusalScorer
    from chatvec_lab.behaviour.sweep import read_prompts

    data = Path(__file__).resolve().parents[1] / "data" / "prompts"
    sets = {"chat": read_prompts(data / "chat_de.txt"), "offensive": read_prompts(data / "offensive_de.txt")}
    tok = AutoTokenizer.from_pretrained(folder / "cp")
    cv = ChatVector.from_models(folder / "base", folder / "chat", hash_files=False)
    load = {
        "CP": lambda: AutoModelForCausalLM.from_pretrained(folder / "cp", dtype=torch.float32),
        "chat": lambda: AutoModelForCausalLM.from_pretrained(folder / "chat", dtype=torch.float32),
        "CP+1CV": lambda: apply_to_model(folder / "cp", [(cv, 1.0)], dtype=torch.float32)[0],
        "CP+1.25CV": lambda: apply_to_model(folder / "cp", [(cv, 1.25)], dtype=torch.float32)[0],
    }
    models = {name: load[name]() for name in models}
    language, refusal = LanguageScorer(), RefusalScorer()
    rows = []
    for name, model in models.items():
        model.to(device).eval()
        for setting, kw in sampling.items():
            row = {"variant": folder.name, "model": name, "sampling": setting}
            for set_name, prompts in sets.items():
                replies = [generate(model, tok, prompts, seed=s, max_new_tokens=max_new_tokens, batch_size=64, **kw)
                           for s in range(3)]
                import pandas as pd
                df = pd.concat(replies, ignore_index=True)
                scores = pd.concat([language.score(df["reply"].tolist()), refusal.score(df["reply"].tolist())], axis=1)
                if set_name == "chat":
                    row.update(turn_end=df["ended_turn"].mean(), share_de=scores["share_de"].mean(),
                               turn_end_64=(df["ended_turn"] & (df["reply_tokens"] <= 64)).mean(),
                               reply_tokens=df["reply_tokens"].mean())
                else:
                    refused = scores["refusal"]
                    row.update(refusal=refused.mean(),
                               refusal_de=(scores["language"][refused] == "de").mean() if refused.any() else float("nan"))
            rows.append(row)
        model.cpu()
    recipes = {m: json.loads((folder / m / "recipe.json").read_text()) for m in ("base", "chat", "cp")}
    for m, r in recipes.items():
        rows.append({"variant": folder.name, "model": f"{m} held-out loss", "sampling": "",
                     "turn_end": r["eval_en"], "share_de": r["eval_de"], "reply_tokens": r["seconds"]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True)
    p.add_argument("--corpus-cache", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--only", default="", help="comma-separated variant names")
    p.add_argument("--round", default="2", choices=sorted(ROUNDS))
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--sampling", default=",".join(SAMPLING))
    p.add_argument("--results", default=None, help="folder for each variant's CSV as soon as it is measured")
    p.add_argument("--evaluate-only", action="store_true")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every step count (0.01: smoke run)")
    p.add_argument("--csv", default=None)
    args = p.parse_args()
    work = Path(args.work)
    variants = {k: v for k, v in ROUNDS[args.round].items() if not args.only or k in args.only.split(",")}
    t0 = time.time()
    import pandas as pd
    pd.set_option("display.width", 200)
    if not args.evaluate_only:
        procs = [train(work / "bases" / b, "base", BASES[b], args)
                 for b in sorted({b for b, _ in variants.values()})]
        for proc in procs:
            if proc.wait() != 0:
                raise SystemExit(f"a base failed: {proc.args}")
        print(f"bases: {time.time() - t0:.0f} s", flush=True)
        running = {}
        for name, (b, settings) in variants.items():
            folder = work / name
            folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(folder / "base", ignore_errors=True)
            shutil.copytree(work / "bases" / b / "base", folder / "base")
            running[name] = train(folder, "chat,cp", BASES[b] + settings, args)
        evaluating = {}
        while running or evaluating:  # each variant is measured as soon as its training ends
            for name, proc in list(running.items()):
                if proc.poll() is not None:
                    del running[name]
                    if proc.returncode:
                        print(f"{name}: training failed", flush=True)
                        continue
                    print(f"{name}: trained at {time.time() - t0:.0f} s", flush=True)
                    evaluating[name] = subprocess.Popen(
                        [sys.executable, __file__, "--work", args.work, "--corpus-cache", args.corpus_cache,
                         "--device", args.device, "--only", name, "--evaluate-only", "--round", args.round,
                         "--max-new-tokens", str(args.max_new_tokens), "--models", args.models,
                         "--sampling", args.sampling,
                         "--csv", str(Path(args.results or work / name) / f"{name}.csv")])
            for name, proc in list(evaluating.items()):
                if proc.poll() is not None:
                    del evaluating[name]
                    print(f"{name}: measured at {time.time() - t0:.0f} s", flush=True)
            time.sleep(1)
        csvs = [Path(args.results or work / n) / f"{n}.csv" for n in variants]
        frames = [pd.read_csv(f) for f in csvs if f.is_file()]
        df = pd.concat(frames, ignore_index=True)
        print(df.round(3).to_string(index=False), flush=True)
        if args.csv:
            df.to_csv(args.csv, index=False)
        print(f"total: {time.time() - t0:.0f} s")
        return
    rows = []
    for name in variants:
        try:
            rows += evaluate(work / name, args.device, args.max_new_tokens, args.models.split(","),
                             {k: SAMPLING[k] for k in args.sampling.split(",")})
        except Exception as e:  # one broken variant should not hide the others
            print(f"{name}: {type(e).__name__}: {e}", flush=True)
    df = pd.DataFrame(rows)
    print(df.round(3).to_string(index=False), flush=True)
    if args.csv:
        df.to_csv(args.csv, index=False)
    print(f"total: {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
