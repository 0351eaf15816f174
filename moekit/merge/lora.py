"""A PEFT LoRA adapter as per-tensor changes to its base checkpoint, read from headers only.

PEFT names adapter tensors after the in-memory modules (``...q_proj.lora_A.weight``).
Most match the stored names; MoE parameters do not: transformers fuses experts
in memory (``mlp.experts.gate_up_proj`` ``[E, 2I, H]``, gate rows first) while
moekit / Mixtral checkpoints store per-expert legacy keys, so each fused delta is
split back onto those keys with the format's key map. Nothing is computed here:
the result says, for every stored tensor the adapter touches, which rows replace
it and which low-rank deltas are added (see :mod:`moekit.merge.sources`).

Legend: E experts, I expert intermediate size, H hidden size, R rank.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from moekit.errors import InputError
from moekit.io import TensorIndex
from moekit.merge.sources import Block, LowRank, TensorSource, whole

PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<mod>.+?)(?P<nest>(?:\.base_layer)*)\.(?P<part>lora_A|lora_B)\.weight$")
EMBEDDING_KEY = re.compile(r"^(?P<mod>.+)\.(?P<part>lora_embedding_A|lora_embedding_B)$")
SAVED_BASE_KEY = re.compile(r"^(?P<mod>.+)\.base_layer\.(?P<param>weight|bias)$")
UNSUPPORTED_KEYS = ("lora_magnitude_vector", "lora_B.bias", "trainable_tokens", "lora_E", "lora_embedding_B.bias")
MOE_PARAM = re.compile(r"^model\.layers\.(?P<layer>\d+)\.mlp\.(?P<what>gate\.weight|experts\.gate_up_proj|experts\.down_proj)$")
UNSUPPORTED_OPTIONS = {"use_dora": "DoRA", "lora_bias": "lora_bias", "fan_in_fan_out": "fan_in_fan_out",
                       "layer_replication": "layer_replication", "trainable_token_indices": "trainable tokens"}


@dataclass(frozen=True)
class Target:
    """Part of an in-memory parameter stored as one tensor: rows row_offset.. of ``expert``."""

    name: str
    expert: int | None = None
    row_offset: int = 0


@dataclass
class LoraPatch:
    """The stored tensors an adapter changes: name -> source (replacement rows and/or deltas)."""

    folder: Path
    index: TensorIndex
    sources: dict[str, TensorSource]


def read_adapter(folder: Path, base: TensorIndex, model_type: str | None) -> LoraPatch:
    """Map every tensor of the adapter in ``folder`` onto the tensors of ``base``.

    Raises InputError naming the first adapter tensor that does not fit the base.
    """
    cfg = _adapter_config(folder)
    index = TensorIndex.from_folder(folder)
    groups: dict[tuple[str, int], dict[str, str]] = {}
    embeddings: dict[str, dict[str, str]] = {}
    replacements: dict[str, str] = {}
    for key in index:
        name = key.removeprefix(PREFIX)
        if any(u in name for u in UNSUPPORTED_KEYS):
            raise InputError(f"adapter {folder} holds {key}, a PEFT feature moekit cannot merge streamed — "
                             "merge it with peft's merge_and_unload() and pass the merged folder")
        if m := LORA_KEY.match(name):
            groups.setdefault((m["mod"], m["nest"].count(".base_layer")), {})[m["part"][-1]] = key
        elif m := EMBEDDING_KEY.match(name):
            embeddings.setdefault(m["mod"], {})[m["part"][-1]] = key
        elif m := SAVED_BASE_KEY.match(name):
            replacements[f"{m['mod']}.{m['param']}"] = key
        else:  # modules_to_save: a full new copy of the tensor
            replacements[name] = key
    fmt = _moe_format(model_type)
    sources: dict[str, TensorSource] = {}

    def add(target: str, block: Block | None = None, delta: LowRank | None = None) -> None:
        src = sources.get(target) or TensorSource(whole(base[target]))
        sources[target] = TensorSource(block or src.block, src.deltas + ((delta,) if delta else ()))

    for mem, key in replacements.items():
        for t, block in _replacement_blocks(mem, key, index, base, fmt, folder):
            add(t, block=block)
    for (mod, depth), pair in sorted(groups.items()):
        for t, delta in _lora_deltas(mod, pair, cfg, index, base, fmt, folder):
            add(t, delta=delta)
    for mod, pair in sorted(embeddings.items()):
        add(*_embedding_delta(mod, pair, cfg, index, base, folder))
    return LoraPatch(folder, index, sources)


def _adapter_config(folder: Path) -> dict:
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise InputError(f"{folder} has no adapter_config.json — in --model BASE+ADAPTER, ADAPTER must be a PEFT adapter folder")
    cfg = json.loads(path.read_text())
    if cfg.get("peft_type") != "LORA":
        raise InputError(f"adapter {folder} is {cfg.get('peft_type')}, not LoRA — moekit merges LoRA adapters only")
    for option, label in UNSUPPORTED_OPTIONS.items():
        if cfg.get(option):
            raise InputError(f"adapter {folder} uses {label}, which moekit cannot merge streamed — "
                             "merge it with peft's merge_and_unload() and pass the merged folder")
    return cfg


def _moe_format(model_type: str | None):
    from moekit.formats import FORMATS

    return FORMATS.get(model_type) if model_type in FORMATS else None


def targets_of(mem: str, base: TensorIndex, fmt) -> tuple[list[Target], tuple[int, int, int]] | None:
    """Where in-memory parameter ``mem`` is stored in ``base``, and its shape as (E, O, N).

    None when the base has no such parameter.
    """
    if mem in base:
        shape = base[mem].shape
        if len(shape) == 3:
            return [Target(mem)], shape
        return [Target(mem)], (1, shape[0], shape[1] if len(shape) > 1 else 1)
    m = MOE_PARAM.match(mem)
    if not m or fmt is None:
        return None
    layer = int(m["layer"])
    if m["what"] == "gate.weight":
        name = fmt.key("router", layer=layer)
        return ([Target(name)], (1, *base[name].shape)) if name in base else None
    keys = {p: lambda e, p=p: fmt.key(f"expert.{p}", layer=layer, expert=e) for p in ("gate_proj", "up_proj", "down_proj")}
    E = 0
    while keys["gate_proj"](E) in base:
        E += 1
    if not E:
        return None
    I, H = base[keys["gate_proj"](0)].shape
    if m["what"] == "experts.down_proj":
        return [Target(keys["down_proj"](e), e) for e in range(E)], (E, H, I)
    return [Target(keys[p](e), e, off) for e in range(E) for p, off in (("gate_proj", 0), ("up_proj", I))], (E, 2 * I, H)


def _replacement_blocks(mem, key, index, base, fmt, folder):
    found = targets_of(mem, base, fmt)
    if found is None:
        raise InputError(f"adapter {folder} replaces {mem}, which the base model has no tensor for — "
                         "is ADAPTER trained on this BASE?")
    targets, (E, O, N) = found
    info = index[key]
    expected = tuple(base[targets[0].name].shape) if targets[0].expert is None else (E, O, N)
    if tuple(info.shape) != expected:
        raise InputError(f"adapter tensor {key} has shape {info.shape} but the base's {mem} is {expected} — "
                         "is ADAPTER trained on this BASE (same vocabulary and sizes)?")
    for t in targets:
        if t.expert is None:
            yield t.name, whole(info)
        else:  # expert e's rows of the fused [E, O, N] copy
            stored = base[t.name]
            yield t.name, Block(info, t.expert * O + t.row_offset, stored.shape[0], stored.shape[1])


def _lora_deltas(mod, pair, cfg, index, base, fmt, folder):
    if set(pair) != {"A", "B"}:
        have = ", ".join(f"lora_{p}" for p in sorted(pair))
        raise InputError(f"adapter {folder} has only {have} for {mod} — re-save the adapter with peft")
    A, B = index[pair["A"]].shape, index[pair["B"]].shape
    params = ["weight"] + [t.rsplit(".", 1)[-1] for t in cfg.get("target_parameters") or []
                           if f"{mod}.{t.rsplit('.', 1)[-1]}".endswith(t)]
    fits = []
    for p in dict.fromkeys(params):
        found = targets_of(f"{mod}.{p}", base, fmt)
        if found:
            E, O, N = found[1]
            if A[1] == N and B[0] == O and A[0] == B[1] and A[0] % E == 0:
                fits.append((p, found))
    if len(fits) != 1:
        what = "no parameter" if not fits else f"several parameters ({', '.join(p for p, _ in fits)})"
        raise InputError(f"adapter {folder}: LoRA on {mod} (A {A}, B {B}) fits {what} of the base model — "
                         "is ADAPTER trained on this BASE? Otherwise merge it with peft's merge_and_unload()")
    param, (targets, (E, O, N)) = fits[0]
    scale = _scale(cfg, f"{mod}.{param}", A[0] // E)
    for t in targets:
        kind = "experts" if E > 1 else "linear"
        yield t.name, LowRank(pair["A"], pair["B"], scale, kind, E, t.expert, t.row_offset)


def _embedding_delta(mod, pair, cfg, index, base, folder):
    name = f"{mod}.weight"
    if set(pair) != {"A", "B"} or name not in base:
        raise InputError(f"adapter {folder} has an embedding LoRA on {mod}, which the base model lacks — "
                         "is ADAPTER trained on this BASE?")
    A, B = index[pair["A"]].shape, index[pair["B"]].shape
    if (A[1], B[0]) != tuple(base[name].shape) or A[0] != B[1]:
        raise InputError(f"adapter embedding LoRA on {mod} (A {A}, B {B}) does not fit the base's {name} "
                         f"{base[name].shape} — is ADAPTER trained on this BASE?")
    return name, None, LowRank(pair["A"], pair["B"], _scale(cfg, name, A[0]), "embedding")


def _scale(cfg: dict, name: str, rank: int) -> float:
    """PEFT's scaling: alpha / r (or alpha / sqrt(r) with rsLoRA); patterns match name suffixes."""
    alpha = cfg.get("lora_alpha", 8)
    module = name.rsplit(".", 1)[0]
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module) or re.match(rf"(.*\.)?({pattern})$", name):
            alpha = value
            break
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
