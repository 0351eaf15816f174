"""The settings of one upcycling run, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

from moekit.errors import ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class UpcycleConfig:
    """Everything ``moekit upcycle`` needs; the CLI, YAML recipes and Python share it.

    Args:
        source: dense model folder or Hub repo id (LlamaForCausalLM / MistralForCausalLM).
        output: folder to create.
        num_experts: N, the number of slices each FFN is cut into (or copies, for ``copy``).
        top_k: K, experts active per token (``K == N`` with ``scale="auto"`` reproduces the dense model).
        method: split strategy (``random``, ``copy``).
        scale: ``"auto"`` or a float folded into every expert's down_proj. ``auto`` picks the
            value that makes a uniform router with all experts active exact: N for a split
            (each expert holds 1/N of the neurons and gets weight 1/N), 1 for ``copy``.
        router: router initialisation (``zero``, ``random``).
        format: output architecture (``mixtral``, ``qwen2_moe``).
        dtype: output dtype, ``auto`` keeps the source's.
        max_shard_size: shard size of the output safetensors.
        seed: seeds splits and router noise.
        allow_pickle: allow reading ``.bin`` pickle weights (can run code: only for trusted files).
        force: replace an existing output folder.
        dry_run: print the plan and write nothing.
        revision: Hub revision of ``source``.
        push_to_hub: Hub repo id to upload the result to (see ``moekit push``).
        private: create the ``push_to_hub`` repo private.

    Example:
        >>> from moekit.upcycle import UpcycleConfig, upcycle
        >>> upcycle(UpcycleConfig("my-llama", "my-moe", num_experts=8, top_k=2))  # doctest: +SKIP
    """

    source: str
    output: str
    num_experts: int = 8
    top_k: int = 2
    method: str = "random"
    scale: str | float = "auto"
    router: str = "zero"
    format: str = "mixtral"
    dtype: str = "auto"
    max_shard_size: str = "5GB"
    seed: int = 0
    allow_pickle: bool = False
    force: bool = False
    dry_run: bool = False
    revision: str | None = None
    push_to_hub: str | None = None
    private: bool = False

    def __post_init__(self):
        from moekit.formats import FORMATS
        from moekit.io import parse_size
        from moekit.upcycle.routers import ROUTERS
        from moekit.upcycle.strategies import STRATEGIES

        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ConfigError(f"num_experts={self.num_experts!r} must be a positive integer — e.g. --num-experts 8")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(
                f"top_k={self.top_k!r} must be between 1 and num_experts={self.num_experts} — lower --top-k"
            )
        STRATEGIES.get(self.method)
        ROUTERS.get(self.router)
        FORMATS.get(self.format)
        if self.scale != "auto":
            try:
                self.scale = float(self.scale)
            except (TypeError, ValueError):
                raise ConfigError(f"scale={self.scale!r} must be 'auto' or a number — e.g. --scale auto") from None
            if not self.scale > 0:
                raise ConfigError(f"scale={self.scale} must be positive — e.g. --scale auto")
        if self.push_to_hub is not None:
            from moekit.hub.push import check_repo_id

            check_repo_id(self.push_to_hub, "push_to_hub")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is not supported — use one of {', '.join(DTYPES)}")
        parse_size(self.max_shard_size)
