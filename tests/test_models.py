import pytest
import torch

from lit_imgcls.errors import ConfigError
from lit_imgcls.models import LeNet5, available_models, create_model


@pytest.mark.parametrize("size", [28, 32, 64])
def test_lenet5_any_input_size(size):
    model = create_model("lenet5", num_classes=7, in_chans=3)
    assert model(torch.randn(2, 3, size, size)).shape == (2, 7)


def test_lenet5_timm_interface():
    model = LeNet5(num_classes=10, in_chans=1)
    x = torch.randn(4, 1, 28, 28)
    features = model.forward_features(x)
    assert features.shape == (4, model.num_features)
    assert model.forward_head(features, pre_logits=True).shape == (4, 84)
    model.reset_classifier(3)
    assert model(x).shape == (4, 3) and model.get_classifier().out_features == 3


def test_lenet5_has_the_classic_layer_sizes():
    convs = [m for m in LeNet5().modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m.out_features for m in LeNet5().modules() if isinstance(m, torch.nn.Linear)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(6, (5, 5)), (16, (5, 5))]
    assert linears == [120, 84, 10]


def test_timm_resnet18_small_input_keeps_resolution():
    model = create_model("resnet18", num_classes=10, in_chans=1, small_input=True)
    assert model.conv1.stride == (1, 1) and model.conv1.in_channels == 1
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert model.forward_features(torch.randn(2, 1, 28, 28)).shape[-2:] == (4, 4)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_unknown_model_lists_close_matches():
    with pytest.raises(ConfigError, match=r"unknown model 'resnet81'.*Did you mean:.*resnet18"):
        create_model("resnet81", num_classes=10)
    with pytest.raises(ConfigError, match=r"Did you mean: lenet5"):
        create_model("lenet", num_classes=10)


def test_small_input_on_unsupported_model_is_an_error():
    with pytest.raises(ConfigError, match="small_input"):
        create_model("vit_tiny_patch16_224", num_classes=10, small_input=True)


def test_available_models_covers_local_and_timm():
    names = available_models()
    assert "lenet5" in names and "resnet18" in names and "efficientnet_b0" in names


@pytest.mark.parametrize(("in_chans", "size"), [(1, 28), (3, 32)])
def test_fast_resnet_shapes_and_timm_interface(in_chans, size):
    model = create_model("fast_resnet", num_classes=10, in_chans=in_chans)
    x = torch.randn(4, in_chans, size, size)
    features = model.forward_features(x)
    assert features.shape == (4, model.num_features) == (4, 128)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.reset_classifier(3)
    assert model(x).shape == (4, 3) and model.get_classifier().out_features == 3


def test_fast_resnet_scales_its_pooled_features_and_has_stochastic_depth():
    """The 0.125 scale keeps the first logits small (without it SGD at lr 0.2 stalls); drop_path reaches both blocks."""
    model = create_model("fast_resnet", num_classes=10, in_chans=1, drop_path_rate=0.2).eval()
    x = torch.randn(8, 1, 28, 28)
    unscaled = model.features[:-1](x)
    torch.testing.assert_close(model.forward_features(x), unscaled * 0.125)
    rates = [m.drop_prob for m in model.modules() if m.__class__.__name__ == "DropPath"]
    assert rates == pytest.approx([0.1, 0.2])
    with pytest.raises(ValueError, match="widths must be 4"):
        create_model("fast_resnet", num_classes=10, widths=(8, 16))
