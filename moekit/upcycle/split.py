"""One layer's MoE, in memory: shared expert, routed experts, router, expert scale, oracle recall.

:func:`split_layer` is the kernel the streaming converter calls once per MoE
layer; it takes and returns tensors only, so tests and benchmarks call it too.

Data flow: (optional) the S·I/N most important neurons become the shared expert
-> the split strategy cuts the remaining neurons into E = N - S equal experts ->
the oracle scores each routed expert on the sampled calibration tokens -> the
router is initialised (fitted on the first 3/4 of the sample) -> its top-k
recall against the oracle is measured on the last 1/4 -> the expert scale is
chosen.

Expert scale (folded into each routed expert's down_proj): the chosen expert's
output is ``weight * scale * slice``. ``weight`` is the router's softmax
probability (~1/E for a near-uniform router), renormalised over the top-k
(~1/K) when ``renormalize`` (Mixtral always; Qwen2-MoE's ``norm_topk_prob``).

- all E routed experts active: ``scale = E`` — a uniform router then reproduces
  the dense FFN exactly, whichever the weighting;
- K < E with calibration data: least squares on the calibration tokens,
  ``scale = sum <r, z> / sum ||z||^2`` with ``r`` the dense routed output and
  ``z`` what the router's choices give at scale 1;
- K < E without data: LLaMA-MoE's amplification, each chosen expert weighs E/K
  (``scale = E`` renormalised, ``E^2 / K`` with softmax weights).

Legend: I dense neurons, N neurons per expert, E routed experts, K top-k,
H hidden size, T sampled calibration tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit.upcycle.oracle import oracle_scores, routing_weights, slice_output, topk_recall
from moekit.upcycle.routers import ROUTERS, RouterStats
from moekit.upcycle.strategies import FFN, STRATEGIES

FIT_FRACTION = 0.75  # of the token sample: router fit; the rest measures recall


@dataclass(frozen=True)
class SplitSpec:
    """What to build from each dense FFN: N slices, S of them shared, top-k among the rest."""

    method: str
    router: str
    num_slices: int
    num_shared: int = 0
    top_k: int = 2
    renormalize: bool = True
    scale: str | float = "auto"

    @property
    def num_routed(self) -> int:
        return self.num_slices - self.num_shared


@dataclass
class LayerSplit:
    """The MoE of one layer.

    Attributes:
        assign_EN: dense neuron indices of each routed expert.
        shared_N: dense neuron indices of the shared expert (empty without one).
        router_EH: router weight (float32).
        scale: factor for the routed experts' down_proj.
        recall: router-vs-oracle top-k recall on held-out calibration tokens (None without data).
    """

    assign_EN: torch.Tensor
    shared_N: torch.Tensor
    router_EH: torch.Tensor
    scale: float
    recall: float | None = None


def split_layer(ffn: FFN, stats, spec: SplitSpec, seed: int) -> LayerSplit:
    """Build one layer's MoE from its dense FFN and (optional) calibration ``stats``.

    Example:
        >>> spec = SplitSpec("random", "zero", num_slices=4, top_k=4)
        >>> split_layer(ffn, None, spec, seed=0).scale    # doctest: +SKIP
        4.0
    """
    strategy = STRATEGIES.get(spec.method)
    E, H = spec.num_routed, ffn.down_HI.shape[0]
    shared_N, rest_I = _shared_neurons(ffn, stats, spec)
    if len(shared_N):  # the routed experts split what the shared expert left
        routed_ffn, routed_stats = ffn.subset(rest_I), stats.subset(rest_I) if stats is not None else None
    else:  # every neuron is routed: no copy of the FFN (it is the hot path of a data-free split)
        routed_ffn, routed_stats = ffn, stats
    assign_EN = rest_I[strategy.fn(routed_ffn, E, seed, routed_stats)]
    router = ROUTERS.get(spec.router)
    if stats is None or strategy.copies:
        router_EH = router.fn(E, H, spec.top_k, seed, None).float()
        return LayerSplit(assign_EN, shared_N, router_EH, _default_scale(spec, strategy.copies))
    x_TH = stats.x_TH.float()
    experts = [(ffn.gate_IH[i].float(), ffn.up_IH[i].float(), ffn.down_HI[:, i].float()) for i in assign_EN]
    scores_TE = oracle_scores(experts, x_TH)
    n_fit = max(1, int(len(x_TH) * FIT_FRACTION))
    router_EH = router.fn(E, H, spec.top_k, seed, RouterStats(x_TH[:n_fit], scores_TE[:n_fit])).float()
    recall = None
    if n_fit < len(x_TH):
        chosen_TK, _ = routing_weights(x_TH[n_fit:] @ router_EH.T, spec.top_k, spec.renormalize)
        recall = topk_recall(chosen_TK, scores_TE[n_fit:])
    scale = _fitted_scale(experts, x_TH, router_EH, spec) if spec.scale == "auto" and spec.top_k < E \
        else _default_scale(spec, False)
    return LayerSplit(assign_EN, shared_N, router_EH, scale, recall)


def _shared_neurons(ffn: FFN, stats, spec: SplitSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(shared neurons, the rest), both sorted. The shared expert takes the S·I/N most important."""
    I = ffn.intermediate_size
    if not spec.num_shared:
        return torch.zeros(0, dtype=torch.long), torch.arange(I)
    needs_grad = "gradients" in STRATEGIES.get(spec.method).needs
    importance_I = stats.grad_importance_I if needs_grad else stats.importance_I
    order_I = importance_I.argsort(descending=True, stable=True)
    n_shared = spec.num_shared * I // spec.num_slices
    return order_I[:n_shared].sort().values, order_I[n_shared:].sort().values


