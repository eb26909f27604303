"""Extract streams: ``ChatVector.save`` writes each tensor block by block (``ShardedSafetensorsWriter.write_blocks``),
never whole in memory, and writes the same bytes as writing whole tensors did."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from chatvec_lab import ChatVector
from chatvec_lab.errors import NonFiniteError
from chatvec_lab.io.shards import ShardedSafetensorsWriter
from chatvec_lab.core.metadata import METADATA_FILE

ROOT = Path(__file__).resolve().parents[1]


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(Path(folder).iterdir())}


def save_whole(vec: ChatVector, folder: Path, max_shard_bytes: int) -> None:
    """The reference: what ``save`` wrote before streaming, each tensor whole through ``write``."""
    folder.mkdir()
    plan = [(n, s, torch.float32) for n, s in vec.shapes.items()]
    writer = ShardedSafetensorsWriter(folder, plan, prefix="vector", max_shard_bytes=max_shard_bytes)
    for name in vec.names:
        writer.write(name, vec[name])
    shards = writer.close()
    (folder / METADATA_FILE).write_text(json.dumps({**vec.metadata, "shards": shards}, indent=2) + "\n")
    if vec.base_config:
        (folder / "base_config.json").write_text(json.dumps(vec.base_config, indent=2) + "\n")


def odd_tensors(dtype=torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors of several blocks (more than CHUNK_ELEMENTS values), 1-D, 3-D, 0-d and empty ones."""
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(1100, 1000, generator=g).to(dtype),  # 2 blocks of rows
        "model.norm.weight": torch.randn(2_500_000, generator=g).to(dtype),  # 1-D, 3 blocks
        "model.layers.0.conv.weight": torch.randn(700, 3, 1000, generator=g).to(dtype),  # 3-D, 3 blocks
        "model.scale": torch.randn((), generator=g).to(dtype),  # 0-d
        "model.empty_rows": torch.empty(0, 7, dtype=dtype),
        "model.empty_cols": torch.empty(5, 0, dtype=dtype),
        "lm_head.weight": torch.randn(64, 48, generator=g).to(dtype),
    }


