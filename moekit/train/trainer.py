"""The one training path: load the model, build TRL's ``SFTTrainer``, train, save.

Data flow: ``require_train_extra`` / ``require_4bit`` (before anything is loaded or
written) -> ``precision`` -> ``load_model`` (dtype, experts kernel, optional 4-bit)
-> ``prepare_run`` (the run folder, the checkpoint to resume) -> ``sft_config`` ->
``build_trainer`` -> ``train`` -> ``save_final`` -> ``publish`` (moekit.train.output).
Finetuning and pretraining call the same functions with different options and PEFT
configs (or none).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from moekit.errors import ConfigError, MissingDependencyError
from moekit.train.log import logger
from moekit.train.options import TrainingOptions, run_dir

TRAIN_EXTRA = "pip install 'moekit[train]'"


# --- environment ----------------------------------------------------------------------------


def require_train_extra(report_to: list[str] = ()) -> None:
    """peft, trl, datasets (and tensorboard when reported to) are the ``train`` extra; say how to get them."""
    import importlib.util

    needed = ["peft", "trl", "datasets"] + (["tensorboard"] if "tensorboard" in report_to else [])
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(f"training needs {', '.join(missing)} — {TRAIN_EXTRA}")


def require_4bit() -> None:
    """4-bit loading needs CUDA and bitsandbytes (checked before anything is loaded)."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise ConfigError("method=qlora needs a CUDA GPU (bitsandbytes 4-bit) and none is visible — "
                          "use --method lora on this machine, or run on a GPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MissingDependencyError("method=qlora needs bitsandbytes — pip install bitsandbytes")


@dataclass(frozen=True)
class Precision:
    dtype: str  # weights at load time
    bf16: bool  # mixed precision in the trainer


def precision(options: TrainingOptions, *, adapters: bool, quantized: bool = False) -> Precision:
    """Weight dtype and mixed precision, set explicitly (TRL turns bf16 on by default, also on CPU).

    CUDA: bf16 autocast when supported; adapter runs keep the frozen base in bf16, full
    runs keep fp32 master weights. CPU: fp32, no autocast.
    """
    import torch

    cuda = torch.cuda.is_available()
    bf16_ok = cuda and torch.cuda.is_bf16_supported()
    bf16 = bf16_ok if options.bf16 is None else options.bf16
    if options.dtype != "auto":
        return Precision(options.dtype, bf16)
    if quantized or (cuda and adapters):
        return Precision("bfloat16" if bf16_ok else "float16", bf16)
    return Precision("float32", bf16)


# --- model ----------------------------------------------------------------------------------


def load_model(model_dir: Path, *, dtype: str, moe: bool, experts_implementation: str | None = None,
               quantization_config=None, revision: str | None = None, device_map=None):
    """``AutoModelForCausalLM`` with stock code only; MoE models use fused experts (``grouped_mm``).

    ``quantization_config`` (a ``BitsAndBytesConfig``) places the model on this process's GPU,
    unless ``device_map`` says otherwise.
    """
    import torch
    from transformers import AutoModelForCausalLM

    kw = {"dtype": getattr(torch, dtype), "trust_remote_code": False, "revision": revision}
    if moe:
        kw["experts_implementation"] = experts_implementation or "grouped_mm"
    if quantization_config is not None:
        from moekit.train.launch import process_state

        kw["quantization_config"] = quantization_config
        kw["device_map"] = device_map or {"": process_state().local_process_index}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kw)
    if moe:
        impl = getattr(model.config, "_experts_implementation", None) or kw["experts_implementation"]
        device = "CUDA" if torch.cuda.is_available() else "CPU"
        logger.info(f"experts: {impl} on {device} (transformers' fused-experts kernel; set experts_implementation to change)")
    return model


def bnb_4bit_config(skip_modules: list[str], compute_dtype: str = "bfloat16"):
    """QLoRA's NF4 + double quantization for ``nn.Linear`` layers only.

    bitsandbytes' experimental parameter quantization is never used: combined with PEFT
    ``target_parameters`` (LoRA on fused experts) its parametrization stacks up every forward.
    ``skip_modules`` replaces transformers' default skip list, so it must name ``lm_head``.
    """
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
                              llm_int8_skip_modules=list(skip_modules))


def load_tokenizer(model_dir: Path, revision: str | None = None):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, revision=revision, trust_remote_code=False)
    except (OSError, ValueError) as e:
        from moekit.errors import InputError

        raise InputError(f"{model_dir} has no usable tokenizer ({str(e).splitlines()[0][:120]}) — "
                         "save the tokenizer into the model folder") from None


