"""Trust, round 4 (review 23, the weights side): extract and apply keep their promises — nothing dropped or measured
silently wrong, one clear line for what a user can fix, notes where an output is a no-op.

Every test here failed on the code before the review's fixes (D2, L1, D8, D19, D21, M5, M6, M7, M11, and GPT-NeoX's
renamed output layer in ``apply_to_model``)."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from chatvec_lab import ChatVector, apply_to_model, apply_vectors, toy
from chatvec_lab.cli import main
from chatvec_lab.errors import MismatchError, SourceError, UsageError

Q = "model.layers.0.self_attn.q_proj.weight"


def _cli(args) -> int:
    return main([str(a) for a in args])


def _copy(name: str, dst: Path) -> Path:
    shutil.copytree(toy.path(name), dst)
    return dst


def _edit(folder: Path, edit) -> None:
    shard = folder / "model.safetensors"
    state = load_file(shard)
    edit(state)
    save_file(state, shard, metadata={"format": "pt"})


def _permuted(dst: Path) -> Path:
    """The toy cp with its vocabulary's ids shuffled (all but the first 6), its token-indexed rows moved with them."""
    _copy("cp", dst)
    tok = json.loads((dst / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    n = len(vocab)
    perm = torch.arange(n)
    perm[6:] = 6 + torch.randperm(n - 6, generator=torch.Generator().manual_seed(0))  # new id = perm[old id]
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(n)
    tok["model"]["vocab"] = {t: int(perm[i]) for t, i in vocab.items()}
    (dst / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))

    def move(state):
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            rows = state[k]
            state[k] = torch.cat([rows[inv], rows[n:]]).contiguous()
    _edit(dst, move)
    return dst


@pytest.fixture(scope="module")
def saved_vector(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vec") / "vec"
    ChatVector.from_models(toy.path("base"), toy.path("chat")).save(folder)
    return folder


# ------------------------------------------------------------------ D2: a weight integer on one side only

@pytest.mark.parametrize("side", ["base", "chat"])
def test_extract_refuses_a_weight_integer_in_one_model_only(tmp_path, side):
    """D2: an int8 base tensor against a float chat one was dropped from the vector without a word."""
    models = {"base": toy.path("base"), "chat": toy.path("chat")}
    models[side] = _copy(side, tmp_path / side)
    _edit(models[side], lambda sd: sd.__setitem__(Q, (sd[Q].float() * 100).to(torch.int8)))
    with pytest.raises(MismatchError, match=rf"{Q}.*int8"):
        ChatVector.from_models(models["base"], models["chat"], hash_files=False)


# ------------------------------------------------------------------ L1: lineage on rows matched by token

def test_lineage_of_a_permuted_vocabulary_matches_rows_by_token(tmp_path, saved_vector):
    """L1: a target whose vocabulary is permuted compared its embedding rows by index: a false lineage warning."""
    target = _permuted(tmp_path / "cp-perm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a LineageWarning fails the test
        permuted = apply_vectors(target, saved_vector, tmp_path / "perm", embeddings="tokens")
        plain = apply_vectors(toy.path("cp"), saved_vector, tmp_path / "plain")
    assert any("matched by token" in s for s in permuted.tensors["status"])
    assert permuted.lineage_distance == pytest.approx(plain.lineage_distance, rel=1e-4)
    assert not permuted.warnings


# ------------------------------------------------------------------ D8: --no-lineage-check reads no base

@pytest.fixture()
def vector_of_a_gone_base(tmp_path):
    base = _copy("base", tmp_path / "base2")
    vector = tmp_path / "vb2"
    ChatVector.from_models(base, toy.path("chat"), hash_files=False).save(vector)
    (base / "model.safetensors").unlink()  # the base's weights deleted or converted later; the folder stays
    return vector, base


def test_no_lineage_check_never_opens_the_recorded_base(tmp_path, vector_of_a_gone_base):
    """D8: --no-lineage-check still opened the recorded base, and failed on its missing weights."""
    vector, _ = vector_of_a_gone_base
    report = apply_vectors(toy.path("cp"), vector, tmp_path / "out", check_lineage=False)
    assert report.lineage_distance is None and (tmp_path / "out" / "model.safetensors").is_file()


def test_a_recorded_base_without_weights_names_itself_and_the_ways_out(tmp_path, vector_of_a_gone_base, capsys):
    """D8: the message said "no weights in X" without saying X is the vector's recorded base, or what to do."""
    vector, base = vector_of_a_gone_base
    with pytest.raises(SourceError, match=r"the vector's recorded base .*base2 has no weights; pass --base or "
                                          r"--no-lineage-check"):
        apply_vectors(toy.path("cp"), vector, tmp_path / "out")
    assert _cli(["apply", "--target", toy.path("cp"), "--vector", vector, "-o", tmp_path / "o2", "-q",
                 "--no-lineage-check"]) == 0
    assert "not checked (--no-lineage-check)" in capsys.readouterr().out


# ------------------------------------------------------------------ D19: a recorded base that changed

def test_apply_says_when_the_recorded_base_changed_since_extraction(tmp_path):
    """D19: the lineage was measured silently against whatever lay at the recorded path."""
    base = _copy("base", tmp_path / "bc")
    vector = tmp_path / "vbc"
    ChatVector.from_models(base, toy.path("chat")).save(vector)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        same = apply_vectors(toy.path("cp"), vector, tmp_path / "o1")
        shutil.copy(toy.path("chat-alt") / "model.safetensors", base / "model.safetensors")  # same size, other bytes
        changed = apply_vectors(toy.path("cp"), vector, tmp_path / "o2")
    assert not any("changed" in w for w in same.warnings)
    assert any("recorded base" in w and "has changed since" in w and "sha256" in w for w in changed.warnings)
    assert "warning: the vector's recorded base" in changed.summary()


def test_base_changes_compares_names_and_sizes_without_hashing_big_files(tmp_path, monkeypatch):
    """D19: names and sizes are compared always; sha256 only for a base small enough to hash."""
    from chatvec_lab.core import metadata

    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x" * 10)
    sha = {"model.safetensors": "0" * 64}
    assert "recorded ['other.safetensors']" in metadata.base_changes({"sizes": {"other.safetensors": 10}}, [f])
    assert "10 bytes" in metadata.base_changes({"sizes": {"model.safetensors": 11}}, [f])
    assert "sha256" in metadata.base_changes({"sha256": sha, "sizes": {"model.safetensors": 10}}, [f])
    monkeypatch.setattr(metadata, "HASH_BASE_AT_MOST", 5)
    assert metadata.base_changes({"sha256": sha, "sizes": {"model.safetensors": 10}}, [f]) is None


# ------------------------------------------------------------------ D21: a lone (vector, alpha) pair

def test_a_lone_vector_alpha_pair_is_one_pair(saved_vector):
    """D21: apply_to_model(target, (v, 0.5)) iterated the tuple: "a vector must be a ChatVector …, not float"."""
    v = ChatVector.load(saved_vector)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lone, report = apply_to_model(toy.path("cp"), (v, 0.5))
        listed, _ = apply_to_model(toy.path("cp"), [(v, 0.5)])
    assert set(report.tensors["coefficients"]) == {(0.5,)}
    a, b = lone.state_dict(), listed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


# ------------------------------------------------------------------ M11: rank 0 and trust_remote_code

def test_low_rank_zero_and_a_truthy_trust_remote_code_are_refused(saved_vector):
    """M11: low_rank(0) built an all-zero vector; trust_remote_code="yes" went to transformers as True."""
    v = ChatVector.load(saved_vector)
    with pytest.raises(UsageError, match="rank must be at least 1"):
        v.low_rank(0)
    with pytest.raises(UsageError, match="trust_remote_code must be True or False"):
        apply_to_model(toy.path("cp"), v, trust_remote_code="yes")


# ------------------------------------------------------------------ M7: extract says when its output is a no-op

def test_extract_notes_outputs_that_change_nothing(tmp_path, capsys):
    """M7: identical --base/--chat, --format peft with --max-shard-gb or --alpha 0: written silently."""
    base = str(toy.path("base"))
    assert _cli(["extract", "--base", base, "--chat", base, "-o", tmp_path / "same", "-q"]) == 0
    assert "note: --base and --chat hold the same weights" in capsys.readouterr().err
    assert _cli(["extract", "--base", base, "--chat", toy.path("chat"), "-o", tmp_path / "peft", "-q",
                 "--format", "peft", "--exclude", "norm", "--max-shard-gb", "1", "--alpha", "0"]) == 0
    err = capsys.readouterr().err
    assert "note: --max-shard-gb is ignored with --format peft" in err and "note: --alpha 0" in err
    assert _cli(["extract", "--base", base, "--chat", toy.path("chat"), "-o", tmp_path / "v", "-q"]) == 0
    assert "note:" not in capsys.readouterr().err


# ------------------------------------------------------------------ M5: the summary's wording

def test_apply_summary_prints_the_chat_template_as_a_note(tmp_path, saved_vector, capsys):
    """M5: "chat template and end of turn from …" was printed as a warning."""
    assert _cli(["apply", "--target", toy.path("cp"), "--vector", saved_vector, "-o", tmp_path / "out", "-q",
                 "--chat-template-from", toy.path("chat")]) == 0
    out = capsys.readouterr().out
    assert "note: chat template and end of turn from" in out and "warning: chat template" not in out


# ------------------------------------------------------------------ M6: a cosine never above 1

def test_the_cosine_of_a_vector_with_its_copy_is_one(tmp_path, saved_vector):
    """M6: `compare` of a vector and a byte copy of it printed 1.0000000000000002."""
    from chatvec_lab.analysis import geometry
    from chatvec_lab.core.vector import named_vectors

    shutil.copytree(saved_vector, tmp_path / "copy")
    stats = geometry.vector_stats(named_vectors([saved_vector, tmp_path / "copy"]))
    assert geometry.cosine_matrix(stats).to_numpy().max() == 1.0
    tidy = geometry.tidy_table(stats)
    assert tidy["cosine"].max() <= 1.0 and geometry.cosine_by(stats)["cosine"].max() <= 1.0


# ------------------------------------------------------------------ issue 26: GPT-NeoX's embed_out in memory

@pytest.mark.parametrize("as_module", [False, True])
def test_apply_to_model_finds_gpt_neox_embed_out_under_its_loaded_name(family_factory, as_module):
    """transformers ≥ 5 loads GPT-NeoX's checkpoint tensor ``embed_out.weight`` as ``lm_head.weight``: apply_to_model
    refused the vector ("has tensor 'embed_out.weight', which the target lacks")."""
    from transformers import AutoModelForCausalLM

    fam = family_factory("gpt_neox")
    v = ChatVector.from_models(fam["base"], fam["chat"], hash_files=False)
    assert "embed_out.weight" in v
    target = AutoModelForCausalLM.from_pretrained(fam["cp"]) if as_module else fam["cp"]
    model, report = apply_to_model(target, [(v, 0.7)], check_lineage=False)
    assert (report.tensors.set_index("name").loc["embed_out.weight", "status"]) == "added"

    def checkpoint(folder):
        out = {}
        for shard in Path(folder).glob("*.safetensors"):
            out.update(load_file(shard))
        return out
    base, chat, cp = checkpoint(fam["base"]), checkpoint(fam["chat"]), checkpoint(fam["cp"])
    got = model.state_dict()
    for name in cp:
        loaded = "lm_head.weight" if name == "embed_out.weight" else name
        torch.testing.assert_close(got[loaded], cp[name] + 0.7 * (chat[name] - base[name]), rtol=0, atol=1e-6)


# -- review round 4 (the newest surfaces): a vector where a model belongs; one tokenizer missing ----------------------

def test_a_saved_vector_is_not_a_model(tmp_path, capsys):
    """A saved vector's folder as --base, --chat or --target was read as a model: chat − vector, exit 0."""
    vec = tmp_path / "cv"
    ChatVector.from_models(toy.path("base"), toy.path("chat")).save(vec)
    before = {p.name: p.read_bytes() for p in vec.iterdir()}
    cases = [["extract", "--base", vec, "--chat", toy.path("chat"), "-o", tmp_path / "v1"],
             ["extract", "--base", toy.path("base"), "--chat", vec, "-o", tmp_path / "v2"],
             ["apply", "--target", vec, "--vector", vec, "-o", tmp_path / "m"]]
    for args in cases:
        capsys.readouterr()
        assert _cli(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is a saved chat vector" in err, err
    assert not any((tmp_path / n).exists() for n in ("v1", "v2", "m"))
    assert {p.name: p.read_bytes() for p in vec.iterdir()} == before


def test_one_missing_tokenizer_is_said(tmp_path, capsys):
    """A base without a tokenizer and a chat with one: rows are subtracted by index; that is now said."""
    base = _copy("base", tmp_path / "base")
    (base / "tokenizer.json").unlink()
    with pytest.warns(Warning, match="base model has no tokenizer: embedding and lm_head rows are subtracted by index"):
        ChatVector.from_models(base, toy.path("chat"))
    assert _cli(["extract", "--base", base, "--chat", toy.path("chat"), "-o", tmp_path / "v", "-q"]) == 0
    err = capsys.readouterr().err
    assert "chatvec extract: warning: the base model has no tokenizer" in err
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # both tokenizers: no warning
        ChatVector.from_models(toy.path("base"), toy.path("chat"))
