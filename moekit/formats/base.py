"""What an output architecture must provide: a support check, a config, key names."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MoeLayout:
    """The shape of the MoE being written, independent of the file format.

    num_experts: routed experts per MoE layer; top_k: routed experts per token;
    expert_size: neurons per routed expert; shared_size: neurons of the always-on
    shared expert (0 = none); dense_layers: layer indices whose FFN stays dense;
    norm_topk_prob: renormalise the top-k routing weights to sum 1 (Mixtral always
    does; False keeps the softmax probabilities, so a top-1 router still gets a
    gradient from the LM loss).
    """

    num_experts: int
    top_k: int
    expert_size: int
    shared_size: int = 0
    dense_layers: tuple[int, ...] = ()
    norm_topk_prob: bool = True


class MoeFormat:
    """One stock transformers MoE architecture.

    ``keys`` is a templated map from moekit's roles to checkpoint names
    (``{layer}``, ``{expert}``, ``{proj}`` are filled in); everything not listed
    (embeddings, attention, norms, lm_head) keeps its LLaMA name.
    """

    name: str
    architecture: str
    keys: dict[str, str]

    def supports(self, src, layout: MoeLayout, explain: list[str]) -> bool:
        raise NotImplementedError

    def make_config(self, src, layout: MoeLayout, dtype: str) -> dict:
        """The output ``config.json`` as a dict."""
        raise NotImplementedError

    def extra_tensors(self, src, layer: int) -> dict[str, tuple[int, ...]]:
        """Zero tensors this format needs that LLaMA has none of: name -> shape."""
        return {}

    def key(self, role: str, **kw) -> str:
        return self.keys[role].format(**kw)


def common_config(src) -> dict:
    """Config fields shared by LLaMA and every target (attention, norms, vocab, RoPE).

    Written as plain JSON, so converting needs no transformers import; legacy
    ``rope_theta``/``rope_scaling`` keys are kept as the source has them and
    transformers normalises them at load time like it does for the source.
    """
    from importlib.metadata import version

    keep = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "tie_word_embeddings",
            "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout", "rope_parameters", "rope_theta",
            "rope_scaling"]
    out = {k: getattr(src, k) for k in keep if getattr(src, k, None) is not None}
    out["head_dim"] = getattr(src, "head_dim", None) or src.hidden_size // src.num_attention_heads
    out["transformers_version"] = version("transformers")
    return out


def check_llama_like(src, explain: list[str], name: str, allow_attention_bias: bool = False) -> bool:
    ok = True
    if getattr(src, "model_type", None) not in ("llama", "mistral"):
        explain.append(f"{name}: source model_type {getattr(src, 'model_type', None)!r} is not llama or mistral")
        ok = False
    if getattr(src, "sliding_window", None):
        explain.append(f"{name}: source uses sliding-window attention ({src.sliding_window}), which changes attention")
        ok = False
    if getattr(src, "mlp_bias", False):
        explain.append(f"{name}: source FFN has biases (mlp_bias=True); stock MoE experts have none")
        ok = False
    if getattr(src, "attention_bias", False) and not allow_attention_bias:
        explain.append(f"{name}: source attention has biases (attention_bias=True)")
        ok = False
    return ok
