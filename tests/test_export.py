"""`lit-imgcls export`: ONNX and TorchScript files take uint8 images and give the checkpoint's logits."""

import json

import pytest
import torch

from lit_imgcls.cli import main
from lit_imgcls.data.augment import normalize, to_float
from lit_imgcls.data.datasets import FASHION_MNIST_CLASSES
from lit_imgcls.export import EXTRA_FILE
from lit_imgcls.models.weights import DATA_KEY
from lit_imgcls.tasks.checkpoints import load_task, read_checkpoint

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
N_IMAGES = 256


@pytest.fixture(scope="module")
def reference(tiny_run, fashion_test):
    """The best checkpoint of the tiny run, real test images (uint8) and the checkpoint's logits on them."""
    (best,) = (tiny_run / "checkpoints").glob("best-*.ckpt")
    data = read_checkpoint(best)[DATA_KEY]
    images = fashion_test.images[:N_IMAGES]
    with torch.no_grad():
        logits = load_task(best).eval()(normalize(to_float(images), data["mean"], data["std"]))
    return best, images, logits


def test_checkpoint_carries_normalisation_and_shape(reference):
    best, _, _ = reference
    data = read_checkpoint(best)[DATA_KEY]
    assert data["image_shape"] == [1, 28, 28]
    assert data["mean"][0] == pytest.approx(0.286, abs=0.01) and data["std"][0] == pytest.approx(0.353, abs=0.01)


def test_onnx_matches_checkpoint(reference, tmp_path, capsys):
    best, images, logits = reference
    out = tmp_path / "model.onnx"
    main(["export", f"--ckpt_path={best}", "--format=onnx", f"--output={out}"])
    assert str(out) in capsys.readouterr().out
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    assert torch.allclose(torch.from_numpy(got), logits, atol=1e-4, rtol=0)
    assert (torch.from_numpy(got).argmax(1) == logits.argmax(1)).all()
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["classes"]) == list(FASHION_MNIST_CLASSES)
    assert json.loads(meta["image_shape"]) == [1, 28, 28] and len(json.loads(meta["mean"])) == 1


def test_torchscript_matches_checkpoint(reference, tmp_path):
    best, images, logits = reference
    out = tmp_path / "model.pt"
    main(["export", f"--ckpt_path={best}", "--format=torchscript", f"--output={out}"])
    extra = {EXTRA_FILE: ""}
    model = torch.jit.load(str(out), _extra_files=extra)
    with torch.no_grad():
        got = model(images)
        odd_batch = model(images[:3])  # the batch size is not baked in
    assert torch.allclose(got, logits, atol=1e-4, rtol=0)
    assert (got.argmax(1) == logits.argmax(1)).all()
    assert torch.allclose(odd_batch, logits[:3], atol=1e-4, rtol=0)
    assert list(model.classes) == list(FASHION_MNIST_CLASSES) and list(model.image_shape) == [1, 28, 28]
    assert json.loads(extra[EXTRA_FILE])["classes"] == list(FASHION_MNIST_CLASSES)


def test_default_output_next_to_checkpoint(reference, tmp_path):
    best, _, _ = reference
    copy = tmp_path / "model.ckpt"
    copy.write_bytes(best.read_bytes())
    main(["export", f"--ckpt_path={copy}", "--format=torchscript"])
    assert (tmp_path / "model.torchscript.pt").is_file()


def test_user_mistakes_are_one_line(run_main, tmp_path):
    err = run_main("export", "--ckpt_path=missing.ckpt", "--format=onnx")
    assert "missing.ckpt not found" in err
    err = run_main("export", "--ckpt_path=missing.ckpt", "--format=tflite")
    assert "invalid choice: 'tflite'" in err and "onnx" in err
    err = run_main("report", "nowhere")
    assert "nowhere is neither a checkpoint nor a run folder" in err
