"""Speed of the seed architectures on this machine, each as its `configs/fashion_mnist/<name>.yaml` builds it.

For each config: parameters, training images/s (forward, backward and SGD step, batch 64) and evaluation images/s
(eval mode, no grad, batch 256) at the config's input size (28x28x1 for Fashion-MNIST), and both speeds relative
to LeNet-5 measured in the same run (the baseline: these machines are noisy, ratios travel better than rates).
Prints one JSON line per architecture, then a Markdown table.

    python benchmarks/zoo.py [--configs lenet5 resnet18 ...] [--device cpu|cuda] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from lit_imgcls.models import create_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist"
SEED = ["lenet5", "alexnet", "vgg16", "googlenet", "resnet18", "densenet121", "seresnet18", "efficientnet_b0"]
MODEL_OPTIONS = ("model", "num_classes", "in_chans", "small_input", "drop_rate", "drop_path_rate")


def build_from_config(config: str) -> tuple[torch.nn.Module, str, tuple[int, int, int]]:
    """The network of `config` (as ImageClassifier builds it), its model name and its input shape."""
    args = yaml.safe_load((CONFIGS / f"{config}.yaml").read_text())["model"]["init_args"]
    options = {k: args[k] for k in MODEL_OPTIONS if k in args}
    name = options.pop("model")
    net = create_model(name, **options, **args.get("model_kwargs", {}))
    size = args.get("image_size", 28)
    return net, name, (options.get("in_chans", 1), size, size)


def images_per_second(step: callable, batch: int, steps: int) -> float:
    """Median over `steps` timed calls of `step`, after two warm-up calls."""
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return batch / sorted(times)[len(times) // 2]


def measure(config: str, device: torch.device, steps: int) -> dict:
    net, name, shape = build_from_config(config)
    net.to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    train_x, train_y = torch.randn(64, *shape, device=device), torch.randint(0, 10, (64,), device=device)
    eval_x = torch.randn(256, *shape, device=device)

    def train_step() -> None:
        out = net(train_x)
        logits = out[0] if isinstance(out, tuple) else out
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(logits, train_y).backward()
        optimizer.step()

    @torch.no_grad()
    def eval_step() -> None:
        net(eval_x)

    net.train()
    train = images_per_second(train_step, len(train_x), steps)
    net.eval()
    evaluation = images_per_second(eval_step, len(eval_x), steps)
    params = sum(p.numel() for p in net.parameters())
    return {"config": config, "model": name, "input": list(shape), "params_m": round(params / 1e6, 3),
            "train_img_s": round(train, 1), "eval_img_s": round(evaluation, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=SEED)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    baseline = measure("lenet5", device, args.steps)
    rows = []
    for config in args.configs:
        row = baseline if config == "lenet5" else measure(config, device, args.steps)
        row = {**row, "train_vs_lenet5": round(row["train_img_s"] / baseline["train_img_s"], 4),
               "eval_vs_lenet5": round(row["eval_img_s"] / baseline["eval_img_s"], 4),
               "device": str(device), "threads": torch.get_num_threads()}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| config | model | params (M) | train img/s | eval img/s | train vs LeNet-5 |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['model']} | {r['params_m']} | {r['train_img_s']:.0f} | {r['eval_img_s']:.0f} "
              f"| {r['train_vs_lenet5']} |")  # fmt: skip


if __name__ == "__main__":
    main()
