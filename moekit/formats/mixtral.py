"""Mixtral: every layer MoE, renormalised top-k, attention exactly LLaMA's."""

from __future__ import annotations

from moekit.formats.base import MoeFormat, MoeLayout, check_llama_like, common_config


class MixtralFormat(MoeFormat):
    name = "mixtral"
    architecture = "MixtralForCausalLM"
    # Legacy per-expert names: what save_pretrained writes by default and vLLM reads.
    keys = {
        "router": "model.layers.{layer}.block_sparse_moe.gate.weight",
        "expert.gate_proj": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight",
        "expert.up_proj": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w3.weight",
        "expert.down_proj": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight",
    }

    def supports(self, src, layout: MoeLayout, explain: list[str]) -> bool:
        ok = check_llama_like(src, explain, self.name)
        if layout.shared_size:
            explain.append("mixtral: has no shared expert (use --format qwen2_moe)")
            ok = False
        if layout.dense_layers:
            explain.append("mixtral: every layer must be MoE (use --format qwen2_moe for dense layers)")
            ok = False
        if not layout.norm_topk_prob:
            explain.append("mixtral: always renormalises the top-k weights (use --format qwen2_moe for norm_topk_prob false)")
            ok = False
        return ok

    def make_config(self, src, layout: MoeLayout, dtype: str) -> dict:
        return {
            "architectures": [self.architecture],
            "model_type": "mixtral",
            **common_config(src),
            "intermediate_size": layout.expert_size,
            "num_local_experts": layout.num_experts,
            "num_experts_per_tok": layout.top_k,
            "router_aux_loss_coef": 0.001,
            "output_router_logits": False,
            "sliding_window": None,
            "dtype": dtype,
        }
