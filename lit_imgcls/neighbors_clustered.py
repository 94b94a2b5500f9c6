"""Exact k-NN candidates from a bank clustered in principal-component space: skip clusters, then rows, then pairs.

Three guaranteed lower bounds of the squared distance, each cheaper and looser than the next:
cluster (distance to the cluster's centroid in the projected space minus its radius, and the gap between the
query's residual norm and the cluster's range of residual norms), coarse (`dims` principal components + residual
norm, per pair) and fine (the full-dimension fp32 product with its rounding margin). A per-query threshold, an
upper bound of the k-th distance, comes from the fine product with the members of the nearest clusters; a pair
survives only if every bound is within it. The bank is sorted by cluster so that every product is dense.
"""

from __future__ import annotations

import torch

from lit_imgcls.neighbors_bounds import LowerBound, bound_limit

KMEANS_ITERS = 6
KMEANS_SAMPLE = 16  # rows per cluster fitted by k-means; every row is then assigned to its nearest centroid
SLACK = 1e-9  # relative slack on the float64 cluster geometry
FP32_SLACK = 1e-5  # relative slack on the fp32 cluster bounds


def kmeans(x: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """Cluster of every row of x (N, w) fp32: Lloyd's iterations on an even sample, seeded for reproducibility."""
    generator = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=generator).to(x.device)
    sample = x[perm[: n_clusters * KMEANS_SAMPLE]]
    centroids = sample[:n_clusters].clone()
    for _ in range(KMEANS_ITERS):
        assign = _nearest(sample, centroids)
        counts = torch.bincount(assign, minlength=n_clusters)
        sums = torch.zeros_like(centroids).index_add_(0, assign, sample)
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centroids)
    return _nearest(x, centroids)


def _nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    sq = centroids.square().sum(1)
    return torch.cat([torch.addmm(sq, part, centroids.T, alpha=-2).min(1).indices for part in x.split(8192)])


