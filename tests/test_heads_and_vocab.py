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
from conftest import perturbed, tiny_config

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


# ------------------------------------------------------------------ vocabularies matched by token

def _permuted_copy(src: Path, dest: Path, seed: int = 0) -> torch.Tensor:
    """A copy of a toy model whose ordinary tokens sit under other ids (rows moved with them): the same model, told
    differently. Returns ``perm`` with new row ``i`` = old row ``perm[i]``."""
    shutil.copytree(src, dest)
    tj = json.loads((dest / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    fixed = {a["id"] for a in tj["added_tokens"]}
    movable = sorted(i for i in vocab.values() if i not in fixed)
    g = torch.Generator().manual_seed(seed)
    shuffled = [movable[int(j)] for j in torch.randperm(len(movable), generator=g)]
    new_of_old = dict(zip(shuffled, movable))
    tj["model"]["vocab"] = {tok: new_of_old.get(i, i) for tok, i in vocab.items()}
    (dest / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    perm = torch.arange(len(vocab))
    for old, new in new_of_old.items():
        perm[new] = old
    weights = open_weights(dest)
    state = {n: weights.get(n).clone() for n in weights.keys()}
    weights.close()
    for name in (EMBED, HEAD):
        state[name] = state[name][perm].contiguous()
    (dest / "model.safetensors").unlink()
    save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
    return perm


def test_a_permuted_vocabulary_is_refused_by_default_and_matched_by_token_on_request(tmp_path, capsys):
    from chatvec_lab import toy
    from chatvec_lab.errors import MismatchError

    cv = ChatVector.from_models(toy.path("base"), toy.path("chat"), hash_files=False)
    cv.save(tmp_path / "cv")
    perm = _permuted_copy(toy.path("cp"), tmp_path / "cp-perm")
    with pytest.raises(MismatchError, match="disagree on shared ids .*id \\d+: "):
        apply_vectors(tmp_path / "cp-perm", ChatVector.load(tmp_path / "cv"), tmp_path / "o", check_lineage=False)
    rc = main(["apply", "--target", str(tmp_path / "cp-perm"), "--vector", str(tmp_path / "cv"), "-o",
               str(tmp_path / "o"), "-q", "--no-lineage-check"])
    assert rc == 2 and "--embeddings tokens" in capsys.readouterr().err
    apply_vectors(toy.path("cp"), ChatVector.load(tmp_path / "cv"), tmp_path / "plain", check_lineage=False)
    apply_vectors(tmp_path / "cp-perm", ChatVector.load(tmp_path / "cv"), tmp_path / "by-token",
                  embeddings="tokens", check_lineage=False)
    plain, by_token = open_weights(tmp_path / "plain"), open_weights(tmp_path / "by-token")
    for name in plain.keys():
        expected = plain.get(name)[perm] if name in (EMBED, HEAD) else plain.get(name)
        assert torch.equal(by_token.get(name), expected), name  # exact: the same arithmetic on the same rows


def _chat_with_added_token(tmp_path: Path, token: str = "<|sys|>") -> Path:
    """The toy chat model after a fine-tuning that added a special token (a new row in embeddings and lm_head)."""
    from transformers import AutoTokenizer

    from chatvec_lab import toy

    dest = tmp_path / "chat-ext"
    shutil.copytree(toy.path("chat"), dest)
    tok = AutoTokenizer.from_pretrained(str(dest))
    tok.add_special_tokens({"additional_special_tokens": [token]})
    tok.save_pretrained(str(dest))
    weights = open_weights(dest)
    state = {n: weights.get(n).clone() for n in weights.keys()}
    weights.close()
    g = torch.Generator().manual_seed(3)
    for name in (EMBED, HEAD):
        row = (torch.randn(1, state[name].shape[1], generator=g) * 0.02).to(state[name].dtype)
        state[name] = torch.cat([state[name], row])
    (dest / "model.safetensors").unlink()
    save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((dest / "config.json").read_text())
    cfg["vocab_size"] = state[EMBED].shape[0]
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def test_tokens_the_chat_model_added_extract_and_join_a_union_vocabulary(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatvec_lab import toy
    from chatvec_lab.errors import MismatchError

    chat = _chat_with_added_token(tmp_path)
    cv = ChatVector.from_models(toy.path("base"), chat, hash_files=False)
    assert cv.shapes[EMBED][0] == 2049 and cv.chat_rows == [2048]
    cv.save(tmp_path / "cv")
    cv = ChatVector.load(tmp_path / "cv")
    assert cv.chat_rows == [2048] and cv.metadata["special_tokens"] == ["<|sys|>"]
    chat_w, base_w = open_weights(chat), open_weights(toy.path("base"))
    assert torch.equal(cv[EMBED][2048], chat_w.get(EMBED)[2048].float())  # the chat model's own row
    assert torch.equal(cv[EMBED][:2048], chat_w.get(EMBED)[:2048].float() - base_w.get(EMBED).float())
    with pytest.raises(MismatchError, match="vocabulary sizes differ"):
        apply_vectors(toy.path("cp"), cv, tmp_path / "o", check_lineage=False)
    apply_vectors(toy.path("cp"), cv, tmp_path / "shared", embeddings="shared", check_lineage=False)
    apply_vectors(toy.path("cp"), cv, tmp_path / "tokens", embeddings="tokens", check_lineage=False)
    report = apply_vectors(toy.path("cp"), cv, tmp_path / "union", embeddings="union", check_lineage=False)
    assert any("union vocabulary: 1 token" in w for w in report.warnings)
    shared, tokens, union = (open_weights(tmp_path / n) for n in ("shared", "tokens", "union"))
    for name in shared.keys():
        assert torch.equal(shared.get(name), tokens.get(name)), name  # cp has no <|sys|>: the same merge
        if name in (EMBED, HEAD):
            assert torch.equal(union.get(name)[:2048], shared.get(name))
            assert torch.equal(union.get(name)[2048], chat_w.get(name)[2048])  # the chat model's row joins
        else:
            assert torch.equal(union.get(name), shared.get(name)), name
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "union"))
    assert tok.convert_tokens_to_ids("<|sys|>") == 2048 and tok.added_tokens_decoder[2048].special
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "union"))
    assert model.get_input_embeddings().weight.shape[0] == 2049


