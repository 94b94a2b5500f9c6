import math

import pytest
import torch

from lit_imgcls.losses import soft_target_cross_entropy


def test_hard_targets_match_hand_computed_value():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    target = torch.tensor([0, 2])
    # row 0: -log(e^2 / (e^2 + 2)); row 1: -log(e^3 / (1 + e + e^3))
    expected = (-math.log(math.exp(2) / (math.exp(2) + 2)) - math.log(math.exp(3) / (1 + math.e + math.exp(3)))) / 2
    assert soft_target_cross_entropy(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_soft_targets_match_hand_computed_value():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # softmax = (1/4, 3/4)
    target = torch.tensor([[0.5, 0.5]])
    expected = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert soft_target_cross_entropy(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_one_hot_soft_targets_equal_hard_targets_with_smoothing():
    logits = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    target = torch.arange(8) % 5
    one_hot = torch.nn.functional.one_hot(target, 5).float()
    for smoothing in (0.0, 0.1):
        hard = soft_target_cross_entropy(logits, target, smoothing)
        soft = soft_target_cross_entropy(logits, one_hot, smoothing)
        assert soft.item() == pytest.approx(hard.item(), rel=1e-6)


def test_label_smoothing_hand_computed():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # log-probs log(1/4), log(3/4)
    # smoothing 0.2 on class 1 of K=2: q = (0.1, 0.9)
    expected = -(0.1 * math.log(0.25) + 0.9 * math.log(0.75))
    assert soft_target_cross_entropy(logits, torch.tensor([1]), 0.2).item() == pytest.approx(expected, rel=1e-6)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="shape"):
        soft_target_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="label_smoothing"):
        soft_target_cross_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), 1.0)
