"""Rows matched by token, checked against mergekit (needs the bench extra: pip install -e ".[bench]").

Two settings on the toy family, each merged by chatvec and by mergekit 0.1.5's ``task_arithmetic``
(base ``base``, models CP weight 1 and chat weight 1, ``normalize: false``, bfloat16):

1. ``tokens``: a CP whose tokenizer holds the same tokens under other ids (rows moved with them);
   chatvec ``--embeddings tokens`` vs mergekit with the CP's tokenizer as the output's.
2. ``union``: a chat model that added a special token in fine-tuning; chatvec ``--embeddings union`` vs
   mergekit ``tokenizer: {source: union}``.

Printed: whether both give the same tokenizer ids, how many rows differ by more than two bfloat16 steps of
their largest value (a row taken from the wrong token would), how many elements differ at all (mergekit rounds differently:
see the README's apply benchmark), and whether the added token's row is byte-identical. Exit 1 if any
row is misaligned or the added row differs.

    python benchmarks/compare_mergekit_vocab.py --work /tmp/mk
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from chatvec_lab import ChatVector, apply_vectors, open_weights, toy  # noqa: E402
from test_heads_and_vocab import _chat_with_added_token, _permuted_copy  # noqa: E402

CONFIG = """merge_method: task_arithmetic
base_model: {base}
models:
  - model: {cp}
    parameters: {{weight: 1.0}}
  - model: {chat}
    parameters: {{weight: 1.0}}
parameters: {{normalize: false}}
tokenizer:
  source: {source}
dtype: bfloat16
"""


def mergekit(work: Path, name: str, cp: Path, chat: Path, source: str) -> Path:
    config = work / f"{name}.yml"
    config.write_text(CONFIG.format(base=toy.path("base"), cp=cp, chat=chat, source=source))
    out = work / f"mergekit-{name}"
    exe = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")
    subprocess.run([exe, str(config), str(out), "--allow-crimes"], check=True, capture_output=True)
    return out


def compare(ours: Path, theirs: Path, added: str | None = None) -> bool:
    from transformers import AutoTokenizer

    a, b = open_weights(ours), open_weights(theirs)
    ta, tb = AutoTokenizer.from_pretrained(str(ours)), AutoTokenizer.from_pretrained(str(theirs))
    same_ids = ta.get_vocab() == tb.get_vocab()
    print(f"  tokenizers give every token the same id: {same_ids}")
    ok = same_ids
    total = differing = misaligned = 0
    for name in a.keys():
        x, y = a.get(name).float(), b.get(name).float()
        if x.shape != y.shape:
            print(f"  {name}: shapes differ {tuple(x.shape)} vs {tuple(y.shape)}")
            ok = False
            continue
        d = (x - y).abs()
        flat = (lambda t: t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1))
        # a row taken from the wrong token differs by about its own size; rounding by a bfloat16 step or two
        step = torch.maximum(flat(x.abs()), flat(y.abs())).max(1).values * 2.0 ** -7
        misaligned += int((flat(d).max(1).values > 2 * step).sum())
        differing += int((d > 0).sum())
        total += d.numel()
    print(f"  rows differing by more than two bfloat16 steps of their largest value (a row from the wrong "
          f"token would): {misaligned}")
    print(f"  elements differing at all (rounding): {differing} of {total} ({differing / total:.2%})")
    ok &= misaligned == 0
    if added is not None:
        ia, ib = ta.convert_tokens_to_ids(added), tb.convert_tokens_to_ids(added)
        same = all(torch.equal(a.get(n)[ia], b.get(n)[ib]) for n in a.keys() if a.get(n).shape[0] == len(ta))
        print(f"  the added token {added!r} (id {ia} / {ib}): rows byte-identical: {same}")
        ok &= same
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="chatvec-mk-"))
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    ok = True

    print("1. tokens: a CP with the same tokens under other ids")
    _permuted_copy(toy.path("cp"), work / "cp-perm")
    cv = ChatVector.from_models(toy.path("base"), toy.path("chat"), hash_files=False)
    apply_vectors(work / "cp-perm", cv, work / "chatvec-tokens", embeddings="tokens", check_lineage=False)
    ok &= compare(work / "chatvec-tokens", mergekit(work, "tokens", work / "cp-perm", toy.path("chat"),
                                                    str(work / "cp-perm")))

    print("2. union: a chat model that added <|sys|>")
    chat = _chat_with_added_token(work)
    cv = ChatVector.from_models(toy.path("base"), chat, hash_files=False)
    apply_vectors(toy.path("cp"), cv, work / "chatvec-union", embeddings="union", check_lineage=False)
    ok &= compare(work / "chatvec-union", mergekit(work, "union", toy.path("cp"), chat, "union"), added="<|sys|>")
    print("agree" if ok else "DISAGREE")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
