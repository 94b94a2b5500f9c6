"""Throughput of the batched Kornia `standard` pipeline against the same ops per sample with torchvision v2.

Kornia: uint8 batches -> float -> `build_train_augmentation("standard")`, whole batches in this process.
torchvision: the same ops (affine p=0.5, flip, brightness p=0.5, contrast p=0.5, perspective p=0.3) applied per
sample to uint8 CHW tensors in a Dataset, then converted to float, served by a DataLoader with 2 workers
(persistent; worker start-up and the first pass are not timed). Each figure is the best of `--repeats` timed
passes. Images are real Fashion-MNIST test images, tinted to 3 channels and resized for the larger sizes.
Prints one JSON line per size, ratio = kornia / torchvision:
{"size": "28x28x1", "kornia_img_s": ..., "torchvision_img_s": ..., "ratio": ..., "device": "cpu"}.
With CUDA available, a second line per size times the Kornia pipeline on the GPU.

    python benchmarks/augment.py [--images 8192] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from lit_imgcls.data.augment import to_float
from lit_imgcls.data.datasets import load_fashion_mnist
from lit_imgcls.data.pipeline import build_train_augmentation

SIZES = ((28, 1), (32, 3), (224, 3))


def make_images(n: int, size: int, channels: int) -> torch.Tensor:
    """n uint8 images (n, channels, size, size) from the Fashion-MNIST test split."""
    images = load_fashion_mnist("data", train=False, download=False).images[:n]
    images = images.repeat((n + len(images) - 1) // len(images), 1, 1, 1)[:n].float()
    if channels == 3:
        images = images.expand(-1, 3, -1, -1) * torch.tensor([1.0, 0.8, 0.6]).view(1, 3, 1, 1)
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
    return images.round().clamp(0, 255).to(torch.uint8)


def torchvision_standard() -> v2.Transform:
    """torchvision v2 equivalent of the `standard` preset, per sample, ending in float [0, 1]."""
    return v2.Compose(
        [
            v2.RandomApply([v2.RandomAffine(10.0, translate=(0.1, 0.1), scale=(0.9, 1.1), shear=8.0)], p=0.5),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(brightness=0.2)], p=0.5),
            v2.RandomApply([v2.ColorJitter(contrast=0.2)], p=0.5),
            v2.RandomPerspective(0.2, p=0.3),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


class Transformed(Dataset):
    """Per-sample transform of in-memory uint8 images."""

    def __init__(self, images: torch.Tensor, transform: v2.Transform) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(self.images[index])


def best_img_s(n: int, timed_pass: Callable[[], None], repeats: int) -> float:
    """Images per second of the fastest of `repeats` calls of `timed_pass` over `n` images."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        timed_pass()
        times.append(time.perf_counter() - start)
    return n / min(times)


def torchvision_img_s(images: torch.Tensor, batch_size: int, repeats: int) -> float:
    """Images per second through a 2-worker DataLoader (after one untimed pass that starts the workers)."""
    loader = DataLoader(
        Transformed(images, torchvision_standard()), batch_size=batch_size, num_workers=2, persistent_workers=True
    )

    def one_pass() -> None:
        for _ in loader:
            pass

    one_pass()
    return best_img_s(len(images), one_pass, repeats)


def kornia_img_s(images: torch.Tensor, batch_size: int, repeats: int, device: str = "cpu") -> float:
    """Images per second of the batched pipeline, uint8 batch on `device` in, augmented float batch out."""
    pipeline = build_train_augmentation("standard", images.shape[-2:]).to(device)
    batches = [b.to(device) for b in images.split(batch_size)]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def one_pass() -> None:
        for batch in batches:
            pipeline(to_float(batch))
        sync()

    one_pass()
    return best_img_s(len(images), one_pass, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8192, help="images per small size (224 px uses 1/8)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per figure; the best one counts")
    args = parser.parse_args()
    torch.manual_seed(0)
    for size, channels in SIZES:
        n = args.images if size < 100 else args.images // 8
        images = make_images(n, size, channels)
        kornia = kornia_img_s(images, args.batch_size, args.repeats)
        tv = torchvision_img_s(images, args.batch_size, args.repeats)
        label = f"{size}x{size}x{channels}"
        row = {
            "size": label,
            "kornia_img_s": round(kornia),
            "torchvision_img_s": round(tv),
            "ratio": round(kornia / tv, 2),
        }
        print(json.dumps({**row, "device": "cpu"}), flush=True)
        if torch.cuda.is_available():
            cuda = kornia_img_s(images, args.batch_size, args.repeats, "cuda")
            print(json.dumps({"size": label, "kornia_img_s": round(cuda), "device": "cuda"}), flush=True)


if __name__ == "__main__":
    main()
