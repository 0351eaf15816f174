"""Trainer settings shared by every training command (finetune, pretrain).

A command's config dataclass inherits :class:`TrainingOptions` and adds its own
fields (model, data, what to train). Field names follow TRL's ``SFTConfig`` /
transformers' ``TrainingArguments`` so a recipe reads like a TRL one; they are
turned into an ``SFTConfig`` in one place (:func:`moekit.train.trainer.sft_config`),
with every default TRL and transformers disagree on set explicitly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from moekit.errors import ConfigError

DTYPES = ("auto", "bfloat16", "float16", "float32")
PACKING_STRATEGIES = ("bfd", "bfd_split", "wrapped")
EXPERTS_IMPLEMENTATIONS = ("grouped_mm", "batched_mm", "eager")
# Settings moekit derives itself; trainer_args may not override them behind the config's back.
MANAGED_ARGS = ("output_dir", "resume_from_checkpoint", "disable_tqdm", "activation_checkpointing",
                "gradient_checkpointing", "gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")


@dataclass(kw_only=True)
class TrainingOptions:
    """How to train, independent of what is trained.

    Args:
        max_length: tokens per example (truncated beyond), or per packed sequence.
        packing: pack several examples into each ``max_length`` sequence (TRL ``packing``).
        packing_strategy: ``bfd`` keeps examples whole, ``bfd_split`` splits long ones, ``wrapped`` concatenates.
        eval_fraction: share of the examples held out for evaluation (0 = no held-out split).
        learning_rate: peak learning rate; ``None`` lets the command pick (finetune: 2e-4 LoRA, 2e-5 full).
        lr_scheduler_type: transformers scheduler name (``cosine``, ``linear``, ``constant`` ...).
        warmup_steps: warm-up steps, or a fraction of all steps when below 1.
        weight_decay, max_grad_norm: AdamW weight decay and gradient clipping.
        num_train_epochs, max_steps: run length; ``max_steps`` > 0 wins over epochs.
        per_device_train_batch_size, gradient_accumulation_steps: batch = their product x processes.
        gradient_checkpointing: recompute activations in backward (less memory, ~20% slower).
        bf16: bfloat16 mixed precision; ``None`` = on when the GPU supports it, off on CPU.
        dtype: weight dtype at load time; ``auto`` = bfloat16 on CUDA for adapters, else float32.
        experts_implementation: fused-experts kernel; ``None`` = ``grouped_mm`` (transformers' fused path).
        router_aux_loss_coef: load-balancing loss weight (``None`` = the command decides).
        seed: seeds data order, adapters and dropout.
        logging_steps, eval_steps, save_steps, save_total_limit: log / evaluate / checkpoint cadence.
        report_to: trainer integrations (``tensorboard``; ``none`` for nothing).
        resume_from_checkpoint: ``True`` = the last checkpoint of the interrupted run for this output,
            or a checkpoint folder.
        force: replace an existing output (and discard an interrupted run's checkpoints).
        accelerate_config: ``ddp``, ``fsdp2``, ``zero2``, ``zero3`` or an accelerate YAML: run under
            ``accelerate launch`` (the CLI relaunches itself).
        num_processes: processes for ``accelerate launch`` (default: the accelerate config's).
        trainer_args: any other ``SFTConfig`` field, passed through as is.
    """

    max_length: int = 1024
    packing: bool = False
    packing_strategy: str = "bfd"
    eval_fraction: float = 0.0
    learning_rate: float | None = None
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 8
    gradient_checkpointing: bool = True
    bf16: bool | None = None
    dtype: str = "auto"
    experts_implementation: str | None = None
    router_aux_loss_coef: float | None = None
    seed: int = 0
    logging_steps: int = 10
    eval_steps: int | None = None
    save_steps: int = 500
    save_total_limit: int | None = 2
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    resume_from_checkpoint: bool | str = False
    force: bool = False
    accelerate_config: str | None = None
    num_processes: int | None = None
    trainer_args: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("max_length", "per_device_train_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "save_steps"):
            _positive_int(self, name)
        for name in ("eval_steps", "save_total_limit", "num_processes"):
            if getattr(self, name) is not None:
                _positive_int(self, name)
        if not isinstance(self.max_steps, int) or self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"max_steps={self.max_steps!r} must be a positive integer or -1 (use num_train_epochs)")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction={self.eval_fraction!r} must be in [0, 1) — e.g. --eval-fraction 0.05")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ConfigError(f"learning_rate={self.learning_rate!r} must be positive — e.g. --learning-rate 2e-4")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps={self.warmup_steps!r} must be >= 0 (steps, or a fraction below 1)")
        if self.num_train_epochs <= 0:
            raise ConfigError(f"num_train_epochs={self.num_train_epochs!r} must be positive — e.g. --num-train-epochs 1")
        _choice(self, "packing_strategy", PACKING_STRATEGIES)
        _choice(self, "dtype", DTYPES)
        if self.experts_implementation is not None:
            _choice(self, "experts_implementation", EXPERTS_IMPLEMENTATIONS)
        if self.router_aux_loss_coef is not None and self.router_aux_loss_coef < 0:
            raise ConfigError(f"router_aux_loss_coef={self.router_aux_loss_coef!r} must be >= 0 — e.g. --aux-loss-coef 0.01")
        if isinstance(self.report_to, str):
            self.report_to = [s.strip() for s in self.report_to.split(",") if s.strip()]
        if self.accelerate_config is not None:
            from moekit.train.launch import accelerate_config_path

            accelerate_config_path(self.accelerate_config)
        self._check_trainer_args()

    def _check_trainer_args(self) -> None:
        if not isinstance(self.trainer_args, dict):
            raise ConfigError("trainer_args must be a mapping of SFTConfig fields, e.g. {weight_decay: 0.1}")
        if not self.trainer_args:
            return
        try:
            from trl import SFTConfig
        except ImportError:  # checked again, with the install command, when training starts
            return
        valid = {f.name for f in dataclasses.fields(SFTConfig)}
        own = {f.name for f in dataclasses.fields(TrainingOptions)} - {"trainer_args"}
        for key in self.trainer_args:
            if key in own:
                raise ConfigError(f"trainer_args.{key} duplicates the setting {key} — set {key} directly instead")
            if key in MANAGED_ARGS:
                raise ConfigError(f"trainer_args.{key} is managed by moekit — remove it (see moekit --help for the flag)")
            if key not in valid:
                raise ConfigError(f"trainer_args.{key} is not an SFTConfig field — check the spelling against TRL's SFTConfig")


def _positive_int(obj, name: str) -> None:
    value = getattr(obj, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name}={value!r} must be a positive integer — e.g. --{name.replace('_', '-')} 8")


def _choice(obj, name: str, choices) -> None:
    value = getattr(obj, name)
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not supported — use one of {', '.join(choices)}")


def run_dir(output: str | Path) -> Path:
    """Where checkpoints and logs of the run writing ``output`` live until it finishes.

    A sibling of ``output`` (same filesystem, so finished files are moved, not copied),
    found again by ``resume_from_checkpoint=True`` after an interruption.
    """
    output = Path(output)
    return output.with_name(f".{output.name}.moekit-run")