# --- run folder -----------------------------------------------------------------------------


def prepare_run(output: str | Path, options: TrainingOptions) -> tuple[Path, str | None]:
    """The run folder (created) and the checkpoint to resume from, if any.

    Checkpoints live in :func:`run_dir` until the output is published, so an interrupted
    run leaves no output folder but can be resumed with ``resume_from_checkpoint=True``.
    """
    from transformers.trainer_utils import get_last_checkpoint

    from moekit.train.launch import process_state

    run, resume = run_dir(output), options.resume_from_checkpoint
    state = process_state()
    checkpoint = None
    if isinstance(resume, str):
        if not Path(resume, "trainer_state.json").is_file():
            raise ConfigError(f"resume_from_checkpoint={resume!r} is not a checkpoint folder (no trainer_state.json) — "
                              f"pass a checkpoint-N folder or --resume to use the last one in {run}")
        checkpoint = resume
    elif resume:
        checkpoint = get_last_checkpoint(str(run)) if run.is_dir() else None
        if checkpoint is None:
            raise ConfigError(f"--resume: no checkpoint in {run} — run again without --resume to start afresh")
    elif run.exists() and not options.force:
        raise ConfigError(f"{run} holds the checkpoints of an interrupted run for {output} — "
                          "pass --resume to continue it or --force to start over")
    state.wait_for_everyone()  # every process has looked before the main one changes anything
    if state.is_main_process:
        if run.exists() and not resume:
            shutil.rmtree(run)
        run.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    if checkpoint:
        logger.info(f"resuming from {checkpoint}")
    return run, checkpoint


# --- trainer --------------------------------------------------------------------------------


def sft_config(options: TrainingOptions, run: Path, *, prec: Precision, progress: bool, evaluate: bool,
               completion_only_loss: bool | None = None, router_aux_loss_coef: float | None = None,
               overrides: dict | None = None):
    """TRL's ``SFTConfig`` with every default that TRL and transformers disagree on set explicitly.

    ``overrides``: further ``SFTConfig`` fields the command itself decides (e.g. pretrain's
    pre-packed data); the recipe's ``trainer_args`` still come last.
    """
    import torch
    from trl import SFTConfig

    from moekit.train.launch import cpu_only

    o = options
    checkpointing = bool(o.gradient_checkpointing)
    kwargs = dict(
        output_dir=str(run),
        learning_rate=o.learning_rate,  # TRL 2e-5, transformers 5e-5: never implicit
        lr_scheduler_type=o.lr_scheduler_type,
        warmup_steps=o.warmup_steps,
        weight_decay=o.weight_decay,
        max_grad_norm=o.max_grad_norm,
        num_train_epochs=o.num_train_epochs,
        max_steps=o.max_steps,
        per_device_train_batch_size=o.per_device_train_batch_size,
        per_device_eval_batch_size=o.per_device_train_batch_size,
        gradient_accumulation_steps=o.gradient_accumulation_steps,
        # TRL turns checkpointing on by default; non-reentrant works with frozen embeddings and PEFT.
        activation_checkpointing=checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        bf16=prec.bf16,  # TRL defaults to True, even on CPU
        fp16=False,
        max_length=o.max_length,
        packing=o.packing,
        packing_strategy=o.packing_strategy,
        completion_only_loss=completion_only_loss,
        assistant_only_loss=False,  # chat data arrives with its labels already masked (moekit.train.data)
        router_aux_loss_coef=router_aux_loss_coef,
        seed=o.seed,
        data_seed=o.seed,
        logging_strategy="steps",
        logging_steps=o.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=(o.eval_steps or o.save_steps) if evaluate else None,
        save_strategy="steps",
        save_steps=o.save_steps,
        save_total_limit=o.save_total_limit,
        report_to=o.report_to,
        disable_tqdm=not progress,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=cpu_only(),  # CPU workers under torchrun: DDP over gloo
        # every buffer is identical on every rank (rotary tables; NF4-packed experts, GiBs): never re-send them
        ddp_broadcast_buffers=False,
    )
    kwargs.update(overrides or {})
    kwargs.update(o.trainer_args)  # recipe pass-through (validated against SFTConfig, never a managed key)
    return SFTConfig(**kwargs)


ROUTER_SETTINGS = ("output_router_logits", "router_aux_loss_coef")


