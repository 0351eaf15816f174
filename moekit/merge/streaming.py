"""LM-Cocktail merge, streamed one tensor at a time.

Data flow: resolve every input (folder, Hub id, or BASE+ADAPTER) -> read configs
and tensor indexes (headers only) -> validate: one architecture, one vocabulary,
the same tensor names and shapes -> weights (given, or softmax(−L/τ) from
examples; α for a target model) -> for each tensor: read the same block of rows
from every input, combine in float32, cast, refuse non-finite values, write ->
add config, tokenizer, card, provenance -> rename into place.

Peak memory is one output tensor plus a few float32 row blocks, whatever the
model size: no input is ever held whole.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from moekit.config import to_recipe
from moekit.errors import InputError, OutputExistsError
from moekit.io import ShardedWriter, TensorIndex, TensorLoader, atomic_output, resolve_model_dir
from moekit.io.writer import TensorSpec
from moekit.merge.config import MergeConfig
from moekit.merge.lora import LoraPatch, read_adapter
from moekit.merge.methods import METHODS
from moekit.merge.sources import RowReader, TensorSource, whole

CHUNK_ELEMENTS = 1 << 20  # elements per row block: 4 MB in float32, per input
TOKENIZER_FILES = re.compile(r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\..*|merges\.txt|"
                             r".*\.jinja|.*\.tiktoken|chat_template.*)$")
COPIED_FILES = re.compile(r"^(generation_config\.json|LICEN[SC]E.*|NOTICE.*)$")
PROVENANCE_FILE = "moekit_merge.json"
RECIPE_FILE = "moekit_recipe.yaml"


@dataclass
class ModelInput:
    """One model of the merge: its folder, config, tensor index and optional LoRA adapter."""

    spec: str
    folder: Path
    config: dict
    index: TensorIndex
    adapter_folder: Path | None = None
    lora: LoraPatch | None = None

    def source(self, name: str) -> TensorSource:
        if self.lora and name in self.lora.sources:
            return self.lora.sources[name]
        return TensorSource(whole(self.index[name]))

    @property
    def tokenizer_folder(self) -> Path | None:
        for folder in (self.adapter_folder, self.folder):
            if folder is not None and _has_tokenizer(folder):
                return folder
        return None


@dataclass
class MergePlan:
    config: MergeConfig
    inputs: list[ModelInput]  # the target model (with --base) first, then config.models
    weights: list[float]  # one per input, α folded in
    model_weights: list[float]  # wᵢ over config.models
    losses: list[float] | None  # Lᵢ over config.models, when weights came from examples
    specs: list[TensorSpec]
    tokenizer_folder: Path | None

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.specs)


# --- inputs ---------------------------------------------------------------------------------


def split_spec(spec: str) -> tuple[str, str | None]:
    """``"BASE+ADAPTER"`` -> (BASE, ADAPTER); an existing folder whose name has a '+' stays whole."""
    if Path(spec).expanduser().is_dir() or "+" not in spec:
        return spec, None
    base, adapter = spec.rsplit("+", 1)
    if not base or not adapter:
        raise InputError(f"--model {spec!r}: expected BASE+ADAPTER with both parts — e.g. ./llama+./my-lora")
    return base, adapter


def resolve_input(spec: str) -> ModelInput:
    base_spec, adapter_spec = split_spec(spec)
    folder = resolve_model_dir(base_spec)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise InputError(f"{folder} has no config.json — pass a transformers model folder")
    config = json.loads(config_file.read_text())
    inp = ModelInput(spec, folder, config, TensorIndex.from_folder(folder))
    if adapter_spec is not None:
        inp.adapter_folder = resolve_model_dir(adapter_spec)
        inp.lora = read_adapter(inp.adapter_folder, inp.index, config.get("model_type"))
    return inp


def validate_inputs(inputs: list[ModelInput]) -> None:
    """Same architecture, vocabulary, tensor names and shapes; raises on the first mismatch."""
    first = inputs[0]
    arch = lambda c: (c.get("architectures") or [c.get("model_type")])[0]
    for other in inputs[1:]:
        a, b = first.spec, other.spec
        if arch(first.config) != arch(other.config) or first.config.get("model_type") != other.config.get("model_type"):
            raise InputError(f"{b} is {arch(other.config)} but {a} is {arch(first.config)} — "
                             "merge models of one architecture")
        va, vb = _vocab_size(first.config), _vocab_size(other.config)
        if va != vb:
            raise InputError(f"vocabulary mismatch: {a} has vocab_size {va}, {b} has {vb} — "
                             "merge models that share a tokenizer")
        for name in first.index:
            if name not in other.index:
                raise InputError(f"{b} has no tensor {name}, which {a} has — merge checkpoints of one architecture and size")
            sa, sb = first.index[name].shape, other.index[name].shape
            if sa != sb:
                raise InputError(f"tensor {name} is {list(sa)} in {a} but {list(sb)} in {b} — "
                                 "merge checkpoints of one size")
        extra = next((n for n in other.index if n not in first.index), None)
        if extra:
            raise InputError(f"{b} has a tensor {extra} that {a} lacks — merge checkpoints of one architecture and size")


def _vocab_size(config: dict):
    return config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # many tokenizer classes, many failure types
        raise InputError(f"cannot load the tokenizer in {folder} ({e.__class__.__name__}) — re-save it with transformers") from None


def _tokenizer_fingerprint(folder: Path) -> list[tuple[str, str]]:
    import hashlib

    return sorted((f.name, hashlib.sha256(f.read_bytes()).hexdigest()) for f in folder.iterdir()
                  if f.is_file() and TOKENIZER_FILES.match(f.name))


def validate_tokenizers(labelled: list[tuple[str, Path]]) -> None:
    """Every tokenizer maps the same ids to the same tokens; names the first difference."""
    if len({repr(_tokenizer_fingerprint(folder)) for _, folder in labelled}) == 1:
        return  # byte-identical tokenizer files: nothing to load
    vocabs = [(label, {i: t for t, i in _load_tokenizer(folder).get_vocab().items()}) for label, folder in labelled]
    (a, va), rest = vocabs[0], vocabs[1:]
    for b, vb in rest:
        for i in sorted(set(va) | set(vb)):
            if va.get(i) != vb.get(i):
                raise InputError(f"vocabulary mismatch: token id {i} is {va.get(i)!r} in {a} but {vb.get(i)!r} in {b} — "
                                 "merge models that share a tokenizer")


# --- plan -----------------------------------------------------------------------------------


def plan_merge(config: MergeConfig, progress: bool = True) -> MergePlan:
    """Resolve and validate the inputs and decide the weights; reads headers (and runs losses), writes nothing.

    Example:
        >>> plan = plan_merge(MergeConfig("out", models=["a", "b"], weights=[0.5, 0.5]))  # doctest: +SKIP
        >>> plan.weights
        [0.5, 0.5]
    """
    out = Path(config.output)
    if out.exists() and not config.force and not config.dry_run:
        raise OutputExistsError(f"output {out} already exists — choose another path or pass --force to overwrite it")
    specs = ([config.base] if config.base is not None else []) + list(config.models)
    inputs = [resolve_input(s) for s in specs]
    validate_inputs(inputs)
    tokenizer_folder = _tokenizer_source(config, inputs)
    models = inputs[1:] if config.base is not None else inputs
    losses = None
    if config.examples is not None:
        from moekit.merge.cocktail import cocktail_weights, model_losses, read_examples

        rows = read_examples(config.examples)
        if tokenizer_folder is None:
            raise InputError(f"--examples needs a tokenizer and {inputs[0].folder} has none — pass --tokenizer-from MODEL")
        losses = model_losses(models, _load_tokenizer(tokenizer_folder), rows, config.max_length,
                              config.batch_size, config.device, progress)
        model_weights = cocktail_weights(losses, config.temperature)
    else:
        model_weights = config.model_weights
    alpha = config.target_share
    weights = model_weights if alpha is None else [alpha] + [(1 - alpha) * w for w in model_weights]
    return MergePlan(config, inputs, weights, model_weights, losses, _output_specs(config, inputs[0]), tokenizer_folder)


def _tokenizer_source(config: MergeConfig, inputs: list[ModelInput]) -> Path | None:
    labelled = [(i.spec, i.tokenizer_folder) for i in inputs if i.tokenizer_folder is not None]
    if config.tokenizer_from is not None:
        folder = resolve_model_dir(config.tokenizer_from)
        if not _has_tokenizer(folder):
            raise InputError(f"--tokenizer-from {config.tokenizer_from} has no tokenizer files — pass a model folder with a tokenizer")
        labelled.insert(0, (config.tokenizer_from, folder))
    if len(labelled) > 1:
        validate_tokenizers(labelled)
    return labelled[0][1] if labelled else None


def _output_specs(config: MergeConfig, first: ModelInput) -> list[TensorSpec]:
    specs = []
    for name, info in first.index.tensors.items():
        floating = getattr(torch, info.dtype).is_floating_point
        dtype = config.dtype if config.dtype != "auto" and floating else info.dtype
        specs.append(TensorSpec(name, info.shape, dtype))
    return specs


def describe_plan(plan: MergePlan) -> str:
    """The weights table (with losses when computed) and the output size."""
    cfg = plan.config
    rows = [(i.spec, "target" if cfg.base is not None and k == 0 else "model") for k, i in enumerate(plan.inputs)]
    losses = ([None] if cfg.base is not None else []) + (plan.losses or [None] * len(cfg.models))
    width = max(5, *(len(r[0]) for r in rows))
    show_loss = plan.losses is not None
    lines = [f"{'model':<{width}}  {'role':<6}  " + (f"{'loss':>8}  " if show_loss else "") + f"{'weight':>8}"]
    for (spec, role), loss, w in zip(rows, losses, plan.weights):
        cell = ("" if loss is None else f"{loss:.4f}") if show_loss else None
        lines.append(f"{spec:<{width}}  {role:<6}  " + (f"{cell:>8}  " if show_loss else "") + f"{w:8.4f}")
    formula = "M = Σ wᵢ·Mᵢ" if cfg.base is None else f"M = {cfg.target_share:g}·M_target + {1 - cfg.target_share:g}·Σ wᵢ·Mᵢ"
    if plan.losses is not None:
        formula += f"   (wᵢ = softmax(−Lᵢ/{cfg.temperature:g}))"
    lines += [formula, f"output: {len(plan.specs)} tensors, {plan.total_bytes / 1e9:,.2f} GB, method {cfg.method}"]
    return "\n".join(lines)


# --- write ----------------------------------------------------------------------------------


def merge_tensor(spec: TensorSpec, sources: list[TensorSource], readers: list[RowReader],
                 weights: list[float], method) -> torch.Tensor:
    """One output tensor, built a block of rows at a time from every input's same rows."""
    block = sources[0].block
    out_dtype = getattr(torch, spec.dtype)
    out = torch.empty(block.rows, block.cols, dtype=out_dtype)
    step = max(1, CHUNK_ELEMENTS // max(block.cols, 1))
    used = [k for k, w in enumerate(weights) if w != 0]  # a zero weight needs no reading
    limit = torch.finfo(out_dtype).max if out_dtype.is_floating_point else None
    for a in range(0, block.rows, step):
        b = min(block.rows, a + step)
        if limit is None:  # integer buffers: copied from the first input
            out[a:b] = readers[0].raw(block, a, b)
            continue
        merged = method.fn([readers[k].read(sources[k], a, b) for k in used], [weights[k] for k in used])
        lo, hi = torch.aminmax(merged)
        if not (-limit <= lo.item() and hi.item() <= limit):  # also false for nan
            hint = "" if spec.dtype == "float32" else f", or use --dtype float32 if {spec.dtype} overflowed"
            raise InputError(f"merged tensor {spec.name} has non-finite values (inf/nan) in rows {a}-{b} — "
                             f"check the inputs for inf/nan{hint}")
        out[a:b].copy_(merged)  # the one cast to the output dtype
    return out.reshape(spec.shape)


def write_merge(plan: MergePlan, progress: bool = True) -> Path:
    """Stream the merged tensors of ``plan`` into ``config.output`` (atomically) and add the metadata."""
    from tqdm.auto import tqdm

    cfg = plan.config
    method = METHODS.get(cfg.method)
    readers = [RowReader(TensorLoader(i.lora.index, cache=4) if i.lora else None) for i in plan.inputs]
    # Row blocks are small and memory-bound: one thread avoids an OpenMP barrier per block,
    # which costs more than the work itself (4x slower on a busy 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with atomic_output(cfg.output, force=cfg.force) as tmp:
        try:
            with ShardedWriter(tmp, plan.specs, cfg.max_shard_size) as writer, \
                    tqdm(total=plan.total_bytes, desc="merge", unit="B", unit_scale=True, disable=not progress) as bar:
                for spec in plan.specs:
                    sources = [i.source(spec.name) for i in plan.inputs]
                    writer.write(spec.name, merge_tensor(spec, sources, readers, plan.weights, method))
                    bar.update(spec.nbytes)
        finally:
            torch.set_num_threads(threads)
            for r in readers:
                r.close()
        _write_metadata(tmp, plan)
    return Path(cfg.output)


def merge(config: MergeConfig, progress: bool = True, api=None) -> Path | str:
    """Merge ``config.models`` into ``config.output``; push it when ``config.push_to_hub`` is set.

    Returns the output path, or the plan description when ``config.dry_run``.
    ``api`` is an ``HfApi``-like client for the push (tests inject a fake).

    Example:
        >>> from moekit.merge import MergeConfig, merge
        >>> merge(MergeConfig("merged", models=["chat", "base"], weights=[0.7, 0.3]))  # doctest: +SKIP
        PosixPath('merged')
    """
    plan = plan_merge(config, progress)
    if config.dry_run:
        return describe_plan(plan)
    out = write_merge(plan, progress)
    if config.push_to_hub:
        from moekit.hub.push import push_folder

        push_folder(out, config.push_to_hub, private=config.private, api=api)
    return out


# --- metadata -------------------------------------------------------------------------------


def _write_metadata(tmp: Path, plan: MergePlan) -> None:
    from moekit import __version__
    from moekit.merge.card import merge_card

    cfg, first = plan.config, plan.inputs[0]
    model_config = dict(first.config)
    if cfg.dtype != "auto":
        model_config["dtype"] = cfg.dtype
        if "torch_dtype" in model_config:
            model_config["torch_dtype"] = cfg.dtype
    (tmp / "config.json").write_text(json.dumps(model_config, indent=2, sort_keys=True) + "\n")
    for f in first.folder.iterdir():
        if f.is_file() and COPIED_FILES.match(f.name):
            shutil.copy2(f, tmp / f.name)
    if plan.tokenizer_folder is not None:
        for f in plan.tokenizer_folder.iterdir():
            if f.is_file() and TOKENIZER_FILES.match(f.name):
                shutil.copy2(f, tmp / f.name)
    provenance = {
        "moekit_version": __version__,
        "method": cfg.method,
        "inputs": [i.spec for i in plan.inputs],
        "weights": plan.weights,
        "model_weights": plan.model_weights,
        "losses": plan.losses,
        "temperature": cfg.temperature if plan.losses is not None else None,
        "alpha": cfg.target_share,
    }
    (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))
    (tmp / RECIPE_FILE).write_text(to_recipe(cfg, "merge"))
    (tmp / "README.md").write_text(merge_card(plan))


def command_line(config: MergeConfig) -> str:
    """The ``moekit merge`` command that reproduces ``config``."""
    q = shlex.quote
    args = ["moekit merge", q(config.output)]
    for m in config.models:
        args += ["--model", q(m)]
    defaults = MergeConfig(config.output, list(config.models), weights=[1.0] + [0.0] * (len(config.models) - 1))
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if f.name in ("output", "models", "force", "dry_run") or v is None or (v == getattr(defaults, f.name) and f.name != "weights"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name == "weights":
            args += [flag, *map(str, v)]  # shortest round-trip form: the exact weights
        else:
            args += [flag] if v is True else [flag, q(str(v))]
    return " ".join(args)
