"""Router initialisations: pure functions ``(n_experts, hidden, top_k, seed, stats) -> router_EH``.

``stats`` is a :class:`RouterStats` (MLP inputs of calibration tokens and the
oracle's per-expert scores, see :mod:`moekit.upcycle.oracle`) for routers whose
spec ``needs`` activations, else ``None``. Data-driven routers return a zero
router when every expert is active: there is nothing to choose, and uniform
weights keep the model exactly equal to the dense one.

Legend: E routed experts, H hidden size, T calibration tokens, C clusters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from moekit.registry import Registry

if TYPE_CHECKING:
    import torch

# Small enough that softmax stays ~uniform (so experts keep their calibrated
# scale), large enough to break torch.topk's ties between identical logits.
SYMMETRY_NOISE_STD = 1e-3
RANDOM_STD = 0.02  # LLaMA's initializer_range
# Fitted routers are rescaled so their logits spread this little around each token's
# mean: the top-k ranking is unchanged, the routing weights stay within ~10% of
# uniform (the fitted expert scale assumes that), and the router still gets a
# gradient through softmax weights. bf16 still resolves ~5e-4 at this size.
FITTED_LOGIT_STD = 0.1
RIDGE = 1e-2  # relative L2 penalty of the least-squares router fit


@dataclass(frozen=True)
class RouterStats:
    """What data-driven routers fit: MLP inputs ``x_TH`` and oracle scores ``scores_TE``."""

    x_TH: torch.Tensor
    scores_TE: torch.Tensor


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


@register_router("centroid", needs=("activations",),
                 summary="LLaMA-MoE-v2: k-means centroids of the layer's MLP inputs, each matched to an expert")
def centroid_router(n_experts: int, hidden: int, top_k: int, seed: int, stats: RouterStats = None) -> torch.Tensor:
    import torch

    from moekit.upcycle.kmeans import kmeans

    if top_k >= n_experts:
        return torch.zeros(n_experts, hidden)
    C_CH, label_T = kmeans(stats.x_TH, n_experts, seed)
    # cluster c -> the expert the oracle likes most on c's tokens (greedy one-to-one matching)
    z_TE = _standardize(stats.scores_TE)
    affinity_CE = torch.zeros(n_experts, n_experts).index_add_(0, label_T, z_TE)
    affinity_CE /= torch.bincount(label_T, minlength=n_experts).clamp_min(1)[:, None]
    router_EH = torch.zeros(n_experts, hidden)
    free_c, free_e = set(range(n_experts)), set(range(n_experts))
    for flat in affinity_CE.flatten().argsort(descending=True, stable=True).tolist():
        c, e = divmod(flat, n_experts)
        if c in free_c and e in free_e:
            router_EH[e] = C_CH[c]
            free_c.discard(c)
            free_e.discard(e)
    return _temper(router_EH, stats.x_TH)


@register_router("calibrated", needs=("activations",),
                 summary="least-squares fit of the router to the oracle's expert scores on calibration tokens")
def calibrated_router(n_experts: int, hidden: int, top_k: int, seed: int, stats: RouterStats = None) -> torch.Tensor:
    import torch

    if top_k >= n_experts:
        return torch.zeros(n_experts, hidden)
    x_TH = stats.x_TH.float()
    target_TE = _standardize(stats.scores_TE)
    # ridge regression: W = (X'X + l I)^-1 X'Y, closed form (H x H solve), no GPU needed
    gram_HH = x_TH.T @ x_TH / len(x_TH)
    gram_HH += RIDGE * gram_HH.diagonal().mean() * torch.eye(hidden)
    router_EH = torch.linalg.solve(gram_HH, x_TH.T @ target_TE / len(x_TH)).T
    return _temper(router_EH, x_TH)


def _standardize(scores_TE: torch.Tensor) -> torch.Tensor:
    """Per-token z-scores: what matters is which experts win for a token, not its scale."""
    s = scores_TE.float()
    return (s - s.mean(1, keepdim=True)) / (s.std(1, keepdim=True) + 1e-6)


def _temper(router_EH: torch.Tensor, x_TH: torch.Tensor) -> torch.Tensor:
    logits_TE = x_TH.float() @ router_EH.T
    spread = (logits_TE - logits_TE.mean(1, keepdim=True)).std()
    return router_EH * (FITTED_LOGIT_STD / spread) if spread > 0 else router_EH
