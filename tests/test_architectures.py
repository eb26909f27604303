"""One tiny model per architecture family, built offline from transformers' config classes.

For each family: every tensor name (in ``model.state_dict()`` and as ``save_pretrained`` writes it) gets a
module and the right layer, and the token-indexed tensors are exactly the embeddings and the output layer;
and extract → save → load → apply → load with transformers gives ``cp + 0.7·(chat − base)`` exactly (float32).
A family whose config class the installed transformers lacks is skipped, naming the class (``pytest -rs``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from chatvec_lab import ChatVector, apply_vectors
from chatvec_lab.io.naming import TOKEN_INDEXED, parse
from conftest import perturbed, save, tiny_config

V = 96
COMMON = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)  # inside the tiny vocabulary
LLAMA_HEAD = frozenset({"model.embed_tokens.weight", "lm_head.weight"})


@dataclass(frozen=True)
class Family:
    config: str  # the transformers config class
    kwargs: dict  # its arguments (None: ``conftest.tiny_config(arch)``)
    layers: str  # the block container: ``<layers>.<i>.`` holds layer i
    token_indexed: frozenset  # the state-dict names whose rows run over the vocabulary
    tied: bool
    modules: dict = field(default_factory=dict)  # spot checks of the family's own spellings: name → module
    other: dict = field(default_factory=dict)  # name regex → why it may stay module ``other`` (none needed today)
    conftest_arch: str | None = None


def _llama_like(cls, tied=False, modules=None, head_bias=False, **kw):
    return Family(cls, dict(intermediate_size=64, tie_word_embeddings=tied, **COMMON, **IDS, **kw), "model.layers",
                  LLAMA_HEAD | ({"lm_head.bias"} if head_bias else set()), tied, modules or {})


def _from_conftest(arch, cls, layers, token_indexed, tied, modules=None):
    return Family(cls, None, layers, frozenset(token_indexed), tied, modules or {}, conftest_arch=arch)


FAMILIES: dict[str, Family] = {
    "llama": _from_conftest("llama", "LlamaConfig", "model.layers", LLAMA_HEAD, False),
    "mistral": _from_conftest("mistral", "MistralConfig", "model.layers", LLAMA_HEAD, False),
    "mixtral": _llama_like("MixtralConfig", num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, modules={
        # transformers ≥ 5 fuses the experts in memory; the checkpoint keeps one tensor per expert
        "model.layers.0.mlp.gate.weight": "moe_router", "model.layers.1.mlp.experts.gate_up_proj": "expert_gate_up",
        "model.layers.1.mlp.experts.down_proj": "expert_down",
        "model.layers.0.block_sparse_moe.gate.weight": "moe_router",
        "model.layers.1.block_sparse_moe.experts.3.w1.weight": "expert_gate",
        "model.layers.1.block_sparse_moe.experts.3.w3.weight": "expert_up",
        "model.layers.1.block_sparse_moe.experts.3.w2.weight": "expert_down"}),
    "qwen2": _from_conftest("qwen2", "Qwen2Config", "model.layers", LLAMA_HEAD, False),
    "qwen2-tied": _llama_like("Qwen2Config", tied=True, num_key_value_heads=2),
    "qwen3": _llama_like("Qwen3Config", num_key_value_heads=2, head_dim=8,
                         modules={"model.layers.0.self_attn.q_norm.weight": "attn_norm"}),
    "gemma": _from_conftest("gemma", "GemmaConfig", "model.layers", LLAMA_HEAD, True),
    "gemma2": _llama_like("Gemma2Config", tied=True, num_key_value_heads=1, head_dim=8,
                          modules={"model.layers.0.pre_feedforward_layernorm.weight": "norm"}),
    "gemma3": _llama_like("Gemma3TextConfig", tied=True, num_key_value_heads=1, head_dim=8,
                          modules={"model.layers.1.self_attn.k_norm.weight": "attn_norm"}),
    "phi3": _from_conftest("phi3", "Phi3Config", "model.layers", LLAMA_HEAD, False),
    "phi": _llama_like("PhiConfig", head_bias=True, modules={
        "model.layers.0.self_attn.dense.weight": "attn_o", "model.layers.0.self_attn.dense.bias": "attn_o",
        "model.layers.0.mlp.fc1.weight": "mlp_up", "model.final_layernorm.bias": "final_norm",
        "lm_head.bias": "lm_head"}),
    "gpt2": _from_conftest("gpt2", "GPT2Config", "transformer.h", {"transformer.wte.weight", "lm_head.weight"}, True,
                           {"transformer.wpe.weight": "pos_embed"}),
    "gptj": Family("GPTJConfig", dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4,
                                      tie_word_embeddings=False, **IDS), "transformer.h",
                   frozenset({"transformer.wte.weight", "lm_head.weight", "lm_head.bias"}), False,
                   {"transformer.h.0.attn.out_proj.weight": "attn_o", "transformer.h.1.mlp.fc_in.bias": "mlp_up",
                    "lm_head.bias": "lm_head"}),
    # transformers ≥ 5 calls the output layer lm_head in memory and embed_out on disk (and older ones embed_out)
    "gpt_neox": _from_conftest("gpt_neox", "GPTNeoXConfig", "gpt_neox.layers",
                               {"gpt_neox.embed_in.weight", "embed_out.weight", "lm_head.weight"}, False),
    "falcon": Family("FalconConfig", dict(**COMMON, **IDS), "transformer.h",
                     frozenset({"transformer.word_embeddings.weight", "lm_head.weight"}), True,
                     {"transformer.h.0.self_attention.dense.weight": "attn_o",
                      "transformer.h.1.self_attention.query_key_value.weight": "attn_qkv"}),
    "falcon-40b": Family("FalconConfig", dict(new_decoder_architecture=True, num_kv_heads=2, **COMMON, **IDS),
                         "transformer.h", frozenset({"transformer.word_embeddings.weight", "lm_head.weight"}), True,
                         {"transformer.h.0.ln_attn.weight": "norm", "transformer.h.1.ln_mlp.bias": "norm",
                          "transformer.h.0.self_attention.dense.weight": "attn_o"}),
    "bloom": Family("BloomConfig", dict(vocab_size=V, hidden_size=32, n_layer=2, n_head=4, **IDS), "transformer.h",
                    frozenset({"transformer.word_embeddings.weight", "lm_head.weight"}), True,
                    {"transformer.h.1.self_attention.dense.bias": "attn_o",
                     "transformer.word_embeddings_layernorm.weight": "norm"}),
    "olmo": _llama_like("OlmoConfig"),
    "stablelm": _llama_like("StableLmConfig", num_key_value_heads=4, modules={"model.norm.bias": "final_norm"}),
    "cohere": _llama_like("CohereConfig", tied=True),
    "starcoder2": _llama_like("Starcoder2Config", tied=True, num_key_value_heads=2, modules={
        "model.layers.0.mlp.c_fc.weight": "mlp_up", "model.layers.0.mlp.c_proj.bias": "mlp_down"}),
    "opt": Family("OPTConfig", dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                                    word_embed_proj_dim=32, max_position_embeddings=64, **IDS), "model.decoder.layers",
                  frozenset({"model.decoder.embed_tokens.weight", "lm_head.weight"}), True,
                  {"model.decoder.embed_positions.weight": "pos_embed",
                   "model.decoder.layers.0.final_layer_norm.weight": "norm",
                   "model.decoder.final_layer_norm.weight": "final_norm",
                   "model.decoder.layers.1.self_attn.out_proj.bias": "attn_o"}),
    "gpt_bigcode": Family("GPTBigCodeConfig", dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, **IDS),
                          "transformer.h", frozenset({"transformer.wte.weight", "lm_head.weight"}), True,
                          {"transformer.h.0.attn.c_attn.weight": "attn_qkv", "transformer.wpe.weight": "pos_embed"}),
}

# Cases that fail only because of how a tied output layer is handled (apply.py's business): none today.
# Fill in as {family: reason}; each is marked xfail(strict=True), so a fix turns it into a failure to notice.
TIED_HEAD_XFAIL: dict[str, str] = {}


def build(family: str, seed: int = 0):
    """The family's tiny model (float32, eval mode), or a skip naming the config class transformers lacks."""
    import transformers
    from transformers import AutoModelForCausalLM

    fam = FAMILIES[family]
    cls = getattr(transformers, fam.config, None)
    if cls is None:
        pytest.skip(f"{family}: transformers {transformers.__version__} has no {fam.config}")
    config = tiny_config(fam.conftest_arch, V) if fam.conftest_arch else cls(**fam.kwargs)
    assert type(config).__name__ == fam.config
    assert bool(getattr(config, "tie_word_embeddings", False)) == fam.tied, family
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).to(torch.float32).eval()


