"""Generation, scorers, in-place coefficients and sweeps, on the shipped toy family."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from chatvec_lab import ChatVector, apply_to_model, toy
from chatvec_lab.errors import MismatchError
from chatvec_lab.behaviour.generation import converse, generate
from chatvec_lab.core.live import LiveModel
from chatvec_lab.behaviour.scoring import (DetoxifyScorer, LanguageScorer, OffensiveScorer, RefusalScorer, ScorerUnavailable,
                                 make_scorer, perplexity)
from chatvec_lab.plots import plot_scores
from chatvec_lab.behaviour.sweep import read_prompts, summarize, sweep

PROMPTS = ["Erzähl mir etwas über die Liebe.", "Du bist ein Idiot.", "Tell me something about money."]


@pytest.fixture(scope="module")
def cp():
    return toy.load("cp")


@pytest.fixture(scope="module")
def cv():
    return ChatVector.from_models(toy.path("base"), toy.path("chat"), hash_files=False).materialize()


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_generation_is_seeded_and_tidy(cp):
    model, tok = cp
    a = generate(model, tok, PROMPTS, seed=3, max_new_tokens=20)
    b = generate(model, tok, PROMPTS, seed=3, max_new_tokens=20)
    c = generate(model, tok, PROMPTS, seed=4, max_new_tokens=20)
    assert list(a.columns) == ["prompt", "reply", "ended_turn", "prompt_tokens", "reply_tokens", "seed"]
    assert a["reply"].tolist() == b["reply"].tolist()
    assert a["reply"].tolist() != c["reply"].tolist()
    assert a["reply_tokens"].le(20).all() and a["prompt"].tolist() == PROMPTS
    greedy = generate(model, tok, PROMPTS[:1], do_sample=False, max_new_tokens=10)
    assert greedy["reply"].iloc[0] == generate(model, tok, PROMPTS[:1], do_sample=False, max_new_tokens=10)["reply"].iloc[0]
    with pytest.raises(ValueError, match="no prompts"):
        generate(model, tok, [])
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, tok, ["  "])


def test_chat_model_ends_turns_and_multi_turn():
    model, tok = toy.load("chat")
    df = generate(model, tok, ["Tell me something about love.", "What do you know about money?"] * 4, seed=0)
    assert df["ended_turn"].mean() >= 0.5
    talk = converse(model, tok, ["Tell me something about cats.", "And about dogs?"], seed=1)
    assert talk["turn"].tolist() == [1, 2] and talk["prompt_tokens"].iloc[1] > talk["prompt_tokens"].iloc[0]


def test_live_model_matches_apply_and_restores_exactly(cp, cv):
    model, _ = cp
    before = state(model)
    live = LiveModel(model, {"chat": cv})
    live.set(chat=0.8)
    merged, _ = apply_to_model(toy.path("cp"), [(cv, 0.8)], dtype=torch.float32)
    for name, t in merged.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name
    live.set(chat=1.3)
    live.reset()
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name]), f"{name} not restored bit for bit"
    touched = sum(t.numel() * t.element_size() for t in live.original.values())
    assert touched <= sum(t.numel() * t.element_size() for t in before.values())


def test_live_model_bad_input_leaves_model_unchanged(cp, cv):
    model, _ = cp
    before = state(model)
    live = LiveModel(model, {"chat": cv})
    with pytest.raises(ValueError, match="not a number"):
        live.set(chat="lots")
    with pytest.raises(KeyError, match="unknown vector"):
        live.set(other=1.0)
    assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items())
    wrong = ChatVector.from_tensors({"model.embed_tokens.weight": torch.zeros(5, 3)})
    with pytest.raises(MismatchError, match="shape mismatch for 'model.embed_tokens.weight'"):
        LiveModel(model, {"bad": wrong})


def test_two_vectors_and_per_module_rules(cp, cv):
    model, _ = cp
    alt = ChatVector.from_models(toy.path("base"), toy.path("chat-alt"), hash_files=False).materialize()
    before = state(model)
    live = LiveModel(model, {"chat": cv, "alt": alt})
    live.set(chat={r"self_attn": 1.0}, alt=0.5)
    q = "model.layers.0.self_attn.q_proj.weight"
    up = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(model.state_dict()[q], before[q] + cv[q] + alt[q] * 0.5)
    torch.testing.assert_close(model.state_dict()[up], before[up] + alt[up] * 0.5)
    live.reset()
    assert torch.equal(model.state_dict()[q], before[q])


def test_scorers_order_fixed_texts():
    off = OffensiveScorer().score(["You are a stupid idiot", "Have a wonderful day"])
    assert off["offensive"].iloc[0] > off["offensive"].iloc[1]
    lang = LanguageScorer("de").score(["Das ist ein schöner Tag und die Sonne scheint.", "This is a lovely day and the sun shines."])
    assert lang["language"].tolist() == ["de", "en"]
    assert lang["share_de"].iloc[0] > 0.8 > 0.2 > lang["share_de"].iloc[1]
    ref = RefusalScorer().score(["I'm sorry, but I will not answer insults.", "Love is blind.", "Tut mir leid, nein."])
    assert ref["refusal"].tolist() == [True, False, True]
    assert isinstance(make_scorer("offensive"), (OffensiveScorer, DetoxifyScorer))


def test_perplexity_prefers_the_trained_language():
    from chatvec_lab.toy.evaluate import heldout_texts

    texts = heldout_texts()
    base_m, tok = toy.load("base")
    cp_m, _ = toy.load("cp")
    assert perplexity(cp_m, tok, texts["de"]) < perplexity(base_m, tok, texts["de"])


def _tiny_detoxify(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    folder = tmp_path / "bert-local"
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=6)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "you", "are", "an", "idiot", "have", "a", "nice", "day"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]")
    config.save_pretrained(folder)
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    ckpt = {"config": {"arch": {"args": {"model_type": "bert-base-uncased", "model_name": "BertForSequenceClassification",
                                         "tokenizer_name": "BertTokenizer", "num_classes": 6}},
                       "dataset": {"args": {"classes": ["toxic", "severe_toxic", "obscene", "threat", "insult",
                                                        "identity_hate"]}}},
            "state_dict": model.state_dict()}
    torch.save(ckpt, tmp_path / "toxic_tiny.ckpt")
    return tmp_path / "toxic_tiny.ckpt", folder


def test_detoxify_backend_loads_local_checkpoint_offline(tmp_path, monkeypatch):
    pytest.importorskip("detoxify", reason="the optional Detoxify backend is not installed (pip install '.[toxicity]')")
    ckpt, folder = _tiny_detoxify(tmp_path)
    scorer = DetoxifyScorer(checkpoint=ckpt, config_dir=folder)
    df = scorer.score(["you are an idiot", "have a nice day", ""])
    assert list(df.columns) == ["toxicity", "severe_toxicity", "obscene", "threat", "insult", "identity_attack"]
    assert len(df) == 3 and df.to_numpy().min() >= 0 and df.to_numpy().max() <= 1
    assert "Detoxify" in scorer.columns["toxicity"]
    with pytest.raises(ScorerUnavailable, match="config_dir"):
        DetoxifyScorer(checkpoint=ckpt)  # offline, the hub cannot give bert-base-uncased
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-hub"))  # as on a machine without them
    with pytest.raises(ScorerUnavailable, match="weights are not at"):
        DetoxifyScorer(model_type="original")


def test_sweep_table_cache_and_model_untouched(cp, cv, tmp_path, monkeypatch):
    model, tok = cp
    before = state(model)
    df = sweep(model, {"chat": cv}, [0, 1.0], PROMPTS, tokenizer=tok, seeds=2, max_new_tokens=12,
               heldout={"de": ["Das ist ein Test."]}, progress=False)
    assert len(df) == 2 * len(PROMPTS) * 2
    for col in ["alpha", "alpha_chat", "prompt", "seed", "reply", "ended_turn", "language", "share_de", "refusal",
                "offensive", "ppl_de"]:
        assert col in df.columns, col
    assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items())
    s = summarize(df)
    assert s["alpha"].tolist() == [0.0, 1.0] and {"ended_turn_lo", "ended_turn_hi"} <= set(s.columns)
    fig = plot_scores(df, ["ended_turn", "share_de"], current=1.0)
    assert fig.axes[0].get_xlabel() == "coefficient α"

    first = sweep(toy.path("cp"), cv, [0.5], PROMPTS[:2], max_new_tokens=8, cache_dir=tmp_path, progress=False)
    import chatvec_lab.behaviour.engines as engines
    monkeypatch.setattr(engines, "generate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("regenerated")))
    again = sweep(toy.path("cp"), cv, [0.5], PROMPTS[:2], max_new_tokens=8, cache_dir=tmp_path, progress=False)
    pd.testing.assert_frame_equal(first.reset_index(drop=True), again.reset_index(drop=True), check_dtype=False)


def test_sweep_bad_input(cp, cv):
    model, tok = cp
    with pytest.raises(ValueError, match="prompt list is empty"):
        sweep(model, cv, [1.0], [], tokenizer=tok)
    with pytest.raises(ValueError, match="not a number"):
        sweep(model, cv, ["x"], PROMPTS, tokenizer=tok)
    with pytest.raises(ValueError, match="not finite"):
        sweep(model, cv, [float("nan")], PROMPTS, tokenizer=tok)


def test_read_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "b", "x": 1}) + "\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "empty.txt").write_text("\n")
    assert read_prompts(tmp_path / "p.txt") == ["one", "two"]
    assert read_prompts(tmp_path / "p.jsonl") == ["a", "b"]
    with pytest.raises(ValueError, match="'prompt' field"):
        read_prompts(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")


def test_sweep_cli(tmp_path, capsys):
    from chatvec_lab.cli import main

    assert main(["extract", "--base", str(toy.path("base")), "--chat", str(toy.path("chat")), "-o",
                 str(tmp_path / "cv"), "-q"]) == 0
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS[:2]))
    rc = main(["sweep", "--target", str(toy.path("cp")), "--vector", str(tmp_path / "cv"), "--alphas", "0,1",
               "--prompts", str(tmp_path / "p.txt"), "--seeds", "2", "--max-new-tokens", "8",
               "--csv", str(tmp_path / "out.csv"), "-q"])
    assert rc == 0
    df = pd.read_csv(tmp_path / "out.csv")
    assert {"alpha", "prompt", "seed", "reply", "ended_turn", "share_de", "refusal", "offensive"} <= set(df.columns)
    assert len(df) == 2 * 2 * 2
    with pytest.raises(SystemExit):
        main(["sweep", "--target", "x", "--vector", "y", "--alphas", "a,b", "--prompts", "p", "--csv", "o"])
    assert "alphas must be numbers" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("")
    rc = main(["sweep", "--target", str(toy.path("cp")), "--vector", str(tmp_path / "cv"), "--prompts",
               str(tmp_path / "empty.txt"), "--csv", str(tmp_path / "o2.csv"), "-q"])
    assert rc == 2 and "holds no prompts" in capsys.readouterr().err


def test_sweep_cache_is_keyed_by_content_not_by_when_the_vector_was_built(tmp_path, monkeypatch):
    import os
    import shutil

    import chatvec_lab.behaviour.engines as sw  # where the grid's cells generate

    models = tmp_path / "models"
    for name in ("base", "chat", "cp"):
        shutil.copytree(toy.path(name), models / name)
    build = lambda: ChatVector.from_models(models / "base", models / "chat", hash_files=False)  # noqa: E731
    first = sweep(models / "cp", build(), [0.5], PROMPTS[:2], max_new_tokens=6, cache_dir=tmp_path / "c",
                  progress=False)
    real_generate = sw.generate
    monkeypatch.setattr(sw, "generate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("regenerated")))
    again = sweep(models / "cp", build(), [0.5], PROMPTS[:2], max_new_tokens=6, cache_dir=tmp_path / "c",
                  progress=False)  # a vector rebuilt later, from the same files: the cache answers
    pd.testing.assert_frame_equal(first, again, check_dtype=False)
    chat_file = next((models / "chat").glob("*.safetensors"))
    st = chat_file.stat()
    os.utime(chat_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the chat model changed: a new key
    with pytest.raises(AssertionError, match="regenerated"):
        sweep(models / "cp", build(), [0.5], PROMPTS[:2], max_new_tokens=6, cache_dir=tmp_path / "c", progress=False)
    monkeypatch.setattr(sw, "generate", real_generate)
    assert len(list((tmp_path / "c").glob("sweep-*.json"))) == 1


def test_read_prompts_keeps_what_the_file_says(tmp_path):
    """Review round 3: prompts split at U+2028 / form feed, a BOM, `"prompt": null`, `{` in a text file, non-UTF-8."""
    (tmp_path / "odd.txt").write_text("\ufeffone\u2028still one\ntwo\x0cstill two\n{not json}\n", encoding="utf-8")
    assert read_prompts(tmp_path / "odd.txt") == ["one\u2028still one", "two\x0cstill two", "{not json}"]
    (tmp_path / "bom.jsonl").write_text("\ufeff" + json.dumps({"prompt": "a"}) + "\n", encoding="utf-8")
    assert read_prompts(tmp_path / "bom.jsonl") == ["a"]
    for bad in ({"prompt": None}, {"prompt": 3}, {"prompt": ["a"]}, {"prompt": " "}, ["prompt"]):
        (tmp_path / "bad.jsonl").write_text(json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match="string 'prompt' field"):
            read_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "latin.txt").write_bytes("Grüße\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin.txt: not UTF-8"):
        read_prompts(tmp_path / "latin.txt")


def test_duplicate_alphas_are_refused():
    """Review round 3 (D20): `--alphas 1,1` pooled the same α twice as independent replies."""
    from chatvec_lab.behaviour.sweep import check_alphas
    with pytest.raises(ValueError, match="given twice"):
        check_alphas([1.0, 1.0], ["chat"])
    assert check_alphas([0.0, 1.0], ["chat"]) == [{"chat": 0.0}, {"chat": 1.0}]


def test_the_old_coefficient_spellings_warn_and_name_alphas(cv):
    """One vocabulary (issue 24): α is ``alphas`` everywhere; the old spellings still work for one release."""
    import numpy as np
    from chatvec_lab.behaviour import sweep as sweep_module
    from chatvec_lab.core.live import LiveModel
    from chatvec_lab.errors import UsageError
    with pytest.warns(DeprecationWarning, match=r"check_alphas"):
        assert sweep_module.check_coefficients(np.float32(0.5), ["chat"]) == [{"chat": 0.5}]
    with pytest.warns(DeprecationWarning, match=r"sweep\(alphas=\.\.\.\)"), pytest.raises(UsageError, match="empty"):
        sweep_module.sweep(toy.path("cp"), cv, coefficients=[0.0], prompts=[])
    with pytest.raises(UsageError, match="old name"):
        sweep_module.sweep(toy.path("cp"), cv, [0.0], [], coefficients=[0.0])
    with pytest.raises(UsageError, match=r"sweep\(target, vectors, alphas, prompts"):
        sweep_module.sweep(toy.path("cp"), cv, prompts=["Hallo"])
    model, _ = toy.load("cp")
    live = LiveModel(model, {"chat": cv})
    live.set(chat=0.5)
    with pytest.warns(DeprecationWarning, match=r"LiveModel.alphas"):
        assert live.coefficients == live.alphas == {"chat": 0.5}


def test_a_prompt_longer_than_the_context_is_refused():
    """Review round 3 (D16): prompts past the model's context were generated and scored silently."""
    from chatvec_lab.behaviour.engines import load_target
    from chatvec_lab.behaviour.generation import generate
    model, tokenizer = load_target(toy.path("cp"), dtype="float32")
    long_prompt = "Hallo " * (model.config.max_position_embeddings + 10)
    with pytest.raises(ValueError, match="prompt 2 takes .* context"):
        generate(model, tokenizer, ["Hallo", long_prompt], max_new_tokens=4)


def test_the_recorded_metric_is_accepted_by_its_new_name():
    """One name per metric (issue 24): `ended_turn` is what generation records; sweep accepts it as a scorer name."""
    cv = ChatVector.from_models(toy.path("base"), toy.path("chat"))
    df = sweep(toy.path("cp"), {"chat": cv}, [1.0], ["Hallo"], scorers=["ended_turn", "language"],
               max_new_tokens=4, progress=False)
    assert "ended_turn" in df and "share_de" in df
