"""Split strategies: which intermediate neurons of a dense FFN each expert gets.

A strategy is a pure function ``(ffn, n_experts, seed, stats) -> assign_EN`` where
``assign_EN[e]`` lists the neuron indices (rows of gate/up, columns of down) of
expert ``e``. Every expert gets the same number of neurons, so the result is a
stock architecture. ``stats`` is a :class:`moekit.upcycle.calibration.LayerStats`
(MLP inputs sampled on calibration text, per-neuron importance) for strategies
whose spec ``needs`` activations or gradients, else ``None``.

Legend: E experts, I dense intermediate size, H hidden size, N neurons per expert,
T calibration tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from moekit.registry import Registry

if TYPE_CHECKING:
    import torch

# Calibration tokens whose activation pattern describes a neuron (coactivation,
# importance, gradient): enough to separate neurons, small enough that the
# I x T pattern matrix of a 7B layer stays under 100 MB.
PATTERN_TOKENS = 2048


@dataclass(frozen=True)
class FFN:
    """One dense SwiGLU FFN: ``down_HI @ (act(gate_IH @ x) * (up_IH @ x))``."""

    gate_IH: torch.Tensor
    up_IH: torch.Tensor
    down_HI: torch.Tensor

    @property
    def intermediate_size(self) -> int:
        return self.gate_IH.shape[0]

    def subset(self, idx_I: torch.Tensor) -> "FFN":
        """The FFN restricted to the neurons ``idx_I`` (in that order)."""
        return FFN(self.gate_IH[idx_I], self.up_IH[idx_I], self.down_HI[:, idx_I])

    def activations(self, x_TH: torch.Tensor) -> torch.Tensor:
        """``a_TI = silu(gate x) * up x``: what down_proj sees (LLaMA's SwiGLU)."""
        import torch.nn.functional as F

        return F.silu(x_TH @ self.gate_IH.float().T) * (x_TH @ self.up_IH.float().T)


@dataclass(frozen=True)
class Strategy:
    name: str
    fn: Callable[..., torch.Tensor]
    paper: str
    needs: tuple[str, ...] = ("weights",)  # "activations" / "gradients" => calibration data required
    copies: bool = False  # every expert is the whole FFN (sparse upcycling)
    summary: str = field(default="")


STRATEGIES: Registry[Strategy] = Registry("split method", "--method")


def register_strategy(name: str, paper: str, needs=("weights",), copies=False, summary=""):
    def deco(fn):
        STRATEGIES.register(name, Strategy(name, fn, paper, tuple(needs), copies, summary))
        return fn

    return deco


@register_strategy("random", paper="https://arxiv.org/abs/2406.16554",
                   summary="LLaMA-MoE: a seeded random partition of the neurons into equal slices")
def random_split(ffn: FFN, n_experts: int, seed: int, stats=None) -> torch.Tensor:
    import torch

    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(ffn.intermediate_size, generator=g)
    # sort inside each expert so slices read memory in order and provenance is tidy
    return perm.view(n_experts, -1).sort(dim=1).values


@register_strategy("copy", paper="https://arxiv.org/abs/2212.05055", copies=True,
                   summary="sparse upcycling: every expert is a full copy of the dense FFN")
def copy_ffn(ffn: FFN, n_experts: int, seed: int, stats=None) -> torch.Tensor:
    import torch

    return torch.arange(ffn.intermediate_size).expand(n_experts, -1)


@register_strategy("clustering", paper="https://arxiv.org/abs/2406.16554",
                   summary="LLaMA-MoE clustering: balanced k-means on each neuron's gate and up weight rows")
def clustering_split(ffn: FFN, n_experts: int, seed: int, stats=None) -> torch.Tensor:
    import torch

    feats_ID = torch.cat([ffn.gate_IH.float(), ffn.up_IH.float()], dim=1)
    return _balanced(feats_ID, n_experts, seed)


@register_strategy("coactivation", paper="https://arxiv.org/abs/2110.01786", needs=("activations",),
                   summary="MoEfication: balanced clustering of neurons that fire on the same calibration tokens")
def coactivation_split(ffn: FFN, n_experts: int, seed: int, stats=None) -> torch.Tensor:
    return _balanced(_patterns(ffn, stats), n_experts, seed)


@register_strategy("importance", paper="https://arxiv.org/abs/2411.15708", needs=("activations",),
                   summary="co-activation clusters built greedily around the most important neurons "
                           "(importance = mean |activation| x down_proj column norm)")
def importance_split(ffn: FFN, n_experts: int, seed: int, stats=None) -> torch.Tensor:
    return _greedy(ffn, stats, stats.importance_I, n_experts, seed)


@register_strategy("gradient", paper="https://arxiv.org/abs/2411.15708", needs=("gradients",),
                   summary="as importance, with the gradient importance mean |a * dL/da| on calibration text")
def gradient_split(ffn: FFN, n_experts: int, seed: int, stats=None) -> torch.Tensor:
    return _greedy(ffn, stats, stats.grad_importance_I, n_experts, seed)


def _patterns(ffn: FFN, stats) -> torch.Tensor:
    """``pattern_IT``: each neuron's |activation| on the first PATTERN_TOKENS sampled tokens."""
    return ffn.activations(stats.x_TH[:PATTERN_TOKENS].float()).abs().T


def _greedy(ffn: FFN, stats, importance_I: torch.Tensor, n_experts: int, seed: int) -> torch.Tensor:
    # Important neurons are placed first (they get their best-matching expert) and
    # weigh more in the centroids, so each expert forms around important neurons.
    order_I = importance_I.argsort(descending=True, stable=True)
    return _balanced(_patterns(ffn, stats), n_experts, seed, weight_I=importance_I, order_I=order_I)


def _balanced(feats_ID, n_experts: int, seed: int, **kw) -> torch.Tensor:
    from moekit.upcycle.kmeans import balanced_kmeans

    return balanced_kmeans(feats_ID, n_experts, seed, **kw).sort(dim=1).values