def saved_names(folder: Path) -> set[str]:
    names = set()
    for f in Path(folder).glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            names.update(fh.keys())
    return names


def _params():
    return [pytest.param(f, marks=pytest.mark.xfail(strict=True, reason=TIED_HEAD_XFAIL[f]))
            if f in TIED_HEAD_XFAIL else f for f in FAMILIES]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_naming(family, tmp_path):
    """Every tensor name gets a module (not ``other``) and its layer; token-indexed ⇔ embeddings/output layer."""
    fam = FAMILIES[family]
    model = build(family)
    in_memory = set(model.state_dict())
    on_disk = saved_names(save(model, tmp_path / "m"))
    names = in_memory | on_disk
    layer_of = re.compile(rf"^{re.escape(fam.layers)}\.(\d+)\.")
    for name in sorted(names):
        info = parse(name)
        match = layer_of.match(name)
        assert info.layer == (int(match.group(1)) if match else None), f"{family}: {name} → layer {info.layer}"
        if info.module == "other":
            assert any(re.search(p, name) for p in fam.other), f"{family}: {name} is labelled 'other'"
        assert info.is_token_indexed == (name in fam.token_indexed), f"{family}: {name} token-indexed?"
        assert info.is_embedding_like == info.is_token_indexed
        assert info.is_token_indexed == (info.module in TOKEN_INDEXED)
    assert fam.token_indexed <= names, f"{family}: missing {sorted(fam.token_indexed - names)}"
    assert {n for n in on_disk if parse(n).is_token_indexed}, f"{family}: no token-indexed tensor saved"
    for name, module in fam.modules.items():
        assert name in names, f"{family} has no {name}"
        assert parse(name).module == module, f"{family}: {name} → {parse(name).module}, expected {module}"
    if fam.tied:
        assert not any(parse(n).module == "lm_head" for n in on_disk), f"{family}: a tied checkpoint stores its head"


