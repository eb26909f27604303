"""Benchmark a coefficient change in place (LiveModel.set) against reloading the model.

    python benchmarks/bench_live.py                 # the toy family and a ~0.5 GB synthetic Llama

Without live coefficients a notebook gets CP + α·CV for a new α by reloading the target and adding
the vector again: ``apply_to_model(folder, [(cv, α)])`` (page cache warm, vector already in memory).
That is the baseline of the ratio. A bare ``from_pretrained`` is shown too: transformers maps
float32 safetensors lazily, so on its own it defers the reading to the first use of each weight.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import llama_config, table, write_family  # noqa: E402


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(label: str, folder_base: Path, folder_chat: Path, folder_target: Path, repeat: int) -> dict:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging
    from chatvec_lab.core.apply import apply_to_model
    from chatvec_lab.core.live import LiveModel
    from chatvec_lab.core.vector import ChatVector

    logging.disable_progress_bar()
    load = lambda: AutoModelForCausalLM.from_pretrained(str(folder_target), dtype=torch.float32)  # noqa: E731
    model = load()
    cv = ChatVector.from_models(folder_base, folder_chat, hash_files=False).materialize()
    live = LiveModel(model, {"chat": cv})
    alphas = iter([0.5, 1.0, 1.5, 0.25] * 100)
    change = timed(lambda: live.set(chat=next(alphas)), repeat)
    reload = timed(load, max(2, repeat // 3))
    reapply = timed(lambda: apply_to_model(folder_target, [(cv, next(alphas))], dtype=torch.float32,
                                           check_lineage=False), max(2, repeat // 3))
    # the atlas moves from one cell (layer × module) to the next: only the two cells' tensors are rewritten
    from chatvec_lab.behaviour.atlas import cell_coefficient, cells_of

    cells = [c for c in cells_of(cv) if c.row.startswith("layer ")]
    order = iter(cells * 100)
    live.set(chat=cell_coefficient(cells[-1], "keep-only", 1.0))
    cell_move = timed(lambda: live.set(chat=cell_coefficient(next(order), "keep-only", 1.0)), repeat)
    rewritten = live.rewritten
    params = sum(p.numel() for p in model.parameters())
    return {"model": label, "parameters": f"{params / 1e6:.1f} M", "size (float32)": f"{params * 4 / 1e9:.2f} GB",
            "α change (s)": f"{change:.4f}", "reload + apply (s)": f"{reapply:.3f}",
            "bare reload (s)": f"{reload:.3f}", "(reload + apply) ÷ change": f"{reapply / change:.0f}×",
            "atlas cell move (s)": f"{cell_move:.4f}", "tensors rewritten": rewritten,
            "(reload + apply) ÷ cell move": f"{reapply / cell_move:.0f}×"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=None)
    p.add_argument("--repeat", type=int, default=6)
    args = p.parse_args()
    sys.path.insert(0, str(HERE.parent))
    from chatvec_lab import toy

    rows = [bench("toy cp (+ chat)", toy.path("base"), toy.path("chat"), toy.path("cp"), args.repeat)]
    work = Path(args.work or tempfile.mkdtemp(prefix="chatvec-live-"))
    cfg = llama_config(layers=4, hidden=1024, intermediate=2816, vocab=32000)  # ≈ 0.5 GB in float32
    import torch as _t
    paths = write_family(work / "synthetic-0.5gb", cfg, dtype=_t.float32)
    rows.append(bench("synthetic Llama", paths["base"], paths["chat"], paths["cp"], args.repeat))
    print(table(rows, list(rows[0])))
    print("target: (reload + apply) ÷ change ≥ 20×; an atlas cell move rewrites the two cells' tensors only")


if __name__ == "__main__":
    main()
