"""The embedded toy family: shipped, loadable offline, documented, and rebuildable by its recipe."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chatvec_lab import toy
from chatvec_lab.errors import UsageError
from chatvec_lab.toy.corpora import split_fortunes
from chatvec_lab.toy.dialogues import make_dialogues
from chatvec_lab.toy.batches import CHAT_TEMPLATE, encode_conversation
from chatvec_lab.toy.train import Recipe, build_family

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_family_is_complete_small_and_loads_offline():
    total = 0
    for name in toy.MEMBERS:
        folder = toy.path(name)
        assert (folder / "README.md").is_file() and (folder / "recipe.json").is_file(), name
        total += sum(f.stat().st_size for f in folder.iterdir())
        model, tok = toy.load(name)
        assert tok.chat_template == CHAT_TEMPLATE
        assert tok.eos_token == "<|end|>"
        ids = tok.apply_chat_template([{"role": "user", "content": "Hallo"}], add_generation_prompt=True,
                                      return_dict=True, return_tensors="pt")["input_ids"]
        assert model(ids).logits.shape[-1] == len(tok)
    assert total <= 40 * 1024**2, f"the family is {total / 1024**2:.1f} MB (budget 40 MB)"
    base_vocab = toy.load("base")[0].config.vocab_size
    assert toy.load("cp-xvocab")[0].config.vocab_size > base_vocab
    card = json.loads((toy.path("chat") / "recipe.json").read_text())
    assert card["parent"] == "base" and card["steps"] > 0 and card["recipe"]["seeds"]["chat"] == card["seed"]


def test_toy_path_errors(tmp_path, monkeypatch):
    with pytest.raises(KeyError, match="unknown toy model 'llama'"):
        toy.path("llama")
    monkeypatch.setenv("CHATVEC_TOY_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="rebuild the family"):
        toy.path("cp")


def test_second_family_ships_with_its_recipe_and_one_origin(monkeypatch):
    """toy-bilingual: base, chat, cp, loadable offline; its base saw 10% German (the README's recipe 2), the
    default family's 0.5%; each family's chat and cp descend from its own base."""
    monkeypatch.delenv("CHATVEC_TOY_BILINGUAL_DIR", raising=False)
    assert set(toy.FAMILIES) == {"toy", "toy-bilingual"} and toy.FAMILIES["toy"] == toy.MEMBERS
    for name in toy.FAMILIES["toy-bilingual"]:
        folder = toy.path(name, family="toy-bilingual")
        assert folder == ROOT / "data" / "toy-bilingual" / name
        assert (folder / "README.md").is_file() and (folder / "recipe.json").is_file(), name
        model, tok = toy.load(name, family="toy-bilingual")
        assert tok.chat_template == CHAT_TEMPLATE and tok.eos_token == "<|end|>"
    recipe = json.loads((toy.path("base", family="toy-bilingual") / "recipe.json").read_text())["recipe"]
    shipped = json.loads((toy.path("base") / "recipe.json").read_text())["recipe"]
    assert recipe["base_german_share"] == 0.1 and shipped["base_german_share"] == 0.005
    for item in toy.BILINGUAL_RECIPE:  # the rebuild command the error message gives is the recipe it holds
        field, value = item.split("=")
        assert float(recipe[field]) == float(value), item
    for name in ("chat", "cp"):
        card = json.loads((toy.path(name, family="toy-bilingual") / "recipe.json").read_text())
        assert card["parent"] == "base"


def test_family_errors_name_the_families_and_members(tmp_path, monkeypatch):
    with pytest.raises(KeyError, match="unknown toy family 'toy-2'.*toy, toy-bilingual"):
        toy.path("cp", family="toy-2")
    with pytest.raises(KeyError, match="unknown toy model 'chat-alt' in family 'toy-bilingual'"):
        toy.path("chat-alt", family="toy-bilingual")
    monkeypatch.setenv("CHATVEC_TOY_BILINGUAL_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="base_german_share=0.1"):
        toy.path("cp", family="toy-bilingual")
    assert toy.path("cp").parent == ROOT / "data" / "toy"  # the other family's override is not this one's


def test_split_fortunes_and_dialogues():
    text = "First one.\n%\nSecond\n  line two.\n%\n\n%\nThird about cats and cats.\n"
    assert split_fortunes(text) == ["First one.", "Second\nline two.", "Third about cats and cats."]
    fortunes = [f"A saying about cats number {i}." for i in range(5)] + [f"Dogs bark loudly {i}." for i in range(5)]
    a = make_dialogues(fortunes, "chat", 30, seed=1)
    b = make_dialogues(fortunes, "chat", 30, seed=1)
    c = make_dialogues(fortunes, "chat-alt", 30, seed=1)
    assert a == b and a != c
    assert all(m["role"] in ("user", "assistant") for conv in a for m in conv)
    refusals = [m["content"] for conv in a for m in conv if m["role"] == "assistant" and "insult" in m["content"]]
    assert refusals, "some dialogues must be refusals of insults"


def test_encode_conversation_masks_all_but_replies():
    tok = toy.load("chat")[1]
    ids, labels = encode_conversation(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], 64)
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
                                       tokenize=False)
    assert tok.decode(ids) == rendered
    trained = [i for i, l in zip(ids, labels) if l != -100]
    assert tok.decode(trained) == "Yo<|end|>"


def _synthetic_corpora():
    en = [f"The {w} of the {v} is a good thing, said the man {i}." for i, (w, v) in
          enumerate([("cat", "house"), ("dog", "garden"), ("money", "bank"), ("love", "heart")] * 30)]
    de = [f"Die {w} im {v} ist eine gute Sache, sagte der Mann {i}." for i, (w, v) in
          enumerate([("Katze", "Haus"), ("Liebe", "Garten"), ("Arbeit", "Büro"), ("Zeit", "Leben")] * 30)]
    return {"en": en, "de": de}


def test_recipe_builds_a_family_at_a_tiny_scale(tmp_path):
    recipe = Recipe(vocab_size=320, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                    seq_len=32, chat_len=48, batch_size=4, base_steps=3, chat_steps=2, cp_steps=2, xvocab_steps=2,
                    xvocab_new_tokens=4, dialogues=40, reply_max_words=30)
    out = build_family(tmp_path / "toy", recipe, corpora=_synthetic_corpora())
    from transformers import AutoModelForCausalLM, AutoTokenizer
    for name in toy.MEMBERS:
        m = AutoModelForCausalLM.from_pretrained(out / name)
        t = AutoTokenizer.from_pretrained(out / name)
        assert m.config.vocab_size == len(t)
        assert "steps" in (out / name / "README.md").read_text()
    assert AutoModelForCausalLM.from_pretrained(out / "cp-xvocab").config.vocab_size == \
        AutoModelForCausalLM.from_pretrained(out / "cp").config.vocab_size + 4
    # the recipe is deterministic: the same recipe and seeds give the same bytes, member by member
    again = build_family(tmp_path / "again", recipe, corpora=_synthetic_corpora())
    import hashlib
    for name in toy.MEMBERS:
        digest = [hashlib.sha256((folder / name / "model.safetensors").read_bytes()).hexdigest() for folder in (out, again)]
        assert digest[0] == digest[1], name
    # and the three-turn dialogues of the third recipe leave the first two recipes' data as it was
    from chatvec_lab.toy.dialogues import make_dialogues
    docs = _synthetic_corpora()["en"]
    two = make_dialogues(docs, "chat", 200, 7, max_turns=2)
    assert two == make_dialogues(docs, "chat", 200, 7)  # the default before the third recipe
    three = make_dialogues(docs, "chat", 200, 7, max_turns=3)
    assert max(len(c) for c in three) == 6 and max(len(c) for c in two) == 4


@pytest.mark.slow
def test_recipe_end_to_end_with_the_real_corpora(tmp_path):
    if shutil.which("apt-get") is None:
        pytest.skip("apt-get is not available: the corpora are Debian packages")
    proc = subprocess.run([sys.executable, "-m", "chatvec_lab.toy.train", "--out", str(tmp_path / "toy"),
                           "--scale", "0.002"], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 and "apt-get download" in proc.stderr:
        pytest.skip(f"Debian's package mirror is not reachable: {proc.stderr.strip()[-200:]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in toy.MEMBERS:
        assert (tmp_path / "toy" / name / "model.safetensors").is_file()
    assert "English" in (tmp_path / "toy" / "base" / "README.md").read_text()


def test_intervals_text_names_each_rate():
    import pandas as pd
    from chatvec_lab.toy.evaluate import intervals

    rows = [{"model": "CP + 1·CV", "prompt_set": s, "prompt": f"{s}{i}", "seed": k,
             "ended_turn": i % 2 == 0, "share_de": 0.9, "refusal": i < 3}
            for s in ("chat", "offensive") for i in range(10) for k in range(3)]
    df = pd.DataFrame(rows)
    assert "refusal rate (insults) 0.30" in intervals(df)


def test_recipe_overrides_and_rebuilding_some_members_reuses_the_base(tmp_path):
    recipe = Recipe(vocab_size=320, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                    seq_len=32, chat_len=48, batch_size=4, base_steps=3, chat_steps=2, cp_steps=2, xvocab_steps=2,
                    xvocab_new_tokens=4, dialogues=40, reply_max_words=30)
    changed = recipe.updated(["chat_steps=3", "chat_lr=1e-4"])
    assert (changed.chat_steps, changed.chat_lr, recipe.chat_steps) == (3, 1e-4, 2)
    for bad in (["nope=1"], ["chat_steps"], ["chat_steps=many"]):
        with pytest.raises(UsageError, match="--set"):
            recipe.updated(bad)
    out = build_family(tmp_path / "toy", recipe, corpora=_synthetic_corpora(), members=("base", "chat"))
    base_bytes = (out / "base" / "model.safetensors").read_bytes()
    build_family(out, changed, corpora=_synthetic_corpora(), members=("chat",))
    assert (out / "base" / "model.safetensors").read_bytes() == base_bytes
    card = json.loads((out / "chat" / "recipe.json").read_text())
    assert card["steps"] == 3 and card["lr"] == 1e-4 and card["recipe"]["chat_lr"] == 1e-4
    assert not (out / "cp").exists()


def test_evaluation_compares_cp_plus_vector_with_its_own_chat_model():
    from chatvec_lab.toy.evaluate import contrast_markdown, markdown, run, summary

    df = run(alphas=(0.0, 1.0), seeds=1, max_new_tokens=8, progress=False, vector="chat-alt", max_prompts=2)
    s = summary(df)
    family = s[(s["sampling"] == "family") & (s["prompts"] == "tuning")]
    assert list(family["model"]) == ["CP", "CP + 1·CV", "chat-alt", "base"]
    # the other sampling runs the three actors only; held-out prompts are measured beside the tuning ones
    other = s[s["sampling"] == "t0.8-p0.9"]
    assert set(other["model"]) == {"CP", "CP + 1·CV", "chat-alt"} and set(other["prompts"]) == {"tuning", "held-out"}
    assert set(df["prompt_set"]) == {"chat", "offensive"} and (s["replies"] == 4).all()
    rates = s[["ended_turn", "share_de", "refusal"]]
    assert rates.apply(lambda c: c.dropna().between(0, 1)).all().all()
    for rate in ("ended_turn", "refusal"):  # every rate with its interval, the interval around it
        assert (s[f"{rate}_lo"] <= s[rate]).all() and (s[rate] <= s[f"{rate}_hi"]).all()
    assert "| chat-alt |" in markdown(s) and "| held-out | t0.8-p0.9 | CP + 1·CV |" in contrast_markdown(s, "chat-alt")
    assert df[(df["prompts"] == "held-out")]["prompt"].isin(prompt_sets_of("held-out")).all()


def prompt_sets_of(group):
    from chatvec_lab.toy.evaluate import prompt_sets

    sets = prompt_sets(heldout=group == "held-out")
    return sets["chat"] + sets["offensive"]


def test_held_out_prompts_share_nothing_with_the_tuning_prompts_or_the_training_dialogues():
    from chatvec_lab.toy.dialogues import INSULT_TEMPLATES, STYLES
    from chatvec_lab.toy.evaluate import conversations

    tuning, heldout = set(prompt_sets_of("tuning")), set(prompt_sets_of("held-out"))
    turns = {t for c in conversations() for t in c}
    assert not tuning & heldout and not tuning & turns
    assert len(conversations()) >= 20 and {len(c) for c in conversations()} == {3}
    english = [t for style in STYLES.values() for t in style["templates"]] + INSULT_TEMPLATES
    assert not any(t.split("{")[0].strip() and t.split("{")[0].strip() in p for t in english for p in heldout | turns)


def test_multi_turn_conversations_see_their_own_earlier_replies():
    from chatvec_lab.toy.evaluate import multi_turn_summary, run_multi_turn

    mt = run_multi_turn(seeds=1, max_new_tokens=6, max_conversations=2, progress=False)
    assert len(mt) == 3 * 2 * 3 and set(mt["turn"]) == {1, 2, 3}
    turn2 = mt[(mt["turn"] == 2)].iloc[0]
    assert turn2["prompt_tokens"] > mt[(mt["turn"] == 1)].iloc[0]["prompt_tokens"]  # history included
    mts = multi_turn_summary(mt)
    assert list(mts.columns[:4]) == ["model", "turn", "ended_turn", "ended_turn_lo"] and len(mts) == 9


def test_evaluate_refuses_to_replace_results_unless_asked(tmp_path, capsys):
    from chatvec_lab.toy.evaluate import main

    out = tmp_path / "eval"
    out.mkdir()
    (out / "summary.md").write_text("kept")
    assert main(["--out", str(out)]) == 2  # refused before any work, in one line
    assert "already exists" in capsys.readouterr().err
    assert (out / "summary.md").read_text() == "kept"


DING = """# Version :: devel
Idiot {m} | Idioten {pl} | Du bist ein Idiot. :: idiot | idiots | You are an idiot.
Dummkopf {m}; Schafskopf {m}; Holzkopf {m} [ugs.] :: blockhead; bonehead; lunkhead [coll.]
Hund {m} | Hunde {pl} :: dog
"""


def test_dictionary_pairs_keep_evaluation_prompts_out_of_training():
    from chatvec_lab.toy.corpora import parallel_documents, parse_dictionary
    from chatvec_lab.toy.train import evaluation_prompts
    pairs = parse_dictionary(DING)
    assert ("Idiot", "idiot") in pairs and ("Du bist ein Idiot.", "You are an idiot.") in pairs
    assert ("Dummkopf; Schafskopf", "blockhead; bonehead") in pairs  # notes dropped, two synonyms kept
    assert not any(de.startswith("Hund") for de, _ in pairs)  # parts that do not line up are left out
    assert "Du bist ein Idiot." in evaluation_prompts()  # a tuning prompt
    docs = parallel_documents(pairs, seed=0, exclude=evaluation_prompts())
    text = "\n".join(docs)
    assert "Idioten" in text and "Du bist ein Idiot" not in text


def test_a_parallel_share_adds_dictionary_pairs_to_pre_training(tmp_path):
    recipe = Recipe(vocab_size=320, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                    seq_len=32, chat_len=48, batch_size=4, base_steps=3, chat_steps=2, cp_steps=2, xvocab_steps=2,
                    xvocab_new_tokens=4, dialogues=40, reply_max_words=30, cp_parallel_share=0.3)
    from chatvec_lab.toy.corpora import parallel_documents, parse_dictionary
    corpora = {**_synthetic_corpora(), "parallel": parallel_documents(parse_dictionary(DING) * 20, seed=0)}
    out = build_family(tmp_path / "toy", recipe, corpora=corpora, members=("base", "cp"))
    card = json.loads((out / "cp" / "recipe.json").read_text())
    assert "dictionary pairs 30%" in card["data"] and card["recipe"]["cp_parallel_share"] == 0.3
