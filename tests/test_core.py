"""The core: sources, vectors, apply, against a naive in-memory computation, and every bad input."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from chatvec_lab import ChatVector, apply_to_model, apply_vectors, open_weights
from chatvec_lab.core.apply import LineageWarning
from chatvec_lab.errors import MismatchError, NonFiniteError, OutputError, SourceError
from chatvec_lab.io.shards import ShardedSafetensorsWriter
from conftest import checksums, new_model, perturbed, save

ARCHS = ["llama", "mistral", "qwen2", "gpt2", "gpt_neox", "gemma"]


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_streaming_extract_and_apply_match_naive_float32(family_factory, tmp_path, arch):
    fam = family_factory(arch)
    assert len(list(fam["base"].glob("*.safetensors"))) > 1, "fixtures must be sharded"
    assert (fam["base"] / "model.safetensors.index.json").is_file()
    before = checksums(fam["base"], fam["chat"], fam["cp"])

    vec = ChatVector.from_models(fam["base"], fam["chat"])
    vec.save(tmp_path / "vec", max_shard_bytes=30_000)
    assert len(list((tmp_path / "vec").glob("vector-*.safetensors"))) > 1
    report = apply_vectors(fam["cp"], [(ChatVector.load(tmp_path / "vec"), 0.7)], tmp_path / "out",
                           base=fam["base"], max_shard_bytes=30_000)

    base, chat, cp = load_all(fam["base"]), load_all(fam["chat"]), load_all(fam["cp"])
    saved_vec = load_all(tmp_path / "vec")
    out = load_all(tmp_path / "out")
    assert set(saved_vec) == {k for k, v in base.items() if v.is_floating_point()}
    for name, b in base.items():
        if not b.is_floating_point():
            continue
        assert torch.equal(saved_vec[name], chat[name] - b), name
        assert torch.equal(out[name], cp[name] + 0.7 * (chat[name] - b)), name
    assert set(out) == set(cp)
    assert report.lineage_distance is not None and report.lineage_distance < 0.5
    assert checksums(fam["base"], fam["chat"], fam["cp"]) == before, "inputs must never be modified"

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == 96
    for f in ("config.json", "chatvec_apply.json"):
        assert (tmp_path / "out" / f).is_file()


def test_bfloat16_within_tolerance_and_keeps_dtype(family_factory, tmp_path):
    fam = family_factory("llama", torch.bfloat16)
    vec = ChatVector.from_models(fam["base"], fam["chat"])
    apply_vectors(fam["cp"], [(vec, 1.0)], tmp_path / "out")
    base, chat, cp, out = (load_all(fam[k]) for k in ("base", "chat", "cp")), None, None, load_all(tmp_path / "out")
    base, chat, cp = list(base)
    for name in cp:
        expected = cp[name].float() + (chat[name].float() - base[name].float())
        assert out[name].dtype == torch.bfloat16
        torch.testing.assert_close(out[name].float(), expected, atol=1e-2, rtol=1e-2)
    assert vec[name].dtype == torch.float32


def test_in_memory_apply_equals_folder_apply(family_factory, tmp_path):
    fam = family_factory("qwen2")
    vec = ChatVector.from_models(fam["base"], fam["chat"])
    apply_vectors(fam["cp"], [(vec, 0.5)], tmp_path / "out")
    model, report = apply_to_model(fam["cp"], [(vec, 0.5)])
    written = load_all(tmp_path / "out")
    for name, tensor in model.state_dict().items():
        if name in written:
            assert torch.equal(tensor, written[name]), name
    assert report.tensors["status"].eq("added").all()


def test_in_memory_module_target_is_copied_not_modified(family_factory):
    fam = family_factory("llama")
    from transformers import AutoModelForCausalLM
    cp = AutoModelForCausalLM.from_pretrained(fam["cp"])
    before = {k: v.clone() for k, v in cp.state_dict().items()}
    vec = ChatVector.from_models(fam["base"], fam["chat"])
    merged, _ = apply_to_model(cp, vec)
    assert all(torch.equal(before[k], v) for k, v in cp.state_dict().items())
    assert not torch.equal(merged.state_dict()["lm_head.weight"], before["lm_head.weight"])


def test_vector_arithmetic_and_roundtrip(family_factory, tmp_path):
    fam = family_factory("llama")
    v = ChatVector.from_models(fam["base"], fam["chat"])
    w = ChatVector.from_models(fam["base"], fam["cp"])
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(((v + w) - w)[name], v[name])
    torch.testing.assert_close((2 * v)[name], 2 * v[name])
    torch.testing.assert_close((-v)[name], -v[name])
    torch.testing.assert_close(sum([v, w, v])[name], 2 * v[name] + w[name])
    torch.testing.assert_close((v / 4)[name], v[name] / 4)
    assert abs((2 * v).norm() - 2 * v.norm()) < 1e-4
    (0.5 * (v + w)).save(tmp_path / "avg")
    loaded = ChatVector.load(tmp_path / "avg")
    torch.testing.assert_close(loaded[name], 0.5 * (v[name] + w[name]))
    meta = json.loads((tmp_path / "avg" / "chatvec.json").read_text())
    assert meta["format"] == "chatvec/1" and "combination_of" in meta
    assert set(v.select(include=r"mlp").names) == {n for n in v.names if "mlp" in n}


def test_metadata_records_provenance(family_factory, tmp_path):
    fam = family_factory("llama")
    ChatVector.from_models(fam["base"], fam["chat"]).save(tmp_path / "v")
    meta = json.loads((tmp_path / "v" / "chatvec.json").read_text())
    assert meta["base"]["source"] == str(fam["base"])
    assert set(meta["base"]["sha256"]) == {f.name for f in fam["base"].glob("*.safetensors")}
    assert meta["dtype"] == "float32" and meta["source_dtype"] == "float32"
    assert meta["parameters"] > 0 and meta["chatvec_lab_version"]
    assert (tmp_path / "v" / "base_config.json").is_file()


def test_extended_vocabulary_policies(family_factory, tmp_path):
    fam = family_factory("llama")
    from transformers import AutoModelForCausalLM
    cp = AutoModelForCausalLM.from_pretrained(fam["cp"])
    cp.resize_token_embeddings(104, mean_resizing=False)
    save(cp, tmp_path / "xcp")
    vec = ChatVector.from_models(fam["base"], fam["chat"])
    with pytest.raises(MismatchError, match="vocabulary sizes differ for '.*(embed_tokens|lm_head).*'"):
        apply_vectors(tmp_path / "xcp", vec, tmp_path / "o1")
    assert not (tmp_path / "o1").exists()
    apply_vectors(tmp_path / "xcp", vec, tmp_path / "shared", embeddings="shared")
    apply_vectors(tmp_path / "xcp", vec, tmp_path / "skip", embeddings="skip")
    x, shared, skip = load_all(tmp_path / "xcp"), load_all(tmp_path / "shared"), load_all(tmp_path / "skip")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        torch.testing.assert_close(shared[name][:96], x[name][:96] + vec[name])
        assert torch.equal(shared[name][96:], x[name][96:])
        assert torch.equal(skip[name], x[name])
    assert torch.equal(skip["model.norm.weight"], x["model.norm.weight"] + vec["model.norm.weight"])


def test_token_map_takes_rows_from_chat_not_base(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(94)} | {"<|user|>": 94, "<|end|>": 95}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), unk_token="t0")
    base = new_model("llama")
    chat, cp = perturbed(base, 1), perturbed(base, 2)
    for name, m in (("base", base), ("chat", chat), ("cp", cp)):
        save(m, tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    vec = ChatVector.from_models(tmp_path / "base", tmp_path / "chat")
    apply_vectors(tmp_path / "cp", vec, tmp_path / "out", token_map=["<|end|>"], chat=tmp_path / "chat")
    out, chat_w, base_w = load_all(tmp_path / "out"), load_all(tmp_path / "chat"), load_all(tmp_path / "base")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(out[name][95], chat_w[name][95])
        assert not torch.equal(out[name][95], base_w[name][95])
    cp_w = load_all(tmp_path / "cp")
    torch.testing.assert_close(out["lm_head.weight"][94], cp_w["lm_head.weight"][94] + vec["lm_head.weight"][94])
    with pytest.raises(MismatchError, match="not a single token"):
        apply_vectors(tmp_path / "cp", vec, tmp_path / "o2", token_map=["<|nope|>"], chat=tmp_path / "chat")


def test_tied_embeddings_gpt2(family_factory, tmp_path):
    fam = family_factory("gpt2")
    vec = ChatVector.from_models(fam["base"], fam["chat"])
    assert not any("lm_head" in n for n in vec.names)
    apply_vectors(fam["cp"], vec, tmp_path / "out")
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert m.lm_head.weight.data_ptr() == m.transformer.wte.weight.data_ptr()
    expected = load_all(fam["cp"])["transformer.wte.weight"] + vec["transformer.wte.weight"]
    torch.testing.assert_close(m.lm_head.weight.detach(), expected)


def test_untied_vector_on_tied_target_is_reported(tmp_path):
    vec = ChatVector.from_tensors({"transformer.wte.weight": torch.ones(96, 32), "lm_head.weight": torch.ones(96, 32)})
    save(new_model("gpt2"), tmp_path / "t")
    report = apply_vectors(tmp_path / "t", vec, tmp_path / "o", check_lineage=False, include="wte")
    assert any("ties its embeddings" in w for w in report.warnings)


def test_selective_application_by_layer_module_and_rules(family_factory, tmp_path):
    fam = family_factory("llama")
    vec = ChatVector.from_models(fam["base"], fam["chat"])
    cp = load_all(fam["cp"])
    apply_vectors(fam["cp"], vec, tmp_path / "l0", layers=[0])
    apply_vectors(fam["cp"], [(vec, {r"self_attn": 2.0, r"mlp": 0.5})], tmp_path / "rules")
    l0, rules = load_all(tmp_path / "l0"), load_all(tmp_path / "rules")
    for name in cp:
        if name.startswith("model.layers.0."):
            torch.testing.assert_close(l0[name], cp[name] + vec[name])
        else:
            assert torch.equal(l0[name], cp[name]), name
        if "self_attn" in name:
            torch.testing.assert_close(rules[name], cp[name] + 2 * vec[name])
        elif "mlp" in name:
            torch.testing.assert_close(rules[name], cp[name] + 0.5 * vec[name])
        else:
            assert torch.equal(rules[name], cp[name]), name


def test_two_vectors_sum(family_factory, tmp_path):
    fam = family_factory("mistral")
    v1 = ChatVector.from_models(fam["base"], fam["chat"])
    v2 = ChatVector.from_models(fam["base"], fam["cp"])
    apply_vectors(fam["base"], [(v1, 0.5), (v2, -1.0)], tmp_path / "o")
    b, c, p, o = (load_all(x) for x in (fam["base"], fam["chat"], fam["cp"], tmp_path / "o"))
    for name in b:
        torch.testing.assert_close(o[name], b[name] + 0.5 * (c[name] - b[name]) - (p[name] - b[name]))


def test_lineage_warns_for_unrelated_target(family_factory, tmp_path):
    fam = family_factory("llama")
    save(new_model("llama", seed=123), tmp_path / "stranger")
    vec = ChatVector.from_models(fam["base"], fam["chat"])
    with pytest.warns(LineageWarning, match="may not descend"):
        report = apply_vectors(tmp_path / "stranger", vec, tmp_path / "o")
    assert report.lineage_distance > 0.5


# ---------------------------------------------------------------- bad input

def _drop_tensor(src: Path, dst: Path, drop: str) -> Path:
    tensors = load_all(src)
    tensors.pop(drop)
    dst.mkdir()
    save_file(tensors, dst / "model.safetensors")
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


def test_missing_and_extra_tensors_are_named(family_factory, tmp_path):
    fam = family_factory("llama")
    short = _drop_tensor(fam["chat"], tmp_path / "short", "model.layers.1.mlp.down_proj.weight")
    with pytest.raises(MismatchError, match=r"lacks tensors.*model\.layers\.1\.mlp\.down_proj\.weight"):
        ChatVector.from_models(fam["base"], short)
    with pytest.raises(MismatchError, match=r"has tensors that base .* lacks: 'model\.layers\.1\.mlp\.down_proj"):
        ChatVector.from_models(short, fam["chat"])
    vec = ChatVector.from_models(fam["base"], fam["chat"])
    with pytest.raises(MismatchError, match=r"has tensor 'model\.layers\.1\.mlp\.down_proj\.weight', which the target"):
        apply_vectors(short, vec, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    a = {"w": torch.zeros(4, 3), "b": torch.zeros(3)}
    c = {"w": torch.zeros(4, 5), "b": torch.zeros(3)}
    with pytest.raises(MismatchError, match=r"shape mismatch for 'w': base \(4, 3\) vs chat \(4, 5\)"):
        ChatVector.from_models(a, c)
    vec = ChatVector.from_tensors(a)
    with pytest.raises(MismatchError, match=r"shape mismatch for 'w': vector 1 has \(4, 3\), target has \(4, 5\)"):
        apply_vectors(c, vec, tmp_path / "o", check_lineage=False)


def test_different_architectures_refused(family_factory):
    with pytest.raises(MismatchError, match=r"'llama' model but chat .* 'gpt2' model"):
        ChatVector.from_models(family_factory("llama")["base"], family_factory("gpt2")["chat"])


def test_vector_on_other_architecture_refused(family_factory, tmp_path):
    vec = ChatVector.from_models(family_factory("llama")["base"], family_factory("llama")["chat"])
    vec.save(tmp_path / "v")
    with pytest.raises(MismatchError, match="built on a 'llama' model but the target is a 'mistral'"):
        apply_vectors(family_factory("mistral")["cp"], ChatVector.load(tmp_path / "v"), tmp_path / "o")


def test_corrupt_and_truncated_safetensors(family_factory, tmp_path):
    fam = family_factory("llama")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(SourceError, match=r"corrupt safetensors file .*bad\.safetensors"):
        open_weights(bad)
    shard = sorted(fam["base"].glob("*.safetensors"))[0]
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(SourceError, match=r"truncated safetensors file .*cut\.safetensors"):
        open_weights(cut)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01")
    with pytest.raises(SourceError, match="corrupt"):
        open_weights(tiny)


def test_nan_in_source_and_result(tmp_path):
    good = {"w": torch.ones(3, 3)}
    nan = {"w": torch.ones(3, 3)}
    nan["w"][1, 1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"tensor 'w' .* holds 1 NaN/Inf"):
        ChatVector.from_models(good, nan)["w"]
    with pytest.raises(NonFiniteError, match=r"tensor 'w': target \+ Σ coefficient·vector overflows float32"):
        big = ChatVector.from_tensors({"w": torch.full((3, 3), 3e38)})
        apply_vectors({"w": torch.full((3, 3), 3e38)}, [(big, 1.0)], tmp_path / "o", check_lineage=False)
    assert not (tmp_path / "o").exists()
    assert not list(tmp_path.glob(".o.partial-*"))


def test_output_exists_and_not_writable(family_factory, tmp_path):
    fam = family_factory("llama")
    vec = ChatVector.from_models(fam["base"], fam["chat"])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="already exists"):
        apply_vectors(fam["cp"], vec, tmp_path / "taken")
    with pytest.raises(OutputError, match="already exists"):
        vec.save(tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="not a writable folder"):
        apply_vectors(fam["cp"], vec, tmp_path / "afile" / "out")
    apply_vectors(fam["cp"], vec, tmp_path / "taken", overwrite=True)
    assert not (tmp_path / "taken" / "keep.txt").exists() and (tmp_path / "taken" / "config.json").exists()


def test_interrupted_write_leaves_nothing(family_factory, tmp_path, monkeypatch):
    fam = family_factory("llama")
    vec = ChatVector.from_models(fam["base"], fam["chat"])
    calls = {"n": 0}
    original = ShardedSafetensorsWriter.write

    def flaky(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, name, tensor)

    monkeypatch.setattr(ShardedSafetensorsWriter, "write", flaky)
    with pytest.raises(KeyboardInterrupt):
        apply_vectors(fam["cp"], vec, tmp_path / "out")
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        vec.save(tmp_path / "vec")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_pickles_refused_unless_opted_in(family_factory, tmp_path):
    fam = family_factory("llama")
    tensors = load_all(fam["base"])
    torch.save(tensors, tmp_path / "weights.bin")
    with pytest.raises(SourceError, match="pickle.*allow_pickle=True"):
        open_weights(tmp_path / "weights.bin")
    folder = tmp_path / "pkl"
    folder.mkdir()
    torch.save(tensors, folder / "pytorch_model.bin")
    with pytest.raises(SourceError, match="only pickled weights"):
        ChatVector.from_models(folder, fam["chat"])
    vec = ChatVector.from_models(folder, fam["chat"], allow_pickle=True)
    torch.testing.assert_close(vec["lm_head.weight"], load_all(fam["chat"])["lm_head.weight"] - tensors["lm_head.weight"])


def test_malicious_pickle_not_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))
    import pickle
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"w": Evil()}))
    with pytest.raises(SourceError, match="weights_only=True"):
        open_weights(tmp_path / "evil.pt", allow_pickle=True)
    assert not (tmp_path / "pwned").exists()


def test_missing_paths_and_hub_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError, match="no such file or folder"):
        open_weights(str(tmp_path / "nope" / "deeper"))
    with pytest.raises(SourceError, match="local hub cache"):
        open_weights("some-org/not-cached-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no weights in"):
        open_weights(tmp_path / "empty")
    with pytest.raises(SourceError, match="not a saved chat vector"):
        ChatVector.load(tmp_path / "empty")


def test_hub_id_resolves_from_local_cache(family_factory, tmp_path, monkeypatch):
    """A hub id is read from the local hub cache, laid out as huggingface_hub lays it out."""
    fam = family_factory("llama")
    cache = tmp_path / "hub"
    snap = cache / "models--toy-org--tiny-llama" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    for f in fam["base"].iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (cache / "models--toy-org--tiny-llama" / "refs").mkdir()
    (cache / "models--toy-org--tiny-llama" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    src = open_weights("toy-org/tiny-llama")
    assert set(src.keys()) == set(load_all(fam["base"]))
    assert src.fingerprint(hash_files=False)["revision"] == "a" * 40


def test_memory_mapped_reads_match_plain_reads_and_never_write_back(family_factory, tmp_path, monkeypatch):
    from chatvec_lab.io.sources import SafetensorsSource

    fam = family_factory("llama")
    before = checksums(fam["base"], fam["chat"], fam["cp"])
    src = open_weights(fam["base"])
    plain = {n: src.get(n).clone() for n in src.keys()}
    monkeypatch.setattr(SafetensorsSource, "MAP_AT_LEAST", 0)  # map every tensor, however small
    mapped_src = open_weights(fam["base"])
    for name, expected in plain.items():
        t = mapped_src.get(name)
        assert t.dtype == expected.dtype and torch.equal(t, expected), name
        if t.numel():
            t.add_(1)  # a private copy-on-write map: the caller may write, the file never changes
    assert checksums(fam["base"], fam["chat"], fam["cp"]) == before

    vec = ChatVector.from_models(fam["base"], fam["chat"])
    apply_vectors(fam["cp"], [(vec, 0.7)], tmp_path / "out")
    base, chat, cp, out = (load_all(p) for p in (fam["base"], fam["chat"], fam["cp"], tmp_path / "out"))
    for name, b in base.items():
        if b.is_floating_point():
            assert torch.equal(out[name], cp[name] + 0.7 * (chat[name] - b)), name
    assert checksums(fam["base"], fam["chat"], fam["cp"]) == before

    shard = sorted(fam["base"].glob("*.safetensors"))[0]
    source = open_weights(shard)
    name = max(source.keys(), key=lambda n: source.get(n).numel())
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(shard.read_bytes())
    cut_src = open_weights(cut)
    with open(cut, "r+b") as f:  # truncated after opening: the read says so instead of crashing
        f.truncate(_data_start(cut, name) + 1)
    with pytest.raises(SourceError, match=f"truncated safetensors file .*{name}"):
        cut_src.get(name)


def _data_start(path: Path, name: str) -> int:
    """Where tensor ``name``'s bytes begin in a safetensors file, read from its header as the format defines."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return 8 + n + json.loads(raw[8:8 + n])[name]["data_offsets"][0]


