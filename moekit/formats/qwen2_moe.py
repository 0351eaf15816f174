"""Qwen2-MoE: optional always-on shared expert and dense (mlp-only) layers.

q/k/v carry biases in this architecture; we write zeros (vLLM always loads them).
``norm_topk_prob`` comes from the layout: True is Mixtral's renormalised top-k,
False weights each chosen expert by its softmax probability (see
:mod:`moekit.upcycle.split` for the expert scale that keeps either exact).
"""

from __future__ import annotations

from moekit.formats.base import MoeFormat, MoeLayout, check_llama_like, common_config


class Qwen2MoeFormat(MoeFormat):
    name = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"
    keys = {
        "router": "model.layers.{layer}.mlp.gate.weight",
        "expert.gate_proj": "model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight",
        "expert.up_proj": "model.layers.{layer}.mlp.experts.{expert}.up_proj.weight",
        "expert.down_proj": "model.layers.{layer}.mlp.experts.{expert}.down_proj.weight",
        "shared.gate_proj": "model.layers.{layer}.mlp.shared_expert.gate_proj.weight",
        "shared.up_proj": "model.layers.{layer}.mlp.shared_expert.up_proj.weight",
        "shared.down_proj": "model.layers.{layer}.mlp.shared_expert.down_proj.weight",
        "shared_gate": "model.layers.{layer}.mlp.shared_expert_gate.weight",
        "dense.gate_proj": "model.layers.{layer}.mlp.gate_proj.weight",
        "dense.up_proj": "model.layers.{layer}.mlp.up_proj.weight",
        "dense.down_proj": "model.layers.{layer}.mlp.down_proj.weight",
        "attn_bias": "model.layers.{layer}.self_attn.{proj}.bias",
    }

    def supports(self, src, layout: MoeLayout, explain: list[str]) -> bool:
        return check_llama_like(src, explain, self.name)

    def make_config(self, src, layout: MoeLayout, dtype: str) -> dict:
        n = src.num_hidden_layers
        return {
            "architectures": [self.architecture],
            "model_type": "qwen2_moe",
            **common_config(src),
            "intermediate_size": src.intermediate_size,  # used by dense layers
            "moe_intermediate_size": layout.expert_size,
            "shared_expert_intermediate_size": layout.shared_size,
            "num_experts": layout.num_experts,
            "num_experts_per_tok": layout.top_k,
            "norm_topk_prob": layout.norm_topk_prob,
            "decoder_sparse_step": 1,
            "mlp_only_layers": sorted(layout.dense_layers),
            "router_aux_loss_coef": 0.001,
            "output_router_logits": False,
            "qkv_bias": True,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": n,
            "layer_types": ["full_attention"] * n,
            "dtype": dtype,
        }

    def extra_tensors(self, src, layer: int) -> dict[str, tuple[int, ...]]:
        head_dim = getattr(src, "head_dim", None) or src.hidden_size // src.num_attention_heads
        q = src.num_attention_heads * head_dim
        kv = src.num_key_value_heads * head_dim
        return {self.key("attn_bias", layer=layer, proj=p): (d,) for p, d in
                (("q_proj", q), ("k_proj", kv), ("v_proj", kv))}
