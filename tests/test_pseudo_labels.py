"""Pseudo-label selection on hand-built teacher outputs: threshold, soft vs hard, temperature, class balancing."""

import pytest
import torch

from lit_imgcls.errors import ConfigError, UserError
from lit_imgcls.pseudo_labels import balance_counts, select_pseudo_labels, soften

# 6 unlabeled images, 3 classes; top probabilities 0.9, 0.5, 0.7, 0.4, 0.8, 0.6 for classes 0, 0, 1, 2, 0, 1
PROBS = torch.tensor(
    [
        [0.90, 0.05, 0.05],
        [0.50, 0.30, 0.20],
        [0.20, 0.70, 0.10],
        [0.30, 0.30, 0.40],
        [0.80, 0.10, 0.10],
        [0.10, 0.60, 0.30],
    ]
)


def test_threshold_keeps_confident_images_with_their_argmax():
    labels = select_pseudo_labels(PROBS, threshold=0.6, hard=True)
    assert labels.indices.tolist() == [0, 2, 4, 5]
    assert labels.targets.tolist() == [0, 1, 0, 1]
    assert labels.targets.dtype == torch.long
    assert labels.kept == 4 and labels.total == 6
    assert labels.confidence.tolist() == pytest.approx([0.9, 0.7, 0.8, 0.6])


def test_soft_labels_are_the_teacher_distribution():
    labels = select_pseudo_labels(PROBS, threshold=0.0)
    assert labels.indices.tolist() == list(range(6))
    torch.testing.assert_close(labels.targets, PROBS)
    assert labels.classes.tolist() == [0, 0, 1, 2, 0, 1]


def test_temperature_matches_softmax_of_scaled_logits():
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    for t in (0.5, 1.0, 2.0, 4.0):
        torch.testing.assert_close(soften(logits.softmax(-1), t), (logits / t).softmax(-1))
    flat = select_pseudo_labels(PROBS, temperature=4.0).targets
    assert (flat.max(-1).values < PROBS.max(-1).values).all()  # T > 1 flattens every row
    torch.testing.assert_close(flat.sum(-1), torch.ones(6))


def test_balancing_drops_the_least_confident_and_duplicates_rare_classes():
    # class 0: images 0 (0.9), 4 (0.8), 1 (0.5); class 1: 2 (0.7), 5 (0.6); class 2: 3 (0.4)
    labels = select_pseudo_labels(PROBS, hard=True, per_class=2)
    assert labels.per_class_counts(3) == [2, 2, 2]
    assert sorted(labels.indices.tolist()) == [0, 2, 3, 3, 4, 5]  # 1 dropped, 3 duplicated
    assert labels.kept == 5
    labels = select_pseudo_labels(PROBS, hard=True, per_class=5)
    assert labels.per_class_counts(3) == [5, 5, 5]
    # class 0 (3 images): 5 = 3 + 2 -> the two most confident (0, 4) twice, 1 once
    assert labels.indices.tolist().count(0) == 2 and labels.indices.tolist().count(1) == 1
    assert labels.indices.tolist().count(3) == 5
    # each row keeps its own image's target
    assert (labels.targets == PROBS.argmax(-1)[labels.indices]).all()


def test_balancing_after_threshold_leaves_empty_classes_empty():
    labels = select_pseudo_labels(PROBS, threshold=0.65, per_class=3)
    assert labels.per_class_counts(3) == [3, 3, 0]
    assert labels.indices.tolist().count(2) == 3  # the only confident class-1 image, tripled
    torch.testing.assert_close(labels.targets, PROBS[labels.indices])


def test_balance_counts_orders_ties_by_position():
    classes = torch.tensor([1, 1, 1, 1])
    confidence = torch.tensor([0.5, 0.9, 0.5, 0.9])
    assert balance_counts(classes, confidence, 2, 2).tolist() == [1, 3]


def test_target_table_is_indexed_by_unlabeled_index():
    labels = select_pseudo_labels(PROBS, threshold=0.6, hard=True)
    table = labels.target_table()
    assert table.shape == (6,)
    assert table[torch.tensor([0, 2, 4, 5])].tolist() == [0, 1, 0, 1]


def test_errors_name_the_fix():
    with pytest.raises(UserError, match="unlabeled set is empty"):
        select_pseudo_labels(torch.empty(0, 3))
    with pytest.raises(UserError, match=r"keeps none of the 6 .*highest teacher confidence 0.900"):
        select_pseudo_labels(PROBS, threshold=0.95)
    with pytest.raises(ConfigError, match="temperature only applies to soft"):
        select_pseudo_labels(PROBS, hard=True, temperature=2.0)
    with pytest.raises(ConfigError, match="threshold must be in"):
        select_pseudo_labels(PROBS, threshold=1.5)
    with pytest.raises(ConfigError, match="per_class"):
        select_pseudo_labels(PROBS, per_class=0)
