"""``moekit pretrain``: continued pretraining of an upcycled MoE (or a dense model) on raw text.

Data flow: check everything that can fail cheaply (output, model, what to train, losses,
teacher tokenizer) -> tokenise and pack the data (cached) -> load model (and teacher)
-> the shared training path of ``moekit.train`` with :class:`PretrainTrainer` -> publish
the output atomically (stock checkpoint, tokenizer, card, recipe, logs, expert load).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from moekit.errors import ConfigError, InputError, OutputExistsError, UnsupportedModelError
from moekit.pretrain.config import PretrainConfig
from moekit.pretrain.data import PretrainData, prepare_data
from moekit.pretrain.trainer import EXPERT_LOAD_FILE, LossSettings, PretrainTrainer, RouterWarmup
from moekit.train import trainer as T
from moekit.train.log import logger
from moekit.train.output import loss_summary, publish, write_recipe


@dataclass
class PretrainResult:
    """What a run produced. ``trainer`` holds the trained model (``trainer.model``)."""

    output: Path
    metrics: dict
    tokens: int
    trainer: object = None


def pretrain(config: PretrainConfig, *, progress: bool = True, callbacks=()) -> PretrainResult:
    """Continue pretraining ``config.model`` on ``config.data`` and write ``config.output``.

    Everything that can be checked cheaply — output folder, model type, what to train, loss
    settings, the teacher's tokenizer, every data source — is checked, and the data tokenised,
    before anything is written. ``callbacks`` are extra transformers ``TrainerCallback`` objects.

    Example:
        >>> from moekit.pretrain import PretrainConfig, pretrain
        >>> cfg = PretrainConfig("moe", "moe-cpt", data=["notes.txt"], max_tokens=1_000_000,
        ...                      router_aux_loss_coef=0.01, teacher="dense", eval_fraction=0.05)
        >>> pretrain(cfg).output   # doctest: +SKIP
        PosixPath('moe-cpt')
    """
    plan = plan_run(config)
    run, checkpoint = T.prepare_run(Path(plan.config.output), plan.config)
    trainer = build_trainer(plan, run, progress=progress, callbacks=callbacks)
    metrics = T.train(trainer, checkpoint)
    final = T.save_final(trainer, run)
    return finish(plan, trainer, run, final, metrics)


@dataclass
class Plan:
    """A run checked and resolved, its data tokenised; nothing written yet."""

    config: PretrainConfig
    model_dir: Path
    model_config: object
    moe: bool
    targets: object  # finetune Targets, or None for every parameter
    tokenizer: object
    teacher_dir: Path | None
    data: PretrainData
    tokens_per_step: int
    max_steps: int
    precision: object


def plan_run(config: PretrainConfig) -> Plan:
    from moekit.io import resolve_model_dir
    from moekit.train.launch import launched, process_state

    T.require_train_extra(config.report_to)
    if config.accelerate_config and not launched():
        raise ConfigError("accelerate_config runs the command under accelerate launch — use the moekit CLI "
                          "(moekit pretrain ... --accelerate-config NAME) or start your script with accelerate launch")
    if Path(config.output).exists() and not config.force:
        raise OutputExistsError(f"output {config.output} already exists — choose another path or pass --force to overwrite it")
    model_dir = resolve_model_dir(config.model, config.revision)
    model_config = T.load_model_config(model_dir, "pretrain needs a stock causal LM (an upcycled Mixtral / Qwen2-MoE, or LLaMA)")
    moe = is_moe(model_config)
    targets = resolve_train(model_config, config.train)
    # the resolved coefficient goes into the recipe and the card
    config = dataclasses.replace(config, router_aux_loss_coef=router_aux_coef(config, model_config, moe))
    tokenizer = T.load_tokenizer(model_dir, config.revision)
    teacher_dir = check_teacher(config, tokenizer, model_config) if config.teacher else None
    data = prepare_data(config, tokenizer)
    blocks_per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * process_state().num_processes
    tokens_per_step = config.max_length * blocks_per_step
    data.train = whole_steps(data.train, blocks_per_step, config.max_length)
    max_steps = config.max_steps if config.max_tokens is None else math.ceil(config.max_tokens / tokens_per_step)
    return Plan(config, model_dir, model_config, moe, targets, tokenizer, teacher_dir, data, tokens_per_step,
                max_steps, T.precision(config, adapters=False))


def build_trainer(plan: Plan, run: Path, *, progress: bool, callbacks=()):
    """Model (and teacher) loaded, parameters selected, TRL's trainer with the pretraining terms."""
    from moekit.finetune.targets import select_parameters

    config, prec = plan.config, plan.precision
    logger.info(f"loading {config.model} ({prec.dtype} weights, bf16 autocast {'on' if prec.bf16 else 'off'})")
    model = T.load_model(plan.model_dir, dtype=prec.dtype, moe=plan.moe, revision=config.revision,
                         experts_implementation=config.experts_implementation)
    if plan.targets is not None:
        select_parameters(model, plan.targets)
    teacher = None
    if plan.teacher_dir:  # never trains: no fp32 master copy under bf16 autocast
        teacher = T.load_model(plan.teacher_dir, dtype="bfloat16" if prec.bf16 else prec.dtype, moe=False)
    evaluate = plan.data.eval is not None
    options = dataclasses.replace(config, max_steps=plan.max_steps, max_tokens=None)
    args = T.sft_config(options, run, prec=prec, progress=progress, evaluate=evaluate,
                        router_aux_loss_coef=config.router_aux_loss_coef, overrides=dict(
                            packing=False,  # the blocks are packed already
                            dataset_kwargs={"skip_prepare_dataset": True},
                            eval_on_start=evaluate,  # the curve starts at the untrained model
                            ddp_find_unused_parameters=True if config.router_warmup_steps else None))
    losses = LossSettings(config.z_loss_coef, teacher, config.distill_weight, config.distill_temperature)
    trainer_cls = functools.partial(PretrainTrainer, losses=losses, tokens_per_step=plan.tokens_per_step, run=run)
    extra = [RouterWarmup(config.router_warmup_steps)] if config.router_warmup_steps else []
    trainer = T.build_trainer(model, plan.tokenizer, plan.data.train, plan.data.eval, args,
                              callbacks=[*callbacks, *extra], trainer_cls=trainer_cls)
    trainer.moekit_trainable = log_trainable(trainer.model, plan.model_config)
    logger.info(f"{plan.tokens_per_step:,} tokens per step ({config.max_length} x {config.per_device_train_batch_size}"
                f" x {config.gradient_accumulation_steps} x {trainer.accelerator.num_processes} processes)"
                + (f", {plan.max_steps:,} steps" if plan.max_steps > 0 else ""))
    return trainer


