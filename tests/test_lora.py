"""The PEFT LoRA export: PEFT loads it onto the target, and merged it is the target plus α times the vector."""
from __future__ import annotations

import json

import peft  # in the test extra (pyproject.toml), so CI's fresh venv always has it
import pytest
import torch
from safetensors import safe_open

from chatvec_lab import ChatVector, apply_to_model, toy
from chatvec_lab.cli import main as cli
from chatvec_lab.errors import UsageError
from chatvec_lab.core.lora import export_peft

@pytest.fixture(scope="module")
def cv():
    return ChatVector.from_models(toy.path("base"), toy.path("chat"), hash_files=False)


def _merged(adapter):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(toy.path("cp"), dtype=torch.float32)
    return peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().state_dict()


def _max_difference(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("rank", [None, 4])
def test_merged_adapter_equals_target_plus_alpha_times_vector(tmp_path, cv, rank):
    out = export_peft(cv, tmp_path / "adapter", rank=rank, alpha=0.8, target=toy.path("cp"), dtype=torch.float32)
    expected = apply_to_model(toy.path("cp"), [(cv.low_rank(rank) if rank else cv, 0.8)], dtype=torch.float32)[0]
    assert _max_difference(_merged(out), expected.state_dict()) < 1e-5
    report = json.loads((out / "chatvec.json").read_text())
    kept = report["kept_energy"]
    assert len(kept) == 4 * 7 + 2 and all(0 < v <= 1 + 1e-9 for v in kept.values())
    assert (min(kept.values()) > 1 - 1e-6) if rank is None else (min(kept.values()) < 0.9)


def test_adapter_stores_factors_of_the_asked_rank(tmp_path, cv):
    out = export_peft(cv, tmp_path / "adapter", rank=8, target=toy.path("cp"))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 8 and config["peft_type"] == "LORA"
    assert "model.layers.0.self_attn.q_proj" in config["target_modules"]
    assert "model.norm" in config["modules_to_save"]
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"] == (8, 512)
    assert shapes["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"] == (192, 8)
    assert shapes["base_model.model.model.embed_tokens.lora_embedding_A"] == (8, 2048)
    # a rank-8 adapter is far smaller than the vector
    stored = sum(torch.Size(s).numel() for k, s in shapes.items() if "lora_" in k)
    assert stored < cv.parameters / 10


def test_norms_need_the_target_or_an_exclusion(tmp_path, cv):
    with pytest.raises(UsageError, match="exclude='norm'"):
        export_peft(cv, tmp_path / "a", rank=4)
    assert not (tmp_path / "a").exists()
    out = export_peft(cv.select(exclude="norm"), tmp_path / "b", rank=4)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None and config["base_model_name_or_path"] is None


def test_what_lora_cannot_hold_is_refused_by_name(tmp_path):
    vector = ChatVector.from_tensors({"model.layers.0.self_attn.q_proj.weight": torch.ones(4, 4),
                                      "model.layers.0.self_attn.q_proj.bias": torch.ones(4)})
    with pytest.raises(UsageError, match="q_proj.bias"):
        export_peft(vector, tmp_path / "a", rank=2)
    with pytest.raises(UsageError, match="rank"):
        export_peft(vector.select(exclude="bias"), tmp_path / "a", rank=0)
    with pytest.raises(UsageError, match="alpha"):
        export_peft(vector.select(exclude="bias"), tmp_path / "a", rank=1, alpha=float("nan"))


def test_existing_output_is_kept_unless_overwrite(tmp_path, cv):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(Exception, match="exists"):
        export_peft(cv, out, rank=2, target=toy.path("cp"))
    assert (out / "mine.txt").read_text() == "keep me"


def test_cli_extract_peft_and_low_rank_vector(tmp_path, capsys):
    base, chat, cp = (str(toy.path(m)) for m in ("base", "chat", "cp"))
    assert cli(["extract", "--base", base, "--chat", chat, "-o", str(tmp_path / "lora"), "--rank", "4",
                "--format", "peft", "--target", cp, "--alpha", "0.5", "-q"]) == 0
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["r"] == 4
    assert cli(["extract", "--base", base, "--chat", chat, "-o", str(tmp_path / "lora2"), "--rank", "4",
                "--format", "peft", "-q"]) == 2
    assert "--exclude norm" in capsys.readouterr().err
    assert cli(["extract", "--base", base, "--chat", chat, "-o", str(tmp_path / "lr"), "--rank", "3", "-q"]) == 0
    saved = ChatVector.load(tmp_path / "lr")
    assert torch.linalg.matrix_rank(saved["model.layers.1.mlp.up_proj.weight"], rtol=1e-4) == 3
    assert cli(["extract", "--base", base, "--chat", chat, "-o", str(tmp_path / "x"), "--target", cp, "-q"]) == 2


def test_tied_embeddings_and_grown_vocabularies_are_refused_before_writing(tmp_path, cv):
    from chatvec_lab.errors import MismatchError
    with pytest.raises(MismatchError, match="grown vocabulary"):  # cp-xvocab has 128 more rows
        export_peft(cv, tmp_path / "a", rank=4, target=toy.path("cp-xvocab"))
    assert not (tmp_path / "a").exists()
    tied = ChatVector(cv.terms, cv.shapes, cv.metadata, base_config={**(cv.base_config or {}), "tie_word_embeddings": True})
    with pytest.raises(UsageError, match="ties its input embeddings"):
        export_peft(tied, tmp_path / "b", rank=4, target=toy.path("cp"))
    export_peft(tied.select(exclude="embed_tokens"), tmp_path / "c", rank=4, target=toy.path("cp"))  # as it says


def test_adapter_records_the_targets_absolute_path(tmp_path, cv, monkeypatch):
    monkeypatch.chdir(toy.path("cp").parent)
    out = export_peft(cv, tmp_path / "a", rank=2, target="cp")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(toy.path("cp"))


# ------------------------------------------------------------------ every family × include/exclude (issue 26)

LINEAR_BIASES = r"(proj|dense|query_key_value|dense_h_to_4h|dense_4h_to_h)\.bias$"
# (include, exclude, with target): norms whole from the target; no norms without it; a part of the modules;
# norm biases kept in the vector (GPT-NeoX's LayerNorms have them), only the linear layers' biases left out
SELECTIONS = {"exclude-bias": (None, "bias", True), "exclude-bias-norm": (None, "bias|norm", False),
              "attention-and-norms": ("attn|attention|norm", "bias", True),
              "exclude-linear-biases": (None, LINEAR_BIASES, True)}
LORA_FAMILIES = ["llama", "mistral", "qwen2", "gemma", "gpt_neox", "phi3"]  # conftest's matrix; gpt2: below


def _full_model(folder):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()


@pytest.mark.parametrize("family", LORA_FAMILIES)
@pytest.mark.parametrize("selection", list(SELECTIONS))
def test_every_family_and_selection_loads_in_peft_and_equals_the_applied_vector(tmp_path, family_factory, family,
                                                                                 selection):
    """PEFT loads every export, and merged it is CP + α·ΔW to 1e-5 (float32 factors at full rank: the SVD's
    rounding only) — GPT-NeoX with --exclude bias included (its LayerNorms' biases go with the norms)."""
    from transformers import AutoModelForCausalLM
    from chatvec_lab import apply_vectors

    fam = family_factory(family)
    include, exclude, with_target = SELECTIONS[selection]
    if family == "gemma":  # tied embeddings: an embedding LoRA would change the input side only
        exclude = f"{exclude}|embed"
    vector = ChatVector.from_models(fam["base"], fam["chat"], hash_files=False).select(include=include,
                                                                                       exclude=exclude)
    out = export_peft(vector, tmp_path / "adapter", alpha=0.7, target=fam["cp"] if with_target else None,
                      dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(fam["cp"], dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, str(out)).merge_and_unload().state_dict()
    apply_vectors(fam["cp"], [(vector, 0.7)], tmp_path / "applied")
    expected, cp = _full_model(tmp_path / "applied"), _full_model(fam["cp"])
    assert _max_difference(merged, expected) < 1e-5
    changed = {k for k in expected if not torch.equal(expected[k], cp[k])}
    assert changed and all(not torch.equal(merged[k], cp[k]) for k in changed)  # every delta arrived
    if family == "gpt_neox" and with_target and "norm" in (include or "norm"):
        config = json.loads((out / "adapter_config.json").read_text())
        assert "gpt_neox.layers.0.input_layernorm" in config["modules_to_save"]
        assert "lm_head" in config["target_modules"] or include  # the in-memory name of embed_out


def test_gpt2_conv1d_is_refused_by_name(tmp_path, family_factory):
    fam = family_factory("gpt2")
    vector = ChatVector.from_models(fam["base"], fam["chat"], hash_files=False).select(exclude="bias|wte|wpe")
    with pytest.raises(UsageError, match="c_attn|c_proj|c_fc"):
        export_peft(vector, tmp_path / "a", target=fam["cp"])


def test_factors_take_the_checkpoints_dtype_or_the_one_asked_for(tmp_path, cv):
    """The toy is bfloat16: its adapter is too (half the size of float32 factors), and still CP + α·low-rank
    to bfloat16's rounding (2⁻⁸ relative, on each factor and on the whole norms)."""
    small = export_peft(cv, tmp_path / "bf16", rank=8, alpha=0.8, target=toy.path("cp"))
    full = export_peft(cv, tmp_path / "f32", rank=8, alpha=0.8, target=toy.path("cp"), dtype="float32")
    with safe_open(small / "adapter_model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    with safe_open(full / "adapter_model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    assert (full / "adapter_model.safetensors").stat().st_size > 1.9 * (small / "adapter_model.safetensors").stat().st_size
    expected = apply_to_model(toy.path("cp"), [(cv.low_rank(8), 0.8)], dtype=torch.float32)[0].state_dict()
    merged = _merged(small)
    for name, want in expected.items():
        assert float((merged[name] - want).abs().max()) <= 2 ** -7 * float(want.abs().max()) + 1e-6, name
    with pytest.raises(UsageError, match="dtype"):
        export_peft(cv, tmp_path / "x", rank=2, target=toy.path("cp"), dtype="int8")
