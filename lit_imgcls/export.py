"""Export a checkpoint for deployment: uint8 images (N, C, H, W) in, class logits out, as ONNX or TorchScript.

Scaling to [0, 1] and the data's normalisation are inside the exported graph, and the class names, mean, std and
image shape travel with the file (ONNX `metadata_props`, TorchScript attributes and the `lit_imgcls.json` extra
file), so a deployer needs nothing but the file.
"""

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lit_imgcls.checkpoint_io import read_checkpoint
from lit_imgcls.errors import UserError
from lit_imgcls.models.weights import CLASSES_KEY, DATA_KEY
from lit_imgcls.tasks.checkpoints import load_task

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
EXTRA_FILE = "lit_imgcls.json"  # TorchScript extra file with the metadata


class DeployModel(nn.Module):
    """uint8 images (N, C, H, W) -> class logits: `net` after scaling to [0, 1] and normalising with mean/std."""

    def __init__(self, net: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.net((images.to(torch.float32) / 255.0 - self.mean) / self.std)
        return out[0] if isinstance(out, tuple) else out  # networks with auxiliary outputs (GoogLeNet)


class ScriptedDeployModel(nn.Module):
    """A traced `DeployModel` with the metadata as TorchScript attributes (`classes`, `mean`, `std`, ...)."""

    classes: list[str]  # class-level annotations (no `from __future__ import annotations`): TorchScript reads them
    mean: list[float]
    std: list[float]
    image_shape: list[int]

    def __init__(self, traced: nn.Module, metadata: dict[str, Any]) -> None:
        super().__init__()
        self.model = traced
        self.classes = list(metadata["classes"])
        self.mean = [float(v) for v in metadata["mean"]]
        self.std = [float(v) for v in metadata["std"]]
        self.image_shape = [int(v) for v in metadata["image_shape"]]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


def checkpoint_metadata(checkpoint: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """Class names, mean, std and image shape [C, H, W] from a checkpoint; older checkpoints without them
    get them from their datamodule settings (the data is loaded once to compute mean/std)."""
    data, classes = checkpoint.get(DATA_KEY), checkpoint.get(CLASSES_KEY)
    if data is None or classes is None:
        hparams = checkpoint.get("datamodule_hyper_parameters")
        if hparams is None:
            raise UserError(
                f"checkpoint {path} carries neither the data's normalisation nor its data settings: "
                "export a checkpoint written by `lit-imgcls fit` (or re-save this one with a fit on its data)"
            )
        from lit_imgcls.data import ImageDataModule

        rank_zero_info(f"{path} predates stored normalisation: computing it from its data settings")
        datamodule = ImageDataModule(**{k: v for k, v in hparams.items() if not k.startswith("_")})
        datamodule.setup("fit")
        data = {"mean": datamodule.mean, "std": datamodule.std, "image_shape": list(datamodule.image_shape)}
        classes = list(datamodule.classes)
    architecture = checkpoint.get("hyper_parameters", {}).get("model")
    return {**data, "classes": list(classes), "architecture": architecture, "input": "uint8 NCHW, 0-255"}


def export_checkpoint(checkpoint: str | Path, format: str = "onnx", output: str | Path | None = None) -> Path:
    """Write the network of `checkpoint` as `format` (onnx or torchscript) to `output`; returns the path."""
    if format not in FORMATS:
        raise UserError(f"unknown export format {format!r}: choose one of {', '.join(FORMATS)}")
    path = Path(checkpoint)
    metadata = checkpoint_metadata(read_checkpoint(path), path)
    task = load_task(path).eval()
    net = getattr(task, "net", None)
    if net is None:
        raise UserError(f"{path} ({type(task).__name__}) has no network to export (k-NN checkpoints have none)")
    model = DeployModel(net.to(memory_format=torch.contiguous_format), metadata["mean"], metadata["std"]).eval()
    example = torch.randint(0, 256, (2, *metadata["image_shape"]), dtype=torch.uint8)
    out = Path(output) if output is not None else path.with_suffix(SUFFIXES[format])
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        if format == "torchscript":
            export_torchscript(model, example, metadata, out)
        else:
            export_onnx(model, example, metadata, out)
    return out


def export_torchscript(model: DeployModel, example: torch.Tensor, metadata: dict[str, Any], out: Path) -> None:
    with warnings.catch_warnings():  # TorchScript is deprecated in favour of torch.export, yet still what C++ loads
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, example, check_trace=False)
        scripted = torch.jit.script(ScriptedDeployModel(traced, metadata))
        torch.jit.save(scripted, str(out), _extra_files={EXTRA_FILE: json.dumps(metadata)})


def export_onnx(model: DeployModel, example: torch.Tensor, metadata: dict[str, Any], out: Path) -> None:
    try:
        import onnx
    except ImportError as error:
        raise UserError("ONNX export needs the onnx and onnxscript packages: pip install onnx onnxscript") from error
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(
        model,
        (example,),
        str(out),
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes={"images": {0: batch}},
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    proto = onnx.load(str(out))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.save(proto, str(out))
