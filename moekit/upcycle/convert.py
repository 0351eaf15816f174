"""Dense LLaMA -> stock MoE checkpoint, streamed one tensor at a time.

Data flow: resolve the source -> read its config and tensor index -> resolve
the method/router and decide the MoE layout and the output format -> build a
plan (every output tensor's name, shape, dtype and a thunk that makes it) ->
stream the plan through the sharded writer inside a temporary folder -> add
config, tokenizer, card, provenance -> rename into place.

Each MoE layer is built by :func:`moekit.upcycle.split.split_layer` when its
first tensor (the router) is written. Data-driven settings get that layer's
calibration statistics from a :class:`moekit.upcycle.calibration.Calibrator`
that walks the model layer by layer just ahead of the writer (through each
layer's new MoE), so calibration is one streaming pass too.

Legend: L layers, E routed experts, H hidden size, I dense intermediate size,
N neurons per expert.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from dataclasses import dataclass
from types import SimpleNamespace
from pathlib import Path
from typing import Callable

import torch

from moekit.config import to_recipe
from moekit.errors import ConfigError, InputError, UnsupportedModelError
from moekit.formats import MoeFormat, MoeLayout, choose_format
from moekit.io import ShardedWriter, TensorIndex, TensorLoader, atomic_output, resolve_model_dir
from moekit.io.writer import TensorSpec
from moekit.upcycle.config import UpcycleConfig
from moekit.upcycle.routers import ROUTERS
from moekit.upcycle.split import LayerSplit, SplitSpec, moe_forward, split_layer
from moekit.upcycle.strategies import FFN, STRATEGIES

PROJS = ("gate_proj", "up_proj", "down_proj")
SOURCE_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM")
# Tokenizer and generation files copied verbatim from the source folder.
AUX_FILES = re.compile(r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\..*|merges\.txt|"
                       r".*\.jinja|generation_config\.json|.*\.tiktoken|LICEN[SC]E.*|NOTICE.*)$")
PROVENANCE_FILE = "moekit_upcycle.json"
RECIPE_FILE = "moekit_recipe.yaml"
# What method/router "auto" resolve to when the source can be calibrated (chosen
# from benchmarks/bench_quality.py, see README, "Upcycling quality").
AUTO_METHOD, AUTO_ROUTER = "coactivation", "calibrated"
CALIB_SEQ_LEN = 512


@dataclass
class Job:
    """One output tensor: its spec and the thunk that makes it from the loader."""

    spec: TensorSpec
    make: Callable[[TensorLoader], torch.Tensor]


@dataclass
class Plan:
    source: Path
    src_config: object
    layout: MoeLayout
    fmt: MoeFormat
    jobs: list[Job]
    moe_layers: list[int]
    spec: SplitSpec | None = None  # resolved method / router / weighting
    splits: dict = dataclasses.field(default_factory=dict)  # layer -> LayerSplit (filled while writing)
    calibrator: object = None  # a Calibrator when the settings need calibration data
    calib_seconds: float = 0.0

    @property
    def total_params(self) -> int:
        return sum(_numel(j.spec.shape) for j in self.jobs)

    @property
    def active_params(self) -> int:
        lay = self.layout
        per_expert = 3 * self.src_config.hidden_size * lay.expert_size
        return self.total_params - len(self.moe_layers) * (lay.num_experts - lay.top_k) * per_expert

    @property
    def total_bytes(self) -> int:
        return sum(j.spec.nbytes for j in self.jobs)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# --- source -------------------------------------------------------------------------------


# LLaMA's config defaults for keys a config.json may omit.
LLAMA_DEFAULTS = {"hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                  "attention_bias": False, "mlp_bias": False, "sliding_window": None, "head_dim": None}


def load_source_config(folder: Path) -> SimpleNamespace:
    """The source's config.json as attributes, refusing anything that is not LLaMA-shaped.

    Read as plain JSON (no transformers import: the converter only moves tensors).
    """
    path = folder / "config.json"
    if not path.is_file():
        raise InputError(f"{folder} has no config.json — point SRC at a transformers model folder")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON ({e.msg}) — re-download or re-save the model") from None
    archs = raw.get("architectures") or []
    kind = archs[0] if archs else raw.get("model_type")
    if raw.get("model_type") not in ("llama", "mistral") or (archs and archs[0] not in SOURCE_ARCHS) or "auto_map" in raw:
        raise UnsupportedModelError(
            f"source architecture is {kind}, not LlamaForCausalLM — "
            "moekit upcycles LLaMA-family (and Mistral without sliding window) models"
        )
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads") if k not in raw]
    if missing:
        raise InputError(f"{path} lacks {', '.join(missing)} — is this a complete LLaMA config?")
    cfg = SimpleNamespace(**{**LLAMA_DEFAULTS, **raw})
    cfg.num_key_value_heads = raw.get("num_key_value_heads") or cfg.num_attention_heads
    return cfg


def resolve_spec(cfg: UpcycleConfig, source: Path) -> SplitSpec:
    """The method, router and weighting this run uses (``auto`` resolved).

    ``auto`` method: AUTO_METHOD when the source ships a tokenizer (calibration needs
    one), else ``random``. ``auto`` router: AUTO_ROUTER when calibration runs anyway,
    else ``zero``. ``norm_topk_prob`` unset: True for Mixtral (its only choice) and for
    copies (weights must sum to 1), False otherwise.
    """
    method = cfg.method
    if method == "auto":
        method = AUTO_METHOD if _has_tokenizer(source) else "random"
    copies = STRATEGIES.get(method).copies
    router = cfg.router
    if router == "auto":
        router = AUTO_ROUTER if needs_calibration(method, "zero", cfg.shared_experts) and not copies else "zero"
    renorm = cfg.norm_topk_prob if cfg.norm_topk_prob is not None else (cfg.format == "mixtral" or copies)
    return SplitSpec(method, router, cfg.num_experts, cfg.shared_experts, cfg.top_k, renorm, cfg.scale)


def needs_calibration(method: str, router: str, shared_experts: int) -> bool:
    data = ("activations", "gradients")
    return (any(n in data for n in STRATEGIES.get(method).needs) or any(n in data for n in ROUTERS.get(router).needs)
            or shared_experts > 0)


def _has_tokenizer(source: Path) -> bool:
    return any(f.name.startswith("tokenizer") for f in source.iterdir())


def decide_layout(cfg: UpcycleConfig, src, spec: SplitSpec) -> MoeLayout:
    I, N, L = src.intermediate_size, cfg.num_experts, src.num_hidden_layers
    dense = _dense_layers(cfg.dense_layers, L)
    if STRATEGIES.get(spec.method).copies:
        return MoeLayout(N, cfg.top_k, I, 0, dense, spec.renormalize)
    if I % N:
        divisors = [d for d in range(2, min(I, 64) + 1) if I % d == 0]
        raise ConfigError(
            f"intermediate_size {I} is not divisible by num_experts={N} — choose --num-experts from "
            f"{', '.join(map(str, divisors[:12]))}"
        )
    n = I // N
    return MoeLayout(spec.num_routed, cfg.top_k, n, spec.num_shared * n, dense, spec.renormalize)


def _dense_layers(given: list[int], L: int) -> tuple[int, ...]:
    """``--dense-layers`` as sorted layer indices (negative ones count from the end)."""
    for d in given:
        if not -L <= d < L:
            raise ConfigError(f"dense_layers has {d}, but the model has {L} layers — use 0..{L - 1} or -{L}..-1")
    dense = tuple(sorted({d % L for d in given}))
    if len(dense) == L:
        raise ConfigError(f"dense_layers={given} keeps every layer dense, nothing would be upcycled — list fewer layers")
    return dense


def describe_scale(plan: "Plan") -> str:
    """The routed experts' down_proj scale: one number, or the per-layer range once fitted."""
    if plan.splits:
        values = [s.scale for s in plan.splits.values()]
        lo, hi = min(values), max(values)
        return f"{lo:g}" if lo == hi else f"{lo:.3g}-{hi:.3g} (least squares per layer)"
    spec, lay = plan.spec, plan.layout
    if spec.scale != "auto":
        return f"{float(spec.scale):g}"
    if STRATEGIES.get(spec.method).copies:
        return "1"
    if lay.top_k < lay.num_experts and needs_calibration(spec.method, spec.router, spec.num_shared):
        return "auto (least squares per layer on calibration tokens)"
    E, K = lay.num_experts, lay.top_k
    return f"{E if spec.renormalize or K >= E else E * E / K:g}"


