import torch

from lit_imgcls.callbacks import concat_batches, merge_ranks


def test_merge_sorts_by_index_and_drops_sampler_padding():
    # rank 0 got indices 0, 2, 4; rank 1 got 1, 3 and a padded repeat of 0
    rank0 = {"index": torch.tensor([0, 2, 4]), "probs": torch.tensor([[1.0, 0], [0.2, 0.8], [0.4, 0.6]])}
    rank1 = {"index": torch.tensor([1, 3, 0]), "probs": torch.tensor([[0.9, 0.1], [0.3, 0.7], [1.0, 0]])}
    merged = merge_ranks([rank0, rank1])
    assert merged["index"].tolist() == [0, 1, 2, 3, 4]
    torch.testing.assert_close(merged["probs"][:, 0], torch.tensor([1.0, 0.9, 0.2, 0.3, 0.4]))


def test_merge_ignores_ranks_without_predictions():
    rank0 = {"index": torch.tensor([1, 0]), "probs": torch.eye(2)}
    assert merge_ranks([rank0, {}])["index"].tolist() == [0, 1]


def testconcat_batches_joins_batches():
    batches = [
        {"index": torch.tensor([0, 1]), "probs": torch.ones(2, 3)},
        {"index": torch.tensor([2]), "probs": torch.ones(1, 3)},
    ]
    joined = concat_batches(batches)
    assert joined["index"].tolist() == [0, 1, 2] and joined["probs"].shape == (3, 3)
    assert concat_batches([batches]).keys() == joined.keys()  # one list per dataloader, as Lightning passes it
