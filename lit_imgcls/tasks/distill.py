"""DistillationModule: a frozen teacher trains a student on labeled, unlabeled or both kinds of data."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from lit_imgcls.checkpoint_io import read_checkpoint
from lit_imgcls.data.protocol import DataRequest, TrainData
from lit_imgcls.errors import ConfigError, UserError
from lit_imgcls.losses import kd_kl_divergence
from lit_imgcls.tasks.base import ClassificationTask, task_options
from lit_imgcls.tasks.classifier import ImageClassifier, drop_finetune_options
from lit_imgcls.tasks.teacher import FrozenTeacher, TeacherPrecision

METHOD_DATA: dict[str, TrainData] = {"labeled": "labeled", "unlabeled": "unlabeled", "semi": "combined"}
LIGHTNING_INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"
IMAGE_CLASSIFIER = f"{ImageClassifier.__module__.rsplit('.', 1)[0]}.{ImageClassifier.__name__}"


class DistillationModule(ClassificationTask):
    """Knowledge distillation (Hinton et al. 2015) from a frozen teacher (`FrozenTeacher`) into the student `net`.

    The loss, as in `lit_imgcls.losses.distillation_loss`, on labeled batches:
        loss = (1 - alpha) * CE(student, target) + alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T))
    `unlabeled`: the KL term alone on unlabeled batches. `semi`: the labeled loss + unlabeled_weight * the KL term
    of the unlabeled batch. Logged per epoch: `train/loss` (the whole loss), `train/ce`, `train/kd` (labeled
    batches; the unlabeled ones in `unlabeled`) and, in `semi`, `train/kd_unlabeled`, each unweighted.

    Args:
        teacher: checkpoint of any task of this project (ImageClassifier, a previous student, ...), or a weights
            file when `teacher_model` is set.
        teacher_model: build the teacher with `create_model(teacher_model, num_classes, in_chans,
            **teacher_model_kwargs)` and load `teacher` into it.
        teacher_model_kwargs: extra arguments of that `create_model` call (e.g. `{small_input: true}`).
        teacher_precision: `32`, `bf16` (the teacher under bfloat16 autocast) or `auto` (bf16 where the device has
            native bfloat16); see `FrozenTeacher`.
        method: `labeled` (CE + KL on labeled batches), `unlabeled` (KL only on the unlabeled set, no labels used),
            `semi` (labeled and unlabeled loaders combined).
        temperature: softmax temperature T of the KL term.
        alpha: weight of the KL term on labeled batches, in [0, 1]; the CE term gets 1 - alpha.
        unlabeled_weight: weight of the unlabeled batches' KL term in `semi`.
        teacher_view: `same`: the teacher sees the student's augmented view (function matching, Beyer et al. 2022);
            `clean`: labeled batches give the teacher the un-augmented image, unlabeled batches the weak view
            (`data.weak_augment`; `none` makes it clean). On unlabeled batches the student sees the strong view
            (`data.strong_augment`).
        **kwargs: the student: the network and training options every task shares (`ClassificationTask`: model,
            num_classes, in_chans, drop_rate, label_smoothing, optimizer, channels_last, ...).

    The teacher is built in `setup("fit")` and is no part of the student: a student checkpoint loads without it
    (see `export_student` for a plain `ImageClassifier` checkpoint).
    """

    def __init__(
        self,
        teacher: str,
        teacher_model: str | None = None,
        teacher_model_kwargs: dict[str, Any] | None = None,
        teacher_precision: TeacherPrecision = "32",
        method: Literal["labeled", "unlabeled", "semi"] = "labeled",
        temperature: float = 4.0,
        alpha: float = 0.9,
        unlabeled_weight: float = 1.0,
        teacher_view: Literal["same", "clean"] = "same",
        **kwargs: Any,
    ) -> None:
        drop_finetune_options(kwargs, type(self).__name__)
        super().__init__(**kwargs)
        if method not in METHOD_DATA:
            raise ConfigError(f"unknown method {method!r}: choose one of {', '.join(METHOD_DATA)}")
        if teacher_view not in ("same", "clean"):
            raise ConfigError(f"unknown teacher_view {teacher_view!r}: choose same or clean")
        if temperature <= 0 or not 0.0 <= alpha <= 1.0 or unlabeled_weight < 0:
            raise ConfigError(
                f"need temperature > 0, alpha in [0, 1], unlabeled_weight >= 0; got temperature={temperature}, "
                f"alpha={alpha}, unlabeled_weight={unlabeled_weight}"
            )
        self.temperature, self.alpha, self.unlabeled_weight = temperature, alpha, unlabeled_weight
        self.teacher_view = teacher_view
        self.data_request = DataRequest(
            METHOD_DATA[method], clean_view=teacher_view == "clean" and method != "unlabeled"
        )
        self.teacher = FrozenTeacher(teacher, teacher_model, teacher_model_kwargs, teacher_precision)
        self.track_loss_terms("ce", "kd", "kd_unlabeled")

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            datamodule = getattr(self.trainer, "datamodule", None)
            self.teacher.load(self.num_classes, self.in_chans, self.channels_last)
            self.teacher.check(datamodule)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.teacher.place(self.device, self.dtype)

    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen teacher's logits on `images`, without gradients."""
        return self.teacher(images)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        train_data = self.data_request.train_data
        labeled = batch if train_data == "labeled" else batch.get("labeled")
        unlabeled = batch if train_data == "unlabeled" else batch.get("unlabeled")
        loss = torch.zeros((), device=self.device)
        if labeled is not None:
            logits = self(labeled["image"])
            teacher = self.teacher_logits(labeled["image_clean" if self.data_request.clean_view else "image"])
            ce = self.compute_loss(logits, labeled["target"])
            kd = kd_kl_divergence(logits, teacher, self.temperature)
            loss = (1 - self.alpha) * ce + self.alpha * kd
            self.update_loss_terms(len(logits), ce=ce, kd=kd)
        if unlabeled is not None:
            student = self(unlabeled["image_strong"])
            teacher = self.teacher_logits(unlabeled["image" if self.teacher_view == "clean" else "image_strong"])
            kd = kd_kl_divergence(student, teacher, self.temperature)
            if labeled is None:
                loss = kd
                self.update_loss_terms(len(student), kd=kd)
                self.train_loss.update(kd.detach(), weight=len(student))
            else:
                loss = loss + self.unlabeled_weight * kd
                self.update_loss_terms(len(student), kd_unlabeled=kd)
        if labeled is not None:  # the whole loss, the unlabeled term included
            self.update_metrics("train", logits, labeled["target"], loss)
        self.log_step_loss(loss, len((labeled or unlabeled)["image"]))
        return loss


def student_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The `ImageClassifier` arguments among a DistillationModule's hyperparameters: its student alone."""
    keep = task_options(ImageClassifier)
    return {key: value for key, value in hparams.items() if key in keep}


def export_student(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the student of a DistillationModule checkpoint as a plain ImageClassifier checkpoint (net.* only)."""
    source = read_checkpoint(checkpoint)
    hparams = source.get("hyper_parameters", {})
    if "teacher" not in hparams:
        raise UserError(f"{checkpoint} is not a DistillationModule checkpoint (no teacher hyperparameter)")
    instantiator = hparams.get("_instantiator", LIGHTNING_INSTANTIATOR)  # `_class_path` needs one to load
    student = {**student_hparams(hparams), "_class_path": IMAGE_CLASSIFIER, "_instantiator": instantiator}
    state = {key: value for key, value in source["state_dict"].items() if key.startswith("net.")}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    version = {k: v for k, v in source.items() if k == "pytorch-lightning_version"}
    torch.save({**version, "state_dict": state, "hyper_parameters": student}, out)
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Export the student of a distillation checkpoint.")
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    arguments = parser.parse_args()
    print(export_student(arguments.checkpoint, arguments.out))
