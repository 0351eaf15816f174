"""Per-layer expert statistics of a MoE model, gathered during the perplexity pass.

Hooks on each sparse MoE block (Mixtral, Qwen2-MoE: any block with a ``gate``
router and fused ``experts``) record, over the scored windows:

- load fraction per expert: the share of (token, top-k slot) routing decisions it gets;
- max/min load ratio (``None`` when an expert gets no token: see ``idle_experts``);
- routing entropy: mean over tokens of the entropy of the router's softmax, in
  nats, and divided by log(E) (1.0 = uniform router);
- router-vs-oracle top-k recall on the first ``oracle_tokens`` tokens: the oracle
  picks the experts whose outputs best rebuild the sum of every routed expert's
  output (see :mod:`moekit.upcycle.oracle`; for a freshly upcycled model that sum
  is the dense FFN's output).

Legend: T tokens, H hidden size, E routed experts, K top-k, N neurons per expert.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from moekit.errors import MissingDependencyError

ORACLE_TOKENS = 2048


def moe_blocks(model) -> dict[int, torch.nn.Module]:
    """layer index -> sparse MoE block (empty for a dense model)."""
    out = {}
    for name, module in model.named_modules():
        experts, gate = getattr(module, "experts", None), getattr(module, "gate", None)
        if experts is not None and hasattr(experts, "gate_up_proj") and hasattr(gate, "weight"):
            m = re.search(r"layers\.(\d+)\.", name + ".")
            if m:
                out[int(m.group(1))] = module
    return out


class _LayerCounter:
    def __init__(self, block, oracle_tokens: int):
        self.block, self.oracle_left = block, oracle_tokens
        E = block.gate.weight.shape[0]
        self.top_k = getattr(block.gate, "top_k", None) or getattr(block, "top_k")
        self.counts_E = torch.zeros(E, dtype=torch.long)
        self.entropy_sum, self.tokens, self.hits, self.oracle_n = 0.0, 0, 0, 0

    def observe(self, x_TH: torch.Tensor) -> None:
        """Routing of the (unpadded) MoE inputs ``x_TH``, as the router computes it."""
        from moekit.upcycle.oracle import oracle_scores

        with torch.no_grad():
            logits_TE = x_TH @ self.block.gate.weight.T
            probs_TE = torch.softmax(logits_TE.float(), dim=-1)
            chosen_TK = probs_TE.topk(self.top_k, dim=-1).indices
            self.counts_E += torch.bincount(chosen_TK.flatten().cpu(), minlength=len(self.counts_E))
            self.entropy_sum += float(-(probs_TE * probs_TE.clamp_min(1e-30).log()).sum())
            self.tokens += len(x_TH)
            if self.oracle_left > 0:
                x = x_TH[: self.oracle_left].float()
                scores_TE = oracle_scores(self._experts(), x)
                best_TK = scores_TE.topk(self.top_k, dim=-1).indices
                ch = chosen_TK[: len(x)]
                self.hits += int((ch[:, :, None] == best_TK[:, None, :]).any(dim=2).sum())
                self.oracle_n += len(x)
                self.oracle_left -= len(x)

    def _experts(self):
        """``[(gate_NH, up_NH, down_HN)]`` from the fused ``gate_up_proj`` [E, 2N, H] and ``down_proj`` [E, H, N]."""
        ex = self.block.experts
        gate_up, down = ex.gate_up_proj.float(), ex.down_proj.float()
        n = gate_up.shape[1] // 2
        return [(gate_up[e, :n], gate_up[e, n:], down[e]) for e in range(gate_up.shape[0])]

    def summary(self) -> dict:
        E = len(self.counts_E)
        load = (self.counts_E.float() / max(1, int(self.counts_E.sum()))).tolist()
        lo, hi = min(load), max(load)
        entropy = self.entropy_sum / max(1, self.tokens)
        return {
            "experts": E, "top_k": self.top_k, "tokens": self.tokens,
            "load": [round(v, 5) for v in load],
            "max_min_load_ratio": (hi / lo) if lo > 0 else None,
            "idle_experts": sum(1 for v in load if v == 0),
            "routing_entropy": entropy,
            "routing_entropy_norm": entropy / math.log(E) if E > 1 else 0.0,
            "oracle_recall": self.hits / (self.oracle_n * self.top_k) if self.oracle_n else None,
        }


class ExpertStats:
    """Collects expert statistics while a model runs; pass it as ``perplexity(..., observer=)``.

    Example:
        >>> stats = ExpertStats(model)                                 # doctest: +SKIP
        >>> perplexity(model, ids, observer=stats); stats.close()     # doctest: +SKIP
        >>> stats.report()["layers"]["0"]["load"]                      # doctest: +SKIP
    """

    def __init__(self, model, oracle_tokens: int = ORACLE_TOKENS):
        self.layers = {l: _LayerCounter(b, oracle_tokens) for l, b in sorted(moe_blocks(model).items())}
        self.mask_BT: torch.Tensor | None = None
        self._handles = [b.register_forward_pre_hook(self._hook(l)) for l, b in moe_blocks(model).items()]

    def __bool__(self) -> bool:
        return bool(self.layers)

    def set_mask(self, mask_BT: torch.Tensor) -> None:
        """The attention mask of the next forward: padding is not counted."""
        self.mask_BT = mask_BT

    def _hook(self, layer: int):
        def hook(module, args):
            x = args[0]
            if x.dim() == 3 and self.mask_BT is not None and self.mask_BT.shape == x.shape[:2]:
                x_TH = x[self.mask_BT.to(x.device).bool()]
            else:
                x_TH = x.reshape(-1, x.shape[-1])
            self.layers[layer].observe(x_TH)
        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def report(self) -> dict:
        layers = {str(l): c.summary() for l, c in self.layers.items()}
        recalls = [v["oracle_recall"] for v in layers.values() if v["oracle_recall"] is not None]
        ratios = [math.inf if v["max_min_load_ratio"] is None else v["max_min_load_ratio"] for v in layers.values()]
        return {
            "layers": layers,
            "mean_oracle_recall": sum(recalls) / len(recalls) if recalls else None,
            "worst_max_min_load_ratio": max(ratios) if ratios and max(ratios) < math.inf else None,
            "mean_routing_entropy_norm": (sum(v["routing_entropy_norm"] for v in layers.values()) / len(layers))
            if layers else None,
        }


def format_expert_report(name: str, rep: dict) -> str:
    """A per-layer table: load balance, entropy, recall."""
    rows = [f"experts of {name[-60:]}:",
            f"  {'layer':>5} {'E':>3} {'K':>2} {'max/min load':>12} {'entropy':>8} {'recall':>7}  load per expert"]
    for layer, v in rep["layers"].items():
        ratio = "inf" if v["max_min_load_ratio"] is None else f"{v['max_min_load_ratio']:.2f}"
        recall = "-" if v["oracle_recall"] is None else f"{v['oracle_recall']:.2f}"
        load = " ".join(f"{x:.2f}" for x in v["load"][:16]) + (" ..." if len(v["load"]) > 16 else "")
        rows.append(f"  {layer:>5} {v['experts']:>3} {v['top_k']:>2} {ratio:>12} {v['routing_entropy_norm']:>8.3f} "
                    f"{recall:>7}  {load}")
    if rep["mean_oracle_recall"] is not None:
        rows.append(f"  mean router-vs-oracle recall {rep['mean_oracle_recall']:.3f}; "
                    f"routing entropy / log E {rep['mean_routing_entropy_norm']:.3f}")
    return "\n".join(rows)


# --- plots ----------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError("plots need matplotlib — pip install 'moekit[plots]'") from None
    return plt


def plot_expert_load(rep: dict, path: str | Path, title: str = "") -> Path:
    """Heat map of load fraction, layers (rows) x experts (columns); 1/E is balanced."""
    plt = _pyplot()
    layers = list(rep["layers"])
    width = max(v["experts"] for v in rep["layers"].values())
    grid = torch.full((len(layers), width), float("nan"))
    for r, layer in enumerate(layers):
        load = rep["layers"][layer]["load"]
        grid[r, : len(load)] = torch.tensor(load)
    fig, ax = plt.subplots(figsize=(max(4, 0.4 * width + 2), max(3, 0.25 * len(layers) + 1.5)))
    im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=0)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(layers)), layers, fontsize=6)
    ax.set_title(title or "expert load (fraction of routing decisions)", fontsize=9)
    fig.colorbar(im, ax=ax, label=f"load (balanced = 1/{width})")
    return _save(plt, fig, path)


def plot_perplexity(results: dict[str, dict], path: str | Path) -> Path:
    """Bar chart of perplexity per model (e.g. dense vs MoE), log scale."""
    plt = _pyplot()
    names = list(results)
    values = [results[n]["perplexity"] for n in names]
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(names) + 1), 3.5))
    bars = ax.bar(range(len(names)), values, color=["tab:blue", "tab:orange", "tab:green", "tab:red"][: len(names)])
    ax.set_xticks(range(len(names)), [Path(n).name or n for n in names], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylim(bottom=1, top=max(values) * 3)  # perplexity >= 1: bars start at 1
    ax.set_ylabel("perplexity (log scale)")
    for b, v in zip(bars, values):
        ax.annotate(f"{v:,.2f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    return _save(plt, fig, path)


def _save(plt, fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
