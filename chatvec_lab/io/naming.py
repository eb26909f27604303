"""What a tensor name means: its layer and the kind of module it belongs to.

The rules below are data: ``_RULES`` maps name patterns to modules (first match wins) and
``TOKEN_INDEXED`` names the modules whose first dimension runs over the vocabulary. They cover the
Llama, Mistral, Mixtral, Qwen2/3, Gemma 1–3, Phi, Phi-3, GPT-2, GPT-J, GPT-NeoX, Falcon, Bloom, OLMo,
StableLM, Cohere, Starcoder2, OPT and GPTBigCode namings (``tests/test_architectures.py`` checks each);
any other model still gets a layer index from the first ``.<number>.`` after a block container, and
module ``other``. Fused weights are labelled as such (``attn_qkv``, ``mlp_gate_up``) rather than guessed
apart; mixture-of-experts weights get ``expert_*`` modules (and ``TensorInfo.expert`` where one expert's
weight is stored alone) and their routers ``moe_router``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

GROUPS = ("embedding", "attention", "mlp", "norm", "lm_head", "other")

# Modules whose rows are indexed by token id: the input embeddings and the output layer (weight and bias,
# e.g. GPT-J's and Phi's ``lm_head.bias``). They change size when a vocabulary grows, so vocabulary
# policies (embeddings="skip"/"shared", token maps) apply to each of them. Position embeddings are not.
TOKEN_INDEXED = frozenset({"embed", "lm_head"})

_END = r"(?:\.|$)"  # a name component ends at a dot, or at the end (fused expert tensors have no ``.weight``)
_EXPERT = r"(^|\.)experts\.(?:\d+\.)?"  # ``experts.3.w1.weight`` (one expert) or ``experts.gate_up_proj`` (all)

# (pattern searched in the name, module, group). First match wins, so specific before general.
_RULES: list[tuple[str, str, str]] = [
    # token-indexed: input embeddings (Llama/Mistral/Qwen/Gemma/OLMo/Cohere/OPT: embed_tokens; GPT-2/GPT-J/
    # BigCode: wte; GPT-NeoX: embed_in; Bloom/Falcon: word_embeddings; Llama original/InternLM2: tok_embeddings;
    # Gemma-3n: embed_tokens_per_layer)
    (r"(^|\.)(embed_tokens|embed_tokens_per_layer|wte|embed_in|word_embeddings|tok_embeddings)\.(weight|bias)$",
     "embed", "embedding"),
    (r"(^|\.)(wpe|embed_positions|position_embeddings)\.", "pos_embed", "embedding"),
    # token-indexed: the output layer, weight and bias (GPT-J, Phi-1/2 have an lm_head.bias; GPT-NeoX names it
    # embed_out, Llama original and InternLM2 output, Microsoft's original Phi lm_head.linear)
    (r"(^|\.)(lm_head|lm_head\.linear|embed_out|output)\.(weight|bias)$", "lm_head", "lm_head"),
    # mixture of experts: the router, then each expert's (or all experts' fused) projections
    (r"(^|\.)(gate|router|shared_expert_gate)(\.(weight|bias|e_score_correction_bias)|\.layer\.weight)$",
     "moe_router", "mlp"),
    (_EXPERT + r"(gate_up_proj)(_bias)?" + _END, "expert_gate_up", "mlp"),
    (_EXPERT + r"(w1|gate_proj)(_bias)?" + _END, "expert_gate", "mlp"),
    (_EXPERT + r"(w3|up_proj)(_bias)?" + _END, "expert_up", "mlp"),
    (_EXPERT + r"(w2|down_proj)(_bias)?" + _END, "expert_down", "mlp"),
    (r"(^|\.)(q_proj|query|wq)\.", "attn_q", "attention"),
    (r"(^|\.)(k_proj|key|wk)\.", "attn_k", "attention"),
    (r"(^|\.)(v_proj|value|wv)\.", "attn_v", "attention"),
    # the attention output: Llama o_proj, GPT-NeoX attention.dense, Falcon/Bloom self_attention.dense,
    # Phi self_attn.dense, GPT-2/BigCode attn.c_proj, GPT-J/OPT out_proj
    (r"(^|\.)(o_proj|attention\.dense|self_attention\.dense|self_attn\.dense|attn\.c_proj|out_proj|wo"
     r"|attention\.output\.dense)\.", "attn_o", "attention"),
    (r"(^|\.)(qkv_proj|c_attn|query_key_value|Wqkv|W_pack)\.", "attn_qkv", "attention"),
    (r"(^|\.)(q_norm|k_norm|q_layernorm|k_layernorm)\.", "attn_norm", "norm"),
    (r"(^|\.)(gate_up_proj)" + _END, "mlp_gate_up", "mlp"),
    (r"(^|\.)(gate_proj|w1)\.", "mlp_gate", "mlp"),
    (r"(^|\.)(up_proj|w3|c_fc|dense_h_to_4h|fc1|fc_in)\.", "mlp_up", "mlp"),
    (r"(^|\.)(down_proj|w2|mlp\.c_proj|dense_4h_to_h|fc2|fc_out)\.", "mlp_down", "mlp"),
    (r"(^|\.)(ln_f|final_layer_norm|norm|final_layernorm)\.(weight|bias)$", "final_norm", "norm"),
    # any other norm: input_layernorm, ln_1, Falcon-40B's ln_attn/ln_mlp, Bloom's word_embeddings_layernorm, …
    (r"((norm|layernorm|layer_norm)[^.]*|(^|\.)ln_[^.]*)\.(weight|bias)$", "norm", "norm"),
]
_COMPILED = [(re.compile(p), m, g) for p, m, g in _RULES]
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|decoder_layers|block)\.(\d+)\.")
_ANY_INDEX = re.compile(r"\.(\d+)\.")
_EXPERT_INDEX = re.compile(r"(?:^|\.)experts\.(\d+)\.")

MODULE_ORDER = ["embed", "pos_embed", "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_o", "attn_norm",
                "mlp_gate", "mlp_up", "mlp_gate_up", "mlp_down", "moe_router", "expert_gate", "expert_up",
                "expert_gate_up", "expert_down", "norm", "final_norm", "lm_head", "other"]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    layer: int | None
    module: str
    group: str
    param: str  # "weight", "bias" or the last name component
    expert: int | None = None  # the expert's index, for one expert's own weight in a mixture of experts

    @property
    def is_token_indexed(self) -> bool:
        """Rows indexed by token id (module in ``TOKEN_INDEXED``): the tensors that change size when a
        vocabulary grows: input embeddings and the output layer's weight and bias."""
        return self.module in TOKEN_INDEXED

    @property
    def is_embedding_like(self) -> bool:
        """The former name of :attr:`is_token_indexed`."""
        return self.is_token_indexed


@lru_cache(maxsize=65536)
def parse(name: str) -> TensorInfo:
    """Describe one tensor name, e.g. ``model.layers.3.mlp.up_proj.weight`` → layer 3, ``mlp_up``."""
    match = _LAYER.search(name) or _ANY_INDEX.search(name)
    layer = int(match.group(1)) if match else None
    module, group = "other", "other"
    for pattern, mod, grp in _COMPILED:
        if pattern.search(name):
            module, group = mod, grp
            break
    if module == "final_norm" and layer is not None:
        module = "norm"
    if module == "lm_head" and layer is not None:  # e.g. a per-layer "output" projection
        module, group = "other", "other"
    expert = _EXPERT_INDEX.search(name) if module.startswith("expert_") else None
    return TensorInfo(name=name, layer=layer, module=module, group=group, param=name.rsplit(".", 1)[-1],
                      expert=int(expert.group(1)) if expert else None)