def finish(plan: Plan, trainer, run: Path, final: Path, metrics: dict) -> PretrainResult:
    """Publish the output (main process) with its card, recipe and logs."""
    from moekit.train.launch import process_state

    config, history = plan.config, trainer.state.log_history
    tokens = trainer.state.global_step * plan.tokens_per_step
    info = {"tokens": tokens, "tokens_per_step": plan.tokens_per_step, "trainable": trainer.moekit_trainable,
            "moe": plan.moe, "total_params": T.parameter_count(plan.model_config),
            "sources": plan.data.sources, "eval_blocks": plan.data.eval_blocks, "final_eval": final_eval(history),
            **loss_summary(history)}
    state = process_state()
    if state.is_main_process:
        publish(run, final, config.output, force=config.force, log_history=history,
                write=lambda tmp: write_extras(tmp, run, config, plan.model_dir, info))
        logger.info(f"wrote {config.output} ({tokens:,} tokens in {trainer.state.global_step:,} steps)")
    state.wait_for_everyone()
    return PretrainResult(Path(config.output), {**metrics, **loss_summary(history), **info["final_eval"]}, tokens,
                          trainer)


def whole_steps(train, unit: int, max_length: int):
    """A map-style mixture cut to a multiple of ``unit`` blocks (one optimizer step, all processes),
    so that every step, at epoch ends too, trains on exactly the same number of tokens."""
    if not hasattr(train, "_fingerprint"):  # streaming
        return train
    usable = len(train) // unit * unit
    if usable == 0:
        raise InputError(f"the data gives {len(train)} blocks of {max_length} tokens, fewer than one step ({unit}) — "
                         "give more text or lower --max-length, the batch size or gradient accumulation")
    return train.select(range(usable)) if usable < len(train) else train


# --- checks ---------------------------------------------------------------------------------


def is_moe(model_config) -> bool:
    cfg = model_config.get_text_config()
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    return bool(experts) and getattr(cfg, "num_experts_per_tok", None) is not None