# ------------------------------------------------------------------ exactness

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extract_of_a_family_is_chat_minus_base_in_float32(family_factory, tmp_path, dtype):
    fam = family_factory("llama", dtype)
    vec = ChatVector.from_models(fam["base"], fam["chat"])
    vec.save(tmp_path / "vec", max_shard_bytes=30_000)
    shards = sorted((tmp_path / "vec").glob("vector-*.safetensors"))
    assert len(shards) > 1
    index = json.loads((tmp_path / "vec" / "vector.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(4 * t.numel() for t in load_all(tmp_path / "vec").values())
    base, chat, saved = load_all(fam["base"]), load_all(fam["chat"]), load_all(tmp_path / "vec")
    assert set(saved) == {k for k, v in base.items() if v.is_floating_point()}
    for name, t in saved.items():
        assert t.dtype == torch.float32
        assert torch.equal(t, chat[name].to(torch.float32) - base[name].to(torch.float32)), name
    # the same bytes as writing each tensor whole (the way save wrote before streaming)
    save_whole(vec, tmp_path / "ref", max_shard_bytes=30_000)
    assert files(tmp_path / "vec") == files(tmp_path / "ref")


@pytest.mark.parametrize("shard", [1 << 40, 3_000_000])
def test_streamed_bytes_equal_whole_tensor_bytes_for_odd_shapes(tmp_path, shard):
    base, chat = odd_tensors(torch.bfloat16, 0), odd_tensors(torch.bfloat16, 1)
    vec = ChatVector.from_models(base, chat)
    vec.save(tmp_path / "vec", max_shard_bytes=shard)
    save_whole(vec, tmp_path / "ref", max_shard_bytes=shard)
    assert files(tmp_path / "vec") == files(tmp_path / "ref")
    assert (len(list((tmp_path / "vec").glob("*.safetensors"))) > 1) == (shard < 1 << 40)

    expected = {k: chat[k].float() - base[k].float() for k in base}
    saved = load_all(tmp_path / "vec")
    assert saved.keys() == expected.keys()
    for name, t in expected.items():
        assert saved[name].shape == t.shape and torch.equal(saved[name], t), name
    for f in (tmp_path / "vec").glob("*.safetensors"):  # the header: safetensors' own metadata, plan order
        with safe_open(f, "pt") as fh:
            assert fh.metadata() == {"format": "pt"}
    # safetensors' own writer agrees on every value (its header layout differs, so compare loaded tensors)
    save_file({k: v.contiguous() for k, v in expected.items()}, tmp_path / "st.safetensors")
    assert all(torch.equal(load_file(tmp_path / "st.safetensors")[k], saved[k]) for k in expected)


def test_resaving_and_combining_saved_vectors_streams_the_same_bytes(tmp_path):
    base, chat, other = (odd_tensors(torch.float32, s) for s in (0, 1, 2))
    ChatVector.from_models(base, chat).save(tmp_path / "v1")
    ChatVector.from_models(base, other).save(tmp_path / "v2", max_shard_bytes=3_000_000)
    v1 = ChatVector.load(tmp_path / "v1")  # a stored float32 vector: read ahead into reused buffers
    v1.save(tmp_path / "again")
    assert files(tmp_path / "again") == files(tmp_path / "v1")

    combo = 0.5 * v1 - ChatVector.load(tmp_path / "v2")
    combo.save(tmp_path / "combo", max_shard_bytes=3_000_000)
    save_whole(combo, tmp_path / "ref", max_shard_bytes=3_000_000)
    assert files(tmp_path / "combo") == files(tmp_path / "ref")
    saved = load_all(tmp_path / "combo")
    for k in base:
        assert torch.equal(saved[k], 0.5 * (chat[k] - base[k]) - (other[k] - base[k])), k


# ------------------------------------------------------------------ the writer's streamed tensors

def _plan():
    return [("a", (4, 3), torch.float32), ("b", (5,), torch.float32), ("c", (), torch.float32),
            ("d", (0, 2), torch.float32)]


def test_write_blocks_in_plan_order_mixes_with_write(tmp_path):
    for background in (False, True):
        folder = tmp_path / f"bg{background}"
        folder.mkdir()
        writer = ShardedSafetensorsWriter(folder, _plan(), max_shard_bytes=40, background=background)
        a, b = torch.arange(12.0).reshape(4, 3), torch.arange(5.0) + 100
        writer.write("b", b)  # early: waits for "a"
        writer.write_blocks("a", [a[:1], a[1:3], a[3:], a[4:]])  # an empty block is fine
        writer.write_blocks("c", iter([torch.tensor(7.0)]))
        writer.write_blocks("d", [torch.empty(0, 2)])
        assert writer.close() == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        got = load_all(folder)
        assert torch.equal(got["a"], a) and torch.equal(got["b"], b) and float(got["c"]) == 7.0
        assert got["d"].shape == (0, 2)
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == 4 * (12 + 5 + 1)


@pytest.mark.parametrize("name, blocks, message", [
    ("b", [torch.zeros(5)], r"cannot be streamed now: the next tensor of the write plan is 'a'"),
    ("zz", [torch.zeros(1)], r"'zz' is not in the write plan"),
    ("a", [torch.zeros(4, 2)], r"planned \(4, 3\), got a block of shape \(4, 2\)"),
    ("a", [torch.zeros(3)], r"planned \(4, 3\), got a block of shape \(3,\)"),
    ("a", [torch.zeros(4, 3, dtype=torch.float64)], r"planned torch.float32, got a block of torch.float64"),
    ("a", [torch.zeros(3, 3)], r"planned 4 rows \(4, 3\), the blocks give 3"),
    ("a", [torch.zeros(3, 3), torch.zeros(2, 3)], r"planned 4 rows, the blocks give more \(5 so far\)"),
    ("a", [[0.0, 1.0, 2.0]], r"a block must be a tensor, not list"),
])
def test_write_blocks_refuses_what_does_not_fit_the_plan(tmp_path, name, blocks, message):
    writer = ShardedSafetensorsWriter(tmp_path, _plan())
    with pytest.raises(ValueError, match=message):
        writer.write_blocks(name, blocks)


def test_zero_d_and_repeated_tensors_refused(tmp_path):
    writer = ShardedSafetensorsWriter(tmp_path, _plan())
    writer.write_blocks("a", [torch.zeros(4, 3)])
    with pytest.raises(ValueError, match="'a' was already written"):
        writer.write_blocks("a", [torch.zeros(4, 3)])
    writer.write("b", torch.zeros(5))
    with pytest.raises(ValueError, match="planned a 0-d tensor, got a block of shape \\(1,\\)"):
        writer.write_blocks("c", [torch.zeros(1)])
    with pytest.raises(ValueError, match="planned a 0-d tensor, got more than one block"):
        writer.write_blocks("c", [torch.tensor(1.0), torch.tensor(2.0)])
    with pytest.raises(ValueError, match="refuses|takes no more tensors"):
        writer.write_blocks("c", [torch.tensor(1.0)])  # part of "c" is in the file now


def test_a_failed_stream_stops_the_writer(tmp_path):
    writer = ShardedSafetensorsWriter(tmp_path, _plan())

    def failing():
        yield torch.zeros(2, 3)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        writer.write_blocks("a", failing())
    for attempt in (lambda: writer.write_blocks("a", [torch.zeros(4, 3)]), lambda: writer.write("b", torch.zeros(5)),
                    writer.close):
        with pytest.raises(ValueError, match="write of tensor 'a' failed part-way"):
            attempt()
    writer.abort()
    # a stream refused before any byte was written leaves the writer usable
    other = tmp_path / "other"
    other.mkdir()
    writer = ShardedSafetensorsWriter(other, _plan())
    with pytest.raises(ValueError):
        writer.write_blocks("a", [torch.zeros(4, 2)])
    writer.write_blocks("a", [torch.ones(4, 3)])
    writer.write("b", torch.ones(5))
    writer.write("c", torch.tensor(1.0))
    writer.write("d", torch.empty(0, 2))
    writer.close()
    assert torch.equal(load_all(other)["a"], torch.ones(4, 3))


# ------------------------------------------------------------------ an error part-way leaves nothing

def _late_overflow(where: str):
    base = {"first.weight": torch.zeros(100, 10), "late.weight": torch.zeros(3000, 1000), "last.weight": torch.zeros(7)}
    chat = {k: v.clone() for k, v in base.items()}
    if where == "vector":  # a finite difference that overflows float32 once scaled, in the third block of rows
        chat["late.weight"][2500, 3] = 1e38
    else:
        chat["late.weight"][2500, 3] = float("nan")
    return base, chat


@pytest.mark.parametrize("where, message", [
    ("vector", r"tensor 'late.weight' in the vector holds 1 NaN/Inf values"),
    ("chat", r"tensor 'late.weight' in base .* or chat .* holds 1 NaN/Inf values"),
])
def test_nan_in_a_late_block_leaves_no_output(tmp_path, monkeypatch, where, message):
    base, chat = _late_overflow(where)
    vec = 4.0 * ChatVector.from_models(base, chat)
    seen = {}
    abort = ShardedSafetensorsWriter.abort

    def spy(self):
        seen.update(failed=self.failed, position=self.position, size=self.file.tell() if self.file else None)
        abort(self)

    monkeypatch.setattr(ShardedSafetensorsWriter, "abort", spy)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(NonFiniteError, match=message):
        vec.save(work / "vec")
    assert seen["failed"] == "late.weight" and seen["position"] == 1  # it failed part-way through the tensor
    assert seen["size"] > 100 * 10 * 4 + 2 * 1048 * 1000 * 4  # two blocks of 'late.weight' were in the file
    assert list(work.iterdir()) == []  # no output, no .vec.partial-*

    # with overwrite, the old output stays as it was
    zeros = {k: torch.zeros_like(v) for k, v in base.items()}
    ChatVector.from_models(zeros, {k: v + 1 for k, v in zeros.items()}).save(work / "vec")
    before = files(work / "vec")
    with pytest.raises(NonFiniteError, match=message):
        vec.save(work / "vec", overwrite=True)
    assert files(work / "vec") == before
    assert [p.name for p in work.iterdir()] == ["vec"]


# ------------------------------------------------------------------ memory: one block, not one tensor

RSS_PROBE = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from chatvec_lab import ChatVector

    def status(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])

    work = Path(sys.argv[1])
    # warm up: imports, thread pools, the writer and the progress bar's machinery, on a small pair
    ChatVector.from_models(work / "small-base.safetensors", work / "small-chat.safetensors",
                           hash_files=False).save(work / "small-vec")
    # ru_maxrss counts what the parent held when it forked us, and the warm-up's peak: both can hide growth;
    # so also reset this process's own high-water mark (VmHWM) to its current RSS, where the kernel lets us
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        Path("/proc/self/clear_refs").write_text("5")
        hwm_reset = True
    except OSError:
        hwm_reset = False
    rss_before, hwm_before = status("VmRSS"), status("VmHWM")
    vec = ChatVector.from_models(work / "base.safetensors", work / "chat.safetensors", hash_files=False)
    vec.save(work / "vec")
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm_after = status("VmHWM")
    print(json.dumps({"maxrss_growth_kib": after - before, "hwm_reset": hwm_reset,
                      "hwm_growth_kib": hwm_after - (rss_before if hwm_reset else hwm_before),
                      "rss_before_kib": rss_before}))
""")


def _checkpoints(work: Path, rows: int, dtype) -> None:
    g = torch.Generator().manual_seed(0)
    for prefix, n in (("small-", 256), ("", rows)):
        base = {"model.embed_tokens.weight": torch.randn(n, 2048, generator=g).to(dtype),
                "model.layers.0.mlp.up_proj.weight": torch.randn(512, 2048, generator=g).to(dtype),
                "model.norm.weight": torch.ones(2048, dtype=dtype)}
        save_file(base, work / f"{prefix}base.safetensors")
        for t in base.values():
            t.add_(0.01)
        save_file(base, work / f"{prefix}chat.safetensors")
        del base


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss is in KiB on Linux")
@pytest.mark.parametrize("dtype, rows", [(torch.float32, 32768), (torch.bfloat16, 32768)])
def test_extract_peak_rss_stays_far_below_one_float32_copy(tmp_path, dtype, rows):
    """A 32k × 2048 embedding (256 MiB per float32 copy), above the size that is mapped whole: saving the difference
    whole adds at least one float32 copy to the peak RSS (3–4 measured); streamed, it adds a few blocks plus what
    the allocator keeps (30–70 MiB measured)."""
    _checkpoints(tmp_path, rows, dtype)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", RSS_PROBE, str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    copy_mib = rows * 2048 * 4 / 2**20
    for key in ("maxrss_growth_kib", "hwm_growth_kib"):
        growth_mib = result[key] / 1024
        assert growth_mib < copy_mib / 2, \
            f"extract's peak RSS grew {growth_mib:.0f} MiB ({key}); one float32 copy is {copy_mib:.0f} MiB"
    with safe_open(tmp_path / "vec" / "vector.safetensors", "pt") as fh:
        name = "model.embed_tokens.weight"
        assert fh.get_slice(name).get_shape() == [rows, 2048]
        last = fh.get_slice(name)[rows - 2:]
    base = load_file(tmp_path / "base.safetensors")[name][rows - 2:]
    chat = load_file(tmp_path / "chat.safetensors")[name][rows - 2:]
    assert torch.equal(last, chat.float() - base.float())
