"""LoRA on fused experts computed per expert, ``(x·Aₑᵀ)·Bₑᵀ``, over bf16 or 4-bit expert weights.

PEFT reaches fused experts through ``target_parameters``: every forward folds ``W + s·B·A``
into a new weight stack, a full copy of the layer's experts that autograd keeps for the
backward pass. That copy is what makes stock QLoRA on experts cost so much, and it rules out
4-bit experts (there is nothing to fold into). This module keeps PEFT's adapter exactly as it is
(same parameters, same saved files, ``PeftModel.from_pretrained`` and ``merge_and_unload``) and
replaces only the forward of each fused-experts module:

    proj_e(x) = x·Wₑᵀ + s·(x·Aₑᵀ)·Bₑᵀ      for the tokens routed to expert e

with ``Wₑ`` taken from the bf16 stack, or dequantized from NF4 one expert at a time by
bitsandbytes (again in the backward pass rather than keeping the weight). No tensor the size of an expert stack is ever built.

bitsandbytes quantizes ``nn.Linear`` only; :class:`Packed4bit` quantizes a fused ``[E, out, in]``
stack expert by expert with the same NF4 + double quantization as QLoRA's linear layers.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moekit.errors import ConfigError, UnsupportedModelError

EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


def is_fused_experts(module: nn.Module) -> bool:
    """transformers' fused experts (Mixtral, Qwen2-MoE): ``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]."""
    return hasattr(module, "num_experts") and hasattr(module, "act_fn") and all(
        isinstance(getattr(module, n, None), (nn.Parameter, Packed4bit)) for n in EXPERT_WEIGHTS)


