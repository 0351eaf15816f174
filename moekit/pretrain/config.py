"""The settings of one continued-pretraining run, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass

from moekit.errors import ConfigError
from moekit.train.options import TrainingOptions

TRAIN_CHOICES = ("all", "attention", "experts", "router", "shared", "mlp")
STOPPING = ("first_exhausted", "all_exhausted")
SOURCE_KEYS = ("path", "subset", "data_dir", "split", "text_field")
SHARDED = ("fsdp2", "zero2", "zero3")


@dataclass(frozen=True)
class Source:
    """One text source of the mixture.

    Args:
        path: a file (``.txt .md .jsonl .json .parquet .csv``), folder or glob, or a Hub dataset id.
        subset: Hub dataset configuration.
        data_dir: folder inside a Hub dataset (e.g. ``train/RedPajamaArXiv`` in SlimPajama-627B-DC).
        split: split to read (local files are one ``train`` split).
        text_field: the column holding the text.
    """

    path: str
    subset: str | None = None
    data_dir: str | None = None
    split: str = "train"
    text_field: str = "text"

    @property
    def name(self) -> str:
        return "/".join(p for p in (self.path, self.subset, self.data_dir) if p)


def parse_source(spec, field: str = "data") -> Source:
    """A :class:`Source` from a string ``PATH`` / ``HUB_ID[:SUBSET][@SPLIT]`` or a mapping of its fields.

    Example:
        >>> parse_source("wikitext:wikitext-103-raw-v1@validation")
        Source(path='wikitext', subset='wikitext-103-raw-v1', data_dir=None, split='validation', text_field='text')
    """
    if isinstance(spec, dict):
        unknown = [k for k in spec if k not in SOURCE_KEYS]
        if unknown or not isinstance(spec.get("path"), str):
            raise ConfigError(f"{field} entry {spec!r}: a source mapping needs `path` and may have "
                              f"{', '.join(SOURCE_KEYS[1:])}" + (f" (not {unknown[0]})" if unknown else ""))
        return Source(**spec)
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"{field} entry {spec!r} must be a path, a Hub dataset id or a mapping with `path`")
    from pathlib import Path

    if Path(spec).expanduser().exists() or spec.startswith((".", "/", "~")) or any(c in spec for c in "*?["):
        return Source(spec)
    name, _, split = spec.partition("@")
    name, _, subset = name.partition(":")
    return Source(name, subset or None, split=split or "train")


@dataclass
class PretrainConfig(TrainingOptions):
    """Everything ``moekit pretrain`` needs; the CLI, YAML recipes (``pretrain:``) and Python share it.

    Training settings (learning rate, schedule, batch, checkpoints ...) come from
    :class:`moekit.train.TrainingOptions` (TRL's ``SFTConfig`` names). ``max_length`` is the
    length of the packed sequences: documents are tokenised once, joined end to end with
    EOS between them and cut into ``max_length`` blocks (``packing`` does not apply).

    Args:
        model: the model to train: an upcycled Mixtral / Qwen2-MoE (or a dense LLaMA), folder or Hub id.
        output: folder to create (a stock checkpoint of the same architecture).
        data: sources: paths, Hub ids ``name[:subset][@split]``, mappings
            ``{path, subset, data_dir, split, text_field}``, or ``builtin`` (Python's reference
            docs, offline; its ``builtin:eval`` part is left out).
        weights: mixing weight per source (normalised; default: equal). Blocks are drawn with these
            probabilities, so tokens per source follow them.
        mixture_stopping: ``first_exhausted`` (a mixture epoch ends when a source runs out: exact
            proportions, no repeats) or ``all_exhausted`` (small sources repeat until all are seen).
        eval_data: held-out sources (default: ``eval_fraction`` of each training source's documents).
            ``builtin:eval`` is the held-out part of the built-in text (Python's reference docs).
        eval_tokens: evaluate on at most this many held-out tokens, shared equally by the held-out
            sources (needed with ``streaming``).
        streaming: read sources lazily (corpora larger than RAM or disk); needs ``max_steps`` or
            ``max_tokens``; tokenised on the fly, nothing cached.
        train: ``all`` (every parameter) or groups among attention, experts, router, shared, mlp.
        max_tokens: run length in tokens (turned into steps; instead of ``max_steps``).
        z_loss_coef: router z-loss weight (ST-MoE: mean over tokens and layers of logsumexp(router logits)²).
        router_warmup_steps: train only the routers for this many steps first.
        teacher: dense model to distil from (same tokenizer); ``None`` = no distillation.
        distill_weight: loss = (1 - w) * LM loss + w * T² * KL(teacher || student) per token.
        distill_temperature: T, applied to both distributions.
        revision: Hub revision of ``model``.
        push_to_hub, private: upload the output to this Hub repo when done.

    Example:
        >>> from moekit.pretrain import PretrainConfig, pretrain
        >>> pretrain(PretrainConfig("moe", "moe-cpt", data=["a.jsonl", "b.txt"], weights=[3, 1],
        ...                         max_tokens=10_000_000, teacher="dense"))  # doctest: +SKIP
    """

    model: str
    output: str
    data: list
    weights: list[float] | None = None
    mixture_stopping: str = "first_exhausted"
    eval_data: list | None = None
    eval_tokens: int | None = None
    streaming: bool = False
    train: list[str] | str = "all"
    max_tokens: int | None = None
    z_loss_coef: float = 0.0
    router_warmup_steps: int = 0
    teacher: str | None = None
    distill_weight: float = 0.5
    distill_temperature: float = 1.0
    revision: str | None = None
    push_to_hub: str | None = None
    private: bool = False

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.data, (str, dict)):
            self.data = [self.data]
        if not self.data:
            raise ConfigError("data is empty — give at least one --data source")
        for spec in self.data:
            parse_source(spec, "data")
        for spec in self.eval_data or []:
            parse_source(spec, "eval_data")
        self._check_weights()
        if self.mixture_stopping not in STOPPING:
            raise ConfigError(f"mixture_stopping={self.mixture_stopping!r} is not supported — use one of {', '.join(STOPPING)}")
        self.train = _parse_train(self.train)
        self._check_length()
        self._check_losses()
        if self.packing_strategy == "bfd_split":
            raise ConfigError("packing_strategy=bfd_split does not apply to pretrain — documents are always joined "
                              "end to end into max_length blocks; remove packing_strategy")
        # what pretrain does, whatever the inherited defaults say
        self.packing, self.packing_strategy = True, "wrapped"
        if self.learning_rate is None:
            self.learning_rate = 2e-4  # LLaMA-MoE's continued pretraining
        if self.push_to_hub is not None:
            from moekit.hub.push import check_repo_id

            check_repo_id(self.push_to_hub, "push_to_hub")

    def _check_weights(self) -> None:
        if self.weights is None:
            return
        if isinstance(self.weights, (int, float)):
            self.weights = [self.weights]
        if len(self.weights) != len(self.data):
            raise ConfigError(f"{len(self.weights)} weights for {len(self.data)} data sources — give one --weights "
                              "value per --data source, in the same order")
        for w in self.weights:
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w <= 0:
                raise ConfigError(f"weights={self.weights} must be positive numbers (normalised), e.g. --weights 3 1")
        self.weights = [float(w) for w in self.weights]

    def _check_length(self) -> None:
        if self.max_tokens is not None:
            if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
                raise ConfigError(f"max_tokens={self.max_tokens!r} must be a positive integer — e.g. --max-tokens 5000000")
            if self.max_steps > 0:
                raise ConfigError(f"max_tokens={self.max_tokens} and max_steps={self.max_steps} both set the run "
                                  "length — give one of --max-tokens and --max-steps")
        if self.streaming and self.max_steps < 0 and self.max_tokens is None:
            raise ConfigError("streaming data has no known length — give --max-steps or --max-tokens")
        if self.streaming and self.eval_fraction and not self.eval_data:
            raise ConfigError(f"eval_fraction={self.eval_fraction} cannot split streaming sources — "
                              "give held-out sources with --eval-data, or --eval-fraction 0")
        if self.streaming and self.eval_data and not self.eval_tokens:
            raise ConfigError("streaming eval_data has no known length — give --eval-tokens (e.g. 1048576)")
        if self.eval_tokens is not None and (not isinstance(self.eval_tokens, int) or self.eval_tokens < self.max_length):
            raise ConfigError(f"eval_tokens={self.eval_tokens!r} must be an integer >= max_length={self.max_length}")

    def _check_losses(self) -> None:
        if not isinstance(self.z_loss_coef, (int, float)) or not self.z_loss_coef >= 0:
            raise ConfigError(f"z_loss_coef={self.z_loss_coef!r} must be >= 0 — e.g. --z-loss-coef 0.001 (ST-MoE)")
        if not isinstance(self.distill_temperature, (int, float)) or not self.distill_temperature > 0:
            raise ConfigError(f"distill_temperature={self.distill_temperature!r} must be positive — "
                              "e.g. --distill-temperature 1")
        if not 0 < self.distill_weight <= 1:
            raise ConfigError(f"distill_weight={self.distill_weight!r} must be in (0, 1] — e.g. --distill-weight 0.5")
        if not isinstance(self.router_warmup_steps, int) or self.router_warmup_steps < 0:
            raise ConfigError(f"router_warmup_steps={self.router_warmup_steps!r} must be an integer >= 0")
        needs_router = {"z_loss_coef": self.z_loss_coef, "router_aux_loss_coef": self.router_aux_loss_coef,
                        "router_warmup_steps": self.router_warmup_steps}
        if "all" not in self.train and "router" not in self.train:
            for name, value in needs_router.items():
                if value:
                    raise ConfigError(f"{name}={value} needs the router trained — add router to --train "
                                      f"(now {','.join(self.train)}) or drop it")
        if self.router_warmup_steps and self.train == ["router"]:
            raise ConfigError("router_warmup_steps with --train router alone changes nothing — "
                              "drop --router-warmup-steps or train more than the router")
        if self.router_warmup_steps and self.accelerate_config in SHARDED:
            raise ConfigError(f"router_warmup_steps freezes parameters mid-run, which {self.accelerate_config} "
                              "sharding does not allow — use --accelerate-config ddp or a separate --train router run")


def _parse_train(train) -> list[str]:
    items = train.split(",") if isinstance(train, str) else list(train or [])
    names = list(dict.fromkeys(str(t).strip() for t in items if str(t).strip()))
    if not names:
        raise ConfigError(f"train={train!r} is empty — use all, or groups among {', '.join(TRAIN_CHOICES[1:])}")
    for name in names:
        if name not in TRAIN_CHOICES:
            raise ConfigError(f"unknown --train group {name!r} — valid: {', '.join(TRAIN_CHOICES)} "
                              "(comma-separated, e.g. experts,router)")
    return ["all"] if "all" in names else names
