"""Router initialisations: pure functions ``(n_experts, hidden, top_k, seed, stats) -> router_EH``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


from moekit.registry import Registry

# Small enough that softmax stays ~uniform (so experts keep their calibrated
# scale), large enough to break torch.topk's ties between identical logits.
SYMMETRY_NOISE_STD = 1e-3
RANDOM_STD = 0.02  # LLaMA's initializer_range


@dataclass(frozen=True)
class RouterInit:
    name: str
    fn: Callable[..., torch.Tensor]
    needs: tuple[str, ...] = ()
    summary: str = ""


ROUTERS: Registry[RouterInit] = Registry("router init", "--router")


def register_router(name: str, needs=(), summary=""):
    def deco(fn):
        ROUTERS.register(name, RouterInit(name, fn, tuple(needs), summary))
        return fn

    return deco


@register_router("zero", summary="uniform router; tiny noise breaks ties when top-k < N")
def zero_router(n_experts: int, hidden: int, top_k: int, seed: int, stats=None) -> torch.Tensor:
    import torch

    if top_k >= n_experts:
        return torch.zeros(n_experts, hidden)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_experts, hidden, generator=g) * SYMMETRY_NOISE_STD


@register_router("random", summary="normal(0, 0.02) like a freshly initialised linear layer")
def random_router(n_experts: int, hidden: int, top_k: int, seed: int, stats=None) -> torch.Tensor:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_experts, hidden, generator=g) * RANDOM_STD
