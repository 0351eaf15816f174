"""The settings of one fine-tuning run, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

from moekit.errors import ConfigError
from moekit.finetune.targets import ADAPTER_METHODS, METHODS, TARGET_CHOICES, check_combination
from moekit.train.options import TrainingOptions

DEFAULT_LR = {"lora": 2e-4, "qlora": 2e-4, "full": 2e-5}


@dataclass
class FinetuneConfig(TrainingOptions):
    """Everything ``moekit finetune`` needs; the CLI, YAML recipes (``finetune:``) and Python share it.

    Training settings (learning rate, batch, packing, checkpoints ...) come from
    :class:`moekit.train.TrainingOptions`; names follow TRL's ``SFTConfig``.

    Args:
        model: MoE (Mixtral / Qwen2-MoE) or dense LLaMA folder, or Hub repo id.
        output: folder to create: the adapter (lora/qlora) or the full model (full).
        data: training data: JSONL / JSON / Parquet / CSV / text file, folder, glob or Hub dataset id,
            with ``messages``, ``prompt``+``completion``, Alpaca ``instruction``/``input``/``output``, or ``text``.
        method: ``lora``, ``qlora`` (4-bit base, CUDA + bitsandbytes) or ``full``.
        quantize_experts: qlora only: keep the fused experts in NF4 too, with LoRA on them computed
            per expert (``None``: on for qlora). Off, the experts stay bf16 (bitsandbytes quantizes
            ``nn.Linear`` only).
        target: groups to train, any of ``attention``, ``experts``, ``router``, ``shared``, ``mlp``
            (dense FFNs), or ``all``; a list or a comma-separated string. ``None``: attention for
            lora/qlora, everything but the router for full.
        lora_r, lora_alpha, lora_dropout: LoRA rank, scale and dropout (TRL's names). Dropout must be 0
            when the experts are targeted.
        merge: also write ``OUT/merged``, the adapter merged into the base (a stock checkpoint).
        data_split, data_subset: split and configuration of a Hub dataset.
        completion_only_loss: prompt/completion and Alpaca data: loss on the completion only.
        assistant_only_loss: chat data: loss on assistant turns only.
        router_aux_loss_coef: load-balancing loss weight when the router is trained
            (``None``: the model config's); must stay unset or 0 while the router is frozen.
        revision: Hub revision of ``model``.

    Example:
        >>> from moekit.finetune import FinetuneConfig, finetune
        >>> finetune(FinetuneConfig("my-moe", "my-adapter", data="chat.jsonl", target="attention,experts"))  # doctest: +SKIP
    """

    model: str
    output: str
    data: str
    method: str = "lora"
    quantize_experts: bool | None = None
    target: list[str] | str | None = None
    lora_r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.0
    merge: bool = False
    data_split: str = "train"
    data_subset: str | None = None
    completion_only_loss: bool = True
    assistant_only_loss: bool = True
    revision: str | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r} is not supported — use one of {', '.join(METHODS)}")
        self.target = _parse_target(self.target)
        if self.quantize_experts and self.method != "qlora":
            raise ConfigError(f"quantize_experts applies to method=qlora, not {self.method} — "
                              "use --method qlora or drop --quantize-experts")
        if self.quantize_experts is None and self.method == "qlora":
            self.quantize_experts = True
        if not isinstance(self.lora_r, int) or self.lora_r < 1:
            raise ConfigError(f"lora_r={self.lora_r!r} must be a positive integer — e.g. --lora-r 16")
        if not self.lora_alpha > 0:
            raise ConfigError(f"lora_alpha={self.lora_alpha!r} must be positive — e.g. --lora-alpha 32")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout={self.lora_dropout!r} must be in [0, 1) — e.g. --lora-dropout 0")
        if self.target:  # "all" and the defaults are checked against the model itself
            check_combination(self.target, self.method, self.lora_dropout)
        if self.merge and self.method not in ADAPTER_METHODS:
            raise ConfigError("merge applies to lora/qlora adapters; method=full already writes a full model — drop --merge")
        if self.router_aux_loss_coef and self.target and not {"router", "all"} & set(self.target):
            raise ConfigError(f"router_aux_loss_coef={self.router_aux_loss_coef} needs the router trained — "
                              "add router to --target or drop --aux-loss-coef (the router is frozen by default)")
        if self.learning_rate is None:
            self.learning_rate = DEFAULT_LR[self.method]


def _parse_target(target) -> list[str] | None:
    if target is None:
        return None
    items = target.split(",") if isinstance(target, str) else list(target)
    names = list(dict.fromkeys(str(t).strip() for t in items if str(t).strip()))
    for name in names:
        if name not in TARGET_CHOICES:
            raise ConfigError(f"unknown target {name!r} — valid --target values: {', '.join(TARGET_CHOICES)} "
                              "(comma-separated, e.g. attention,experts)")
    return names or None
