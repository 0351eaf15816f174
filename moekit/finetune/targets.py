"""What "attention / experts / router / shared / mlp" means in each architecture.

One function per architecture (registered by ``model_type``) returns the groups
its checkpoints have, each as module and parameter names. :func:`resolve_targets`
turns the user's choice into :class:`Targets`; PEFT and the trainer do the rest.

In transformers 5 the routed experts are fused 3-D parameters, not ``nn.Linear``:
``mlp.experts.gate_up_proj`` [E, 2*I, H] and ``mlp.experts.down_proj`` [E, H, I]
(E experts, I expert size, H hidden size). LoRA reaches them only through PEFT's
``target_parameters`` (never through ``target_modules`` or ``all-linear``), which
refuses ``lora_dropout`` != 0. Routers (``mlp.gate``, [E, H]) are trained in full
through ``modules_to_save``: LoRA of rank r on an E x H matrix has r * (E + H)
parameters, more than E * H itself whenever r >= E.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from moekit.errors import ConfigError, UnsupportedModelError
from moekit.registry import Registry

GROUPS = ("attention", "experts", "router", "shared", "mlp")
TARGET_CHOICES = (*GROUPS, "all")
METHODS = ("lora", "qlora", "full")
ADAPTER_METHODS = ("lora", "qlora")
DROPOUT_WITH_EXPERTS = ("lora_dropout={dropout} cannot be used with target experts: PEFT's LoRA on fused expert "
                        "parameters has no dropout — set --lora-dropout 0 or drop experts from --target")


@dataclass(frozen=True)
class Group:
    """One trainable part of a model.

    Args:
        linear: regexes matching whole ``nn.Linear`` module names (LoRA ``target_modules``).
        fused: fused expert parameter names, ``module.param`` (LoRA ``target_parameters``).
        whole: module-name suffixes trained in full (``modules_to_save``).
    """

    linear: tuple[str, ...] = ()
    fused: tuple[str, ...] = ()
    whole: tuple[str, ...] = ()

    def patterns(self) -> list[re.Pattern]:
        """Regexes that find this group's parameters in plain or PEFT-wrapped parameter names."""
        modules = [*self.linear, *(re.escape(p.rsplit(".", 1)[0]) for p in self.fused), *map(re.escape, self.whole)]
        return [re.compile(rf"(?:^|\.){m}(?:\.|$)") for m in modules]


LAYER = r"(?:.*\.)?layers\.\d+\."
ATTENTION = Group(linear=(LAYER + r"self_attn\.(?:q|k|v|o)_proj",))
FUSED_EXPERTS = Group(fused=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))
ROUTER = Group(whole=("mlp.gate",))  # PEFT matches modules_to_save by suffix: not "shared_expert_gate"
DENSE_MLP = Group(linear=(LAYER + r"mlp\.(?:gate|up|down)_proj",))
QWEN2_SHARED = Group(linear=(LAYER + r"mlp\.shared_expert\.(?:gate|up|down)_proj",), whole=("mlp.shared_expert_gate",))

ARCHITECTURES: Registry[Callable] = Registry("architecture", "model_type")


def llama_groups(cfg) -> dict[str, Group]:
    return {"attention": ATTENTION, "mlp": DENSE_MLP}


def mixtral_groups(cfg) -> dict[str, Group]:
    return {"attention": ATTENTION, "experts": FUSED_EXPERTS, "router": ROUTER}


def qwen2_moe_groups(cfg) -> dict[str, Group]:
    groups = {"attention": ATTENTION}
    sparse = qwen2_moe_sparse_layers(cfg)
    if sparse:
        groups.update(experts=FUSED_EXPERTS, router=ROUTER)
        if cfg.shared_expert_intermediate_size:
            groups["shared"] = QWEN2_SHARED
    if len(sparse) < cfg.num_hidden_layers:
        groups["mlp"] = DENSE_MLP
    return groups


def qwen2_moe_sparse_layers(cfg) -> list[int]:
    """Layers with experts, by transformers' own rule (Qwen2MoeDecoderLayer)."""
    return [i for i in range(cfg.num_hidden_layers)
            if i not in (cfg.mlp_only_layers or []) and cfg.num_experts > 0 and (i + 1) % cfg.decoder_sparse_step == 0]


for _name, _fn in (("llama", llama_groups), ("mistral", llama_groups), ("mixtral", mixtral_groups),
                   ("qwen2_moe", qwen2_moe_groups)):
    ARCHITECTURES.register(_name, _fn)


