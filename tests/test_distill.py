"""DistillationModule: a frozen teacher, the three methods, checkpoints usable without the teacher, DDP."""

from tests.conftest import QUIET, needs_fashion_mnist

pytestmark = needs_fashion_mnist
SMALL = {"val_size": 128, "train_subset": 512, "batch_size": 32}
TINY_CLI = [
    "--data.train_subset=600",
    "--data.val_size=128",
    "--data.test_subset=201",
    "--data.batch_size=32",
    "--data.labels_per_class=20",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=4",
    *QUIET,
]
