"""Exact k-nearest-neighbour search and voting (CPU or GPU) that scores only the pairs it cannot rule out.

Search (`ClusteredBounds`): guaranteed lower bounds of the (query, bank) distances rule out whole clusters, rows
and pairs against a per-query threshold (an upper bound of the k-th distance); the few pairs left get exact
float64 distances. `brute` bounds every pair with the full-dimension product; `pruned` first clusters the bank
and bounds with top principal components + residual norm. Neighbours, their order and the tie rule (lower bank
index first) are those of an exact brute-force search (scikit-learn's), whichever the strategy.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from lit_imgcls.neighbors_bounds import PairDistances, principal_axes
from lit_imgcls.neighbors_clustered import ClusteredBounds

Metric = Literal["euclidean", "cosine"]
Weights = Literal["uniform", "distance", "temperature"]
Strategy = Literal["auto", "brute", "pruned"]

PRUNED_DIMS = 64  # principal components of the per-pair coarse bound (at most a quarter of the dimensions)
CLUSTER_SIZE = 128  # bank rows per cluster: fewer, larger clusters cost less Python and gathering per pass
PROBES = 4  # nearest clusters whose members give each query's first threshold
PRUNED_CHUNK = 16384  # queries per pruned pass: the per-cluster loop costs the same for any number of queries
PRUNED_MIN_BANK = 8192
PRUNED_MIN_DIM = 128  # auto: below this, one product per pair is cheap enough to be unbeatable
BRUTE_TILE = 4096  # bank rows per brute-force product (a multiple of 64): a tile stays in cache for the chunk
MAX_RESIDUAL_VARIANCE = 0.5  # auto: above this share of variance outside the components, do not even try
PAIR_COST = 64  # a bounded pair beyond its product's flops (writing, comparing, gathering), in product terms
PROBE_QUERIES = 128


PADDED_SLACK = 4  # per-row selections use a padded (rows, widest row) layout unless it exceeds this many times the list


def _best_pairs(
    rows: torch.Tensor, cols: torch.Tensor, dist: torch.Tensor, n_rows: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the k best of a flat list of (row, col, dist) pairs, grouped by row with cols ascending in a row.

    Equal distances keep the lower col first. The selection runs on a padded (n_rows, widest row) layout, or, when
    one row holds far more pairs than the others (many equal distances), on the flat list.
    """
    counts = torch.bincount(rows, minlength=n_rows)
    starts = counts.cumsum(0) - counts
    width = int(counts.max()) if len(rows) else 0
    if n_rows * width > PADDED_SLACK * (len(rows) + 1024):
        order = dist.sort(stable=True).indices
        order = order[rows[order].sort(stable=True).indices]
        take = order[(starts[:, None] + torch.arange(k, device=rows.device)).flatten()]
        return dist[take].view(n_rows, k), cols[take].view(n_rows, k)
    at = torch.arange(len(rows), device=rows.device) - starts[rows]
    padded = dist.new_full((n_rows, width), float("inf")).index_put_((rows, at), dist)
    best = padded.sort(dim=1, stable=True).indices[:, :k]
    padded_cols = cols.new_zeros(n_rows, width).index_put_((rows, at), cols)
    return padded.gather(1, best), padded_cols.gather(1, best)


def _group_by_row(rows: torch.Tensor, cols: torch.Tensor, n_cols: int, *values: torch.Tensor) -> list[torch.Tensor]:
    """rows, cols and values reordered by (row, col), unless they already are (one brute-force tile)."""
    key = rows * n_cols + cols
    if len(key) < 2 or bool((key[1:] > key[:-1]).all()):
        return [rows, cols, *values]
    order = key.argsort()
    return [t[order] for t in (rows, cols, *values)]


