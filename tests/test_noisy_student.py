"""NoisyStudent on real Fashion-MNIST subsets: frozen clean-view teacher, strong-view student, generations, DDP."""

from lit_imgcls.data import ImageDataModule
from tests.conftest import QUIET, REPO, needs_fashion_mnist

pytestmark = needs_fashion_mnist
STUDENT = str(REPO / "configs" / "noisy_student" / "fashion_mnist_100.yaml")
TEACHER = str(REPO / "configs" / "noisy_student" / "teacher_fashion_mnist_100.yaml")
# 1,200 training images: 100 val, 10 labels per class, 1,000 unlabeled
TINY_DATA = [
    "--data.train_subset=1100",
    "--data.val_size=100",
    "--data.labels_per_class=10",
    "--data.test_subset=200",
    "--data.batch_size=16",
    "--data.unlabeled_batch_ratio=2",
    "--data.eval_batch_size=128",
]
TINY_FIT = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=4", *QUIET]


def tiny_data(**kwargs) -> ImageDataModule:
    options = dict(train_subset=1100, val_size=100, labels_per_class=10, test_subset=200, batch_size=16)
    return ImageDataModule(**{**options, "unlabeled_batch_ratio": 2, "eval_batch_size": 128, **kwargs})
