"""`model.compile`: checkpoints move between compiled and plain networks in both directions."""

import pytest
import torch

from lit_imgcls.cli import instantiate_from_config
from lit_imgcls.tasks import ImageClassifier
from lit_imgcls.tasks.checkpoints import read_checkpoint
from tests.conftest import REPO, needs_fashion_mnist
from tests.test_cli import read_metrics

pytestmark = [needs_fashion_mnist, pytest.mark.slow]
CONFIG = REPO / "configs" / "fashion_mnist" / "lenet5.yaml"
QUIET = {"trainer.enable_progress_bar": False, "trainer.enable_model_summary": False}


@pytest.fixture
def eager_compile(monkeypatch):
    """`nn.Module.compile` with dynamo's eager backend: the same graph capture, no C++ code generation (seconds)."""
    original = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: original(self, backend="eager"))
    yield
    torch._dynamo.reset()


def test_plain_checkpoint_tests_the_same_with_compile(tiny_run, tmp_path, monkeypatch, eager_compile):
    monkeypatch.chdir(tmp_path)
    (best,) = (tiny_run / "checkpoints").glob("best-*.ckpt")
    overrides = {**QUIET, "model.init_args.compile": True, "data.test_subset": 300, "trainer.logger": False}
    model, datamodule, trainer = instantiate_from_config(CONFIG, overrides)
    (result,) = trainer.test(model, datamodule=datamodule, ckpt_path=str(best), verbose=False)
    assert model.net._compiled_call_impl is not None
    assert result["test/acc"] == pytest.approx(read_metrics(tiny_run)["test/acc"])


def test_compiled_fit_checkpoint_loads_into_a_plain_network(tmp_path, monkeypatch, eager_compile):
    monkeypatch.chdir(tmp_path)
    overrides = {
        **QUIET,
        "model.init_args.compile": True,
        "data.train_subset": 256,
        "data.val_size": 64,
        "data.batch_size": 64,
        "trainer.max_steps": 3,
        "trainer.limit_val_batches": 1,
    }
    model, datamodule, trainer = instantiate_from_config(CONFIG, overrides)
    trainer.fit(model, datamodule=datamodule)
    path = tmp_path / "compiled.ckpt"
    trainer.save_checkpoint(path)
    assert not any("_orig_mod" in key for key in read_checkpoint(path)["state_dict"])
    plain = ImageClassifier.load_from_checkpoint(path, compile=False).eval()
    images = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(plain(images), model.eval()(images), atol=1e-6)


def test_torch_compile_prefix_is_accepted_on_load(tiny_run, tmp_path):
    (best,) = (tiny_run / "checkpoints").glob("best-*.ckpt")
    checkpoint = read_checkpoint(best)
    wrapped = {k.replace("net.", "net._orig_mod.", 1): v for k, v in checkpoint["state_dict"].items()}
    torch.save({**checkpoint, "state_dict": wrapped}, tmp_path / "wrapped.ckpt")
    images = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        expected = ImageClassifier.load_from_checkpoint(best).eval()(images)
        loaded = ImageClassifier.load_from_checkpoint(tmp_path / "wrapped.ckpt").eval()(images)
    assert torch.equal(loaded, expected)