# --- plan ---------------------------------------------------------------------------------


def build_plan(cfg: UpcycleConfig, source: Path, src, index: TensorIndex) -> Plan:
    spec = resolve_spec(cfg, source)
    layout = decide_layout(cfg, src, spec)
    fmt = choose_format(cfg.format, src, layout)
    L, H, I = src.num_hidden_layers, src.hidden_size, src.intermediate_size
    for layer in range(L):
        for proj, shape in zip(PROJS, ((I, H), (I, H), (H, I))):
            info = index[f"model.layers.{layer}.mlp.{proj}.weight"]
            if info.shape != shape:
                raise InputError(f"{info.name} has shape {info.shape}, config says {shape} — the checkpoint does not match its config.json")
    out_dtype = None if cfg.dtype == "auto" else cfg.dtype
    model_dtype = out_dtype or index["model.embed_tokens.weight"].dtype
    plan = Plan(source, src, layout, fmt, [], [l for l in range(L) if l not in layout.dense_layers], spec=spec)
    layer_of = re.compile(r"^model\.layers\.(\d+)\.")
    by_layer: dict[int, list[str]] = {}
    head, tail = [], []
    for name in index:
        if name.endswith("rotary_emb.inv_freq"):  # a buffer old checkpoints saved; recomputed at load
            continue
        m = layer_of.match(name)
        if m:
            by_layer.setdefault(int(m.group(1)), []).append(name)
        else:
            (head if "embed_tokens" in name else tail).append(name)
    for name in head:
        plan.jobs.append(_copy_job(index, name, out_dtype))
    for layer in range(L):
        for name in sorted(by_layer.get(layer, [])):
            if ".mlp." not in name:
                plan.jobs.append(_copy_job(index, name, out_dtype))
        for name, shape in fmt.extra_tensors(src, layer).items():
            plan.jobs.append(Job(TensorSpec(name, shape, model_dtype), lambda _, s=shape, d=model_dtype: torch.zeros(s, dtype=getattr(torch, d))))
        if layer in layout.dense_layers:
            for p in PROJS:
                plan.jobs.append(_copy_job(index, f"model.layers.{layer}.mlp.{p}.weight", out_dtype, fmt.key(f"dense.{p}", layer=layer)))
        else:
            plan.jobs.extend(_moe_jobs(cfg, plan, layer, model_dtype, out_dtype, index))
    for name in sorted(tail):
        plan.jobs.append(_copy_job(index, name, out_dtype))
    return plan