class Packed4bit(nn.Module):
    """One fused expert weight ``[E, out, in]`` in NF4 with double quantization, each expert
    quantized on its own (so one expert can be dequantized without touching the others).

    Each expert is quantized as a flat vector: bitsandbytes 0.50's CPU dequantization gets 2-D
    weights wrong when a row is not a multiple of the 64-value block (``in`` = 1376 for an 8-way
    split of LLaMA-2-7B: 25% error instead of NF4's 9%); flat vectors are exact on every backend.
    """

    def __init__(self, weight: torch.Tensor, quant_type: str = "nf4", device=None):
        super().__init__()
        import bitsandbytes.functional as bnbf

        self.shape = tuple(weight.shape)
        self.dtype = weight.dtype  # compute dtype: what the expert weight was
        packed, self.states = [], []
        for w in weight.detach():  # one expert at a time onto ``device``: only its bf16 copy travels
            q, state = bnbf.quantize_4bit(w.reshape(-1).to(device), quant_type=quant_type, compress_statistics=True)
            packed.append(q)
            self.states.append(state)
        # not persistent: adapters are saved, never the quantized base
        self.register_buffer("packed", torch.stack(packed), persistent=False)

    def weight(self, e: int) -> torch.Tensor:
        """Expert ``e``'s weight ``[out, in]``, dequantized (a temporary)."""
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(self.packed[e], self.states[e]).view(self.shape[1:])

    def linear(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return _Linear4bit.apply(x.to(self.dtype), self, e)

    def dequantize(self) -> torch.Tensor:
        return torch.stack([self.weight(e) for e in range(self.shape[0])])

    @property
    def nbytes(self) -> int:
        """Packed weights plus quantization statistics (absmax and its own double quantization)."""
        size = lambda t: t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
        stats = sum(size(s.absmax) + size(getattr(s, "offset", None))
                    + (size(s.state2.absmax) + size(s.state2.code) if getattr(s, "state2", None) else 0)
                    for s in self.states)
        return size(self.packed) + stats

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for state in self.states:  # bitsandbytes' QuantState moves in place, next to the packed bytes
            state.to(self.packed.device)
        return self

    def extra_repr(self) -> str:
        return f"shape={list(self.shape)}, nf4, compute_dtype={self.dtype}"


class _Linear4bit(torch.autograd.Function):
    """``x·Wₑᵀ`` with ``Wₑ`` dequantized in the forward and again in the backward, never kept
    (bitsandbytes' ``MatMul4Bit`` does the same for ``Linear4bit``)."""

    @staticmethod
    def forward(ctx, x, packed: Packed4bit, e: int):
        ctx.packed, ctx.e = packed, e
        return F.linear(x, packed.weight(e))

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.packed.weight(ctx.e).to(grad.dtype), None, None


@dataclass(frozen=True)
class ExpertLora:
    """PEFT's LoRA factors for a fused weight, per expert: ``ΔWₑ = scaling · B[e] @ A[e]``."""

    A: torch.Tensor  # [E, r, in]
    B: torch.Tensor  # [E, out, r]
    scaling: float

    @classmethod
    def from_wrapper(cls, wrapper, adapter: str) -> "ExpertLora":
        # PEFT's ParamWrapper layout: lora_A [r*E, in] (expert-major), lora_B [out, r*E] (expert-minor)
        E = wrapper.num_experts
        A = wrapper.lora_A[adapter].weight
        B = wrapper.lora_B[adapter].weight
        return cls(A.reshape(E, -1, A.shape[-1]), B.reshape(B.shape[0], -1, E).permute(2, 0, 1),
                   wrapper.scaling[adapter])


def project(weight, x: torch.Tensor, e: int, lora: ExpertLora | None) -> torch.Tensor:
    """Expert ``e``'s projection of ``x`` [T, in]: base weight plus its low-rank update, never ΔWₑ."""
    y = weight.linear(x, e) if isinstance(weight, Packed4bit) else F.linear(x, weight[e])
    if lora is not None:
        low = F.linear(F.linear(x.to(lora.A.dtype), lora.A[e]), lora.B[e])
        y = y + (lora.scaling * low).to(y.dtype)
    return y


def experts_forward(experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor, loras: dict[str, ExpertLora] | None = None) -> torch.Tensor:
    """transformers' eager fused-experts forward, with per-expert LoRA and 4-bit weights allowed."""
    loras = loras or {}
    out = torch.zeros_like(hidden)
    E = experts.num_experts
    with torch.no_grad():  # index E is transformers' expert-parallel "not here" sentinel: skipped
        mask = F.one_hot(top_k_index, num_classes=E + 1).permute(2, 1, 0)  # [E + 1, k, T]
        hit = (mask[:E].sum(dim=(-1, -2)) > 0).nonzero().flatten().tolist()
    for e in hit:
        top_k_pos, token_idx = torch.where(mask[e])
        x = hidden[token_idx]
        gate, up = project(experts.gate_up_proj, x, e, loras.get("gate_up_proj")).chunk(2, dim=-1)
        h = experts.act_fn(gate) * up
        y = project(experts.down_proj, h, e, loras.get("down_proj"))
        y = y * top_k_weights[token_idx, top_k_pos, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out


def _base_forward(self, hidden, top_k_index, top_k_weights):
    return experts_forward(self, hidden, top_k_index, top_k_weights)


def _wrapped_forward(self, hidden, top_k_index, top_k_weights):
    """Forward of the outermost PEFT ``ParamWrapper`` around a fused-experts module."""
    loras = {}
    for wrapper in self.moekit_wrappers:
        if wrapper.merged:  # the update is already in the (unquantized) weight
            if not self.disable_adapters:
                continue
            wrapper.unmerge()
        if self.disable_adapters:
            continue
        active = [a for a in wrapper.active_adapters if a in wrapper.lora_A]
        if len(active) > 1:
            raise ConfigError("factored expert LoRA runs one active adapter at a time — "
                              "activate one with model.set_adapter(name)")
        if active:
            loras[wrapper.parameter_name] = ExpertLora.from_wrapper(wrapper, active[0])
    return experts_forward(self.get_base_layer(), hidden, top_k_index, top_k_weights, loras)


def _wrapper_chains(model: nn.Module) -> list[list]:
    """Each chain of nested PEFT ``ParamWrapper``s around a fused-experts module, outermost first."""
    from peft.tuners.lora.layer import ParamWrapper

    wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper)]
    inner = {id(w.base_layer) for w in wrappers}
    chains = []
    for outer in (w for w in wrappers if id(w) not in inner):
        chain, m = [], outer
        while isinstance(m, ParamWrapper):
            chain.append(m)
            m = m.base_layer
        if is_fused_experts(m):
            chains.append(chain)
    return chains


