import csv
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

from lit_imgcls import neighbors
from lit_imgcls.data import ImageDataModule
from lit_imgcls.errors import ConfigError, UserError
from lit_imgcls.neighbors import KNNIndex, knn_search, knn_vote
from lit_imgcls.neighbors_bounds import LowerBound, PairDistances, principal_axes
from lit_imgcls.neighbors_clustered import ClusteredBounds
from lit_imgcls.tasks import ImageClassifier, KNNClassifier, KNNMonitor
from lit_imgcls.tasks.knn import penultimate_features
from lit_imgcls.tasks.knn_monitor import count_once
from tests.conftest import QUIET, REPO, needs_cuda, needs_fashion_mnist, quiet_trainer, run_cli
from tests.test_cli import read_metrics

pytestmark = needs_fashion_mnist
PIXELS = str(REPO / "configs" / "knn" / "fashion_mnist_pixels.yaml")


@pytest.fixture(scope="module")
def pixels(fashion_test):
    """3,000 bank images and 1,000 queries of real Fashion-MNIST, as raw float pixels."""
    x, y = fashion_test.images.flatten(1).float(), fashion_test.targets
    return x[:3000], y[:3000], x[3000:4000], y[3000:4000]


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("weights", ["uniform", "distance"])
@pytest.mark.parametrize(("strategy", "bf16"), [("brute", False), ("brute", True), ("pruned", False)])
def test_same_neighbours_and_predictions_as_sklearn(pixels, metric, weights, strategy, bf16):
    bank, bank_y, queries, _ = pixels
    dist, idx = knn_search(queries, bank, 5, metric, chunk_size=256, bf16=bf16, strategy=strategy)
    probs = knn_vote(dist, bank_y[idx], 10, weights, metric=metric)
    sk = KNeighborsClassifier(5, metric=metric, weights=weights, algorithm="brute").fit(bank.numpy(), bank_y.numpy())
    sk_dist, sk_idx = sk.kneighbors(queries.numpy())
    np.testing.assert_array_equal(idx.numpy(), sk_idx)
    np.testing.assert_allclose(dist.numpy(), sk_dist, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(probs.argmax(1).numpy(), sk.predict(queries.numpy()))
    np.testing.assert_allclose(probs.numpy(), sk.predict_proba(queries.numpy()), atol=1e-5)


def reference_search(queries, bank, k, metric):
    """Exact float64 brute force, ties to the lower bank index (the rule every strategy must follow)."""
    q, b = queries.double()[:, None], bank.double()[None]
    dist = (
        1 - torch.nn.functional.cosine_similarity(q, b, dim=-1, eps=1e-12)
        if metric == "cosine"
        else (q - b).norm(dim=-1)
    )
    order = dist.sort(dim=1, stable=True).indices[:, :k]
    return dist.gather(1, order), order


def random_data(kind: str, n_bank: int = 1500, n_queries: int = 80, dim: int = 48):
    g = torch.Generator().manual_seed(0)
    if kind == "gaussian":  # decaying spectrum, like features: the pruning bound is tight
        scale = torch.logspace(0, -2, dim)
        return torch.randn(n_bank, dim, generator=g) * scale, torch.randn(n_queries, dim, generator=g) * scale
    if kind == "uniform":  # isotropic: the pruning bound is loose
        return torch.rand(n_bank, dim, generator=g), torch.rand(n_queries, dim, generator=g)
    bank = torch.randint(0, 3, (n_bank, dim), generator=g).float() + 1  # "ties": many equal distances
    bank[1::7] = bank[::7][: len(bank[1::7])]  # duplicated rows: exact ties, also under cosine
    queries = torch.randint(0, 3, (n_queries, dim), generator=g).float() + 1
    queries[:10] = bank[100:110]
    return bank, queries


@pytest.mark.parametrize("kind", ["gaussian", "uniform", "ties"])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("k", [1, 5, 20])
@pytest.mark.parametrize("strategy", ["brute", "pruned", "auto"])
def test_every_strategy_is_exact_with_index_ties(kind, metric, k, strategy):
    bank, queries = random_data(kind)
    dist, idx = knn_search(queries, bank, k, metric, chunk_size=32, strategy=strategy)
    ref_dist, ref_idx = reference_search(queries, bank, k, metric)
    torch.testing.assert_close(idx, ref_idx, rtol=0, atol=0)
    torch.testing.assert_close(dist, ref_dist, rtol=1e-12, atol=1e-12)
    sk = NearestNeighbors(n_neighbors=k, metric=metric, algorithm="brute").fit(bank.double().numpy())
    sk_dist, sk_idx = sk.kneighbors(queries.double().numpy())
    np.testing.assert_allclose(dist.numpy(), sk_dist, rtol=1e-9, atol=1e-9)
    if kind != "ties":  # scikit-learn does not order equal distances by index
        np.testing.assert_array_equal(idx.numpy(), sk_idx)
        labels = torch.arange(len(bank)) % 3
        ours = knn_vote(dist, labels[idx], 3).argmax(1).numpy()
        clf = KNeighborsClassifier(k, metric=metric, algorithm="brute").fit(bank.double().numpy(), labels.numpy())
        np.testing.assert_array_equal(ours, clf.predict(queries.double().numpy()))


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_lower_bound_never_exceeds_the_distance(offset):
    bank, queries = random_data("uniform", 600, 60, 64)
    bank, queries = bank + offset, queries + offset
    exact = torch.cdist(queries.double(), bank.double()).square()
    for dims in (None, 4, 16):
        bound = LowerBound(bank, dims)
        part, query_term = bound.bounds(queries.double())
        assert (part.double() + query_term[:, None] <= exact).all()


def test_auto_prunes_only_where_it_pays(monkeypatch):
    monkeypatch.setattr(neighbors, "PRUNED_MIN_BANK", 1000)
    monkeypatch.setattr(neighbors, "PRUNED_MIN_DIM", 32)
    monkeypatch.setattr(neighbors, "PRUNED_DIMS", 8)
    tight = torch.randn(8192, 64, generator=torch.Generator().manual_seed(0))
    tight[:, 4:] *= 1e-3  # nearly 4-dimensional: clusters and 8 principal components bound the distance tightly
    loose, _ = random_data("uniform", 4096, 1, 64)
    assert KNNIndex(tight).strategy == "pruned"
    assert KNNIndex(loose).strategy == "brute"
    assert KNNIndex(tight[:, :16]).strategy == "brute"  # low dimension
    assert KNNIndex(tight[:999]).strategy == "brute"  # small bank


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_cluster_bound_never_exceeds_a_members_distance(offset):
    bank, queries = random_data("gaussian", 1500, 60, 48)
    bank, queries = bank + offset, queries + offset
    clustered = ClusteredBounds(bank, principal_axes(bank, 8), 75, abs_margin=0.0)  # 20 clusters
    lower, _ = clustered.cluster_bounds(clustered.coarse.features_of(queries.double())[0])
    exact = torch.cdist(queries.double(), bank.double()).square()[:, clustered.order]
    for j, (start, stop) in enumerate(zip(clustered.starts, clustered.stops, strict=True)):
        if stop > start:
            assert (lower[:, j, None].double() <= exact[:, start:stop]).all()


@pytest.mark.parametrize("kind", ["uniform", "ties"])
def test_pruned_is_exact_with_clusters_smaller_than_k_and_many_chunks(monkeypatch, kind):
    monkeypatch.setattr(neighbors, "CLUSTER_SIZE", 4)  # the nearest clusters hold fewer than k rows
    monkeypatch.setattr(neighbors, "PRUNED_CHUNK", 16)
    bank, queries = random_data(kind, 600, 50, 24)
    for metric in ("euclidean", "cosine"):
        dist, idx = knn_search(queries, bank, 20, metric, chunk_size=8, strategy="pruned")
        ref_dist, ref_idx = reference_search(queries, bank, 20, metric)
        torch.testing.assert_close(idx, ref_idx, rtol=0, atol=0)
        torch.testing.assert_close(dist, ref_dist, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("kind", ["uniform", "ties"])
@pytest.mark.parametrize("n_bank", [1500, 120])  # 24 column blocks of 64 (the last one padded); 2: fewer than k
def test_brute_tiles_and_column_blocks_are_exact(monkeypatch, kind, bf16, n_bank):
    monkeypatch.setattr(neighbors, "BRUTE_TILE", 128)  # 1500 rows: 12 tiles of 2 blocks (fewer than k=20); 120: 1 tile
    bank, queries = random_data(kind, n_bank, 50, 24)
    for metric in ("euclidean", "cosine"):
        dist, idx = knn_search(queries, bank, 20, metric, chunk_size=16, bf16=bf16, strategy="brute")
        ref_dist, ref_idx = reference_search(queries, bank, 20, metric)
        torch.testing.assert_close(idx, ref_idx, rtol=0, atol=0)
        torch.testing.assert_close(dist, ref_dist, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("padded_slack", [0, 10**6])  # per-row selection on the flat list, or always padded
@pytest.mark.parametrize("prepared_values", [0, 2**22])  # exact distances from the streamed bank, or a float64 copy
def test_exact_stage_paths_are_exact(monkeypatch, padded_slack, prepared_values):
    monkeypatch.setattr(neighbors, "PADDED_SLACK", padded_slack)
    monkeypatch.setattr(PairDistances, "PREPARED_VALUES", prepared_values)
    monkeypatch.setattr(PairDistances, "STEP_VALUES", 1)  # the fewest pairs per step (256): many steps
    for kind in ("uniform", "ties"):
        bank, queries = random_data(kind, 600, 50, 24)
        for metric in ("euclidean", "cosine"):
            for k in (1, 5, 20):
                dist, idx = knn_search(queries, bank, k, metric, chunk_size=16, strategy="brute")
                ref_dist, ref_idx = reference_search(queries, bank, k, metric)
                torch.testing.assert_close(idx, ref_idx, rtol=0, atol=0)
                torch.testing.assert_close(dist, ref_dist, rtol=1e-12, atol=1e-12)


@needs_cuda
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("strategy", ["brute", "pruned"])
@pytest.mark.parametrize("bf16", [False, True])
def test_cuda_search_matches_cpu(metric, strategy, bf16):
    bank, queries = random_data("ties")
    dist, idx = knn_search(queries.cuda(), bank.cuda(), 20, metric, chunk_size=32, bf16=bf16, strategy=strategy)
    ref_dist, ref_idx = reference_search(queries, bank, 20, metric)
    assert idx.device.type == "cuda"
    torch.testing.assert_close(idx.cpu(), ref_idx, rtol=0, atol=0)
    torch.testing.assert_close(dist.cpu(), ref_dist, rtol=1e-12, atol=1e-12)


def test_distance_weights_let_exact_matches_decide():
    dist = torch.tensor([[0.0, 1.0, 1.0], [1.0, 2.0, 4.0]], dtype=torch.float64)
    labels = torch.tensor([[2, 0, 0], [0, 1, 1]])
    probs = knn_vote(dist, labels, 3, "distance")
    torch.testing.assert_close(probs[0], torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(probs[1], torch.tensor([1.0, 0.75, 0.0]) / 1.75)  # weights 1, 1/2, 1/4


def test_temperature_weights_hand_computed():
    dist = torch.tensor([[0.1, 0.2, 0.4]], dtype=torch.float64)  # cosine distances: similarities 0.9, 0.8, 0.6
    labels = torch.tensor([[1, 0, 0]])
    w = [math.exp(0.9 / 0.1), math.exp(0.8 / 0.1), math.exp(0.6 / 0.1)]
    probs = knn_vote(dist, labels, 2, "temperature", temperature=0.1, metric="cosine")
    torch.testing.assert_close(probs[0], torch.tensor([w[1] + w[2], w[0]]) / sum(w))


def test_search_rejects_k_larger_than_bank():
    with pytest.raises(ValueError, match="k=5 is larger than the reference bank"):
        knn_search(torch.zeros(2, 3), torch.zeros(4, 3), 5)


def test_classifier_matches_sklearn_on_normalized_pixels():
    dm = ImageDataModule(val_size=0, train_subset=3000, test_subset=500, augment="none", batch_size=250)
    (result,) = quiet_trainer().test(KNNClassifier(k=5), dm, verbose=False)
    bank = dm.transform_batch({"image": dm.train_set.images[dm.train_indices]}, train=False)["image"].flatten(1)
    queries = dm.transform_batch({"image": dm.test_set.images[:500]}, train=False)["image"].flatten(1)
    sk = KNeighborsClassifier(5).fit(bank.numpy(), dm.train_set.targets[dm.train_indices].numpy())
    expected = (sk.predict(queries.numpy()) == dm.test_set.targets[:500].numpy()).mean()
    assert result["test/acc"] == pytest.approx(expected, abs=1e-6)
    assert result["test/acc"] > 0.7


def test_k_larger_than_bank_is_a_clear_error():
    dm = ImageDataModule(val_size=0, train_subset=10, test_subset=10)
    with pytest.raises(ConfigError, match=r"k=20 is larger than the reference bank \(10 images\)"):
        quiet_trainer().test(KNNClassifier(k=20), dm, verbose=False)


def test_backbone_without_features_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot give features"):
        penultimate_features(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)), "alexnet")
    with pytest.raises(UserError, match="not found"):
        KNNClassifier(features="checkpoint", checkpoint=str(tmp_path / "missing.ckpt"))
    with pytest.raises(ConfigError, match=r"needs model\.init_args\.checkpoint"):
        KNNClassifier(features="checkpoint")


def test_checkpoint_features_and_monitor_rise_with_training(tmp_path):
    pl.seed_everything(0)
    dm = ImageDataModule(val_size=500, train_subset=2000, test_subset=500, batch_size=32, augment="none")
    model = ImageClassifier("lenet5")
    monitor = KNNMonitor(k=10, bank_size=2000)
    trainer = quiet_trainer(max_epochs=2, callbacks=[monitor], default_root_dir=tmp_path)
    (untrained,) = trainer.validate(model, dm, verbose=False)
    before = untrained["val/knn_acc"]
    trainer.fit(model, dm)
    after = trainer.callback_metrics["val/knn_acc"].item()
    assert after > before + 0.03 and after > 0.6
    trainer.save_checkpoint(tmp_path / "lenet.ckpt")
    knn = KNNClassifier(
        k=10, metric="cosine", weights="temperature", features="checkpoint", checkpoint=str(tmp_path / "lenet.ckpt")
    )
    (result,) = quiet_trainer().test(knn, dm, verbose=False)
    assert result["test/acc"] > 0.6


def monitor_reference(model, dm, monitor) -> float:
    """val/knn_acc recomputed the slow way: both feature passes again, float64 brute force, the same vote."""
    net = model.net.eval()
    features = penultimate_features(net)

    def feats(indices):
        images = dm.transform_batch({"image": dm.train_set.images[indices]}, train=False)["image"]
        with torch.no_grad():
            return features(images).float(), dm.train_set.targets[indices]

    bank, bank_y = feats(dm.train_indices[: monitor.bank_size])
    queries, query_y = feats(dm.val_indices)
    dist, idx = reference_search(queries, bank, monitor.k, monitor.metric)
    probs = knn_vote(dist, bank_y[idx], 10, monitor.weights, monitor.temperature, monitor.metric)
    return (probs.argmax(1) == query_y).double().mean().item()


@pytest.mark.parametrize("use_hook", [True, False])
def test_monitor_equals_a_brute_force_recomputation(tmp_path, use_hook):
    pl.seed_everything(0)
    dm = ImageDataModule(val_size=301, train_subset=1500, batch_size=64, augment="none")
    model = ImageClassifier("lenet5")
    monitor = KNNMonitor(bank_size=700, batch_size=128)  # bank passes of 128, 128, ..., 60 images
    monitor.use_hook = use_hook
    trainer = quiet_trainer(max_epochs=1, callbacks=[monitor], default_root_dir=tmp_path)
    trainer.fit(model, dm)
    assert monitor.use_hook is use_hook and monitor.hook_checked is use_hook  # the hook's features passed the check
    assert trainer.callback_metrics["val/knn_acc"].item() == pytest.approx(monitor_reference(model, dm, monitor))
    assert monitor._hook is None and not model.net.get_classifier()._forward_pre_hooks


def test_monitor_skips_epochs_and_sanity_checks(tmp_path):
    dm = ImageDataModule(val_size=100, train_subset=300, batch_size=100, augment="none")
    monitor = KNNMonitor(every_n_epochs=2, bank_size=200)
    logged = []
    monitor.evaluate = lambda trainer, *_: logged.append(trainer.current_epoch) or 0.5
    trainer = quiet_trainer(max_epochs=4, callbacks=[monitor], default_root_dir=tmp_path, num_sanity_val_steps=1)
    trainer.fit(ImageClassifier("lenet5"), dm)
    assert logged == [1, 3]
    with pytest.raises(ConfigError, match="every_n_epochs must be at least 1"):
        KNNMonitor(every_n_epochs=0)


def test_count_once_drops_sampler_padding():
    # DistributedSampler over 5 images on 2 ranks: rank 0 sees 0, 2, 4; rank 1 sees 1, 3 and 0 again (padding)
    index = torch.tensor([0, 2, 4, 1, 3, 0])
    correct = torch.tensor([1, 0, 1, 1, 1, 0])
    assert count_once(correct, index) == (4, 5)


@pytest.mark.slow
def test_ddp_knn_matches_one_process(tmp_path):
    n_test = 1001
    args = ["--data.train_subset=3000", f"--data.test_subset={n_test}", "--data.batch_size=250", *QUIET]
    ddp = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    results = {}
    for name, extra in (("single", []), ("ddp", ddp)):
        run = run_cli("test", "--config", PIXELS, *args, *extra, cwd=tmp_path / name)
        assert run.returncode == 0, run.stderr[-3000:]
        (version,) = (tmp_path / name / "runs" / "knn_fashion_mnist_pixels").glob("version_*")
        results[name] = read_metrics(version)["test/acc"]
    padding = -n_test % 2
    assert abs(results["ddp"] - results["single"]) <= padding / (n_test + padding) + 1e-6
    assert results["single"] > 0.7


@pytest.mark.slow
def test_ddp_monitor_equals_one_process(tmp_path):
    """301 validation images on 2 ranks: the sampler repeats one image, which must not be counted twice. The network
    is the config's seeded initialisation, the same in both runs."""
    lenet = str(REPO / "configs" / "fashion_mnist" / "lenet5.yaml")
    args = ["--data.val_size=301", "--data.train_subset=1500", "--data.batch_size=64"]
    monitor = ["--trainer.callbacks+=lit_imgcls.tasks.KNNMonitor", "--trainer.callbacks.init_args.bank_size=700"]
    ddp = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    results = {}
    for name, extra in (("single", ["--trainer.accelerator=cpu"]), ("ddp", ddp)):
        run = run_cli("validate", "--config", lenet, *args, *monitor, *extra, *QUIET, cwd=tmp_path / name)
        assert run.returncode == 0, run.stderr[-3000:]
        (version,) = (tmp_path / name / "runs" / "fashion_mnist_lenet5").glob("version_*")
        results[name] = read_metrics(version)["val/knn_acc"]
    assert results["ddp"] == pytest.approx(results["single"], abs=1e-6)
    assert round(results["single"] * 301) == pytest.approx(results["single"] * 301, abs=1e-4)  # hits / 301 images


@pytest.mark.slow
def test_predict_writes_neighbour_classes(tmp_path):
    out = tmp_path / "knn.csv"
    args = ["--data.train_subset=2000", "--data.test_subset=50", f"--prediction_writer.output={out}", *QUIET]
    run = run_cli("predict", "--config", PIXELS, *args, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 50
    neighbours = rows[0]["neighbors"].split("|")
    assert len(neighbours) == 5 and rows[0]["predicted"] in neighbours


def test_timm_features_path():
    dm = ImageDataModule(val_size=0, train_subset=200, test_subset=50, augment="none", batch_size=50)
    knn = KNNClassifier(k=3, features="timm", timm_model="test_resnet", metric="cosine")
    (result,) = quiet_trainer().test(knn, dm, verbose=False)
    assert 0.0 <= result["test/acc"] <= 1.0
    assert knn.bank[0].shape[0] == 200 and knn.bank[0].shape[1] == knn.backbone.num_features
