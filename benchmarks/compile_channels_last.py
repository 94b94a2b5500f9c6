"""Training images/s that `model.channels_last` and `model.compile` buy, against eager in the same run.

For each network (as `ImageClassifier` builds it, 28x28x1 Fashion-MNIST-sized inputs): SGD training steps
(forward, cross-entropy, backward, step) in four settings: eager, channels_last, compile, compile+channels_last.
Warm-up steps (which include compilation, reported as `warmup_s`) are not timed; the timed steps are split into
`--repeats` windows and the median window counts. Prints one JSON line:
{"benchmark": "compile_channels_last", "models": {"lenet5": {"eager": img/s, ..., "ratio": {...}}, ...}}.

    python benchmarks/compile_channels_last.py [--models lenet5 fast_resnet resnet18] [--steps 30] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from lit_imgcls.models.factory import PROJECT_MODELS
from lit_imgcls.tasks import ImageClassifier
from lit_imgcls.tasks.classifier import default_optimizer

VARIANTS = {
    "eager": (False, False),
    "channels_last": (True, False),
    "compile": (False, True),
    "compile+channels_last": (True, True),
}
AUTOCAST = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_images_per_second(
    model: str,
    device: str | torch.device = "cpu",
    precision: str = "32-true",
    batch_size: int = 128,
    steps: int = 30,
    warmup: int = 3,
    repeats: int = 3,
    channels_last: bool = False,
    compile: bool = False,
    image_shape: tuple[int, int, int] = (1, 28, 28),
) -> tuple[float, float]:
    """(training images/s, warm-up seconds) of `ImageClassifier(model)` on random images at `precision`."""
    device = torch.device(device)
    torch.manual_seed(0)
    small_input = model not in PROJECT_MODELS
    task = ImageClassifier(model, 10, image_shape[0], small_input=small_input, channels_last=channels_last)
    task.to(device).train()
    if compile:
        task.net.compile()  # what ImageClassifier(compile=True) does in setup()
    optimizer = default_optimizer(task.parameters())
    images = torch.randn(batch_size, *image_shape, device=device)
    target = torch.randint(0, 10, (batch_size,), device=device)
    dtype = AUTOCAST[precision]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(task(images), target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    start = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(device)
    warmup_s = time.perf_counter() - start
    window = max(1, steps // repeats)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(window):
            step()
        _sync(device)
        rates.append(window * batch_size / (time.perf_counter() - start))
    return statistics.median(rates), warmup_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lenet5", "fast_resnet", "resnet18"])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per setting (lenet5: 5x as many)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32-true", choices=list(AUTOCAST))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for model in args.models:
        steps = args.steps * (5 if model == "lenet5" else 1)
        rates, warmups = {}, {}
        for name, (channels_last, compile) in VARIANTS.items():
            rate, warm = train_images_per_second(
                model, args.device, args.precision, args.batch_size, steps, 3, args.repeats, channels_last, compile
            )
            rates[name], warmups[name] = round(rate, 1), round(warm, 2)
            torch._dynamo.reset()
        ratio = {name: round(rate / rates["eager"], 3) for name, rate in rates.items() if name != "eager"}
        results[model] = {**rates, "ratio": ratio, "warmup_s": warmups, "steps": steps}
    print(
        json.dumps(
            {
                "benchmark": "compile_channels_last",
                "device": args.device,
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "threads": torch.get_num_threads(),
                "batch_size": args.batch_size,
                "precision": args.precision,
                "models": results,
            }
        )
    )


if __name__ == "__main__":
    main()
