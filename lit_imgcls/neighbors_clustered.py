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

from lit_imgcls.neighbors_bounds import LowerBound, Projection, bound_limit

CLUSTER_DIMS = 8  # principal components the bank is clustered on: few dimensions, tight clusters
BLOCK = 64  # columns ruled out together by their minimum
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


def _below(part: torch.Tensor, limit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the entries of part (R, M) at most their row's limit. Listing every comparison costs several
    times more than a minimum, so whole blocks of `BLOCK` columns (or whole rows) are ruled out by their minimum."""
    if part.shape[1] % BLOCK == 0:
        blocks = part.view(len(part), -1, BLOCK)
        r, b = (blocks.amin(2) <= limit[:, None]).nonzero(as_tuple=True)
        rr, c = (blocks[r, b] <= limit[r, None]).nonzero(as_tuple=True)
        return r[rr], b[rr] * BLOCK + c
    rows = (part.amin(1) <= limit).nonzero().squeeze(1)
    r, c = (part[rows] <= limit[rows, None]).nonzero(as_tuple=True)
    return rows[r], c


def _cluster_space(feats: torch.Tensor, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `dims` principal components of coarse features (M, width) and the norm of the rest (float64)."""
    rest = (feats[:, -1].square() + feats[:, dims:-1].square().sum(1)).sqrt()
    return feats[:, :dims], rest


class ClusteredBounds:
    """Candidate pairs of an exact search over `vectors` (N, D): bank sorted by cluster, three lower bounds.

    `projection=None` is brute force: the fine bound only (in `dtype`, fp32 or bf16), over tiles of `cluster_size`
    bank rows (a multiple of `BLOCK`); the minima of column blocks give each query's threshold and rule out most
    blocks. `order[i]` is the original index of sorted bank
    row i. `abs_margin` covers the rounding of the float64 reference distances.
    """

    def __init__(
        self,
        vectors: torch.Tensor,
        projection: Projection | None,
        cluster_size: int,
        abs_margin: float,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.abs_margin = abs_margin
        self.pairs = [0, 0, 0]  # pairs bounded by the coarse bound, by the fine bound, and that survive both
        n, device = len(vectors), vectors.device
        if projection is None:
            self.coarse = None
            self.order = torch.arange(n, device=device)
            self.fine = LowerBound(vectors, None, dtype)
            self.fine.fold(BLOCK)
            # per column block, the largest bank term of its real rows: upper bounds from block minima alone
            self.block_terms = self.fine.bank_term.view(-1, BLOCK).nan_to_num(posinf=0.0).amax(1)
            # a bank of at most two tiles is one product: splitting it only loosens the first tile's threshold
            self.tile = cluster_size if n > 2 * cluster_size else len(self.fine.features)
            return
        self.coarse = LowerBound(vectors, projection)
        dims = projection.axes.shape[1]
        n_clusters = max(1, n // cluster_size)
        proj, resid = _cluster_space(self.coarse.exact_features, min(dims, CLUSTER_DIMS))
        assign = kmeans(torch.cat([proj, resid[:, None]], 1).float(), n_clusters)
        self.order = assign.argsort(stable=True)
        self.coarse.reorder(self.order)
        del self.coarse.exact_features
        self.fine = LowerBound(vectors, None, dtype, order=self.order)
        counts = torch.bincount(assign, minlength=n_clusters)
        self.starts = (counts.cumsum(0) - counts).tolist()
        self.stops = counts.cumsum(0).tolist()
        self.centroids = torch.zeros(n_clusters, proj.shape[1], dtype=torch.float64, device=device)
        self.centroids.index_add_(0, assign, proj).div_(counts.clamp_min(1)[:, None])
        spread = (proj - self.centroids[assign]).norm(dim=1)
        radius = torch.zeros_like(counts, dtype=torch.float64).scatter_reduce_(0, assign, spread, "amax")
        resid_low = torch.full_like(radius, float("inf")).scatter_reduce_(0, assign, resid, "amin")
        resid_high = torch.zeros_like(radius).scatter_reduce_(0, assign, resid, "amax")
        up, down = torch.tensor(float("inf"), device=device), torch.tensor(0.0, device=device)
        self.radius = radius.mul_(1 + SLACK).float().nextafter(up)  # fp32, rounded outwards
        self.resid_low = resid_low.mul_(1 - SLACK).float().nextafter(down)
        self.resid_high = resid_high.mul_(1 + SLACK).float().nextafter(up)

    def cluster_bounds(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, C) fp32 lower bounds to every member of each cluster, and squared distances to centroids.

        fp32 is rounded by at most (dims + 8) 2^-24 of the squared norms: `FP32_SLACK` of them is subtracted.
        """
        proj64, resid = _cluster_space(feats, self.centroids.shape[1])
        proj, resid = proj64.float(), resid.float()
        centroid_sq = self.centroids.square().sum(1)
        sq = torch.addmm(centroid_sq.float(), proj, self.centroids.float().T, alpha=-2)
        sq += proj.square().sum(1, keepdim=True)
        slack = FP32_SLACK * (proj64.square().sum(1) + centroid_sq.max()) + self.abs_margin
        low = (sq - slack[:, None].float()).clamp_min_(0).sqrt_().sub_(self.radius).clamp_min_(0).square_()
        outside = (self.resid_low - resid[:, None]).clamp_min_(0)
        outside += (resid[:, None] - self.resid_high).clamp_min_(0)
        low += outside.square_()
        return low.mul_(1 - FP32_SLACK), sq

    def candidates(self, queries: torch.Tensor, k: int, probes: int) -> tuple[torch.Tensor, ...]:
        """Pairs that may be among the k nearest: (rows, sorted bank rows, lower bound, upper bound) float64."""
        if self.coarse is None:
            return self._dense_candidates(queries, k)
        n_q, device = len(queries), queries.device
        coarse_q, offset = self.coarse.query_features(queries)
        lower, centre_sq = self.cluster_bounds(self.coarse.features_of(queries)[0])
        fine_q, fine_offset = self.fine.query_features(queries)
        probe = centre_sq.topk(min(probes, centre_sq.shape[1]), dim=1, largest=False).indices
        best = torch.full((n_q, k), float("inf"), dtype=torch.float64, device=device)
        for j, qs in self._groups(torch.zeros_like(lower, dtype=torch.bool).scatter_(1, probe, True)):
            upper = self._upper(self.fine.part(fine_q[qs], self.starts[j], self.stops[j]), qs, j, fine_offset, k)
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
            self.pairs[1] += part.numel()
            r, c = _below(part, fine_limit[qs])
            found.append((qs[r], c + start, part[r, c]))
        rows, cols, part = (torch.cat(x) for x in zip(*found, strict=True))
        self.pairs[2] += len(rows)
        low = part.double() + fine_offset[rows]
        return rows, cols, low, self._margin(low, fine_offset[rows], self.fine.bank_term[cols])

    def _dense_candidates(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
        """`candidates` of brute force: the bank in tiles of `tile` rows, one product each; the minima of each tile's
        `BLOCK`-column blocks are distinct pairs whose k smallest upper bounds so far give the threshold, and rule out
        most blocks before pairs are listed. Later tiles only lower the threshold (the caller drops what it keeps)."""
        fine_q, offset = self.fine.query_features(queries)
        best = torch.full((len(queries), k), float("inf"), dtype=torch.float64, device=queries.device)
        found: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for start in range(0, len(self.fine.features), self.tile):
            part = self.fine.part(fine_q, start, start + self.tile)  # whole blocks: the bank is padded with +inf
            self.pairs[1] += part.numel()
            blocks = part.view(-1, BLOCK)  # row i * n_blocks + b: block b of query i
            minima = blocks.amin(1).view(len(queries), -1)
            n_blocks = minima.shape[1]
            if n_blocks >= k:  # the k smallest block minima: k distinct pairs, bounded with their block's largest term
                low, chosen = minima.topk(k, dim=1, largest=False)
                bank_term = self.block_terms[start // BLOCK + chosen]
            else:
                low, cols = part.topk(min(k, part.shape[1]), dim=1, largest=False)
                bank_term = self.fine.bank_term[cols + start]
            upper = self._margin(low.double() + offset[:, None], offset[:, None], bank_term)
            best = torch.cat([best, upper], 1).topk(k, dim=1, largest=False).values
            limit = bound_limit(best[:, -1], offset, self.abs_margin)
            r, b = (minima <= limit[:, None]).nonzero(as_tuple=True)
            values = blocks.index_select(0, r * n_blocks + b)
            rr, c = (values <= limit[r, None]).nonzero(as_tuple=True)
            found.append((r[rr], start + b[rr] * BLOCK + c, values[rr, c]))
        rows, cols, part = (torch.cat(x) for x in zip(*found, strict=True))
        self.pairs[2] += len(rows)
        low = part.double() + offset[rows]
        return rows, cols, low, self._margin(low, offset[rows], self.fine.bank_term[cols])

    def _groups(self, mask: torch.Tensor):
        """(cluster, queries) for every non-empty cluster with at least one query set in mask (Q, C)."""
        clusters, queries = mask.T.nonzero(as_tuple=True)
        counts = torch.bincount(clusters, minlength=mask.shape[1]).tolist()
        for j, qs in enumerate(queries.split(counts)):
            if len(qs) and self.stops[j] > self.starts[j]:
                yield j, qs

    def _upper(self, part: torch.Tensor, qs: torch.Tensor, j: int, offset: torch.Tensor, k: int) -> torch.Tensor:
        """Upper bounds (len(qs), min(k, size)) of squared distances to distinct members of cluster j."""
        part, cols = part.topk(min(k, part.shape[1]), dim=1, largest=False)
        low = part.double() + offset[qs, None]
        return self._margin(low, offset[qs, None], self.fine.bank_term[cols + self.starts[j]])

    def _margin(self, low: torch.Tensor, query_term: torch.Tensor, bank_term: torch.Tensor) -> torch.Tensor:
        """Upper bounds of the squared distances whose fine lower bounds are `low`, given the pairs' query and bank
        terms (or larger ones)."""
        eta = self.fine.eta
        norms = (query_term + bank_term.double()) / (1 - eta)
        return low + 3 * eta * (1 + 1e-6) * norms + 2 * self.abs_margin
