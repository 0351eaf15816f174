"""The settings of one upcycling run, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from moekit.errors import ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")
AUTO = "auto"


@dataclass
class UpcycleConfig:
    """Everything ``moekit upcycle`` needs; the CLI, YAML recipes and Python share it.

    Args:
        source: dense model folder or Hub repo id (LlamaForCausalLM / MistralForCausalLM).
        output: folder to create.
        num_experts: N, the number of slices each FFN is cut into (or copies, for ``copy``).
        top_k: K, routed experts active per token (``K == N - shared_experts`` with
            ``scale="auto"`` reproduces the dense model).
        method: split strategy (``random``, ``copy``, ``clustering``, ``coactivation``,
            ``importance``, ``gradient``) or ``auto``: ``coactivation`` when the source has a
            tokenizer to calibrate with, else ``random`` (see README, "Upcycling quality").
        scale: ``"auto"`` or a float folded into every routed expert's down_proj. ``auto``
            makes a uniform router with every routed expert active exact (E = N - S for a
            split, 1 for ``copy``); with fewer active it is fitted per layer by least squares
            on calibration tokens, or, without calibration, LLaMA-MoE's E/K amplification.
        router: router initialisation (``zero``, ``random``, ``centroid``, ``calibrated``) or
            ``auto``: ``calibrated`` when calibration data is used, else ``zero``.
        format: output architecture (``mixtral``, ``qwen2_moe``).
        shared_experts: S of the N slices form one always-on shared expert holding the most
            important neurons (Qwen2-MoE only); N - S experts are routed.
        dense_layers: layers whose FFN stays dense (negative counts from the end; Qwen2-MoE only).
        norm_topk_prob: renormalise the top-k weights. ``None`` = Mixtral's True for
            ``mixtral`` and ``copy``, else False (each chosen expert weighs its softmax
            probability, so even a top-1 router learns from the LM loss).
        calib_data: calibration text for data-driven methods and routers: a .txt/.jsonl/
            .json/.parquet file, a Hub dataset ``name[:config][@split]`` or ``builtin``
            (its calibration split, disjoint from ``moekit eval``'s).
        calib_text_field: the field holding the text in JSON / Parquet / dataset rows.
        calib_tokens: calibration token budget (one streaming pass, layer by layer).
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
    method: str = AUTO
    scale: str | float = "auto"
    router: str = AUTO
    format: str = "mixtral"
    shared_experts: int = 0
    dense_layers: list[int] = field(default_factory=list)
    norm_topk_prob: bool | None = None
    calib_data: str = "builtin"
    calib_text_field: str = "text"
    calib_tokens: int = 8192
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
        if not isinstance(self.shared_experts, int) or not 0 <= self.shared_experts < self.num_experts:
            raise ConfigError(
                f"shared_experts={self.shared_experts!r} must be between 0 and num_experts - 1 = "
                f"{self.num_experts - 1} (at least one expert must be routed) — lower --shared-experts"
            )
        routed = self.num_experts - self.shared_experts
        if self.top_k > routed:
            raise ConfigError(
                f"top_k={self.top_k} must be at most num_experts - shared_experts = {routed} routed experts "
                f"— use --top-k {routed} or fewer"
            )
        if self.method != AUTO:
            STRATEGIES.get(self.method)
        if self.router != AUTO:
            ROUTERS.get(self.router)
        FORMATS.get(self.format)
        self._check_experts()
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

    def _check_experts(self) -> None:
        if not isinstance(self.dense_layers, (list, tuple)) or not all(
                isinstance(d, int) and not isinstance(d, bool) for d in self.dense_layers):
            raise ConfigError(f"dense_layers={self.dense_layers!r} must be a list of layer indices — e.g. --dense-layers 0,-1")
        if self.norm_topk_prob not in (None, True, False):
            raise ConfigError(f"norm_topk_prob={self.norm_topk_prob!r} must be true or false (or unset for auto)")
        if not isinstance(self.calib_tokens, int) or self.calib_tokens < 64:
            raise ConfigError(f"calib_tokens={self.calib_tokens!r} must be an integer of at least 64 — e.g. --calib-tokens 8192")
        if self.method == "copy":
            if self.shared_experts:
                raise ConfigError("method=copy makes every expert the whole FFN, so there is no slice to share "
                                  "— drop --shared-experts or use a split method")
            if self.router in ("centroid", "calibrated"):
                raise ConfigError(f"router={self.router} has nothing to learn: copied experts are identical "
                                  "— use --router zero or --router random with --method copy")