def quantize_experts(experts: nn.Module, device=None) -> int:
    """Replace the bf16 expert stacks of one fused-experts module by NF4 (on ``device``, default:
    where they are); returns bytes freed."""
    freed = 0
    for name in EXPERT_WEIGHTS:
        weight = getattr(experts, name)
        if isinstance(weight, Packed4bit):
            continue
        if weight.requires_grad:
            raise ConfigError("expert weights that train in full cannot be 4-bit — "
                              "train the experts with LoRA, or turn off quantize_experts")
        packed = Packed4bit(weight.data, device=device)
        freed += weight.numel() * weight.element_size() - packed.nbytes
        del experts._parameters[name]
        setattr(experts, name, packed)
    return freed


def _refuse_merge(self, *args, **kwargs):
    raise ConfigError("this model's experts are packed to NF4: it cannot be merged or saved whole — save the "
                      "adapter (PeftModel.save_pretrained) and merge it into the unquantized base: moekit finetune "
                      "--merge, moekit merge BASE+ADAPTER, or PeftModel.from_pretrained(base, adapter).merge_and_unload()")


def install(model: nn.Module, *, quantize: bool, device=None) -> dict[str, int]:
    """Route every fused-experts module of ``model`` (a ``PeftModel`` or plain) through
    :func:`experts_forward`; ``quantize`` also stores its expert weights in NF4 (packed on
    ``device``: experts staged on the CPU are packed straight onto the GPU).

    Wrapped experts (LoRA on ``gate_up_proj`` / ``down_proj``) get the factored LoRA forward;
    experts without LoRA are replaced only when quantized (otherwise transformers' kernel stays).
    Returns counts: ``wrapped`` and ``quantized`` modules and the bytes ``freed``.
    """
    counts = {"wrapped": 0, "quantized": 0, "freed": 0}
    chains = _wrapper_chains(model)
    for chain in chains:
        outer, base = chain[0], chain[-1].base_layer
        if not all(w._did_swap_in_out_features for w in chain):  # [E, in, out] storage: not transformers' layout
            raise UnsupportedModelError(f"{type(base).__name__} stores experts as [E, in, out]; factored expert "
                                        "LoRA needs transformers' [E, out, in] layout")
        outer.moekit_wrappers = chain
        outer.forward = types.MethodType(_wrapped_forward, outer)
        counts["wrapped"] += 1
    wrapped_bases = {id(c[-1].base_layer) for c in chains}
    if quantize:
        for module in model.modules():
            if is_fused_experts(module):
                counts["freed"] += quantize_experts(module, device)
                counts["quantized"] += 1
                if id(module) not in wrapped_bases:
                    module.forward = types.MethodType(_base_forward, module)
        for chain in chains:  # PEFT would add ΔW to a weight that no longer exists
            for wrapper in chain:
                wrapper.merge = types.MethodType(_refuse_merge, wrapper)
        # nor may the model be merged or saved whole: the packed experts are not in its state dict
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        for obj, names in ((model, ("merge_and_unload", "merge_adapter")),
                           (getattr(model, "base_model", None), ("merge_and_unload", "merge_adapter")),
                           (base, ("save_pretrained",))):
            for name in names:
                if obj is not None and hasattr(obj, name):
                    setattr(obj, name, types.MethodType(_refuse_merge, obj))
    if quantize and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return counts


def move_except_experts(model: nn.Module, device) -> None:
    """Move every parameter and buffer to ``device`` except the fused expert stacks, which stay
    where they are (on the CPU) until :func:`install` packs them onto the GPU."""
    for module in model.modules():
        if not is_fused_experts(module):
            module._apply(lambda t: t.to(device), recurse=False)