@dataclass(frozen=True)
class Targets:
    """The resolved choice: which groups, and their names for PEFT."""

    parts: dict[str, Group] = field(default_factory=dict)

    @property
    def groups(self) -> list[str]:
        return list(self.parts)

    def _all(self, attr: str) -> list[str]:
        return [x for g in self.parts.values() for x in getattr(g, attr)]

    def lora_config(self, r: int, alpha: float, dropout: float):
        """PEFT ``LoraConfig``: LoRA on linear modules and fused experts, routers trained in full."""
        from peft import LoraConfig

        linear, fused, whole = self._all("linear"), self._all("fused"), self._all("whole")
        return LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
            # a string is matched with re.fullmatch against module names; [] = no modules (fused-only)
            target_modules=f"(?:{'|'.join(linear)})" if linear else [],
            target_parameters=fused or None,
            modules_to_save=whole or None,
        )

    def group_of(self, param_name: str) -> str | None:
        """The targeted group a (plain or PEFT-wrapped) parameter belongs to, if any."""
        for name, group in self.parts.items():
            if any(p.search(param_name) for p in group.patterns()):
                return name
        return None


def model_groups(model_config) -> dict[str, Group]:
    """Every group this model has, by architecture."""
    model_type = getattr(model_config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"finetune knows model types {', '.join(ARCHITECTURES.names())}, not {model_type!r} — "
            "upcycle the model with moekit upcycle (Mixtral / Qwen2-MoE) or use a LLaMA checkpoint")
    return ARCHITECTURES.get(model_type)(model_config)


def default_targets(method: str, available: list[str]) -> list[str]:
    """Attention for adapters (TRL's Mixtral QLoRA recipe); everything but the router for full runs."""
    return ["attention"] if method in ADAPTER_METHODS else [g for g in available if g != "router"]


def resolve_targets(model_config, target: list[str] | None, method: str, lora_dropout: float = 0.0) -> Targets:
    """The groups to train in this model, checked against what it has and what PEFT allows.

    Example:
        >>> from transformers import MixtralConfig
        >>> resolve_targets(MixtralConfig(), ["attention", "experts"], "lora").groups
        ['attention', 'experts']
    """
    available = model_groups(model_config)
    if not target:
        chosen = default_targets(method, list(available))
    elif "all" in target:
        chosen = list(available)
    else:
        chosen = list(target)
        for g in chosen:
            if g not in available:
                raise ConfigError(f"this {model_config.model_type} model has no {g} to train — "
                                  f"its targets are {', '.join(available)} (or all)")
    check_combination(chosen, method, lora_dropout)
    return Targets({g: available[g] for g in GROUPS if g in chosen})


def check_combination(chosen: list[str], method: str, lora_dropout: float) -> None:
    """Combinations PEFT would refuse late (or never train), refused early with the fix."""
    if method in ADAPTER_METHODS and "experts" in chosen and lora_dropout:
        raise ConfigError(DROPOUT_WITH_EXPERTS.format(dropout=lora_dropout))
    if method in ADAPTER_METHODS and set(chosen) == {"router"}:
        raise ConfigError("target router alone has no LoRA layers (routers are trained in full) — "
                          "use --method full --target router, or add attention/experts to --target")


def select_parameters(model, targets: Targets) -> dict[str, int]:
    """Full training: only the targeted groups' parameters require grad; returns numel per group."""
    counts = dict.fromkeys(targets.groups, 0)
    for name, p in model.named_parameters():
        group = targets.group_of(name)
        p.requires_grad_(group is not None)
        if group is not None:
            counts[group] += p.numel()
    return counts


def trainable_by_group(model, targets: Targets) -> dict[str, int]:
    """Trainable parameters per targeted group (``other`` for anything else)."""
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            group = targets.group_of(name) or "other"
            counts[group] = counts.get(group, 0) + p.numel()
    return counts


def quantization_skip_modules(model_config) -> list[str]:
    """Modules bitsandbytes must leave alone. ``llm_int8_skip_modules`` replaces transformers'
    default list (which holds ``lm_head``), so ``lm_head`` is named here; routers and the
    1-output shared-expert gate stay in bf16 too."""
    return ["lm_head", *ROUTER.whole, *QWEN2_SHARED.whole]


def expert_memory(model_config) -> dict[str, int]:
    """Bytes in bf16 of the fused experts and routers (what 4-bit loading leaves unquantized)."""
    groups = model_groups(model_config)
    targets = Targets({g: groups[g] for g in ("experts", "router") if g in groups})
    sizes = dict.fromkeys(targets.groups, 0)
    from moekit.train.trainer import meta_model

    for name, p in meta_model(model_config).named_parameters():
        g = targets.group_of(name)
        if g:
            sizes[g] += p.numel() * 2
    return sizes