def build_trainer(model, tokenizer, train_dataset, eval_dataset, args, *, peft_config=None, callbacks=(),
                  trainer_cls=None):
    """TRL's ``SFTTrainer`` (or ``trainer_cls``, a subclass adding loss terms); remembers the model's
    router settings, which TRL rewrites for the aux loss."""
    from trl import SFTTrainer

    text_config = model.config.get_text_config()
    loaded = {k: getattr(text_config, k) for k in ROUTER_SETTINGS if hasattr(text_config, k)}
    trainer = (trainer_cls or SFTTrainer)(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                                          processing_class=tokenizer, peft_config=peft_config,
                                          callbacks=list(callbacks) or None)
    trainer.moekit_router_settings = loaded
    acc = trainer.accelerator
    if acc.num_processes > 1:
        fsdp = f" v{acc.state.fsdp_plugin.fsdp_version}" if trainer.is_fsdp_enabled else ""
        logger.info(f"{acc.num_processes} processes: {acc.distributed_type.value}{fsdp} "
                    f"({'gloo on CPU' if acc.device.type == 'cpu' else acc.device.type}), "
                    f"mixed precision {acc.mixed_precision}")
    return trainer


def train(trainer, checkpoint: str | None = None) -> dict:
    """Train (resuming from ``checkpoint``); the model keeps its own router settings for saving."""
    if checkpoint:
        restore_converted_weights(trainer, checkpoint)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    text_config = trainer.model.config.get_text_config()
    for key, value in getattr(trainer, "moekit_router_settings", {}).items():
        setattr(text_config, key, value)
    return dict(result.metrics)


def restore_converted_weights(trainer, checkpoint: str) -> int:
    """Load the checkpoint weights that transformers' Trainer would silently skip on resume.

    The Trainer reloads a full-model checkpoint with ``load_state_dict(strict=False)``, but
    ``save_pretrained`` wrote fused MoE experts in the per-expert layout, so the experts would
    stay at their initial values. ``from_pretrained`` converts the layout; the tensors the plain
    load cannot match are copied in before training resumes (the Trainer's own load then
    leaves them alone). Adapters, FSDP and DeepSpeed checkpoints have their own formats.
    Returns the number of tensors restored.
    """
    import torch
    from safetensors import safe_open

    model = trainer.model
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled or hasattr(model, "peft_config"):
        return 0
    saved = set()
    for f in Path(checkpoint).glob("model*.safetensors"):
        with safe_open(str(f), "pt") as h:
            saved.update(h.keys())
    own = model.state_dict()
    loaded = {own[k].data_ptr() for k in own if k in saved}  # tied weights come with their twin
    missing = [k for k in own if k not in saved and own[k].data_ptr() not in loaded]
    if not saved or not missing:
        return 0
    fresh = type(model).from_pretrained(checkpoint, dtype=next(model.parameters()).dtype).state_dict()
    with torch.no_grad():
        for k in missing:
            own[k].copy_(fresh[k])
    logger.info(f"resume: restored {len(missing)} tensors the checkpoint stores in another layout (fused experts)")
    return len(missing)


def save_final(trainer, run: Path) -> Path:
    """The trained weights (adapter or full model) and tokenizer in ``run/final``, gathered across processes."""
    final = run / "final"
    trainer.save_model(str(final))
    if trainer.accelerator.is_main_process:
        (final / "training_args.bin").unlink(missing_ok=True)  # a pickle; the recipe records the settings
        (final / "README.md").unlink(missing_ok=True)  # PEFT's template card; the command writes its own
    trainer.accelerator.wait_for_everyone()
    return final


def meta_model(model_config):
    """The model's modules with no memory behind them (shapes and names only)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config)


def parameter_count(model_config) -> int:
    """Parameters of the model as defined: a model in memory may be 4-bit (packed bytes count) or
    sharded across processes (FSDP, ZeRO-3), so its live parameters undercount."""
    return sum(p.numel() for p in meta_model(model_config).parameters())


def load_model_config(model_dir: Path, needs: str):
    """The model's stock transformers config (no remote code); ``needs`` ends the error's fix."""
    from transformers import AutoConfig

    from moekit.errors import InputError, UnsupportedModelError

    if not (model_dir / "config.json").is_file():
        raise InputError(f"{model_dir} has no config.json — point MODEL at a transformers model folder")
    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as e:
        raise UnsupportedModelError(f"cannot read {model_dir}/config.json as a stock transformers config "
                                    f"({str(e).splitlines()[0][:120]}) — {needs}") from None
