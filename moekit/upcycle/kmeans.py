"""Spherical k-means, plain and balanced (every cluster exactly the same size).

Balanced k-means is what turns neuron features into equal-sized experts: the
assignment step fills clusters greedily, items in a fixed order each taking the
most similar cluster that still has room. The order is the items' "regret"
(best minus second-best similarity) unless the caller gives one, e.g. neurons
by decreasing importance so the important ones get their first choice.

Legend: I items (neurons or tokens), D feature dims, K clusters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_ITERS = 25


def _kmeanspp(X_ID: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """k-means++ seeding on unit vectors (distance = 1 - cosine)."""
    first = int(torch.randint(len(X_ID), (1,), generator=g))
    C_KD = [X_ID[first]]
    dist_I = (1 - X_ID @ X_ID[first]).clamp_min(0)
    for _ in range(1, k):
        p = dist_I + 1e-12
        nxt = int(torch.multinomial(p / p.sum(), 1, generator=g))
        C_KD.append(X_ID[nxt])
        dist_I = torch.minimum(dist_I, (1 - X_ID @ X_ID[nxt]).clamp_min(0))
    return torch.stack(C_KD)


def balanced_assign(sim_IK: torch.Tensor, order_I: torch.Tensor | None = None) -> torch.Tensor:
    """Cluster id per item, every cluster exactly ``I // K`` items (``I % K == 0``).

    Items are placed in ``order_I`` (default: decreasing regret), each into its most
    similar cluster with room left.
    """
    I, K = sim_IK.shape
    cap = I // K
    if order_I is None:
        top2 = sim_IK.topk(min(2, K), dim=1).values
        regret_I = top2[:, 0] - top2[:, -1]
        order_I = regret_I.argsort(descending=True, stable=True)
    prefs = sim_IK.argsort(dim=1, descending=True, stable=True).tolist()
    room = [cap] * K
    label = [0] * I
    for i in order_I.tolist():
        for c in prefs[i]:
            if room[c]:
                room[c] -= 1
                label[i] = c
                break
    return torch.tensor(label, dtype=torch.long)


def balanced_kmeans(X_ID: torch.Tensor, k: int, seed: int, weight_I: torch.Tensor | None = None,
                    order_I: torch.Tensor | None = None) -> torch.Tensor:
    """Balanced spherical k-means: ``groups_KM`` (M = I / k item indices per cluster, sorted).

    Args:
        X_ID: item features; compared by cosine similarity.
        k: clusters (must divide I).
        seed: seeds the k-means++ initialisation.
        weight_I: optional item weights for the centroid means (e.g. importance).
        order_I: optional fixed assignment order (default: by regret).

    Example:
        >>> balanced_kmeans(torch.randn(12, 3), 3, seed=0).shape
        torch.Size([3, 4])
    """
    I = X_ID.shape[0]
    if I % k:
        raise ValueError(f"{I} items cannot form {k} equal clusters")
    X_ID = F.normalize(X_ID.float(), dim=1)
    g = torch.Generator().manual_seed(seed)
    C_KD = _kmeanspp(X_ID, k, g)
    w_I = torch.ones(I) if weight_I is None else weight_I.float().clamp_min(0) + 1e-12
    label_I = None
    for _ in range(MAX_ITERS):
        new_I = balanced_assign(X_ID @ C_KD.T, order_I)
        if label_I is not None and torch.equal(new_I, label_I):
            break
        label_I = new_I
        C_KD = torch.zeros_like(C_KD).index_add_(0, label_I, X_ID * w_I[:, None])
        C_KD = F.normalize(C_KD, dim=1)
    return torch.stack([torch.nonzero(label_I == c).flatten() for c in range(k)])


def kmeans(X_ID: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain spherical k-means: ``(centroids_KD unit vectors, label_I)``.

    An emptied cluster is re-seeded with the item farthest from its centroid.
    """
    X_ID = F.normalize(X_ID.float(), dim=1)
    g = torch.Generator().manual_seed(seed)
    C_KD = _kmeanspp(X_ID, k, g)
    label_I = None
    for _ in range(MAX_ITERS):
        sim_IK = X_ID @ C_KD.T
        new_I = sim_IK.argmax(dim=1)
        if label_I is not None and torch.equal(new_I, label_I):
            break
        label_I = new_I
        C_KD = F.normalize(torch.zeros_like(C_KD).index_add_(0, label_I, X_ID), dim=1)
        for c in range(k):
            if not bool((label_I == c).any()):
                far = int(sim_IK.max(dim=1).values.argmin())
                C_KD[c], label_I[far] = X_ID[far], c
    return C_KD, label_I