def _default_scale(spec: SplitSpec, copies: bool) -> float:
    if spec.scale != "auto":
        return float(spec.scale)
    if copies:
        return 1.0
    E, K = spec.num_routed, spec.top_k
    return float(E) if spec.renormalize or K >= E else float(E * E / K)


def _fitted_scale(experts, x_TH: torch.Tensor, router_EH: torch.Tensor, spec: SplitSpec) -> float:
    """Least-squares scale: the routed output at scale 1 (``z``) against the dense one (``r``)."""
    num = den = 0.0
    for x in x_TH.split(2048):
        chosen_TK, w_TK = routing_weights(x @ router_EH.T, spec.top_k, spec.renormalize)
        r_TH = torch.zeros(len(x), x.shape[1])
        z_TH = torch.zeros_like(r_TH)
        for e, w in enumerate(experts):
            y_TH = slice_output(*w, x)
            r_TH += y_TH
            w_T = (w_TK * (chosen_TK == e)).sum(1)
            z_TH += w_T[:, None] * y_TH
        num += float((r_TH * z_TH).sum())
        den += float((z_TH * z_TH).sum())
    return num / den if den > 0 and num > 0 else _default_scale(spec, False)


def moe_forward(ffn: FFN, split: LayerSplit, spec: SplitSpec, x_TH: torch.Tensor) -> torch.Tensor:
    """What the upcycled layer's MoE block computes on ``x_TH`` (float32): the shared
    expert (gate sigmoid(0) = 0.5 times its doubled down_proj = its dense slice) plus
    the router's top-k routed experts, weighted and scaled as in the checkpoint."""
    x_TH = x_TH.float()
    out_TH = torch.zeros_like(x_TH)
    if len(split.shared_N):
        i = split.shared_N
        out_TH += slice_output(ffn.gate_IH[i].float(), ffn.up_IH[i].float(), ffn.down_HI[:, i].float(), x_TH)
    chosen_TK, w_TK = routing_weights(x_TH @ split.router_EH.T, spec.top_k, spec.renormalize)
    for e, i in enumerate(split.assign_EN):
        w_T = (w_TK * (chosen_TK == e)).sum(1)
        rows = torch.nonzero(w_T).flatten()
        if len(rows):
            y = slice_output(ffn.gate_IH[i].float(), ffn.up_IH[i].float(), ffn.down_HI[:, i].float(), x_TH[rows])
            out_TH[rows] += (w_T[rows] * split.scale)[:, None] * y
    return out_TH
