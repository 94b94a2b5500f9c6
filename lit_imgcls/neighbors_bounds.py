"""Guaranteed lower bounds on k-NN distances, and exact distances of chosen (query, bank) pairs.

A `LowerBound` maps vectors to features f with ||f(q) - f(b)|| <= ||q - b||: the vectors themselves (brute force:
the bound is only rounding away from the distance) or their projection onto the top principal components plus the
norm of the residual, so that ||q - b||^2 >= ||P(q - b)||^2 + (||r_q|| - ||r_b||)^2. The (Q, N) bound matrix is one
matrix product in fp32 (or bf16); a margin that covers its worst-case rounding error keeps it a true lower bound.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

PCA_SAMPLE = 4096  # rows used to fit the centre and projection: any orthonormal projection gives a valid bound


def input_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff of the matrix product's inputs: bf16, or fp32 unless reduced-precision fp32 products are on."""
    if dtype == torch.bfloat16 or torch.get_float32_matmul_precision() != "highest":
        return 2.0**-8
    if torch.cuda.is_available() and torch.backends.cuda.matmul.allow_tf32:
        return 2.0**-11
    return 2.0**-24


class LowerBound:
    """Lower bounds of squared Euclidean distances to a (centred) bank of float64 vectors (N, D).

    `dims=None` bounds with the vectors themselves (brute force); otherwise with `dims` principal components and
    the residual norm.
    """

    def __init__(
        self,
        vectors: torch.Tensor,
        dims: int | Projection | None,
        dtype: torch.dtype = torch.float32,
        order: Tensor | None = None,
    ) -> None:
        """`dims`: a component count, or a `Projection` already fitted. `order`: the bank is vectors[order] (brute
        force only)."""
        self.dtype = dtype
        self.folded: Tensor | None = None
        if isinstance(dims, int):
            dims = principal_axes(vectors, dims)
        self.mean = _sample(vectors).mean(0).float() if dims is None else dims.mean
        self.projection = None if dims is None else dims.axes
        if dims is None:
            rows = vectors if order is None else vectors.index_select(0, order)
            parts = [self.features_of(rows)]
        else:
            parts = [self.features_of(chunk) for chunk in vectors.split(8192)]
        width = parts[0][0].shape[1]
        # |computed - exact| <= eta * (|f_q|^2 + |f_b|^2): inputs and output rounded (bf16: 4 u), fp32 accumulation
        self.eta = 2 * (4 * input_roundoff(dtype) + (width + 8) * 2.0**-24)
        if dims is not None:  # float64 features of the bank, for callers that need them exact
            self.exact_features = torch.cat([f for f, _ in parts])
        self.features = torch.cat([f.to(dtype) for f, _ in parts]) if len(parts) > 1 else parts[0][0].to(dtype)
        self.bank_term = (torch.cat([n for _, n in parts]) * (1 - self.eta)).float()

    def reorder(self, order: torch.Tensor) -> None:
        """Permute the bank rows (bank row i becomes old row order[i])."""
        self.features, self.bank_term = self.features[order], self.bank_term[order]

    def fold(self, multiple: int) -> None:
        """Prepare the whole-bank product of brute force: pad the bank with zero rows whose bank term is +inf (their
        bound is +inf, so no search keeps them) to a multiple of `multiple` rows and, in fp32, fold the bank term
        into the product (bank rows [b, term], queries [-2 q, 1]): one matrix product and no bias pass. The extra
        term lies within eta's allowance: (width + 1) products summing to at most 2 (|f_q|^2 + |f_b|^2)."""
        pad = -len(self.features) % multiple
        self.features = torch.cat([self.features, self.features.new_zeros(pad, self.width)])
        self.bank_term = torch.cat([self.bank_term, self.bank_term.new_full((pad,), float("inf"))])
        if self.dtype == torch.float32:
            self.folded = torch.cat([self.features, self.bank_term[:, None]], 1)
            self.features = self.folded[:, :-1]  # a view: the bank is stored once

    @property
    def width(self) -> int:
        return self.features.shape[1]

    def features_of(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (M, width) and their squared norms: fp32 for brute force, else float64."""
        if self.projection is None:  # a translation by the fp32 mean is exact in the maths; rounding is in eta
            centred = vectors.float() - self.mean
            return centred, _squared_norms(centred)
        centred = vectors.to(torch.float64, copy=True).sub_(self.mean)
        projected = centred @ self.projection
        total = _squared_norms(centred)
        residual = (total - projected.square().sum(1)).clamp_min(0).sqrt()
        return torch.cat([projected, residual[:, None]], 1), total

    def query_features(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (Q, width) in the product dtype, offset (Q,) float64) of queries, for `part`."""
        feats, sq_norm = self.features_of(queries)
        return feats.to(self.dtype), sq_norm * (1 - self.eta)

    def part(self, feats: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """fp32 (Q, stop - start): with the query's offset, a lower bound to bank rows start..stop."""
        if self.folded is not None:
            return torch.cat([feats * -2, feats.new_ones(len(feats), 1)], 1) @ self.folded[start:stop].T
        bank, bank_term = self.features[start:stop], self.bank_term[start:stop]
        if self.dtype == torch.float32:
            return torch.addmm(bank_term, feats, bank.T, alpha=-2)
        return (feats @ bank.T).float().mul_(-2).add_(bank_term)

    def bounds(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(part (Q, N) fp32, offset (Q,) float64): the bound is at most part + offset, a true lower bound."""
        feats, offset = self.query_features(queries)
        return self.part(feats), offset


def bound_limit(squared: torch.Tensor, offset: torch.Tensor, abs_margin: float) -> torch.Tensor:
    """fp32 limit on a bound part: a bank row whose part exceeds it is farther than `squared` (float64, (Q,))."""
    limit64 = squared + abs_margin - offset
    limit = limit64.float()
    return torch.where(limit.double() < limit64, limit.nextafter(torch.full_like(limit, float("inf"))), limit)


def _sample(vectors: torch.Tensor) -> torch.Tensor:
    """An even float64 sample of the rows: any centre and orthonormal axes fitted on it give a valid bound."""
    return vectors[:: max(1, len(vectors) // PCA_SAMPLE)].double()


class Projection(NamedTuple):
    """Centre (D,) and orthonormal top principal axes (D, dims), float64, and the share of variance left out."""

    mean: Tensor
    axes: Tensor
    residual_share: float


def principal_axes(vectors: torch.Tensor, dims: int) -> Projection:
    """The top `dims` principal axes of `vectors` (N, D), fitted on an even sample."""
    sample = _sample(vectors)
    mean = sample.mean(0)
    centred = sample - mean  # not in place: the sample may be a view of float64 vectors
    variances, axes = torch.linalg.eigh(centred.T @ centred)
    left = variances[:-dims].clamp_min(0).sum() / variances.clamp_min(0).sum().clamp_min(1e-300)
    return Projection(mean, axes[:, -dims:].flip(1).contiguous(), left.item())


def _squared_norms(x: torch.Tensor) -> torch.Tensor:
    """Squared row norms (a few ulps from the plain sum of squares, several times faster)."""
    return torch.linalg.vector_norm(x, dim=1).square()


class PairDistances:
    """Exact distances of (query row, bank row) pairs: float64 (squared Euclidean or 1 - cos), as brute force."""

    STEP_VALUES = 2**20  # float64 values per operand per step (8 MiB): few steps for low dimensions, bounded memory
    PREPARED_VALUES = 2**22  # a bank of at most this many values is kept in float64 (32 MiB), cosine rows unit

    def __init__(self, bank: torch.Tensor, metric: str) -> None:
        self.bank, self.cosine = bank, metric == "cosine"
        self.step = max(256, self.STEP_VALUES // max(1, bank.shape[1]))
        self.prepared = bank.numel() <= self.PREPARED_VALUES
        if self.prepared:
            self.bank = self._prepare(bank)
        elif self.cosine:
            self.bank_norms = torch.cat([_norms(part) for part in bank.split(self.step)])

    def _prepare(self, rows: torch.Tensor) -> torch.Tensor:
        """float64 rows, divided by their norms for cosine (as `F.cosine_similarity` does: the same rounding as the
        brute-force reference, so that equal distances stay equal)."""
        return rows.double() / _norms(rows)[:, None] if self.cosine else rows.double()

    def __call__(self, queries: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Distances (P,) between queries[rows] and bank[cols]."""
        out = torch.empty(len(rows), dtype=torch.float64, device=rows.device)
        queries = self._prepare(queries)
        for start in range(0, len(rows), self.step):
            r, c = rows[start : start + self.step], cols[start : start + self.step]
            q, b = queries.index_select(0, r), self.bank.index_select(0, c)
            if not self.prepared:
                b = b.double().div_(self.bank_norms[c, None]) if self.cosine else b.double()
            if self.cosine:
                out[start : start + len(r)] = b.mul_(q).sum(1).neg_().add_(1)
            else:
                out[start : start + len(r)] = q.sub_(b).square_().sum(1)
        return out


def _norms(x: torch.Tensor) -> torch.Tensor:
    """Row norms in float64, at least 1e-12 (a zero row has cosine 0 to everything: distance 1)."""
    return torch.linalg.vector_norm(x.double(), dim=1).clamp_min(1e-12)
