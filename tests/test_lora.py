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
    out = export_peft(cv, tmp_path / "adapter", rank=rank, alpha=0.8, target=toy.path("cp"))
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
