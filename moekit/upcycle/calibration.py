"""Calibration statistics of a dense LLaMA, collected layer by layer in one streaming pass.

Calibration text is tokenised into ``seq_len`` windows (``calib_tokens`` in all).
Their hidden states are pushed through the decoder one layer at a time: only the
current layer's weights (read through the converter's :class:`TensorLoader`) and
one ``T x H`` hidden-state buffer are in memory, so the cost scales with the
token budget, not the model. For each layer the pass keeps :class:`LayerStats`:
per-neuron importance over every token and the MLP inputs of a fixed random
sample of tokens (for activation patterns, router fitting and the oracle).

The walk follows the *upcycled* model: once a layer's MoE is built, the caller
hands its MoE forward to :meth:`Calibrator.finish`, and the next layer's
statistics are taken on the hidden states the MoE model will really produce
(as GPTQ quantises each layer on the outputs of the already-quantised ones).
Routers fitted this way see the inputs they get at inference, not the dense
model's.

The ``gradient`` importance needs dL/da, so it adds a backward sweep first: the
layer inputs of the first GRAD_TOKENS tokens are kept (L x T x H floats), the
LM loss is backpropagated through the final norm and head, then through the
layers in reverse, each reloaded and recomputed.

Legend: B sequences, T tokens, H hidden size, I intermediate size, V vocab, L layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from moekit.errors import InputError, UnsupportedModelError

MAX_SAMPLE = 16384  # sampled tokens whose MLP inputs are kept per layer
GRAD_TOKENS = 4096  # tokens of the gradient sweep (their layer inputs are all kept)
MICRO_TOKENS = 4096  # tokens per forward call


@dataclass
class LayerStats:
    """One layer's calibration statistics.

    Attributes:
        importance_I: mean over calibration tokens of |a_i| * ||down_proj[:, i]||.
        x_TH: MLP inputs (after post_attention_layernorm) of the sampled tokens, float32.
        grad_importance_I: mean |a_i * dL/da_i| (only when a method needs gradients).
        tokens: calibration tokens behind ``importance_I``.
    """

    importance_I: torch.Tensor
    x_TH: torch.Tensor
    grad_importance_I: torch.Tensor | None = None
    tokens: int = 0

    def subset(self, idx_I: torch.Tensor) -> "LayerStats":
        """Statistics of the neurons ``idx_I`` only (the MLP inputs are shared)."""
        grad = None if self.grad_importance_I is None else self.grad_importance_I[idx_I]
        return LayerStats(self.importance_I[idx_I], self.x_TH, grad, self.tokens)


def calibration_ids(folder: Path, data: str, field: str, n_tokens: int, seq_len: int) -> torch.Tensor:
    """``ids_BT``: up to ``n_tokens`` tokens of ``data`` (its ``calib`` split) in windows of ``seq_len``.

    Documents are taken in a fixed shuffled order, joined by EOS, until the budget is met.

    Example:
        >>> calibration_ids(Path("dense"), "builtin", "text", 8192, 512).shape   # doctest: +SKIP
        torch.Size([16, 512])
    """
    from transformers import AutoTokenizer

    from moekit.text import load_texts

    texts = load_texts(data, field, split="calib")
    # a fixed shuffle: a small budget then samples the whole source, not its first documents
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
    texts = [texts[i] for i in order]
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError):
        raise InputError(
            f"{folder} has no tokenizer, and calibration needs one — save the tokenizer into the model folder, "
            "or use data-free settings: --method random --router zero --shared-experts 0"
        ) from None
    ids: list[int] = []
    for text in texts:  # tokenise document by document so the budget stops the work early
        text = text[: 16 * n_tokens]  # a token is rarely 16 characters: no need to tokenise a whole book
        ids += tok(text, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
        if len(ids) >= n_tokens:
            break
    seq_len = min(seq_len, len(ids))
    usable = min(n_tokens, len(ids)) // seq_len * seq_len
    if usable < 16:
        raise InputError(f"calibration data {data} has only {len(ids)} tokens — give more text (--calib-data)")
    return torch.tensor(ids[:usable], dtype=torch.long).view(-1, seq_len)


def _llama_config(src):
    """A transformers LlamaConfig (sdpa attention) from the converter's plain config namespace."""
    from transformers import LlamaConfig

    skip = ("architectures", "auto_map", "model_type", "transformers_version", "dtype", "torch_dtype")
    raw = src.to_dict() if hasattr(src, "to_dict") else dict(vars(src))
    cfg = LlamaConfig(**{k: v for k, v in raw.items() if k not in skip and not k.startswith("_")})
    cfg._attn_implementation = "sdpa"
    return cfg


