"""``moekit finetune``: LoRA / QLoRA / full fine-tuning through TRL's SFTTrainer and PEFT.

Data flow: check everything that can fail cheaply (output, model type, targets,
hardware, data) -> load the model (4-bit for QLoRA) -> PEFT adapter or frozen
non-targets -> train in the run folder -> save -> publish the output atomically
(adapter or model, tokenizer, card, recipe, logs; ``--merge`` adds ``merged/``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from moekit.errors import ConfigError, OutputExistsError
from moekit.finetune.config import FinetuneConfig
from moekit.finetune.targets import (Targets, expert_memory, model_groups, quantization_skip_modules,
                                     resolve_targets, select_parameters, trainable_by_group)
from moekit.train import data as D
from moekit.train import trainer as T
from moekit.train.log import logger
from moekit.train.output import loss_summary, publish, write_recipe

MERGED_DIR = "merged"


@dataclass
class FinetuneResult:
    """What a run produced. ``trainer`` holds the trained model (``trainer.model``) and datasets."""

    output: Path
    merged: Path | None
    metrics: dict
    trainable: dict[str, int]
    trainer: object = None


def finetune(config: FinetuneConfig, *, progress: bool = True, callbacks=()) -> FinetuneResult:
    """Fine-tune ``config.model`` on ``config.data`` and write ``config.output``.

    Everything that can be checked cheaply (output folder, model type, targets, CUDA for
    QLoRA, data columns) is checked before anything is loaded or written. ``callbacks``
    are extra transformers ``TrainerCallback`` objects.

    Example:
        >>> from moekit.finetune import FinetuneConfig, finetune
        >>> cfg = FinetuneConfig("moe", "moe-sft", data="chat.jsonl", target="attention,experts", merge=True)
        >>> finetune(cfg).output   # doctest: +SKIP
        PosixPath('moe-sft')
    """
    from moekit.io import resolve_model_dir
    from moekit.train.launch import launched, process_state

    T.require_train_extra(config.report_to)
    if config.accelerate_config and not launched():
        raise ConfigError("accelerate_config runs the command under accelerate launch — use the moekit CLI "
                          "(moekit finetune ... --accelerate-config NAME) or start your script with accelerate launch")
    out = Path(config.output)
    if out.exists() and not config.force:
        raise OutputExistsError(f"output {out} already exists — choose another path or pass --force to overwrite it")
    model_dir = resolve_model_dir(config.model, config.revision)
    model_config = T.load_model_config(model_dir, "finetune needs a Mixtral, Qwen2-MoE or LLaMA checkpoint")
    targets = resolve_targets(model_config, config.target, config.method, config.lora_dropout)
    aux = router_aux_coef(config, targets, model_config)
    moe = "experts" in model_groups(model_config)
    # the resolved choices go into the recipe and the card
    config = dataclasses.replace(config, target=targets.groups, router_aux_loss_coef=aux,
                                 quantize_experts=bool(config.quantize_experts and moe))
    if config.method == "qlora":
        T.require_4bit()
        check_packed_experts_parallelism(config)
    tokenizer = T.load_tokenizer(model_dir, config.revision)
    fmt, train_ds, eval_ds = load_data(config, tokenizer)

    prec = T.precision(config, adapters=config.method != "full", quantized=config.method == "qlora")
    run, checkpoint = T.prepare_run(out, config)
    total = T.parameter_count(model_config)  # the model as defined: 4-bit weights in memory count packed bytes
    model = load_for_method(config, model_dir, model_config, prec, moe=moe, total_params=total)
    peft_config = None
    if config.method == "full":
        select_parameters(model, targets)
    else:
        peft_config = targets.lora_config(config.lora_r, config.lora_alpha, config.lora_dropout)
    args = T.sft_config(config, run, prec=prec, progress=progress, evaluate=eval_ds is not None,
                        completion_only_loss=config.completion_only_loss, router_aux_loss_coef=aux)
    trainer = T.build_trainer(model, tokenizer, train_ds, eval_ds, args, peft_config=peft_config, callbacks=callbacks)
    if config.method == "qlora" and moe:
        factor_experts(trainer.model, quantize=config.quantize_experts, device=getattr(model, STAGED, None))
    trainable = log_trainable(trainer.model, targets, total)
    metrics = T.train(trainer, checkpoint)
    final = T.save_final(trainer, run)

    history = trainer.state.log_history
    info = {"format": fmt, "examples": len(train_ds), "eval_examples": len(eval_ds) if eval_ds is not None else 0,
            "trainable": trainable, "total_params": total, "moe": moe,
            **loss_summary(history)}  # for the model card
    merged = out / MERGED_DIR if config.merge else None
    state = process_state()
    if state.is_main_process:
        publish(run, final, out, force=config.force, log_history=history,
                write=lambda tmp: write_extras(tmp, final, config, model_dir, tokenizer, info))
        logger.info(f"wrote {out}" + (f" and {merged}" if merged else ""))
    state.wait_for_everyone()
    return FinetuneResult(out, merged, {**metrics, **loss_summary(history)}, trainable, trainer)


# --- checks and loading ---------------------------------------------------------------------


def router_aux_coef(config: FinetuneConfig, targets: Targets, model_config) -> float | None:
    """Load balancing only while the router trains (frozen routers: 0, LLaMA-MoE's SFT choice);
    unset means the model config's own coefficient, made explicit."""
    coef = config.router_aux_loss_coef
    if "router" not in targets.groups:
        if coef:
            raise ConfigError(f"router_aux_loss_coef={coef} needs the router trained — "
                              "add router to --target or drop --aux-loss-coef (the router is frozen by default)")
        return 0.0 if hasattr(model_config, "router_aux_loss_coef") else None  # dense: TRL refuses any value
    return float(model_config.router_aux_loss_coef if coef is None else coef)


def check_packed_experts_parallelism(config: FinetuneConfig) -> None:
    """NF4-packed experts live outside the parameters FSDP and DeepSpeed shard: DDP (or one GPU) only.
    Checked in the launching process (the accelerate YAML) and in each worker (its environment)."""
    if config.method != "qlora" or config.quantize_experts is False:
        return
    sharded = [name for name, var in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
               if os.environ.get(var, "").lower() in ("1", "true")]
    sharded += [name for name, key in (("FSDP", "fsdp"), ("DeepSpeed", "deepspeed")) if config.trainer_args.get(key)]
    if config.accelerate_config:
        from moekit.train.launch import distributed_type

        sharded += {"FSDP": ["FSDP"], "DEEPSPEED": ["DeepSpeed"]}.get(distributed_type(config.accelerate_config), [])
    if sharded:
        raise ConfigError(f"qlora with experts packed to NF4 runs on one GPU or under DDP, not {sharded[0]} — use "
                          "--accelerate-config ddp, or --no-quantize-experts to keep the experts in bf16")


def load_data(config: FinetuneConfig, tokenizer):
    """(format, train, held-out or None), shaped for TRL; fails on unusable data before any write."""
    raw = D.load_source(config.data, split=config.data_split, subset=config.data_subset)
    fmt = D.detect_format(raw.column_names, config.data)
    train_raw, eval_raw = D.split_heldout(raw, config.eval_fraction, config.seed)
    shape = lambda ds: D.to_sft_dataset(ds, fmt, tokenizer, assistant_only_loss=config.assistant_only_loss,
                                        src=config.data)
    logger.info(f"data: {config.data} as {fmt}, {len(train_raw):,} examples"
                + (f" (+{len(eval_raw):,} held out)" if eval_raw is not None else ""))
    return fmt, shape(train_raw), (shape(eval_raw) if eval_raw is not None else None)


def load_for_method(config: FinetuneConfig, model_dir: Path, model_config, prec, *, moe: bool, total_params: int):
    quantization, staged = None, False
    if config.method == "qlora":
        quantization = T.bnb_4bit_config(quantization_skip_modules(model_config), compute_dtype=prec.dtype)
        if moe:
            sizes = expert_memory(model_config)
            staged = config.quantize_experts and not experts_fit_gpu(sizes.get("experts", 0))
            if staged:
                check_staging_memory(total_params * 2)
            experts = (f"the fused experts ({sizes.get('experts', 0) / 2**30:.2f} GiB in bf16) are loaded in bf16 and "
                       + ("then packed to NF4 by moekit (about a quarter of that)" if config.quantize_experts else
                          "stay bf16 (--no-quantize-experts)"))
            logger.info(f"QLoRA: bitsandbytes 4-bit quantizes nn.Linear layers (attention, shared expert, dense "
                        f"MLPs); {experts}; routers ({sizes.get('router', 0) / 2**20:.1f} MiB) stay bf16")
    logger.info(f"loading {config.model} ({prec.dtype} weights, bf16 autocast {'on' if prec.bf16 else 'off'})")
    load = dict(dtype=prec.dtype, moe=moe, experts_implementation=config.experts_implementation,
                quantization_config=quantization, revision=config.revision)
    if not staged:
        return T.load_model(model_dir, **load)
    return load_staged(model_dir, load, staging_device())


STAGED = "moekit_staged_on"  # attribute of a model whose experts wait on the CPU to be packed onto this device


def experts_fit_gpu(expert_bytes: int) -> bool:
    """Whether the bf16 experts can be loaded onto this process's GPU before being packed:
    they may take at most half of its free memory (the rest is the model and the packing)."""
    import torch

    free, _ = torch.cuda.mem_get_info(staging_device())
    return expert_bytes <= free // 2


def check_staging_memory(model_bytes: int) -> None:
    """Staging loads the whole bf16 model into CPU memory in every process of this machine."""
    import psutil

    procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # set by torchrun / accelerate launch
    need, free = procs * model_bytes * 1.1, psutil.virtual_memory().available
    if need > free:
        raise ConfigError(f"the experts do not fit on the GPU before packing, and staging them in CPU memory needs "
                          f"about {need / 2**30:.0f} GiB ({procs} process(es) x {model_bytes / 2**30:.0f} GiB in bf16) "
                          f"with {free / 2**30:.0f} GiB free — use fewer processes per machine or a larger GPU")


def staging_device():
    import torch

    from moekit.train.launch import process_state

    return torch.device("cuda", process_state().local_process_index)


def load_staged(model_dir: Path, load: dict, device):
    """QLoRA for experts larger than the GPU: load on the CPU (bitsandbytes quantizes the linear
    layers there), move everything but the bf16 experts to ``device``; :func:`factor_experts`
    then packs the experts onto ``device`` one at a time."""
    from moekit.finetune.expert_lora import move_except_experts

    logger.info(f"QLoRA: the bf16 experts do not fit on {device} before packing — loading the model into CPU "
                f"memory first (the model's bf16 size in RAM, per process), then packing each expert onto {device}")
    model = T.load_model(model_dir, **load, device_map={"": "cpu"})
    move_except_experts(model, device)
    model.hf_device_map = {"": device.index if device.type == "cuda" else device.type}
    setattr(model, STAGED, device)
    return model


def factor_experts(model, *, quantize: bool, device=None) -> None:
    """QLoRA on an MoE: LoRA on experts computed per expert (no ΔW stacks), experts optionally NF4;
    ``device``: experts staged on the CPU are packed onto it, and their LoRA factors follow."""
    from moekit.finetune.expert_lora import install

    counts = install(model, quantize=quantize, device=device)
    if device is not None:
        model.to(device)  # the expert LoRA factors, made next to the CPU experts
    logger.info(f"experts: moekit's per-expert loop (factored LoRA) on {counts['wrapped']} LoRA-wrapped layers"
                + (f"; {counts['quantized']} layers packed to NF4 ({counts['freed'] / 2**30:.2f} GiB freed), "
                   "so they run that loop too, not transformers' kernel" if quantize else
                   "; expert weights kept in bf16"))


def log_trainable(model, targets: Targets, total: int) -> dict[str, int]:
    counts = trainable_by_group(model, targets)
    parts = " · ".join(f"{g} {n:,}" for g, n in counts.items())
    logger.info(f"trainable: {parts} ({sum(counts.values()) / max(total, 1):.2%} of {total:,} parameters)")
    return counts


# --- output ---------------------------------------------------------------------------------


def write_extras(tmp: Path, final: Path, config: FinetuneConfig, model_dir: Path, tokenizer, info: dict) -> None:
    """Card, recipe and (``merge``) the merged model; ``final`` is moved in afterwards."""
    from moekit.finetune.card import finetune_card

    recipe = write_recipe(tmp, config, "finetune")
    adapter = config.method != "full"
    if adapter:
        _point_adapter_at_base(final, config)
    kind = "adapter" if adapter else "full"
    (tmp / "README.md").write_text(finetune_card(config, kind=kind, info=info, recipe=recipe, model_dir=model_dir))
    if config.merge:
        merged = tmp / MERGED_DIR
        merge_adapter(model_dir, final, merged, revision=config.revision)
        tokenizer.save_pretrained(merged)
        write_recipe(merged, config, "finetune")
        (merged / "README.md").write_text(finetune_card(config, kind="merged", info=info, recipe=recipe,
                                                        model_dir=model_dir))


def _point_adapter_at_base(final: Path, config: FinetuneConfig) -> None:
    """adapter_config.json names the base as the user gave it (a Hub id, or an absolute path)."""
    from moekit.finetune.card import hub_id

    path = final / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["base_model_name_or_path"] = hub_id(config.model) or str(Path(config.model).expanduser().resolve())
    cfg["revision"] = config.revision
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def merge_adapter(model_dir: Path, adapter_dir: Path, dest: Path, *, revision: str | None = None) -> Path:
    """Base weights (their own dtype, unquantized) + adapter -> a stock checkpoint in ``dest``.

    Experts are written in transformers' default (per-expert) layout, which vLLM reads.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", revision=revision, trust_remote_code=False)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(dest)
    return dest
