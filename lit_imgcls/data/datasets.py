"""The dataset sources, each loaded as `ImageTensors`: Fashion-MNIST, torchvision datasets, image folders."""

from __future__ import annotations

import gzip
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from lit_imgcls.data.tensors import ImageTensors, conform, select_classes
from lit_imgcls.errors import ConfigError, DatasetNotFoundError, UserError

log = logging.getLogger(__name__)

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise UserError(f"{path} is not an IDX file (bad magic number); delete it and fetch the dataset again")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(raw, dtype=_IDX_DTYPES[raw[2]], offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise UserError(f"{path} is truncated: header says {shape}, file holds {array.size} values")
    return array.reshape(shape)


def _find_idx(dirs: Sequence[Path], stem: str) -> Path | None:
    for directory in dirs:
        for name in (f"{stem}.gz", stem):
            if (directory / name).is_file():
                return directory / name
    return None


def ensure_fashion_mnist(data_dir: str | os.PathLike, train: bool, download: bool = True) -> tuple[Path, Path]:
    """Paths of the split's image and label IDX files: from the Debian package, `data_dir`, or a download."""
    prefix = "train" if train else "t10k"
    data_dir = Path(data_dir)
    dirs = [DEBIAN_FASHION_MNIST, data_dir, data_dir / "FashionMNIST" / "raw"]
    image_file = _find_idx(dirs, f"{prefix}-images-idx3-ubyte")
    label_file = _find_idx(dirs, f"{prefix}-labels-idx1-ubyte")
    if image_file is not None and label_file is not None:
        return image_file, label_file
    if not download:
        raise DatasetNotFoundError(_fashion_mnist_missing(data_dir, "download is disabled (data.download=false)"))
    _download_fashion_mnist(data_dir)
    return ensure_fashion_mnist(data_dir, train, download=False)


def load_fashion_mnist(data_dir: str | os.PathLike, train: bool, download: bool = True) -> ImageTensors:
    """Fashion-MNIST from the Debian package, `data_dir`, or torchvision's download, in that order."""
    image_file, label_file = ensure_fashion_mnist(data_dir, train, download)
    images = torch.from_numpy(read_idx(image_file).copy()).unsqueeze(1)
    targets = torch.from_numpy(read_idx(label_file).astype(np.int64))
    return ImageTensors(images, targets, FASHION_MNIST_CLASSES)


def _fashion_mnist_missing(data_dir: Path, reason: str) -> str:
    return (
        f"Fashion-MNIST not found in {DEBIAN_FASHION_MNIST} or {data_dir}, and {reason}.\n"
        "Fix it one of two ways:\n"
        "  1. install the Debian package: sudo apt-get install -y dataset-fashion-mnist\n"
        f"  2. on a machine with internet, set data.download=true to fetch it with torchvision into {data_dir}"
    )


def _download_fashion_mnist(data_dir: Path) -> None:
    from torchvision.datasets import FashionMNIST

    try:
        for train in (True, False):
            FashionMNIST(str(data_dir), train=train, download=True)
    except Exception as err:  # torchvision raises several kinds of network errors
        raise DatasetNotFoundError(_fashion_mnist_missing(data_dir, f"the download failed ({err})")) from err


TORCHVISION_DATASETS = ("mnist", "cifar10", "cifar100")
DATASETS = ("fashion_mnist", *TORCHVISION_DATASETS, "image_folder")


def load_torchvision(name: str, data_dir: str | os.PathLike, train: bool, download: bool = True) -> ImageTensors:
    """MNIST, CIFAR-10 or CIFAR-100 through torchvision, converted to uint8 (N, C, H, W)."""
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    try:
        ds = cls(str(data_dir), train=train, download=download)
    except Exception as err:
        raise DatasetNotFoundError(
            f"{name} is not in {data_dir} and could not be downloaded ({err}).\n"
            f"Run once on a machine with internet with data.download=true, then copy {data_dir} here."
        ) from err
    images = torch.as_tensor(np.asarray(ds.data))
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
    return ImageTensors(images.contiguous(), torch.as_tensor(ds.targets, dtype=torch.int64), tuple(ds.classes))


def is_hidden(path: Path, root: Path) -> bool:
    """Whether `path` or a folder between `root` and it starts with '.' (`.ipynb_checkpoints/`, `.DS_Store`)."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def list_image_files(root: Path) -> list[Path]:
    """Image files under `root` (recursive, hidden files and folders skipped), sorted the same on every machine."""
    files = (p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not is_hidden(p, root))
    return sorted(p for p in files if p.is_file())


def decode_image(path: Path, channels: int, image_size: int | None) -> np.ndarray | None:
    """Decode with OpenCV to (H, W, C) uint8 RGB or grayscale, resized to a square `image_size`; None if unreadable."""
    flag = cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR
    image = cv2.imread(str(path), flag)
    if image is None:
        return None
    if channels == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if image_size is not None and image.shape[:2] != (image_size, image_size):
        image = cv2.resize(image, (image_size, image_size), interpolation=cv2.INTER_AREA)
    return image.reshape(image.shape[0], image.shape[1], channels)


def _decode_all(
    files: Sequence[Path], channels: int, image_size: int | None, skip_corrupt: bool
) -> tuple[list[np.ndarray], list[int]]:
    images, kept = [], []
    for i, path in enumerate(files):
        image = decode_image(path, channels, image_size)
        if image is None:
            if not skip_corrupt:
                raise UserError(
                    f"cannot decode image {path}: the file is corrupt or not an image.\n"
                    "Remove it, or set data.skip_corrupt=true to skip such files with a warning."
                )
            log.warning("skipping unreadable image %s", path)
            continue
        images.append(image)
        kept.append(i)
    return images, kept


def _stack(images: list[np.ndarray], files: Sequence[Path], root: Path) -> torch.Tensor:
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        raise ConfigError(
            f"images under {root} have different sizes ({sorted(shapes)[:3]}...): set data.image_size to resize them"
        )
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def load_image_folder(
    root: str | os.PathLike, channels: int = 3, image_size: int | None = None, skip_corrupt: bool = False
) -> ImageTensors:
    """A labeled folder `root/<class>/<image>`; classes are the sorted sub-folder names (as torchvision's), hidden
    ones (`.ipynb_checkpoints/`) skipped."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist: check data.data_dir (or data.test_dir)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files, labels = [], []
    for label, name in enumerate(classes):
        class_files = list_image_files(root / name)
        files += class_files
        labels += [label] * len(class_files)
    if not files:
        raise UserError(
            f"no images found in {root}: expected one sub-folder per class holding "
            f"{'/'.join(IMAGE_EXTENSIONS)} files, e.g. {root}/cat/001.png"
        )
    images, kept = _decode_all(files, channels, image_size, skip_corrupt)
    if not kept:
        raise UserError(f"none of the {len(files)} images under {root} could be decoded")
    return ImageTensors(
        _stack(images, files, root),
        torch.tensor([labels[i] for i in kept], dtype=torch.int64),
        tuple(classes),
        [str(files[i]) for i in kept],
    )


def load_unlabeled_folder(
    root: str | os.PathLike, channels: int = 3, image_size: int | None = None, skip_corrupt: bool = False
) -> ImageTensors:
    """Every image under `root` (recursive), without labels; sources are the file paths."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist: check data.predict_dir")
    files = list_image_files(root)
    if not files:
        raise UserError(f"no images ({'/'.join(IMAGE_EXTENSIONS)}) found under {root}")
    images, kept = _decode_all(files, channels, image_size, skip_corrupt)
    if not kept:
        raise UserError(f"none of the {len(files)} images under {root} could be decoded")
    return ImageTensors(_stack(images, files, root), None, (), [str(files[i]) for i in kept])


def load_dataset(
    dataset: str,
    data_dir: str | os.PathLike,
    train: bool,
    *,
    test_dir: str | os.PathLike | None = None,
    channels: int | None = None,
    image_size: int | None = None,
    classes: Sequence[int] | None = None,
    download: bool = True,
    skip_corrupt: bool = False,
) -> ImageTensors:
    """The train or test split of `dataset` (one of `DATASETS`), with `classes` kept, `channels` and `image_size`."""
    if dataset == "fashion_mnist":
        data = load_fashion_mnist(data_dir, train, download)
    elif dataset in TORCHVISION_DATASETS:
        data = load_torchvision(dataset, data_dir, train, download)
    elif dataset == "image_folder":
        folder = data_dir if train else test_dir
        if folder is None:
            raise ConfigError("dataset image_folder has no test split: set data.test_dir to a folder of images")
        data = load_image_folder(folder, channels or 3, image_size, skip_corrupt)
    else:
        raise ConfigError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    return conform(data if classes is None else select_classes(data, classes), channels, image_size)