def resolve_train(model_config, train: list[str]):
    """``None`` for ``all`` (every parameter, embeddings and norms too), else the groups' Targets."""
    if train == ["all"]:
        return None
    from moekit.finetune.targets import resolve_targets

    try:
        return resolve_targets(model_config, train, "full")
    except UnsupportedModelError:
        raise UnsupportedModelError(f"--train {','.join(train)} knows the groups of llama, mistral, mixtral and "
                                    f"qwen2_moe models, not {model_config.model_type!r} — use --train all") from None


def router_aux_coef(config: PretrainConfig, model_config, moe: bool) -> float | None:
    """The load-balancing weight to train with: unset means the model config's own, made explicit
    (recorded in the recipe); 0 while the router is frozen; ``None`` for dense models."""
    if not moe:
        for name in ("router_aux_loss_coef", "z_loss_coef", "router_warmup_steps"):
            if getattr(config, name):
                raise ConfigError(f"{name}={getattr(config, name)} needs an MoE model, and {config.model} is a dense "
                                  f"{model_config.model_type} — upcycle it first (moekit upcycle) or drop the setting")
        return None
    if "all" not in config.train and "router" not in config.train:
        return 0.0
    coef = config.router_aux_loss_coef
    return float(getattr(model_config.get_text_config(), "router_aux_loss_coef", 0.0) if coef is None else coef)


def check_teacher(config: PretrainConfig, tokenizer, model_config) -> Path:
    """The teacher's folder, after checking it tokenises exactly like the student and scores the same vocabulary."""
    from moekit.io import resolve_model_dir

    teacher_dir = resolve_model_dir(config.teacher)
    teacher_config = T.load_model_config(teacher_dir, "the teacher must be a stock causal LM (the dense source)")
    teacher_tok = T.load_tokenizer(teacher_dir)
    why = None
    if teacher_tok.get_vocab() != tokenizer.get_vocab():
        why = "different vocabularies"
    elif (teacher_tok.bos_token_id, teacher_tok.eos_token_id) != (tokenizer.bos_token_id, tokenizer.eos_token_id):
        why = "different BOS/EOS tokens"
    elif teacher_config.get_text_config().vocab_size != model_config.get_text_config().vocab_size:
        why = "different vocab_size in config.json"
    if why:
        raise InputError(f"teacher {config.teacher} does not share {config.model}'s tokenizer ({why}) — distil from "
                         "the dense model MODEL was upcycled from, or another with the same tokenizer")
    return teacher_dir


def log_trainable(model, model_config) -> dict[str, int]:
    """Trainable parameters per group (``other``: embeddings, norms, lm_head), logged."""
    from moekit.finetune.targets import resolve_targets, trainable_by_group

    total = sum(p.numel() for p in model.parameters())
    try:
        counts = trainable_by_group(model, resolve_targets(model_config, ["all"], "full"))
    except UnsupportedModelError:
        counts = {"all": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    parts = " · ".join(f"{g} {n:,}" for g, n in counts.items())
    logger.info(f"trainable: {parts} ({sum(counts.values()) / max(total, 1):.2%} of {total:,} parameters)")
    return counts


def final_eval(history: list[dict]) -> dict:
    """The last held-out evaluation's figures (perplexity, expert load), without the ``eval_`` prefix."""
    evals = [e for e in history if "eval_loss" in e]
    if not evals:
        return {}
    last = evals[-1]
    keep = ("loss", "perplexity", "expert_load_max_min", "expert_load_max_frac", "idle_experts", "router_entropy",
            "router_entropy_norm")
    out = {k: last[f"eval_{k}"] for k in keep if f"eval_{k}" in last}
    out["step"] = last.get("step")
    if len(evals) > 1 and "eval_perplexity" in evals[0]:
        out["start_perplexity"] = evals[0]["eval_perplexity"]
    return out


# --- output ---------------------------------------------------------------------------------


def write_extras(tmp: Path, run: Path, config: PretrainConfig, model_dir: Path, info: dict) -> None:
    """Card, resolved recipe and the per-evaluation expert load; the weights are moved in afterwards."""
    from moekit.pretrain.card import pretrain_card

    recipe = write_recipe(tmp, config, "pretrain")
    if (run / EXPERT_LOAD_FILE).is_file():
        shutil.copy(run / EXPERT_LOAD_FILE, tmp / EXPERT_LOAD_FILE)
    (tmp / "README.md").write_text(pretrain_card(config, info=info, recipe=recipe, model_dir=model_dir))


__all__ = ["Plan", "PretrainResult", "pretrain"]
