"""Exact k-NN on Fashion-MNIST (60,000 references, 10,000 queries, k=5, Euclidean, uniform votes): the project's
search against scikit-learn's brute force, faiss's exact IndexFlatL2 (when faiss is installed) and the bare fp32
distance product + top-k (the floor of any search that scores every pair), the previous (not exact) search
(`previous_s`) and, for integer data such as pixels, an exact brute force on int8 products (`int8_brute_s`, the
issue's integer candidate path), all in the same run. `ours_s` includes building the index (`build_s`).

Banks: `pixels` (raw pixels, 784-d), `lenet_features` (84-d penultimate features of a randomly initialised
LeNet-5, seed 0), `random512` (uniform random 512-d vectors: the adversarial case where the pruning bound is loose).
Prints one JSON line; `same_neighbours` compares indices with scikit-learn's, `same_neighbours_up_to_ties` allows
a different order among neighbours at equal distance (scikit-learn does not order ties by index).

    python benchmarks/knn.py [--bank pixels|lenet_features|random512] [--queries N] [--strategy auto|brute|pruned]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch
from sklearn.neighbors import NearestNeighbors

from lit_imgcls.data.datasets import load_fashion_mnist
from lit_imgcls.neighbors import KNNIndex, knn_vote

T = TypeVar("T")


def lenet_features(images: torch.Tensor) -> torch.Tensor:
    """84-d penultimate features of a randomly initialised LeNet-5 (seed 0) on normalised images."""
    from lit_imgcls.models import create_model

    torch.manual_seed(0)
    net = create_model("lenet5", 10, 1).eval()
    x = (images.float() / 255 - 0.2860) / 0.3530
    with torch.no_grad():
        return torch.cat([net.forward_head(net.forward_features(b), pre_logits=True).flatten(1) for b in x.split(2048)])


def load_bank(name: str, n_queries: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    train = load_fashion_mnist("data", train=True, download=False)
    test = load_fashion_mnist("data", train=False, download=False)
    bank_y, query_y = train.targets, test.targets[:n_queries]
    if name == "pixels":
        return train.images.flatten(1).float(), bank_y, test.images[:n_queries].flatten(1).float(), query_y
    if name == "lenet_features":
        return lenet_features(train.images), bank_y, lenet_features(test.images[:n_queries]), query_y
    generator = torch.Generator().manual_seed(0)
    return (
        torch.rand(len(bank_y), 512, generator=generator),
        bank_y,
        torch.rand(n_queries, 512, generator=generator),
        query_y,
    )


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def faiss_search(bank: torch.Tensor, queries: torch.Tensor, k: int) -> np.ndarray | None:
    try:
        import faiss
    except ImportError:
        return None
    faiss.omp_set_num_threads(torch.get_num_threads())
    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(bank.numpy())
    return index.search(queries.numpy(), k)[1]


def matmul_topk(bank: torch.Tensor, queries: torch.Tensor, k: int) -> None:
    bank_sq = bank.square().sum(1)
    for chunk in queries.split(1024):
        torch.addmm(bank_sq, chunk, bank.T, alpha=-2).topk(k, dim=1, largest=False)


def previous_search(bank: torch.Tensor, queries: torch.Tensor, k: int, chunk_size: int = 1024) -> torch.Tensor:
    """The search shipped before exact pruning (main at 590c393, `KNNIndex.search`, Euclidean fp32): one distance
    product per chunk, the best 2k + 8 candidates re-ranked in float64. Indices (Q, k), nearest first."""
    features = bank.float()
    bank_sq = features.square().sum(1)
    n_candidates = min(len(bank), 2 * k + 8)
    all_idx = []
    for start in range(0, len(queries), chunk_size):
        chunk = queries[start : start + chunk_size].float()
        scores = (chunk @ features.T).mul_(2).sub_(bank_sq)
        cand = scores.topk(n_candidates, dim=1).indices
        dist = (chunk.double().unsqueeze(1) - bank[cand].double()).square().sum(-1).sqrt()
        by_index = cand.sort(dim=1)
        dist = dist.gather(1, by_index.indices)
        order = dist.sort(dim=1, stable=True).indices[:, :k]
        all_idx.append(by_index.values.gather(1, order))
    return torch.cat(all_idx)


def int8_brute_search(bank: torch.Tensor, queries: torch.Tensor, k: int, block: int = 64) -> torch.Tensor | None:
    """Exact brute force in integers, for a bank and queries of integers spanning at most 256 values (uint8 pixels):
    shifted to int8, `torch._int_mm` gives exact products (AMX-INT8/VNNI where the CPU has them), so squared
    distances are exact int32 and need no re-ranking. The k nearest by (distance, index) from 64-column block minima
    and a running threshold, as the fp32 brute force does. Indices (Q, k), or None for other data."""
    low = min(bank.min(), queries.min())
    if max(bank.max(), queries.max()) - low > 255 or bool((bank != bank.round()).any()):
        return None
    b8 = torch.cat(
        [(bank - low - 128).to(torch.int8), torch.zeros(-len(bank) % block, bank.shape[1], dtype=torch.int8)]
    )
    bank_sq = b8.int().square().sum(1)
    bank_sq[len(bank) :] = 2**30  # padding rows: never among the nearest
    all_idx = []
    for chunk in queries.split(1024):
        q8 = (chunk - low - 128).to(torch.int8)
        best = torch.full((len(q8), k), 2**31 - 1, dtype=torch.int32)
        found = []
        for start in range(0, len(b8), 4096):
            part = torch._int_mm(q8, b8[start : start + 4096].T).mul_(-2).add_(bank_sq[start : start + 4096])
            blocks = part.view(len(q8), -1, block)
            minima = blocks.amin(2)
            lowest = minima.topk(min(k, minima.shape[1]), dim=1, largest=False).values
            best = torch.cat([best, lowest], 1).topk(k, dim=1, largest=False).values
            r, b = (minima <= best[:, -1:]).nonzero(as_tuple=True)
            values = blocks[r, b]
            rr, c = (values <= best[r, -1:]).nonzero(as_tuple=True)
            found.append((r[rr], start + b[rr] * block + c, values[rr, c]))
        rows, cols, values = (torch.cat(x) for x in zip(*found, strict=True))
        keep = values <= best[rows, -1]
        rows, cols, values = rows[keep], cols[keep], values[keep].long()
        key = (rows * (2**31) + values) * len(b8) + cols  # by row, then distance, then index: one exact order
        order = key.argsort()
        counts = torch.bincount(rows, minlength=len(q8))
        take = order[((counts.cumsum(0) - counts)[:, None] + torch.arange(k)).flatten()]
        all_idx.append(cols[take].view(len(q8), k))
    return torch.cat(all_idx)


def same_up_to_ties(ours: np.ndarray, ours_d: np.ndarray, theirs: np.ndarray, theirs_d: np.ndarray) -> bool:
    """Same distances, and the same indices wherever the distance is not shared with another neighbour."""
    if not np.allclose(ours_d, theirs_d, rtol=1e-5, atol=1e-5):
        return False
    tied = np.zeros_like(ours_d, dtype=bool)
    close = np.isclose(ours_d[:, 1:], ours_d[:, :-1], rtol=1e-9, atol=1e-9)
    tied[:, 1:] |= close
    tied[:, :-1] |= close
    return bool(((ours == theirs) | tied).all())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", choices=["pixels", "lenet_features", "random512"], default="pixels")
    parser.add_argument("--queries", type=int, default=10000)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--strategy", choices=["auto", "brute", "pruned"], default="auto")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--no-brute", action="store_true", help="skip timing strategy=brute for comparison")
    args = parser.parse_args()
    bank, bank_y, queries, query_y = load_bank(args.bank, args.queries)
    bf16 = args.precision == "bf16"

    def ours_search(strategy: str) -> tuple[KNNIndex, float, torch.Tensor, torch.Tensor]:
        index, build_s = timed(lambda: KNNIndex(bank, "euclidean", bf16, strategy))
        index.exact_pairs = 0
        return (index, build_s, *index.search(queries, args.k))

    (index, build_s, dist, idx), ours_s = timed(lambda: ours_search(args.strategy))
    ours = knn_vote(dist, bank_y[idx], 10).argmax(1)
    brute_s = None if args.no_brute or index.strategy == "brute" else timed(lambda: ours_search("brute"))[1]
    _, matmul_s = timed(lambda: matmul_topk(bank, queries, args.k))
    previous_idx, previous_s = timed(lambda: previous_search(bank, queries, args.k))
    sk_model = NearestNeighbors(n_neighbors=args.k, algorithm="brute", n_jobs=torch.get_num_threads())
    (sk_d, sk_idx), sklearn_s = timed(lambda: sk_model.fit(bank.numpy()).kneighbors(queries.numpy()))
    sk_pred = knn_vote(torch.from_numpy(sk_d), bank_y[torch.from_numpy(sk_idx)], 10).argmax(1)
    faiss_idx, faiss_s = timed(lambda: faiss_search(bank, queries, args.k))
    int8_idx, int8_s = timed(lambda: int8_brute_search(bank, queries, args.k))

    result = {
        "benchmark": "knn",
        "bank": args.bank + (" (randomly initialised LeNet-5, seed 0)" if args.bank == "lenet_features" else ""),
        "references": len(bank),
        "queries": len(queries),
        "dims": bank.shape[1],
        "k": args.k,
        "strategy": f"{args.strategy} -> {index.strategy}",
        "bound_precision": "bf16" if bf16 and index.strategy == "brute" else "fp32",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "ours_acc": round((ours == query_y).float().mean().item(), 4),
        "sklearn_acc": round((sk_pred == query_y).float().mean().item(), 4),
        "ours_s": round(ours_s, 3),
        "build_s": round(build_s, 3),
        "previous_s": round(previous_s, 3),
        "brute_s": None if brute_s is None else round(brute_s, 3),
        "sklearn_s": round(sklearn_s, 3),
        "faiss_flat_s": None if faiss_idx is None else round(faiss_s, 3),
        "matmul_s": round(matmul_s, 3),
        "int8_brute_s": None if int8_idx is None else round(int8_s, 3),
        "speedup_vs_sklearn": round(sklearn_s / ours_s, 3),
        "speedup_vs_faiss": None if faiss_idx is None else round(faiss_s / ours_s, 3),
        "speedup_vs_previous": round(previous_s / ours_s, 3),
        "exact_distance_evaluations": round(index.exact_pairs / (len(bank) * len(queries)), 5),
        "same_predictions": bool((ours == sk_pred).all()),
        "same_neighbours": bool((idx.numpy() == sk_idx).all()),
        "same_neighbours_up_to_ties": same_up_to_ties(idx.numpy(), dist.numpy(), sk_idx, sk_d),
        "previous_same_neighbours": bool((previous_idx == idx).all()),
        "faiss_same_neighbours": None if faiss_idx is None else bool((faiss_idx == idx.numpy()).all()),
        "int8_same_neighbours": None if int8_idx is None else bool((int8_idx == idx).all()),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
