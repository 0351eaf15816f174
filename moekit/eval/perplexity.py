"""Token-weighted perplexity with a fixed context length.

The text is tokenised once (documents joined by blank lines) and scored in
windows of ``seq_len`` tokens that start every ``stride`` tokens. Each token is
scored exactly once, by the window that first reaches it, with whatever context
that window gives it (``stride == seq_len``: disjoint windows, the default and
the fastest; smaller strides give every scored token more context, as in the
transformers perplexity guide). Perplexity = exp(total NLL / scored tokens).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from moekit.errors import ConfigError, InputError


@dataclass
class EvalConfig:
    """Settings of ``moekit eval``.

    Args:
        model: model folder or Hub repo id (dense or MoE, any causal LM transformers loads).
        data: text source — .txt/.jsonl/.json/.parquet file, Hub dataset ``name[:config][@split]``,
            or ``builtin`` (Python's reference docs, held out from calibration).
        text_field: the field holding text in JSON / Parquet / dataset rows.
        seq_len: context length of each window.
        stride: tokens between window starts (default: ``seq_len``, disjoint windows).
        batch_size: windows per forward pass.
        max_tokens: score at most this many tokens (default: all).
        compare: a second model (e.g. the dense source) evaluated on the same tokens.
        output: write the results as JSON here.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        dtype: ``auto`` (bfloat16 on CUDA, float32 on CPU), ``float32`` or ``bfloat16``.
        expert_stats: for MoE models, also report per-layer expert load, load balance,
            routing entropy and router-vs-oracle recall (see :mod:`moekit.eval.experts`).
        plots: write PNG plots here (expert-load heat map per MoE model, perplexity bars);
            implies ``expert_stats``.

    Example:
        >>> from moekit.eval import EvalConfig, evaluate
        >>> evaluate(EvalConfig("my-moe", data="builtin", compare="my-dense"))   # doctest: +SKIP
    """

    model: str
    data: str = "builtin"
    text_field: str = "text"
    seq_len: int = 512
    stride: int | None = None
    batch_size: int = 4
    max_tokens: int | None = None
    compare: str | None = None
    output: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    expert_stats: bool = False
    plots: str | None = None

    def __post_init__(self):
        if self.seq_len < 2:
            raise ConfigError(f"seq_len={self.seq_len} must be at least 2 — e.g. --seq-len 512")
        if self.stride is not None and not 1 <= self.stride <= self.seq_len:
            raise ConfigError(f"stride={self.stride} must be between 1 and seq_len={self.seq_len}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be positive")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device={self.device!r} must be auto, cpu or cuda")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"dtype={self.dtype!r} must be auto, float32 or bfloat16")


def load_model(name: str, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer, device) for any stock causal LM, in eval mode, no remote code."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moekit.io import resolve_model_dir

    folder = resolve_model_dir(name)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available — use --device cpu")
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    kw = {"experts_implementation": "grouped_mm"} if device == "cuda" else {}
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as e:
        raise InputError(f"{name} has no loadable tokenizer ({str(e).splitlines()[0][:80]}) — save one into the folder") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), **kw)
    except TypeError:  # architectures without the experts_implementation switch
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load {name} as a causal LM ({str(e).splitlines()[0][:100]}) — is it a saved model folder?") from None
    return model.to(device).eval(), tok, device


def tokenize_texts(tok, texts: list[str], max_tokens: int | None = None):
    """One long LongTensor of token ids (BOS once, documents joined by blank lines)."""
    import torch

    ids = tok("\n\n".join(texts), add_special_tokens=True)["input_ids"]
    if max_tokens:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise InputError("the evaluation text has fewer than 2 tokens — give more text")
    return torch.tensor(ids, dtype=torch.long)


def windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) per window. No position is scored twice; a window's
    first token has no context inside it and is never scored."""
    out, scored_to = [], 1
    for begin in range(0, n_tokens - 1, stride):
        end = min(begin + seq_len, n_tokens)
        first = max(scored_to, begin + 1)
        if end > first:
            out.append((begin, end, first))
            scored_to = end
        if end == n_tokens:
            break
    return out


def perplexity(model, ids, seq_len: int = 512, stride: int | None = None, batch_size: int = 4,
               device: str = "cpu", progress: bool = True, desc: str = "eval", observer=None) -> dict:
    """Token-weighted perplexity of ``model`` on ``ids`` (1-D LongTensor).

    ``observer`` (e.g. :class:`moekit.eval.experts.ExpertStats`) is told each batch's
    attention mask before the forward pass, so its hooks can skip padding.

    Returns ``{"perplexity", "nll", "tokens", "seq_len", "stride", "seconds"}``.
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    stride = stride or seq_len
    spans = windows(len(ids), seq_len, stride)
    total_nll, total_tokens, t0 = 0.0, 0, time.perf_counter()
    for i in tqdm(range(0, len(spans), batch_size), desc=desc, unit="batch", disable=not progress):
        batch = spans[i:i + batch_size]
        width = max(end - begin for begin, end, _ in batch)
        input_BT = torch.zeros(len(batch), width, dtype=torch.long)
        labels_BT = torch.full((len(batch), width), -100, dtype=torch.long)
        mask_BT = torch.zeros(len(batch), width, dtype=torch.long)
        for b, (begin, end, first) in enumerate(batch):
            input_BT[b, : end - begin] = ids[begin:end]
            mask_BT[b, : end - begin] = 1
            labels_BT[b, first - begin: end - begin] = ids[first:end]
        if observer is not None:
            observer.set_mask(mask_BT)
        with torch.inference_mode():
            logits_BTV = model(input_ids=input_BT.to(device), attention_mask=mask_BT.to(device)).logits.float()
        # position t predicts token t+1
        nll = F.cross_entropy(logits_BTV[:, :-1].flatten(0, 1), labels_BT[:, 1:].flatten().to(device),
                              ignore_index=-100, reduction="sum")
        total_nll += nll.item()
        total_tokens += int((labels_BT[:, 1:] != -100).sum())
    mean = total_nll / total_tokens
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": total_tokens, "seq_len": seq_len,
            "stride": stride, "seconds": round(time.perf_counter() - t0, 2)}


def evaluate(config: EvalConfig, progress: bool = True) -> dict:
    """Perplexity of ``config.model`` (and ``config.compare``) on the same tokens.

    Returns ``{"config": ..., "results": {name: metrics}}`` and writes it to
    ``config.output`` when given.
    """
    from moekit.text import load_texts

    texts = load_texts(config.data, config.text_field, split="eval")
    results, experts, ids0 = {}, {}, None
    for name in [config.model] + ([config.compare] if config.compare else []):
        model, tok, device = load_model(name, config.device, config.dtype)
        ids = tokenize_texts(tok, texts, config.max_tokens)
        if ids0 is not None and not (len(ids) == len(ids0) and bool((ids == ids0).all())):
            raise InputError(f"{name} tokenizes the text differently from {config.model} — compare models that share a tokenizer")
        ids0 = ids
        stats = None
        if config.expert_stats or config.plots:
            from moekit.eval.experts import ExpertStats

            stats = ExpertStats(model) or None  # None for a dense model
        results[name] = perplexity(model, ids, config.seq_len, config.stride, config.batch_size, device,
                                   progress, desc=f"eval {Path(name).name}", observer=stats)
        if stats is not None:
            stats.close()
            experts[name] = stats.report()
        del model
    report = {"config": asdict(config), "results": results}
    if config.compare:
        report["ratio"] = results[config.model]["perplexity"] / results[config.compare]["perplexity"]
    if experts:
        report["experts"] = experts
    if config.plots:
        report["plots"] = _plots(config.plots, results, experts)
    if config.output:
        Path(config.output).parent.mkdir(parents=True, exist_ok=True)
        Path(config.output).write_text(json.dumps(report, indent=2))
    return report


def _plots(folder: str, results: dict, experts: dict) -> list[str]:
    from moekit.eval.experts import plot_expert_load, plot_perplexity

    out = [str(plot_perplexity(results, Path(folder) / "perplexity.png"))]
    for k, (name, rep) in enumerate(experts.items()):
        stem = Path(name).name or f"model{k}"
        out.append(str(plot_expert_load(rep, Path(folder) / f"expert_load_{stem}.png", title=f"expert load: {stem}")))
    return out


def format_report(report: dict) -> str:
    rows = [f"{'model':<48} {'tokens':>9} {'nll':>8} {'perplexity':>12}"]
    for name, r in report["results"].items():
        rows.append(f"{name[-48:]:<48} {r['tokens']:>9,} {r['nll']:>8.4f} {r['perplexity']:>12.3f}")
    if "ratio" in report:
        rows.append(f"perplexity ratio (model / compare): {report['ratio']:.3f}x")
    if report.get("experts"):
        from moekit.eval.experts import format_expert_report

        rows += [format_expert_report(name, rep) for name, rep in report["experts"].items()]
    for path in report.get("plots", []):
        rows.append(f"plot: {path}")
    return "\n".join(rows)
