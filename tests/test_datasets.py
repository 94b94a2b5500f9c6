import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_imgcls.data import datasets
from lit_imgcls.data.datasets import load_fashion_mnist, load_image_folder, load_unlabeled_folder, read_idx
from lit_imgcls.errors import ConfigError, DatasetNotFoundError, UserError
from tests.conftest import needs_fashion_mnist


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_round_trips(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x-idx3-ubyte.gz", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "x-idx3-ubyte.gz"), array)


def test_read_idx_rejects_other_files(tmp_path):
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"not an idx file"))
    with pytest.raises(UserError, match="not an IDX file"):
        read_idx(tmp_path / "bad.gz")


@needs_fashion_mnist
def test_fashion_mnist_from_debian_package():
    train = load_fashion_mnist("unused", train=True, download=False)
    test = load_fashion_mnist("unused", train=False, download=False)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and train.targets.dtype == torch.int64
    assert torch.bincount(train.targets).tolist() == [6000] * 10
    assert train.classes[0] == "T-shirt/top" and len(train.classes) == 10


def test_fashion_mnist_missing_names_both_fixes(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(DatasetNotFoundError) as err:
        load_fashion_mnist(tmp_path, train=True, download=False)
    assert "apt-get install -y dataset-fashion-mnist" in str(err.value)
    assert "data.download=true" in str(err.value)


def test_fashion_mnist_failed_download_names_both_fixes(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr("torchvision.datasets.FashionMNIST", offline)
    with pytest.raises(DatasetNotFoundError, match=r"download failed.*no network") as err:
        load_fashion_mnist(tmp_path, train=True, download=True)
    assert "apt-get install -y dataset-fashion-mnist" in str(err.value)


def test_fashion_mnist_from_torchvision_layout(tmp_path, monkeypatch):
    """Files unpacked by torchvision (root/FashionMNIST/raw, not gzipped) are found too."""
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    for name, array in [("t10k-images-idx3-ubyte", images), ("t10k-labels-idx1-ubyte", np.arange(5))]:
        write_idx(raw / f"{name}.gz", array)
        (raw / name).write_bytes(gzip.decompress((raw / f"{name}.gz").read_bytes()))
        (raw / f"{name}.gz").unlink()
    data = load_fashion_mnist(tmp_path, train=False, download=False)
    assert data.images.shape == (5, 1, 28, 28)
    assert torch.equal(data.images[:, 0], torch.from_numpy(images.astype(np.uint8)))


def test_image_folder_png_and_jpeg(image_folder):
    data = load_image_folder(image_folder, channels=1)
    assert data.classes == ("Pullover", "T-shirt-top", "Trouser")
    assert data.images.shape == (60, 1, 28, 28) and data.images.dtype == torch.uint8
    assert torch.bincount(data.targets).tolist() == [20, 20, 20]
    assert {Path(s).suffix for s in data.sources} == {".png", ".jpg"}
    rgb = load_image_folder(image_folder, channels=3, image_size=32)
    assert rgb.images.shape == (60, 3, 32, 32)


def test_image_folder_png_is_lossless(tmp_path, fashion_test):
    from tests.conftest import write_image_folder

    write_image_folder(tmp_path, fashion_test, per_class=3, classes=1)
    data = load_image_folder(tmp_path, channels=1)
    expected = fashion_test.images[(fashion_test.targets == 0).nonzero().flatten()[:3]]
    assert torch.equal(data.images, expected)


def test_image_folder_errors(tmp_path, image_folder):
    with pytest.raises(UserError, match="does not exist"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(UserError, match="no images found"):
        load_image_folder(tmp_path / "empty")
    big = next(image_folder.rglob("*.png"))
    import cv2

    cv2.imwrite(str(big), np.zeros((40, 40), dtype=np.uint8))
    with pytest.raises(ConfigError, match=r"data\.image_size"):
        load_image_folder(image_folder, channels=1)


def test_corrupt_image_names_file_or_is_skipped(image_folder, caplog):
    corrupt = image_folder / "Trouser" / "broken.png"
    corrupt.write_bytes(b"\x89PNG garbage")
    with pytest.raises(UserError, match=r"broken\.png.*\n.*data\.skip_corrupt=true"):
        load_image_folder(image_folder, channels=1)
    data = load_image_folder(image_folder, channels=1, skip_corrupt=True)
    assert len(data) == 60 and str(corrupt) not in data.sources
    assert "broken.png" in caplog.text


def test_unlabeled_folder_reads_any_layout(image_folder):
    data = load_unlabeled_folder(image_folder, channels=1)
    assert data.targets is None and len(data) == 60 and len(data.sources) == 60