class Calibrator:
    """Streams calibration tokens through a dense LLaMA one layer at a time.

    Call :meth:`layer` with increasing layer indices (the converter writes layers in
    order); skipped layers are run without collecting statistics.

    Args:
        src: the source's transformers config (LLaMA / Mistral).
        ids_BT: calibration token ids (see :func:`calibration_ids`).
        seed: seeds the token sample.
        gradients: also compute gradient importance (a backward sweep first).
        device: ``cpu`` or ``cuda``.
    """

    def __init__(self, src, ids_BT: torch.Tensor, seed: int = 0, gradients: bool = False, device: str = "cpu"):
        if getattr(src, "hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"calibration assumes SwiGLU (hidden_act silu), the source uses {src.hidden_act}")
        self.src, self.ids_BT, self.device, self.gradients = src, ids_BT, device, gradients
        B, T = ids_BT.shape
        g = torch.Generator().manual_seed(seed)
        self.sample_idx = torch.randperm(B * T, generator=g)[:MAX_SAMPLE].sort().values
        self.h_BTH: torch.Tensor | None = None
        self.next_layer = 0
        self.grad_importance: dict[int, torch.Tensor] = {}
        self._pending: tuple | None = None  # (layer, mlp inputs, dense mlp outputs) until finish()
        cfg = _llama_config(src)
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        self.block = LlamaDecoderLayer(cfg, layer_idx=0).to(device).float().eval().requires_grad_(False)
        rope = LlamaRotaryEmbedding(cfg).to(device)
        pos_1T = torch.arange(T, device=device)[None]
        self.rope = tuple(t.float() for t in rope(torch.zeros(1, device=device), pos_1T))
        self.mask = torch.full((T, T), float("-inf"), device=device).triu(1)[None, None]

    @property
    def tokens(self) -> int:
        return self.ids_BT.numel()

    # --- forward sweep ------------------------------------------------------------------

    def layer(self, layer: int, load) -> LayerStats:
        """Statistics of ``layer``; runs every layer before it first."""
        if layer < self.next_layer:
            raise RuntimeError(f"calibration already passed layer {layer} (layers must be asked for in order)")
        if self.gradients and not self.grad_importance:
            self.grad_importance = self._gradient_sweep(load)
        if self.h_BTH is None:
            self.h_BTH = self._embed(load, self.ids_BT)
        while self.next_layer < layer:
            self.h_BTH = self._run(self.next_layer, load, self.h_BTH)
            self.next_layer += 1
        stats = self._collect(layer, load)
        self.next_layer += 1
        return stats

    def finish(self, layer: int, mlp_fn) -> None:
        """Replace ``layer``'s dense MLP output by ``mlp_fn(x_TH)`` (its MoE) in the hidden states.

        ``mlp_fn`` gets CPU float32 inputs, like the weights the converter reads.
        """
        if self._pending is None or self._pending[0] != layer:
            raise RuntimeError(f"finish({layer}) must follow layer({layer})")
        _, x_TH, y_TH = self._pending
        self._pending = None
        h_TH = self.h_BTH.view(-1, self.h_BTH.shape[-1])
        for lo in range(0, len(x_TH), MICRO_TOKENS):
            hi = lo + MICRO_TOKENS
            h_TH[lo:hi] += mlp_fn(x_TH[lo:hi]).cpu() - y_TH[lo:hi]

    def _collect(self, layer: int, load) -> LayerStats:
        down_HI = load(f"model.layers.{layer}.mlp.down_proj.weight").to(self.device).float()
        imp_I = torch.zeros(down_HI.shape[1], device=self.device)
        xs: list[torch.Tensor] = []
        ys: list[torch.Tensor] = []

        def hook(module, args, y):
            x_TH = args[0].reshape(-1, args[0].shape[-1])
            a_TI = F.silu(module.gate_proj(x_TH)) * module.up_proj(x_TH)
            imp_I.add_(a_TI.abs().sum(0))
            xs.append(x_TH.cpu())
            ys.append(y.reshape(-1, y.shape[-1]).cpu())

        handle = self.block.mlp.register_forward_hook(hook)
        try:
            self.h_BTH = self._run(layer, load, self.h_BTH)
        finally:
            handle.remove()
        x_TH = torch.cat(xs)
        self._pending = (layer, x_TH, torch.cat(ys))
        imp_I = (imp_I / self.tokens * down_HI.norm(dim=0)).cpu()
        return LayerStats(imp_I, x_TH[self.sample_idx], self.grad_importance.get(layer), self.tokens)

    def _load_block(self, layer: int, load) -> None:
        prefix = f"model.layers.{layer}."
        state = {name: load(prefix + name) for name in self.block.state_dict()}
        self.block.load_state_dict({k: v.float() for k, v in state.items()})

    def _run(self, layer: int, load, h_BTH: torch.Tensor) -> torch.Tensor:
        self._load_block(layer, load)
        out = []
        with torch.no_grad():
            for h in h_BTH.split(max(1, MICRO_TOKENS // h_BTH.shape[1])):
                out.append(self._forward(h.to(self.device)).cpu())
        return torch.cat(out)

    def _forward(self, h_BTH: torch.Tensor) -> torch.Tensor:
        T = h_BTH.shape[1]
        cos, sin = self.rope
        return self.block(h_BTH, attention_mask=self.mask[..., :T, :T], position_embeddings=(cos[:, :T], sin[:, :T]))

    def _embed(self, load, ids_BT: torch.Tensor) -> torch.Tensor:
        return load("model.embed_tokens.weight").float()[ids_BT]

    # --- gradient sweep -----------------------------------------------------------------

    def _gradient_sweep(self, load) -> dict[int, torch.Tensor]:
        """mean |a * dL/da| per neuron and layer, on the first GRAD_TOKENS tokens."""
        ids_BT = self.ids_BT[: max(1, GRAD_TOKENS // self.ids_BT.shape[1])]
        L = self.src.num_hidden_layers
        inputs = [self._embed(load, ids_BT)]
        for layer in range(L):
            inputs.append(self._run(layer, load, inputs[-1]))
        g_BTH = self._head_grad(load, inputs.pop(), ids_BT)
        importance = {}
        for layer in reversed(range(L)):
            self._load_block(layer, load)
            g_BTH, importance[layer] = self._layer_backward(inputs.pop(), g_BTH)
        n = ids_BT.numel()
        return {layer: imp / n for layer, imp in importance.items()}

    def _head_grad(self, load, h_BTH: torch.Tensor, ids_BT: torch.Tensor) -> torch.Tensor:
        """dL/dh of the last layer's output, L = mean next-token cross-entropy."""
        norm_H = load("model.norm.weight").float()
        head = "lm_head.weight" if "lm_head.weight" in load.index else "model.embed_tokens.weight"
        head_VH = load(head).float()
        eps = self.src.rms_norm_eps
        grads, n = [], ids_BT[:, 1:].numel()
        for h, ids in zip(h_BTH.split(1), ids_BT.split(1)):  # one sequence at a time: B x T x V is big
            h = h.clone().requires_grad_(True)
            normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * norm_H
            logits = normed[:, :-1] @ head_VH.T
            loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum") / n
            loss.backward()
            grads.append(h.grad)
        return torch.cat(grads)

    def _layer_backward(self, h_in_BTH: torch.Tensor, g_out_BTH: torch.Tensor):
        """(dL/d layer input, sum over tokens of |a * dL/da|) for the loaded block."""
        captured: list[torch.Tensor] = []

        def hook(module, args):
            args[0].retain_grad()
            captured.append(args[0])

        handle = self.block.mlp.down_proj.register_forward_pre_hook(hook)
        imp_I, g_in = 0.0, []
        try:
            step = max(1, MICRO_TOKENS // h_in_BTH.shape[1])
            for h, g in zip(h_in_BTH.split(step), g_out_BTH.split(step)):
                h = h.to(self.device).requires_grad_(True)
                captured.clear()
                self._forward(h).backward(g.to(self.device))
                a = captured[0]
                imp_I = imp_I + (a.detach() * a.grad).abs().flatten(0, -2).sum(0).cpu()
                g_in.append(h.grad.cpu())
        finally:
            handle.remove()
        return torch.cat(g_in), imp_I