def _copy_job(index: TensorIndex, name: str, dtype: str | None, out_name: str | None = None) -> Job:
    info = index[name]
    d = dtype if dtype and info.dtype.startswith(("float", "bfloat")) else info.dtype
    return Job(TensorSpec(out_name or name, info.shape, d), lambda load: load(name, cache=False).to(getattr(torch, d)))


def _moe_jobs(cfg: UpcycleConfig, plan: Plan, layer: int, model_dtype: str, out_dtype: str | None,
              index: TensorIndex) -> list[Job]:
    """Router + E experts of one layer. The split is computed once, when the layer's first tensor is made."""
    src, lay, fmt = plan.src_config, plan.layout, plan.fmt
    H = src.hidden_size
    names = {p: f"model.layers.{layer}.mlp.{p}.weight" for p in PROJS}
    copies = STRATEGIES.get(plan.spec.method).copies
    seed = cfg.seed * 100_003 + layer  # distinct, reproducible per layer

    def split(load) -> LayerSplit:
        if layer not in plan.splits:
            t0 = time.perf_counter()
            stats = plan.calibrator.layer(layer, load) if plan.calibrator is not None else None
            ffn = FFN(*(load(names[p]) for p in PROJS))
            s = split_layer(ffn, stats, plan.spec, seed)
            if stats is not None:  # the calibration walk continues through this layer's MoE
                plan.calibrator.finish(layer, lambda x: moe_forward(ffn, s, plan.spec, x))
            plan.splits[layer] = s
            plan.calib_seconds += time.perf_counter() - t0 if stats is not None else 0.0
        return plan.splits[layer]

    def make_router(load):
        return split(load).router_EH.to(getattr(torch, model_dtype))

    def make_expert(load, e: int, proj: str):
        dtype = getattr(torch, out_dtype or index[names[proj]].dtype)
        w, s = load(names[proj]), split(load)
        if copies and s.scale == 1.0:
            return w.to(dtype)
        return _take(w, s.assign_EN[e], proj, s.scale, dtype)

    def make_shared(load, proj: str):
        # Always-on shared expert; sigmoid(shared_expert_gate = 0) = 0.5, so down_proj x 2.
        idx = split(load).shared_N
        return _take(load(names[proj]), idx, proj, 2.0, getattr(torch, out_dtype or index[names[proj]].dtype))

    jobs = [Job(TensorSpec(fmt.key("router", layer=layer), (lay.num_experts, H), model_dtype), make_router)]
    for e in range(lay.num_experts):
        for p in PROJS:
            shape = (H, lay.expert_size) if p == "down_proj" else (lay.expert_size, H)
            dtype = out_dtype or index[names[p]].dtype
            jobs.append(Job(TensorSpec(fmt.key(f"expert.{p}", layer=layer, expert=e), shape, dtype),
                            lambda load, e=e, p=p: make_expert(load, e, p)))
    if "shared_gate" in fmt.keys:  # the architecture always has the shared slot; it may hold 0 neurons
        for p in PROJS:
            shape = (H, lay.shared_size) if p == "down_proj" else (lay.shared_size, H)
            jobs.append(Job(TensorSpec(fmt.key(f"shared.{p}", layer=layer), shape, out_dtype or index[names[p]].dtype),
                            lambda load, p=p: make_shared(load, p)))
        jobs.append(Job(TensorSpec(fmt.key("shared_gate", layer=layer), (1, H), model_dtype),
                        lambda _: torch.zeros(1, H, dtype=getattr(torch, model_dtype))))
    return jobs


