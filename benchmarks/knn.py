"""k-NN on full Fashion-MNIST raw pixels (60,000 references, 10,000 queries, k=5, Euclidean, uniform votes):
the project's search against scikit-learn's KNeighborsClassifier(n_jobs=2), and the bare fp32 distance
matrix product + top-k in the same run (the floor both are bound by on a CPU without fast bf16 units).

Prints one JSON line with ours_acc, sklearn_acc, ours_s, sklearn_s, matmul_s, speedup, same_predictions.

    python benchmarks/knn.py [--queries N] [--precision auto|fp32|bf16]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from sklearn.neighbors import KNeighborsClassifier

from lit_imgcls.data.datasets import load_fashion_mnist
from lit_imgcls.neighbors import fast_bf16_available, knn_search, knn_vote


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=10000)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    args = parser.parse_args()
    train = load_fashion_mnist("data", train=True, download=False)
    test = load_fashion_mnist("data", train=False, download=False)
    bank, bank_y = train.images.flatten(1).float(), train.targets
    queries, query_y = test.images[: args.queries].flatten(1).float(), test.targets[: args.queries]
    bf16 = args.precision == "bf16" or (args.precision == "auto" and fast_bf16_available(torch.device("cpu")))

    start = time.perf_counter()
    dist, idx = knn_search(queries, bank, args.k, "euclidean", bf16=bf16)
    ours = knn_vote(dist, bank_y[idx], 10).argmax(1)
    ours_s = time.perf_counter() - start

    start = time.perf_counter()
    bank_sq = bank.square().sum(1)
    for chunk in queries.split(1024):
        (2 * chunk @ bank.T - bank_sq).topk(args.k, dim=1)
    matmul_s = time.perf_counter() - start

    start = time.perf_counter()
    sklearn = KNeighborsClassifier(args.k, n_jobs=2).fit(bank.numpy(), bank_y.numpy()).predict(queries.numpy())
    sklearn_s = time.perf_counter() - start

    result = {
        "benchmark": "knn",
        "references": len(bank),
        "queries": len(queries),
        "k": args.k,
        "search": "bf16+fp64 rerank" if bf16 else "fp32+fp64 rerank",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "ours_acc": round((ours == query_y).float().mean().item(), 4),
        "sklearn_acc": round(float((torch.from_numpy(sklearn) == query_y).float().mean()), 4),
        "ours_s": round(ours_s, 3),
        "sklearn_s": round(sklearn_s, 3),
        "matmul_s": round(matmul_s, 3),
        "speedup": round(sklearn_s / ours_s, 3),
        "same_predictions": bool((ours.numpy() == sklearn).all()),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