def test_a_target_that_has_the_added_token_elsewhere_takes_the_chat_row_and_target_only_rows(tmp_path):
    from transformers import AutoTokenizer

    from chatvec_lab import toy

    chat = _chat_with_added_token(tmp_path)
    cv = ChatVector.from_models(toy.path("base"), chat, hash_files=False)
    target = tmp_path / "xvocab-sys"  # cp-xvocab (2176 rows) that also learned <|sys|>, at id 2176
    shutil.copytree(toy.path("cp-xvocab"), target)
    tok = AutoTokenizer.from_pretrained(str(target))
    tok.add_special_tokens({"additional_special_tokens": ["<|sys|>"]})
    tok.save_pretrained(str(target))
    w = open_weights(target)
    state = {n: w.get(n).clone() for n in w.keys()}
    w.close()
    for name in (EMBED, HEAD):
        state[name] = torch.cat([state[name], torch.zeros(1, state[name].shape[1], dtype=state[name].dtype)])
    (target / "model.safetensors").unlink()
    save_file(state, target / "model.safetensors", metadata={"format": "pt"})
    apply_vectors(target, cv, tmp_path / "keep", embeddings="tokens", check_lineage=False)
    apply_vectors(target, cv, tmp_path / "mean", embeddings="tokens", target_only="mean", check_lineage=False)
    keep, mean, chat_w = open_weights(tmp_path / "keep"), open_weights(tmp_path / "mean"), open_weights(chat)
    delta = cv[EMBED]
    for out in (keep, mean):
        assert torch.equal(out.get(EMBED)[2176], chat_w.get(EMBED)[2048])  # <|sys|> ← the chat model's row
        expected = (state[EMBED][:2048].float() + delta[:2048]).to(state[EMBED].dtype)
        assert torch.equal(out.get(EMBED)[:2048], expected)
    assert torch.equal(keep.get(EMBED)[2048:2176], state[EMBED][2048:2176])  # German tokens the vector lacks
    mean_delta = delta[:2048].mean(0)
    torch.testing.assert_close(mean.get(EMBED)[2048:2176].float(),
                               (state[EMBED][2048:2176].float() + mean_delta).to(state[EMBED].dtype).float(),
                               atol=1e-2, rtol=0)