_SAME_SIZE_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _take(w, idx_N, proj: str, scale: float, dtype):
    """Neurons ``idx_N`` of one FFN matrix: rows of gate/up, columns of down (times ``scale``).

    The gather runs in numpy on an integer view of the bits: for bf16 it is many
    times faster than ``torch.index_select``. ``mul_`` on a bf16/fp16 tensor
    computes in fp32 and rounds once — the same result as scaling in fp32 and
    casting, without the fp32 copy.
    """
    import numpy as np

    bits = w.view(_SAME_SIZE_INT[w.element_size()]).numpy()
    taken = np.take(bits, idx_N.numpy(), axis=1 if proj == "down_proj" else 0)
    out = torch.from_numpy(taken).view(w.dtype).to(dtype)
    if proj != "down_proj" or scale == 1.0:
        return out
    if out.dtype == torch.bfloat16:
        return _scale_bf16(out, scale)
    return out.mul_(scale)


def _scale_bf16(x, scale: float):
    """``x * scale`` rounded to nearest-even bf16, exactly what torch computes, ~4x faster on CPU.

    A power-of-two scale (N experts, N / k) is exact: it adds to the exponent bits, in
    one integer pass, whenever no value is zero, subnormal, inf/nan or would leave the
    normal range; otherwise the general path multiplies in fp32 and rounds.
    """
    import math

    import numpy as np

    u16 = x.view(torch.int16).numpy().view(np.uint16)
    mantissa, exp2 = math.frexp(scale)
    shift = exp2 - 1  # scale = 2**shift when mantissa == 0.5
    if mantissa == 0.5 and u16.size:
        exponent = u16 & np.uint16(0x7F80)
        lo, hi = int(exponent.min()) >> 7, int(exponent.max()) >> 7
        if lo >= max(1, 1 - shift) and hi <= min(254, 254 - shift):
            return torch.from_numpy((u16 + np.uint16((shift % 512) << 7)).view(np.int16)).view(torch.bfloat16)
    u32 = u16.astype(np.uint32) << 16
    f32 = u32.view(np.float32)
    with np.errstate(over="ignore"):  # overflow gives inf, as in torch
        f32 *= np.float32(scale)
    u32 += 0x7FFF + ((u32 >> 16) & 1)  # round to nearest even on the dropped 16 bits
    return torch.from_numpy((u32 >> 16).astype(np.uint16).view(np.int16)).view(torch.bfloat16)