def test_block_reads_match_tensors(family_factory, tmp_path):
    """read_into / read_blocks give the bytes get() gives, across tensors and dtypes; bad ranges are refused."""
    from chatvec_lab.io.paging import read_blocks
    from chatvec_lab.core.vector import row_blocks

    for dtype in (torch.float32, torch.bfloat16):
        src = open_weights(family_factory("llama", dtype)["base"])
        names = sorted(src.keys())
        items = [(n, i) for n in names for i in row_blocks(src.shape(n), None, chunk=100)]
        seen = []
        for name, index, block in read_blocks(src, items):
            expected = src.get(name)[index]
            assert block.dtype == dtype and torch.equal(block, expected), (name, index)
            seen.append(name)
        assert list(dict.fromkeys(seen)) == names
        name = names[0]
        nbytes = src.get(name).numel() * src.get(name).element_size()
        out = bytearray(8)
        src.read_into(name, nbytes - 8, memoryview(out))
        assert bytes(out) == src.get(name).reshape(-1).view(torch.uint8)[-8:].numpy().tobytes()
        with pytest.raises(ValueError, match="outside tensor"):
            src.read_into(name, nbytes - 4, memoryview(out))

    shard = sorted(family_factory("llama")["base"].glob("*.safetensors"))[0]
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(shard.read_bytes())
    src = open_weights(cut)
    name = max(src.keys(), key=lambda n: _data_start(cut, n))  # the last tensor in the file
    with open(cut, "r+b") as f:
        f.truncate(_data_start(cut, name) + 1)
    with pytest.raises(SourceError, match=f"truncated safetensors file .*{name}"):
        list(read_blocks(src, [(name, ...)]))


