import math

import pytest
import torch

from lit_imgcls.losses import (
    distillation_loss,
    kd_kl_divergence,
    soft_target_cross_entropy,
    softmax_with_temperature,
)


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


def hand_kd(student: list[list[float]], teacher: list[list[float]], labels: list[int], t: float, alpha: float) -> float:
    """The KD loss written out with math only: (1 - alpha) CE + alpha T^2 KL(p_teacher || p_student), mean over rows."""

    def softmax(row: list[float], temp: float) -> list[float]:
        exps = [math.exp(v / temp) for v in row]
        return [e / sum(exps) for e in exps]

    ce = sum(-math.log(softmax(s, 1.0)[y]) for s, y in zip(student, labels, strict=True)) / len(student)
    kl = 0.0
    for s, te in zip(student, teacher, strict=True):
        p, q = softmax(te, t), softmax(s, t)
        kl += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))
    return (1 - alpha) * ce + alpha * t * t * kl / len(student)  # batchmean: KL summed per row, averaged over rows


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 20.0])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 1.0])
def test_distillation_loss_matches_hand_computed_value(temperature, alpha):
    student = [[1.0, -0.5, 0.2], [0.0, 2.0, -1.0]]
    teacher = [[3.0, 0.0, -1.0], [-1.0, 1.0, 0.5]]
    labels = [0, 2]
    loss = distillation_loss(
        torch.tensor(student, dtype=torch.float64),
        torch.tensor(teacher, dtype=torch.float64),
        torch.tensor(labels),
        temperature=temperature,
        alpha=alpha,
    )
    assert loss.item() == pytest.approx(hand_kd(student, teacher, labels, temperature, alpha), rel=1e-9)


def test_distillation_loss_ends_and_known_numbers():
    student, teacher = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, math.log(3.0)]])  # teacher at T=1: (1/4, 3/4)
    target = torch.tensor([1])
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert distillation_loss(student, teacher, target, temperature=1.0, alpha=1.0).item() == pytest.approx(kl)
    assert distillation_loss(student, teacher, target, temperature=1.0, alpha=0.0).item() == pytest.approx(math.log(2))
    # identical logits: no KD term at any T, and alpha=1 needs no labels
    assert distillation_loss(teacher, teacher, None, temperature=4.0, alpha=1.0).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="needs targets"):
        distillation_loss(student, teacher, None, alpha=0.5)
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss(student, teacher, target, alpha=1.5)


def test_kd_term_scales_with_t_squared_for_large_t():
    # for large T, KL(p_t || p_s) ~ sum((z_t - z_s - mean)^2) / (2 K T^2), so T^2 * KL tends to a constant
    student, teacher = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.0, 0.5, 0.0]])
    values = [kd_kl_divergence(student, teacher, t).item() for t in (50.0, 100.0, 200.0)]
    diff = (teacher - student) - (teacher - student).mean()
    assert values == pytest.approx([diff.square().sum().item() / (2 * 3)] * 3, rel=2e-2)


def test_softmax_with_temperature_flattens_and_equals_softmax_at_one():
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0]])
    torch.testing.assert_close(softmax_with_temperature(logits, 1.0), torch.softmax(logits, dim=-1))
    maxima = [softmax_with_temperature(logits, t).max().item() for t in (0.5, 1.0, 2.0, 4.0, 100.0)]
    assert maxima == sorted(maxima, reverse=True)
    entropy = [-(p * p.log()).sum().item() for p in (softmax_with_temperature(logits, t) for t in (1.0, 4.0, 1e4))]
    assert entropy == sorted(entropy) and entropy[-1] == pytest.approx(math.log(4), rel=1e-6)
    with pytest.raises(ValueError, match="positive"):
        softmax_with_temperature(logits, 0.0)


def test_distillation_gradient_reaches_the_student_only():
    student = torch.randn(4, 3, requires_grad=True)
    teacher = torch.randn(4, 3, requires_grad=True)
    distillation_loss(student, teacher, torch.tensor([0, 1, 2, 0]), temperature=3.0, alpha=0.7).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None
