"""What a tensor name means: its layer and the kind of module it belongs to.

Covers Llama, Mistral, Qwen2, Gemma, Phi-3, GPT-2 and GPT-NeoX naming; any other model still
gets a layer index from the first ``.<number>.`` after a block container, and module ``other``.
Fused weights are labelled as such (``attn_qkv``, ``mlp_gate_up``) rather than guessed apart.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

GROUPS = ("embedding", "attention", "mlp", "norm", "lm_head", "other")

# (pattern searched in the name, module, group). First match wins, so specific before general.
_RULES: list[tuple[str, str, str]] = [
    (r"(^|\.)(embed_tokens|wte|embed_in|word_embeddings|tok_embeddings)\.", "embed", "embedding"),
    (r"(^|\.)(wpe|embed_positions|position_embeddings)\.", "pos_embed", "embedding"),
    (r"(^|\.)(lm_head|embed_out|output)\.weight$", "lm_head", "lm_head"),
    (r"(^|\.)(q_proj|query|wq)\.", "attn_q", "attention"),
    (r"(^|\.)(k_proj|key|wk)\.", "attn_k", "attention"),
    (r"(^|\.)(v_proj|value|wv)\.", "attn_v", "attention"),
    (r"(^|\.)(o_proj|attention\.dense|attn\.c_proj|out_proj|wo|attention\.output\.dense)\.", "attn_o", "attention"),
    (r"(^|\.)(qkv_proj|c_attn|query_key_value|Wqkv|W_pack)\.", "attn_qkv", "attention"),
    (r"(^|\.)(q_norm|k_norm|q_layernorm|k_layernorm)\.", "attn_norm", "norm"),
    (r"(^|\.)(gate_up_proj)\.", "mlp_gate_up", "mlp"),
    (r"(^|\.)(gate_proj|w1)\.", "mlp_gate", "mlp"),
    (r"(^|\.)(up_proj|w3|c_fc|dense_h_to_4h|fc1|fc_in)\.", "mlp_up", "mlp"),
    (r"(^|\.)(down_proj|w2|mlp\.c_proj|dense_4h_to_h|fc2|fc_out)\.", "mlp_down", "mlp"),
    (r"(^|\.)(ln_f|final_layer_norm|norm|final_layernorm)\.(weight|bias)$", "final_norm", "norm"),
    (r"(norm|ln_\d|layernorm|layer_norm)[^.]*\.(weight|bias)$", "norm", "norm"),
]
_COMPILED = [(re.compile(p), m, g) for p, m, g in _RULES]
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|decoder_layers|block)\.(\d+)\.")
_ANY_INDEX = re.compile(r"\.(\d+)\.")

MODULE_ORDER = ["embed", "pos_embed", "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_o", "attn_norm",
                "mlp_gate", "mlp_up", "mlp_gate_up", "mlp_down", "norm", "final_norm", "lm_head", "other"]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    layer: int | None
    module: str
    group: str
    param: str  # "weight", "bias" or the last name component

    @property
    def is_embedding_like(self) -> bool:
        """Rows indexed by token id: the tensors that change size when a vocabulary grows."""
        return self.module in ("embed", "lm_head")


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
    return TensorInfo(name=name, layer=layer, module=module, group=group, param=name.rsplit(".", 1)[-1])
