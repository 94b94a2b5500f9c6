"""Exact k-nearest-neighbour search and voting with chunked matrix products (CPU or GPU).

Search: for each chunk of queries, score the whole bank with one matrix product (optionally in bf16 where
the hardware has fast bf16 units), keep the best `candidates` per query, then re-rank those exactly in
float64 so the neighbours and their order match an exact search (scikit-learn's brute force).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Metric = Literal["euclidean", "cosine"]
Weights = Literal["uniform", "distance", "temperature"]


def fast_bf16_available(device: torch.device) -> bool:
    """bf16 matrix products are faster than fp32 here: CUDA, or a CPU with AMX/AVX512-BF16 units."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX")


def _approximate_scores(
    queries: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor, metric: Metric
) -> torch.Tensor:
    """Higher is nearer: -squared distance (without the query's constant norm) or cosine similarity."""
    scores = (queries @ bank.T).float()
    return scores if metric == "cosine" else scores.mul_(2).sub_(bank_sq)


def _exact_distances(queries: torch.Tensor, candidates: torch.Tensor, metric: Metric) -> torch.Tensor:
    """float64 distances between each query (Q, D) and its candidates (Q, C, D)."""
    q, c = queries.double().unsqueeze(1), candidates.double()
    if metric == "cosine":
        return 1 - F.cosine_similarity(q, c, dim=-1, eps=1e-12)
    return (q - c).square().sum(-1).sqrt()


class KNNIndex:
    """A reference bank (N, D) prepared once (normalized, cast, squared norms) for repeated searches.

    Distances are Euclidean, or cosine distance 1 - cos. `bf16` searches candidates in bf16 (fast on CUDA and
    AMX/AVX512-BF16 CPUs); candidates are always re-ranked exactly in float64.
    """

    def __init__(self, bank: torch.Tensor, metric: Metric = "euclidean", bf16: bool = False) -> None:
        self.bank, self.metric, self.bf16 = bank, metric, bf16
        features = F.normalize(bank.float(), dim=1) if metric == "cosine" else bank.float()
        self.search_bank = features.to(torch.bfloat16 if bf16 else torch.float32)
        self.bank_sq = features.square().sum(1)

    def __len__(self) -> int:
        return len(self.bank)

    def search(
        self, queries: torch.Tensor, k: int, chunk_size: int = 1024, candidates: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The `k` nearest bank rows of every query: (distances (Q, k) float64, indices (Q, k)), nearest first.

        Ties are broken by the lower bank index.
        """
        if k > len(self):
            raise ValueError(f"k={k} is larger than the reference bank ({len(self)} images): lower k")
        n_candidates = min(len(self), candidates or (max(4 * k, k + 32) if self.bf16 else 2 * k + 8))
        all_dist, all_idx = [], []
        for start in range(0, len(queries), chunk_size):
            chunk = queries[start : start + chunk_size].float()
            chunk_f = F.normalize(chunk, dim=1) if self.metric == "cosine" else chunk
            scores = _approximate_scores(
                chunk_f.to(self.search_bank.dtype), self.search_bank, self.bank_sq, self.metric
            )
            cand = scores.topk(n_candidates, dim=1).indices
            dist = _exact_distances(chunk, self.bank[cand], self.metric)
            # stable sort on (distance, bank index): sort by index first, then stably by distance
            by_index = cand.sort(dim=1)
            dist = dist.gather(1, by_index.indices)
            order = dist.sort(dim=1, stable=True).indices[:, :k]
            all_dist.append(dist.gather(1, order))
            all_idx.append(by_index.values.gather(1, order))
        return torch.cat(all_dist), torch.cat(all_idx)


def knn_search(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    metric: Metric = "euclidean",
    chunk_size: int = 1024,
    candidates: int | None = None,
    bf16: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One-off search: `KNNIndex(bank, metric, bf16).search(queries, k, chunk_size, candidates)`."""
    return KNNIndex(bank, metric, bf16).search(queries, k, chunk_size, candidates)


def knn_vote(
    distances: torch.Tensor,
    neighbor_labels: torch.Tensor,
    num_classes: int,
    weights: Weights = "uniform",
    temperature: float = 0.07,
    metric: Metric = "euclidean",
) -> torch.Tensor:
    """Class probabilities (Q, num_classes) from the neighbours' labels.

    uniform: one vote each. distance: 1 / distance, and only the exact matches vote when a query has any
    (scikit-learn's rule). temperature: exp(similarity / T) with similarity = 1 - cosine distance, or
    -distance for Euclidean (DINO's weighted k-NN).
    """
    if weights == "uniform":
        w = torch.ones_like(distances)
    elif weights == "distance":
        exact = distances == 0
        w = torch.where(exact.any(dim=1, keepdim=True), exact.double(), 1 / distances.clamp_min(1e-300))
    elif weights == "temperature":
        similarity = 1 - distances if metric == "cosine" else -distances
        w = ((similarity - similarity.max(dim=1, keepdim=True).values) / temperature).exp()
    else:
        raise ValueError(f"weights must be uniform, distance or temperature, got {weights!r}")
    votes = torch.zeros(len(distances), num_classes, dtype=torch.float64, device=distances.device)
    votes.scatter_add_(1, neighbor_labels.long(), w.double())
    return (votes / votes.sum(dim=1, keepdim=True)).float()