class KNNIndex:
    """A reference bank (N, D) prepared once for repeated exact searches (Euclidean, or cosine distance 1 - cos).

    strategy: `brute` bounds every pair with the full-dimension product (per chunk of queries, tile by tile);
    `pruned` clusters the bank and rules out clusters, rows and pairs with `PRUNED_DIMS` principal components first;
    `auto` picks pruned only for a large, high-dimensional, not nearly isotropic bank where a probe of bank rows
    predicts it is cheaper.
    `bf16` runs the brute-force product in bf16 with a margin for its rounding (loose: measured slower than fp32
    overall, see `KNNClassifier`). Results never depend on the strategy or the precision.
    """

    def __init__(
        self, bank: torch.Tensor, metric: Metric = "euclidean", bf16: bool = False, strategy: Strategy = "auto"
    ) -> None:
        if strategy not in ("auto", "brute", "pruned"):
            raise ValueError(f"strategy must be auto, brute or pruned, got {strategy!r}")
        self.bank, self.metric, self.bf16 = bank, metric, bf16
        self.exact = PairDistances(bank, metric)
        self.vectors = F.normalize(bank.float(), dim=1) if metric == "cosine" else bank
        largest = max(map(abs, self.vectors.aminmax())).item() ** 2 * max(1, bank.shape[1])  # bounds every squared norm
        self.abs_margin = 1e-13 * largest + (1e-12 if metric == "cosine" else 0)
        self.exact_pairs = 0
        self.strategy, self.bound = self._choose(strategy)
        del self.vectors

    def __len__(self) -> int:
        return len(self.bank)

    def _vectors(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.double(), dim=1) if self.metric == "cosine" else x

    def _choose(self, strategy: Strategy) -> tuple[str, ClusteredBounds]:
        n, dim = self.vectors.shape
        if strategy == "brute" or (strategy == "auto" and (n < PRUNED_MIN_BANK or dim < PRUNED_MIN_DIM)):
            return "brute", self._brute()
        dims = min(PRUNED_DIMS, max(1, dim // 4))
        projection = principal_axes(self.vectors, dims)
        if strategy == "auto" and projection.residual_share > MAX_RESIDUAL_VARIANCE:
            return "brute", self._brute()  # nearly isotropic: the per-pair bound would rule out almost nothing
        pruned = ClusteredBounds(self.vectors, projection, CLUSTER_SIZE, self.abs_margin)
        if strategy == "pruned":
            return "pruned", pruned
        self.strategy, self.bound = "pruned", pruned
        probe = self.bank[torch.linspace(0, n - 1, min(PROBE_QUERIES, n), device=self.bank.device).long()]
        self.search(probe, min(6, n))  # bank rows find themselves first: k=6 probes the cost of k=5
        coarse, fine, _ = (p / len(probe) for p in pruned.pairs)
        pruned.pairs = [0, 0, 0]
        self.exact_pairs = 0
        cheaper = coarse * (dims + PAIR_COST) + fine * (dim + PAIR_COST) < 0.5 * n * (dim + PAIR_COST)
        return ("pruned", pruned) if cheaper else ("brute", self._brute())

    def _brute(self) -> ClusteredBounds:
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        return ClusteredBounds(self.vectors, None, BRUTE_TILE, self.abs_margin, dtype)

    def search(self, queries: torch.Tensor, k: int, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        """The `k` nearest bank rows of every query: (distances (Q, k) float64, indices (Q, k)), nearest first.

        Ties are broken by the lower bank index. `chunk_size`: queries per pass (brute; pruned passes take at least
        `PRUNED_CHUNK`, as its per-cluster overhead is paid once per pass).
        """
        if k > len(self):
            raise ValueError(f"k={k} is larger than the reference bank ({len(self)} images): lower k")
        chunk_size = max(chunk_size, PRUNED_CHUNK) if self.strategy == "pruned" else chunk_size
        parts = [self._search_chunk(chunk, k) for chunk in queries.split(chunk_size)]
        dist = torch.cat([p[0] for p in parts]) if parts else torch.empty(0, k, dtype=torch.float64)
        idx = torch.cat([p[1] for p in parts]) if parts else torch.empty(0, k, dtype=torch.long)
        return (dist.sqrt() if self.metric == "euclidean" else dist), idx

    def _search_chunk(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact (squared Euclidean or cosine) distances and indices of one chunk's k nearest."""
        rows, cols, low, high = self.bound.candidates(
            self._vectors(queries), k, PROBES if self.strategy == "pruned" else 1
        )
        rows, cols, low, high = _group_by_row(rows, self.bound.order[cols], len(self), low, high)
        kth = _best_pairs(rows, cols, high, len(queries), k)[0][:, -1]  # k pairs are at most this far
        keep = low <= kth[rows]
        rows, cols = rows[keep], cols[keep]
        return _best_pairs(rows, cols, self._exact(queries, rows, cols), len(queries), k)

    def _exact(self, queries: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        self.exact_pairs += len(rows)
        return self.exact(queries, rows, cols)


def knn_search(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    metric: Metric = "euclidean",
    chunk_size: int = 1024,
    bf16: bool = False,
    strategy: Strategy = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One-off search: `KNNIndex(bank, metric, bf16, strategy).search(queries, k, chunk_size)`."""
    return KNNIndex(bank, metric, bf16, strategy).search(queries, k, chunk_size)


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
