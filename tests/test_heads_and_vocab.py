"""Real checkpoints: tied output layers in every layout, the chat model's end of turn, token maps by name."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from chatvec_lab import ChatVector, apply_vectors, open_weights
from chatvec_lab.cli import main
from conftest import new_model, perturbed, tiny_config

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _llama(tied: bool, seed: int = 0):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    cfg.tie_word_embeddings = tied
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _save_storing_head(model, folder: Path) -> Path:
    """A tied model saved with an explicit copy of its output layer, as some checkpoints on the hub are."""
    model.save_pretrained(folder)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    state[HEAD] = state[EMBED].clone()
    for f in folder.glob("*.safetensors"):
        f.unlink()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def test_tied_target_that_stores_its_head_keeps_head_equal_to_embedding(tmp_path):
    base = _llama(tied=True)
    chat, cp = perturbed(base, 1), perturbed(base, 2)
    base.save_pretrained(tmp_path / "base")
    chat.save_pretrained(tmp_path / "chat")
    _save_storing_head(cp, tmp_path / "cp")
    vec = ChatVector.from_models(tmp_path / "base", tmp_path / "chat")
    assert HEAD not in vec.names  # tied models store one matrix
    report = apply_vectors(tmp_path / "cp", [(vec, 0.5)], tmp_path / "out")
    status = report.tensors.set_index("name")["status"]
    assert status[HEAD].startswith("added") and "tied" in status[HEAD]
    stored = open_weights(tmp_path / "out")
    expected = cp.state_dict()[EMBED] + 0.5 * vec[EMBED]
    assert torch.equal(stored.get(HEAD), stored.get(EMBED))
    torch.testing.assert_close(stored.get(EMBED), expected)
    model = _load(tmp_path / "out")
    torch.testing.assert_close(model.lm_head.weight.detach(), expected)  # the output layer carries the delta


def test_tied_vector_onto_untied_target_gives_the_head_the_embedding_delta(tmp_path):
    base = _llama(tied=True)
    chat = perturbed(base, 1)
    base.save_pretrained(tmp_path / "base")
    chat.save_pretrained(tmp_path / "chat")
    cp = _llama(tied=False)  # a descendant whose output layer was untied (e.g. by continued pre-training)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    state[HEAD] = state[EMBED] + 0.01
    cp.load_state_dict(state)
    cp.save_pretrained(tmp_path / "cp")
    vec = ChatVector.from_models(tmp_path / "base", tmp_path / "chat")
    report = apply_vectors(tmp_path / "cp", vec, tmp_path / "out")
    assert any("tie their embeddings" in w for w in report.warnings)
    model = _load(tmp_path / "out")
    torch.testing.assert_close(model.lm_head.weight.detach(), state[HEAD] + vec[EMBED])
    torch.testing.assert_close(model.model.embed_tokens.weight.detach(), state[EMBED] + vec[EMBED])


def test_untied_vector_onto_tied_target_says_its_head_is_not_used(tmp_path):
    base = _llama(tied=False)
    chat = perturbed(base, 1)
    base.save_pretrained(tmp_path / "base")
    chat.save_pretrained(tmp_path / "chat")
    cp = _llama(tied=True)
    cp.load_state_dict({k: v for k, v in base.state_dict().items() if k != HEAD}, strict=False)
    cp.save_pretrained(tmp_path / "cp")
    vec = ChatVector.from_models(tmp_path / "base", tmp_path / "chat")
    report = apply_vectors(tmp_path / "cp", vec, tmp_path / "out", check_lineage=False)
    assert any("ties its embeddings" in w and HEAD in w for w in report.warnings)
    model = _load(tmp_path / "out")
    torch.testing.assert_close(model.lm_head.weight.detach(), cp.state_dict()[EMBED] + vec[EMBED])


def _target_without_chat_end(tmp_path) -> Path:
    """The toy CP model as a real CP checkpoint would come: its text ends at <|endoftext|>, it knows no end of turn."""
    from chatvec_lab import toy

    folder = tmp_path / "cp-plain"
    shutil.copytree(toy.path("cp"), folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["eos_token"] = "<|endoftext|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    gen = json.loads((folder / "generation_config.json").read_text())
    gen["eos_token_id"] = 0
    (folder / "generation_config.json").write_text(json.dumps(gen))
    return folder


def _replies(folder, n_prompts=6, max_new_tokens=48):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from chatvec_lab.toy.evaluate import prompt_sets

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    gen = GenerationConfig.from_pretrained(str(folder))
    out = []
    for prompt in prompt_sets()["chat"][:n_prompts]:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            seq = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=gen.eos_token_id, pad_token_id=gen.pad_token_id)
        out.append(seq[0, ids.shape[1]:].tolist())
    return out


def test_chat_template_from_brings_the_chat_models_end_of_turn(tmp_path):
    from chatvec_lab import toy

    target = _target_without_chat_end(tmp_path)
    cv = ChatVector.from_models(toy.path("base"), toy.path("chat"), hash_files=False)
    apply_vectors(target, cv, tmp_path / "plain", check_lineage=False)
    report = apply_vectors(target, cv, tmp_path / "turns", chat_template_from=toy.path("chat"), check_lineage=False)
    assert any("generation stops at token ids [4, 0]" in w for w in report.warnings)
    assert json.loads((tmp_path / "turns" / "tokenizer_config.json").read_text())["eos_token"] == "<|end|>"
    assert json.loads((tmp_path / "turns" / "generation_config.json").read_text())["eos_token_id"] == [4, 0]
    end = 4  # <|end|>
    plain, turns = _replies(tmp_path / "plain"), _replies(tmp_path / "turns")
    # same weights, same greedy tokens: the merged model with the chat model's end of turn stops right there,
    # the one with the target's end of text writes past it
    ended = [i for i, r in enumerate(turns) if r and r[-1] == end]
    assert ended, turns
    for i in ended:
        assert plain[i][:len(turns[i])] == turns[i] and len(plain[i]) > len(turns[i])


def test_an_end_of_turn_the_target_lacks_is_refused_before_the_merge(tmp_path):
    from chatvec_lab import toy
    from chatvec_lab.errors import MismatchError

    chat = tmp_path / "chat-odd"
    shutil.copytree(toy.path("chat"), chat)
    cfg = json.loads((chat / "tokenizer_config.json").read_text())
    cfg["eos_token"] = "<|eot_id|>"
    (chat / "tokenizer_config.json").write_text(json.dumps(cfg))
    cv = ChatVector.from_models(toy.path("base"), toy.path("chat"), hash_files=False)
    with pytest.raises(MismatchError, match="ends its turns with '<\\|eot_id\\|>'"):
        apply_vectors(toy.path("cp"), cv, tmp_path / "o", chat_template_from=chat, check_lineage=False)
    assert not (tmp_path / "o").exists()


def test_cli_token_map_maps_a_target_token_to_another_chat_token(tmp_path, capsys):
    from chatvec_lab import toy

    cv = ChatVector.from_models(toy.path("base"), toy.path("chat"), hash_files=False)
    cv.save(tmp_path / "cv")
    rc = main(["apply", "--target", str(toy.path("cp")), "--vector", str(tmp_path / "cv"), "-o", str(tmp_path / "o"),
               "--token-map", "<|end|>=<|endoftext|>,<|pad|>", "--chat", str(toy.path("chat")), "-q",
               "--no-lineage-check"])
    assert rc == 0, capsys.readouterr().err
    out, chat = open_weights(tmp_path / "o"), open_weights(toy.path("chat"))
    for name in (EMBED, HEAD):
        assert torch.equal(out.get(name)[4], chat.get(name)[0])  # <|end|> row ← chat's <|endoftext|> row
        assert torch.equal(out.get(name)[5], chat.get(name)[5])  # <|pad|> row ← chat's <|pad|> row