def _rss_file_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise RuntimeError("no RssFile")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads RSS from /proc")
def test_large_mapped_tensors_are_paged_in_and_dropped_block_by_block(tmp_path, monkeypatch):
    from chatvec_lab.io.paging import paged_rows
    from chatvec_lab.io.sources import SafetensorsSource
    from chatvec_lab.core.vector import row_blocks

    g = torch.Generator().manual_seed(0)
    base = {"model.embed_tokens.weight": torch.randn(2048, 2048, generator=g)}  # 16 MiB
    chat = {k: t + 0.01 * torch.randn(t.shape, generator=g) for k, t in base.items()}
    save_file(base, tmp_path / "base.safetensors")
    save_file(chat, tmp_path / "chat.safetensors")
    monkeypatch.setattr(SafetensorsSource, "POPULATE_AT_MOST", 1 << 20)  # 16 MiB is "large" here
    src = open_weights(tmp_path / "base.safetensors")
    t = src.get("model.embed_tokens.weight")
    assert not t.mapped_pages.whole
    before = _rss_file_kib()
    indices = list(row_blocks(tuple(t.shape), None, chunk=1 << 18))
    for index in paged_rows([t], indices, release=False):
        assert torch.equal(t[index], base["model.embed_tokens.weight"][index])
    grown = _rss_file_kib()
    assert grown - before > 12 * 1024  # the pages are in
    for _ in paged_rows([t], indices, release=True):
        pass
    deadline = time.monotonic() + 10  # the drops run in a background thread
    while _rss_file_kib() - before >= 4 * 1024 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _rss_file_kib() - before < 4 * 1024  # and out again
    assert torch.equal(t, base["model.embed_tokens.weight"])  # dropped pages read back from the file

    vec = ChatVector.from_models(tmp_path / "base.safetensors", tmp_path / "chat.safetensors")
    name = "model.embed_tokens.weight"
    got = torch.cat([b for _, b in vec.blocks(name, chunk=1 << 18)])
    assert torch.equal(got, chat[name] - base[name])
    streamed = [(n, b) for n, _, b in vec.stream([name], chunk=1 << 18)]
    assert torch.equal(torch.cat([b for _, b in streamed]), got)


def test_numpy_and_torch_scalars_scale_a_vector():
    """Review round 3 (D17): `np.float64(0.5) * vector` failed with a numpy string-dtype error."""
    from chatvec_lab import toy
    import numpy as np
    cv = ChatVector.from_models(toy.path("base"), toy.path("chat"))
    name = cv.names[0]
    for scalar in (np.float64(0.5), np.float32(0.5), torch.tensor(0.5).item()):
        scaled = scalar * cv
        assert isinstance(scaled, ChatVector)
        assert torch.equal(scaled[name], 0.5 * cv[name])


def test_numpy_layer_indices_are_layers():
    """Review round 3 (D22): `layers=np.arange(...)` was refused as "not integers"."""
    import numpy as np

    from chatvec_lab.core.plan import layer_filter
    assert layer_filter(np.arange(0, 3), None, None).layers == {0, 1, 2}
    with pytest.raises(ValueError, match="non-negative integers"):
        layer_filter(np.array([0.5]), None, None)