class ClusteredBounds:
    """Candidate pairs of an exact search over `vectors` (N, D): bank sorted by cluster, three lower bounds.

    `order[i]` is the original index of sorted bank row i. `abs_margin` covers the rounding of the float64
    reference distances.
    """

    def __init__(self, vectors: torch.Tensor, dims: int, n_clusters: int, abs_margin: float) -> None:
        self.abs_margin = abs_margin
        self.coarse = LowerBound(vectors, dims)
        feats = self.coarse.exact_features
        assign = kmeans(feats.float(), n_clusters)
        self.order = assign.argsort(stable=True)
        self.coarse.reorder(self.order)
        del self.coarse.exact_features
        self.fine = LowerBound(vectors[self.order], None)
        counts = torch.bincount(assign, minlength=n_clusters)
        self.starts = (counts.cumsum(0) - counts).tolist()
        self.stops = counts.cumsum(0).tolist()
        proj, resid = feats[:, :dims], feats[:, dims]
        self.centroids = torch.zeros(n_clusters, dims, dtype=torch.float64, device=vectors.device)
        self.centroids.index_add_(0, assign, proj).div_(counts.clamp_min(1)[:, None])
        spread = (proj - self.centroids[assign]).norm(dim=1)
        self.radius = torch.zeros_like(counts, dtype=torch.float64).scatter_reduce_(0, assign, spread, "amax")
        self.radius.mul_(1 + SLACK)
        big = torch.full_like(self.radius, float("inf"))
        self.resid_low = big.scatter_reduce(0, assign, resid, "amin").mul_(1 - SLACK)
        self.resid_high = torch.zeros_like(self.radius).scatter_reduce_(0, assign, resid, "amax").mul_(1 + SLACK)
        self.radius_f32 = self.radius.float().nextafter(torch.tensor(float("inf"), device=vectors.device))
        self.resid_low_f32 = self.resid_low.float().nextafter(torch.tensor(0.0, device=vectors.device))
        self.resid_high_f32 = self.resid_high.float().nextafter(torch.tensor(float("inf"), device=vectors.device))
        self.pairs = [0, 0, 0]  # pairs bounded by the coarse bound, by the fine bound, and that survive both

    def cluster_bounds(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, C) fp32 lower bounds to every member of each cluster, and squared distances to centroids.

        fp32 is rounded by at most (dims + 8) 2^-24 of the squared norms: `FP32_SLACK` of them is subtracted.
        """
        dims = self.centroids.shape[1]
        proj, resid = feats[:, :dims].float(), feats[:, dims].float()
        centroid_sq = self.centroids.square().sum(1)
        sq = torch.addmm(centroid_sq.float(), proj, self.centroids.float().T, alpha=-2)
        sq += proj.square().sum(1, keepdim=True)
        slack = FP32_SLACK * (feats[:, :dims].square().sum(1) + centroid_sq.max()) + self.abs_margin
        low = (sq - slack[:, None].float()).clamp_min_(0).sqrt_().sub_(self.radius_f32).clamp_min_(0).square_()
        outside = (self.resid_low_f32 - resid[:, None]).clamp_min_(0)
        outside += (resid[:, None] - self.resid_high_f32).clamp_min_(0)
        low += outside.square_()
        return low.mul_(1 - FP32_SLACK), sq

    def candidates(self, queries: torch.Tensor, k: int, probes: int) -> tuple[torch.Tensor, ...]:
        """Pairs that may be among the k nearest: (rows, sorted bank rows, lower bound, upper bound) float64."""
        coarse_q, offset = self.coarse.query_features(queries)
        lower, centre_sq = self.cluster_bounds(self.coarse.features_of(queries)[0])
        fine_q, fine_offset = self.fine.query_features(queries)
        n_q = len(queries)
        probe = centre_sq.topk(min(probes, centre_sq.shape[1]), dim=1, largest=False).indices
        best = torch.full((n_q, k), float("inf"), dtype=torch.float64, device=queries.device)
        for j, qs in self._groups(torch.zeros_like(lower, dtype=torch.bool).scatter_(1, probe, True)):
            upper = self._upper(self.fine.part(fine_q[qs], self.starts[j], self.stops[j]), qs, j, fine_offset)
            best[qs] = torch.cat([best[qs], upper], 1).topk(k, dim=1, largest=False).values
        threshold = best[:, -1]
        coarse_limit = bound_limit(threshold, offset, self.abs_margin)
        fine_limit = bound_limit(threshold, fine_offset, self.abs_margin)
        found: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for j, qs in self._groups(lower <= threshold[:, None]):
            start, stop = self.starts[j], self.stops[j]
            coarse = self.coarse.part(coarse_q[qs], start, stop)
            rows = (coarse.amin(1) <= coarse_limit[qs]).nonzero().squeeze(1)
            self.pairs[0] += coarse.numel()
            if not len(rows):
                continue
            qs = qs[rows]
            part = self.fine.part(fine_q[qs], start, stop)
            r, c = (part <= fine_limit[qs, None]).nonzero(as_tuple=True)
            self.pairs[1] += part.numel()
            found.append((qs[r], c + start, part[r, c]))
        rows, cols, part = (torch.cat(x) for x in zip(*found, strict=True))
        self.pairs[2] += len(rows)
        low = part.double() + fine_offset[rows]
        return rows, cols, low, self._margin(low, rows, cols, fine_offset)

    def _groups(self, mask: torch.Tensor):
        """(cluster, queries) for every non-empty cluster with at least one query set in mask (Q, C)."""
        clusters, queries = mask.T.nonzero(as_tuple=True)
        counts = torch.bincount(clusters, minlength=mask.shape[1]).tolist()
        for j, qs in enumerate(queries.split(counts)):
            if len(qs) and self.stops[j] > self.starts[j]:
                yield j, qs

    def _upper(self, part: torch.Tensor, qs: torch.Tensor, j: int, offset: torch.Tensor) -> torch.Tensor:
        """Upper bounds (len(qs), min(k, size)) of the smallest squared distances to cluster j's members."""
        cols = torch.arange(self.starts[j], self.stops[j], device=part.device)
        low = part.double() + offset[qs, None]
        return self._margin(low, qs[:, None].expand_as(low), cols.expand_as(low), offset)

    def _margin(self, low: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """Upper bounds of the squared distances whose fine lower bounds are `low`."""
        eta = self.fine.eta
        norms = offset[rows] / (1 - eta) + self.fine.bank_term[cols].double() / (1 - eta)
        return low + 3 * eta * (1 + 1e-6) * norms + 2 * self.abs_margin
