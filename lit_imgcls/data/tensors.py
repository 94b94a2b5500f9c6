"""A split held in memory as uint8 tensors, and the dataset and collate function that serve it in batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from lit_imgcls.errors import ConfigError


@dataclass
class ImageTensors:
    """A whole split in memory: uint8 images (N, C, H, W), int64 targets (N,) or None when unlabeled."""

    images: torch.Tensor
    targets: torch.Tensor | None
    classes: tuple[str, ...]
    sources: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.targets is not None and len(self.targets) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.targets)} targets")

    def __len__(self) -> int:
        return len(self.images)

    def source(self, index: int) -> str:
        """Where image `index` came from: its file path, or its index in the dataset."""
        return self.sources[index] if self.sources is not None else str(index)


def select_classes(data: ImageTensors, classes: Sequence[int]) -> ImageTensors:
    """The images of `classes` only, relabelled 0..len(classes)-1 in the given order."""
    if data.targets is None:
        return data
    if len(set(classes)) != len(classes) or not all(0 <= c < len(data.classes) for c in classes):
        raise ConfigError(f"data.classes must be distinct class indices in 0..{len(data.classes) - 1}, got {classes}")
    relabel = torch.full((len(data.classes),), -1, dtype=torch.long)
    relabel[torch.as_tensor(list(classes))] = torch.arange(len(classes))
    keep = (relabel[data.targets] >= 0).nonzero().flatten()
    sources = [data.sources[i] for i in keep.tolist()] if data.sources is not None else None
    names = tuple(data.classes[c] for c in classes)
    return ImageTensors(data.images[keep], relabel[data.targets[keep]], names, sources)


class TensorImageDataset(Dataset):
    """Serves dict samples from `ImageTensors`; `__getitems__` fetches a whole batch with one index op."""

    def __init__(self, data: ImageTensors, indices: torch.Tensor | None = None) -> None:
        self.data = data
        self.indices = torch.arange(len(data)) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([i])

    def __getitems__(self, batch: Sequence[int]) -> dict[str, torch.Tensor]:
        index = self.indices[torch.as_tensor(batch, dtype=torch.long)]
        sample = {"image": self.data.images[index], "index": index}
        if self.data.targets is not None:
            sample["target"] = self.data.targets[index]
        return sample


def collate_batch(batch: dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Batches from `__getitems__` arrive whole; single samples (batch_size=None users) are concatenated."""
    if isinstance(batch, dict):
        return batch
    return {key: torch.cat([sample[key] for sample in batch]) for key in batch[0]}


def conform(data: ImageTensors, channels: int | None, image_size: int | None) -> ImageTensors:
    """`data` with `channels` (1: luma of RGB, 3: gray repeated) and square `image_size` (antialiased bilinear)."""
    images = data.images
    if channels == 3 and images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1).contiguous()
    elif channels == 1 and images.shape[1] == 3:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        images = (images.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    if image_size is not None and images.shape[-1] != image_size:
        resized = torch.nn.functional.interpolate(
            images.float(), size=(image_size, image_size), mode="bilinear", antialias=True
        )
        images = resized.round().clamp(0, 255).to(torch.uint8)
    return ImageTensors(images, data.targets, data.classes, data.sources)
