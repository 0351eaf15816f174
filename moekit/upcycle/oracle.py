"""Which experts *should* a token use? The oracle that routers are fitted to and scored against.

At initialisation the routed experts' outputs sum to the dense FFN's output
(minus the shared expert): ``r = sum_e y_e``. The oracle picks, per token, the
experts whose outputs best reconstruct ``r`` at unit weight: minimising
``||r - y_e||^2`` is maximising ``score_e = 2 <r, y_e> - ||y_e||^2`` (exact for
top-1, greedy for top-k). Multiplying every expert by the same scale multiplies
every score by the same positive factor, so the ranking is the same whether the
scale is folded into down_proj or not — eval can apply it to any MoE checkpoint.

Legend: T tokens, H hidden size, I neurons, E experts, N neurons per expert, K top-k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 2048  # tokens per block: bounds the T x H temporaries


def slice_output(gate_NH, up_NH, down_HN, x_TH) -> torch.Tensor:
    """One SwiGLU slice's output ``y_TH = down_HN @ (silu(gate_NH x) * up_NH x)``."""
    return (F.silu(x_TH @ gate_NH.T) * (x_TH @ up_NH.T)) @ down_HN.T


def oracle_scores(experts, x_TH: torch.Tensor) -> torch.Tensor:
    """``scores_TE`` for experts given as ``[(gate_NH, up_NH, down_HN), ...]`` (float32 tensors)."""
    out = []
    for x in x_TH.split(CHUNK):
        ys = [slice_output(*w, x) for w in experts]
        r_TH = torch.stack(ys).sum(0)
        out.append(torch.stack([2 * (r_TH * y).sum(-1) - (y * y).sum(-1) for y in ys], dim=1))
    return torch.cat(out)


def topk_recall(chosen_TK: torch.Tensor, scores_TE: torch.Tensor) -> float:
    """Fraction of the oracle's top-k experts that the router also chose (mean over tokens)."""
    k = chosen_TK.shape[1]
    best_TK = scores_TE.topk(k, dim=1).indices
    hits = (chosen_TK[:, :, None] == best_TK[:, None, :]).any(dim=2).sum()
    return float(hits) / chosen_TK.numel()


def routing_weights(logits_TE: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """What Mixtral / Qwen2-MoE do with router logits: ``(chosen_TK, weights_TK)``.

    softmax in float32 over all experts -> top-k -> renormalised to sum 1 if ``renormalize``.
    """
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    w_TK, chosen_TK = probs_TE.topk(top_k, dim=-1)
    if renormalize:
        w_TK = w_TK / w_TK.sum(-1, keepdim=True)
    return chosen_TK, w_TK
