"""Split strategies: which intermediate neurons of a dense FFN each expert gets.

A strategy is a pure function ``(ffn, n_experts, seed, stats) -> assign_EN`` where
``assign_EN[e]`` lists the neuron indices (rows of gate/up, columns of down) of
expert ``e``. Every expert gets the same number of neurons, so the result is a
stock architecture.

Legend: E experts, I dense intermediate size, H hidden size, N neurons per expert.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


from moekit.registry import Registry


@dataclass(frozen=True)
class FFN:
    """One dense SwiGLU FFN: ``down_HI @ (act(gate_IH @ x) * (up_IH @ x))``."""

    gate_IH: torch.Tensor
    up_IH: torch.Tensor
    down_HI: torch.Tensor

    @property
    def intermediate_size(self) -> int:
        return self.gate_IH.shape[0]


@dataclass(frozen=True)
class Strategy:
    name: str
    fn: Callable[..., torch.Tensor]
    paper: str
    needs: tuple[str, ...] = ("weights",)  # "activations" => calibration data required
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
