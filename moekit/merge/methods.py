"""Merge methods: pure functions ``(tensors, weights) -> tensor`` over float32 tensors.

Each gets the same slice (a block of rows) of one tensor from every input, in
input order, and returns the merged slice. They are registered by name with a
spec, like split strategies; LM-Cocktail's weights are computed elsewhere
(``moekit.merge.cocktail``) and only passed in here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from moekit.registry import Registry

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., "torch.Tensor"]
    paper: str
    summary: str = ""


METHODS: Registry[MergeMethod] = Registry("merge method", "--method")


def register_method(name: str, paper: str, summary: str = ""):
    def deco(fn):
        METHODS.register(name, MergeMethod(name, fn, paper, summary))
        return fn

    return deco


@register_method("linear", paper="https://arxiv.org/abs/2311.13534",
                 summary="LM-Cocktail / model soup: the weighted sum Σ wᵢ·θᵢ")
def linear(tensors: list, weights: list[float]):
    """Σ wᵢ·tensorsᵢ, accumulated in the first tensor's dtype (float32 in moekit).

    Example:
        >>> import torch
        >>> linear([torch.ones(2), torch.zeros(2)], [0.25, 0.75])
        tensor([0.2500, 0.2500])
    """
    out = tensors[0] * weights[0]
    for t, w in zip(tensors[1:], weights[1:]):
        out.add_(t, alpha=w)
    return out