# --- describe -----------------------------------------------------------------------------


def describe_plan(plan: Plan, cfg: UpcycleConfig) -> str:
    """Human-readable plan: tensors of the first layer, totals, estimated size."""
    lay = plan.layout
    first = [j for j in plan.jobs if not re.match(r"^model\.layers\.(?!0\.)\d+\.", j.spec.name)]
    lines = [
        f"source      {plan.source}",
        f"format      {plan.fmt.name} ({plan.fmt.architecture})",
        f"layout      {lay.num_experts} experts x {lay.expert_size} neurons, top-{lay.top_k}"
        + (f", shared expert {lay.shared_size} neurons" if lay.shared_size else "")
        + (f", dense layers {list(lay.dense_layers)}" if lay.dense_layers else "")
        + f", norm_topk_prob={lay.norm_topk_prob}",
        f"method      {plan.spec.method}, router={plan.spec.router}, scale={describe_scale(plan)}",
        "calibration " + (f"{cfg.calib_tokens} tokens of {cfg.calib_data}"
                          if needs_calibration(plan.spec.method, plan.spec.router, plan.spec.num_shared) else "none"),
        f"tensors     {len(plan.jobs)} (layer 0 and non-layer tensors below; layers 1-{plan.src_config.num_hidden_layers - 1} alike)",
    ]
    lines += [f"  {j.spec.name:<64} {str(list(j.spec.shape)):<16} {j.spec.dtype}" for j in first]
    lines += [
        f"parameters  total {plan.total_params / 1e6:,.1f}M, active per token {plan.active_params / 1e6:,.1f}M",
        f"output size {plan.total_bytes / 1e9:,.2f} GB",
    ]
    return "\n".join(lines)


# --- write --------------------------------------------------------------------------------


def upcycle(config: UpcycleConfig, progress: bool = True) -> Path | str:
    """Convert ``config.source`` into a stock MoE checkpoint at ``config.output``.

    Returns the output path, or the plan description when ``config.dry_run``.

    Example:
        >>> from moekit.upcycle import UpcycleConfig, upcycle
        >>> upcycle(UpcycleConfig("dense", "moe", num_experts=4, top_k=4))   # doctest: +SKIP
        PosixPath('moe')
    """
    from tqdm.auto import tqdm

    out = Path(config.output)
    if out.exists() and not config.force and not config.dry_run:
        from moekit.errors import OutputExistsError

        raise OutputExistsError(f"output {out} already exists — choose another path or pass --force to overwrite it")
    source = resolve_model_dir(config.source, config.revision)
    src = load_source_config(source)
    index = _load_index(source, config)
    plan = build_plan(config, source, src, index)
    if config.dry_run:
        return describe_plan(plan, config)
    spec = plan.spec
    if needs_calibration(spec.method, spec.router, spec.num_shared):  # before any output exists
        from moekit.upcycle.calibration import Calibrator, calibration_ids

        seq_len = min(CALIB_SEQ_LEN, getattr(src, "max_position_embeddings", CALIB_SEQ_LEN) or CALIB_SEQ_LEN)
        ids_BT = calibration_ids(source, config.calib_data, config.calib_text_field, config.calib_tokens, seq_len)
        plan.calibrator = Calibrator(src, ids_BT, seed=config.seed, device="cuda" if torch.cuda.is_available() else "cpu",
                                     gradients="gradients" in STRATEGIES.get(spec.method).needs)
    with atomic_output(out, force=config.force) as tmp:
        with TensorLoader(index) as load, ShardedWriter(tmp, [j.spec for j in plan.jobs], config.max_shard_size) as writer:
            for job in tqdm(plan.jobs, desc="upcycle", unit="tensor", disable=not progress):
                writer.write(job.spec.name, job.make(load))
        _write_metadata(tmp, plan, config)
    return out