@pytest.mark.parametrize("family", _params())
def test_extract_apply_round_trip(family, tmp_path):
    """extract → save → load → apply (α = 0.7) → from_pretrained: every tensor is cp + 0.7·(chat − base)."""
    from transformers import AutoModelForCausalLM

    fam = FAMILIES[family]
    base = build(family)
    chat, cp = perturbed(base, 1), perturbed(base, 2)
    for name, model in (("base", base), ("chat", chat), ("cp", cp)):
        save(model, tmp_path / name)
    ChatVector.from_models(tmp_path / "base", tmp_path / "chat").save(tmp_path / "vec")
    apply_vectors(tmp_path / "cp", [(ChatVector.load(tmp_path / "vec"), 0.7)], tmp_path / "out", check_lineage=False)

    out, loading = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(loading[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), \
        f"{family} did not load cleanly: {loading}"
    sb, sc, sp, so = base.state_dict(), chat.state_dict(), cp.state_dict(), out.state_dict()
    assert set(so) == set(sp)
    for name, got in so.items():
        if not got.is_floating_point():
            assert torch.equal(got, sp[name]), name
            continue
        # the tool's arithmetic: float32, multiply then add, one rounding to the dtype
        expected = (sp[name].float() + 0.7 * (sc[name].float() - sb[name].float())).to(sp[name].dtype)
        assert torch.equal(got, expected), f"{family}: {name} differs from cp + 0.7·(chat − base)"
    head, embed = out.get_output_embeddings().weight, out.get_input_embeddings().weight
    expected_head = cp.get_output_embeddings().weight + 0.7 * (
        chat.get_output_embeddings().weight - base.get_output_embeddings().weight)
    assert torch.equal(head, expected_head.detach()), f"{family}: the output layer lacks the delta"
    assert not torch.equal(head, cp.get_output_embeddings().weight), f"{family}: the output layer is unchanged"
    if fam.tied:
        assert out.config.tie_word_embeddings and head.data_ptr() == embed.data_ptr(), f"{family}: no longer tied"
    with torch.no_grad():
        assert out(torch.tensor([[3, 4, 5]])).logits.shape == (1, 3, V)


def test_hub_spellings():
    """Names as checkpoints on the hub spell them, beyond what the tiny models above hold."""
    cases = {
        "lm_head.bias": (None, "lm_head"), "embed_out.weight": (None, "lm_head"), "output.weight": (None, "lm_head"),
        "tok_embeddings.weight": (None, "embed"), "lm_head.linear.bias": (None, "lm_head"),
        "model.language_model.embed_tokens_per_layer.weight": (None, "embed"),
        "model.layers.3.block_sparse_moe.experts.7.w2.weight": (3, "expert_down"),
        "model.layers.2.mlp.experts.5.gate_proj.weight": (2, "expert_gate"),
        "model.layers.2.mlp.shared_expert.gate_proj.weight": (2, "mlp_gate"),  # always on: a dense MLP
        "model.layers.2.mlp.shared_experts.down_proj.weight": (2, "mlp_down"),
        "model.layers.2.mlp.shared_expert_gate.weight": (2, "moe_router"),
        "model.layers.4.mlp.router.bias": (4, "moe_router"), "model.layers.4.mlp.experts.gate_up_proj_bias": (4, "expert_gate_up"),
        "model.layers.1.mlp.gate.e_score_correction_bias": (1, "moe_router"),
        "transformer.h.5.self_attention.dense.weight": (5, "attn_o"), "model.layers.0.self_attn.dense.bias": (0, "attn_o"),
        "gpt_neox.layers.2.attention.dense.weight": (2, "attn_o"), "transformer.wpe.weight": (None, "pos_embed"),
        "model.decoder.embed_positions.weight": (None, "pos_embed"),
        "transformer.h.0.mlp.dense_h_to_4h.weight": (0, "mlp_up"),  # not the attention output's "dense"
    }
    for name, (layer, module) in cases.items():
        info = parse(name)
        assert (info.layer, info.module) == (layer, module), f"{name} → {info.layer}, {info.module}"
    assert parse("model.layers.3.block_sparse_moe.experts.7.w2.weight").expert == 7
    assert parse("model.layers.3.mlp.experts.down_proj").expert is None  # all experts in one tensor
    assert parse("model.layers.3.mlp.down_proj.weight").expert is None
    assert not parse("transformer.wpe.weight").is_token_indexed  # position embeddings: rows are positions
    assert parse("lm_head.bias").is_token_indexed and parse("embed_out.weight").is_embedding_like
    assert parse("model.layers.2.output.weight").module == "other"  # a per-layer "output" is no lm_head
