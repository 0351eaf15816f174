"""The settings of one merge, validated on construction."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from moekit.errors import ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")
WEIGHT_TOLERANCE = 1e-6  # |sum(w) - 1| allowed for explicit weights


@dataclass
class MergeConfig:
    """Everything ``moekit merge`` needs; the CLI, YAML recipes and Python share it.

    The merge is LM-Cocktail's M = Σ wᵢ·Mᵢ over every tensor, or with a target model
    M = α·M_target + (1 − α)·Σ wᵢ·Mᵢ.

    Args:
        output: folder to create.
        models: the models Mᵢ: folders or Hub ids; ``"BASE+ADAPTER"`` first merges a
            PEFT LoRA adapter into BASE (tensor by tensor).
        weights: wᵢ, one per model, summing to 1 (or any sum with ``normalize``).
            Give either ``weights`` or ``examples``.
        examples: JSONL file of ``{"input", "output"}`` or ``{"messages": [...]}`` rows;
            then wᵢ = softmax(−Lᵢ/temperature), Lᵢ each model's mean loss on the output tokens.
        temperature: τ of the softmax (LM-Cocktail uses 5).
        base: the target model M_target of the general form (a folder, Hub id or BASE+ADAPTER).
        alpha: α, the target's share; 0.5 when ``base`` is given and ``alpha`` is not.
        method: how tensors are combined (``linear``).
        normalize: divide explicit weights by their sum.
        allow_negative: accept negative weights (task-vector style extrapolation).
        dtype: output dtype; ``auto`` keeps each tensor's dtype from the first input.
        tokenizer_from: model whose tokenizer is copied (default: the first input).
        max_length: tokens per example when computing losses (the prompt is cut first).
        batch_size: examples per forward pass when computing losses.
        device: where losses are computed: ``auto`` (CUDA if available), ``cpu``, ``cuda``...
        max_shard_size: shard size of the output safetensors.
        force: replace an existing output folder.
        dry_run: validate, compute the weights, print the plan; write nothing.
        push_to_hub: Hub repo id to upload the result to (see ``moekit push``).
        private: create that repo private.

    Example:
        >>> from moekit.merge import MergeConfig, merge
        >>> merge(MergeConfig("merged", models=["chat", "base"], weights=[0.7, 0.3]))  # doctest: +SKIP
        PosixPath('merged')
    """

    output: str
    models: list[str]
    weights: list[float] | None = None
    examples: str | None = None
    temperature: float = 5.0
    base: str | None = None
    alpha: float | None = None
    method: str = "linear"
    normalize: bool = False
    allow_negative: bool = False
    dtype: str = "auto"
    tokenizer_from: str | None = None
    max_length: int = 2048
    batch_size: int = 2
    device: str = "auto"
    max_shard_size: str = "5GB"
    force: bool = False
    dry_run: bool = False
    push_to_hub: str | None = None
    private: bool = False

    def __post_init__(self):
        from moekit.io import parse_size
        from moekit.merge.methods import METHODS

        # Paths given from Python are kept as the strings they name (recipes are YAML).
        for name in ("output", "examples", "base", "tokenizer_from"):
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))
        if isinstance(self.models, (list, tuple)):
            self.models = [os.fspath(m) if isinstance(m, os.PathLike) else m for m in self.models]
        if not isinstance(self.models, (list, tuple)) or not self.models or \
                not all(isinstance(m, str) and m.strip() for m in self.models):
            raise ConfigError(f"models={self.models!r} must be a non-empty list of model folders or Hub ids — "
                              "e.g. --model ./chat --model ./base")
        if (self.weights is None) == (self.examples is None):
            raise ConfigError("give either weights or examples (not both, not neither) — e.g. --weights 0.7 0.3 "
                              "or --examples task.jsonl")
        if self.weights is not None:
            self._check_weights()
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ConfigError(f"temperature={self.temperature!r} must be a positive number — e.g. --temperature 5")
        if self.alpha is not None and self.base is None:
            raise ConfigError(f"alpha={self.alpha} needs a target model — add --base MODEL or drop --alpha")
        if self.alpha is not None:
            self._check_alpha()
        METHODS.get(self.method)
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is not supported — use one of {', '.join(DTYPES)}")
        for name in ("max_length", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (2 if name == "max_length" else 1):
                raise ConfigError(f"{name}={value!r} must be a positive integer — e.g. --{name.replace('_', '-')} "
                                  f"{2048 if name == 'max_length' else 2}")
        parse_size(self.max_shard_size)
        if self.push_to_hub is not None:
            from moekit.hub.push import check_repo_id

            check_repo_id(self.push_to_hub, "push_to_hub")

    def _check_weights(self) -> None:
        w = self.weights
        if not isinstance(w, (list, tuple)) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in w):
            raise ConfigError(f"weights={w!r} must be a list of numbers — e.g. --weights 0.7 0.3")
        if len(w) != len(self.models):
            raise ConfigError(f"{len(w)} weights for {len(self.models)} models — give one weight per --model")
        if not all(math.isfinite(x) for x in w):
            raise ConfigError(f"weights={list(w)} must be finite numbers — e.g. --weights 0.7 0.3")
        negative = [x for x in w if x < 0]
        if negative and not self.allow_negative:
            raise ConfigError(f"weight {negative[0]} is negative — pass --allow-negative if you mean to extrapolate")
        total = sum(w)
        if self.normalize:
            if abs(total) <= WEIGHT_TOLERANCE:
                raise ConfigError(f"weights={list(w)} sum to {total:g}, so they cannot be normalised — fix the weights")
        elif abs(total - 1) > WEIGHT_TOLERANCE:
            raise ConfigError(f"weights={list(w)} sum to {total:.6g}, not 1 — fix them or pass --normalize")

    def _check_alpha(self) -> None:
        a = self.alpha
        if not isinstance(a, (int, float)) or not math.isfinite(a):
            raise ConfigError(f"alpha={a!r} must be a number — e.g. --alpha 0.5")
        if not 0 <= a <= 1 and not self.allow_negative:
            raise ConfigError(f"alpha={a} is outside [0, 1] — use e.g. --alpha 0.5, or pass --allow-negative to extrapolate")

    @property
    def model_weights(self) -> list[float] | None:
        """The explicit weights wᵢ after ``normalize`` (None when they come from examples)."""
        if self.weights is None:
            return None
        total = sum(self.weights) if self.normalize else 1.0
        return [float(x) / total for x in self.weights]

    @property
    def target_share(self) -> float | None:
        """α when a target model is given (default 0.5), else None."""
        if self.base is None:
            return None
        return 0.5 if self.alpha is None else float(self.alpha)