def _load_index(source: Path, config: UpcycleConfig) -> TensorIndex:
    try:
        return TensorIndex.from_folder(source)
    except InputError:
        if not config.allow_pickle:
            raise
    from moekit.io.pickle import pickle_to_safetensors_index  # opt-in only

    return pickle_to_safetensors_index(source)


def _write_metadata(tmp: Path, plan: Plan, config: UpcycleConfig) -> None:
    from moekit import __version__

    dtype = plan.jobs[0].spec.dtype
    hf_config = plan.fmt.make_config(plan.src_config, plan.layout, dtype)
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    for f in plan.source.iterdir():
        if f.is_file() and AUX_FILES.match(f.name):
            shutil.copy2(f, tmp / f.name)
    copies = STRATEGIES.get(plan.spec.method).copies
    scales = {str(l): s.scale for l, s in sorted(plan.splits.items())}
    provenance = {
        "moekit_version": __version__,
        "source": str(config.source),
        "method": plan.spec.method,
        "seed": config.seed,
        "router": plan.spec.router,
        # one number when every layer has the same scale, else null (see "scales")
        "scale": next(iter(scales.values())) if len(set(scales.values())) == 1 else None,
        "scales": scales,
        "layout": dataclasses.asdict(plan.layout),
        "format": plan.fmt.name,
        # expert -> dense intermediate neuron indices, per layer ("all" for copies)
        "experts": {str(l): ("all" if copies else s.assign_EN.tolist()) for l, s in sorted(plan.splits.items())},
        "shared_expert": {str(l): s.shared_N.tolist() for l, s in sorted(plan.splits.items()) if len(s.shared_N)},
        "calibration": None if plan.calibrator is None else {
            "data": config.calib_data, "tokens": plan.calibrator.tokens, "seconds": round(plan.calib_seconds, 2)},
        # router-vs-oracle top-k recall on held-out calibration tokens, per layer
        "router_recall": {str(l): s.recall for l, s in sorted(plan.splits.items()) if s.recall is not None},
    }
    (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance))
    # "auto" depends on the source (tokenizer or not) and on moekit's version: pin what ran
    pinned = dataclasses.replace(config, method=plan.spec.method, router=plan.spec.router)
    (tmp / RECIPE_FILE).write_text(to_recipe(pinned, "upcycle"))
    from moekit.upcycle.card import upcycle_card

    (tmp / "README.md").write_text(upcycle_card(plan, pinned, auto=(config.method == "auto", config.router == "auto")))


def command_line(config: UpcycleConfig) -> str:
    """The ``moekit upcycle`` command that reproduces ``config``."""
    defaults = UpcycleConfig(config.source, config.output)
    always = ("num_experts", "top_k", "method")
    args = ["moekit upcycle", config.source, config.output]
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if f.name in ("source", "output", "dry_run", "force", "push_to_hub", "private"):
            continue
        if f.name in always or v != getattr(defaults, f.name):
            flag = "--" + f.name.replace("_", "-")
            if isinstance(v, (list, tuple)):
                args += [flag, ",".join(map(str, v))]
            elif f.name == "norm_topk_prob":
                args += [flag, str(v).lower()]
            else:
                args += [flag] if v is True else [flag, str(v)]
    return " ".join(args)

