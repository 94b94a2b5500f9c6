"""DistillationModule: a frozen teacher trains a student on labeled, unlabeled or both kinds of data."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lit_imgcls.checkpoint_io import read_checkpoint
from lit_imgcls.data.protocol import DataRequest, TrainData
from lit_imgcls.errors import ConfigError, UserError
from lit_imgcls.losses import distillation_loss, kd_kl_divergence
from lit_imgcls.models import create_model
from lit_imgcls.tasks.checkpoints import load_task_network
from lit_imgcls.tasks.classifier import ImageClassifier

METHOD_DATA: dict[str, TrainData] = {"labeled": "labeled", "unlabeled": "unlabeled", "semi": "combined"}
IMAGE_CLASSIFIER = f"{ImageClassifier.__module__.rsplit('.', 1)[0]}.{ImageClassifier.__name__}"


def build_teacher(
    checkpoint: str, model: str | None = None, num_classes: int = 10, in_chans: int = 1, **model_kwargs: Any
) -> nn.Module:
    """The teacher network: the `net` of a checkpoint of any task of this project, or `create_model(model, ...)`
    with the weights in `checkpoint` (a state dict, bare or under "state_dict", keys optionally prefixed "net.")."""
    if model is None:
        return load_task_network(checkpoint)
    net = create_model(model, num_classes, in_chans, **model_kwargs)
    state = read_checkpoint(checkpoint)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if any(key.startswith("net.") for key in state):
        state = {key[4:]: value for key, value in state.items() if key.startswith("net.")}
    try:
        net.load_state_dict(state)
    except RuntimeError as error:
        raise ConfigError(f"the weights in {checkpoint} do not fit teacher_model={model!r}: {error}") from error
    return net


class DistillationModule(ImageClassifier):
    """Knowledge distillation (Hinton et al. 2015) from a frozen teacher into the student `net`.

    The loss is `lit_imgcls.losses.distillation_loss`: (1 - alpha) * CE + alpha * T^2 * KL(teacher || student)
    on labeled batches; unlabeled batches give the KL term only (times `unlabeled_weight` in `semi`).

    Args:
        teacher: checkpoint of any task of this project (ImageClassifier, a previous student, ...), or a weights
            file when `teacher_model` is set.
        teacher_model: build the teacher with `create_model(teacher_model, num_classes, in_chans,
            **teacher_model_kwargs)` and load `teacher` into it.
        teacher_model_kwargs: extra arguments of that `create_model` call (e.g. `{small_input: true}`).
        method: `labeled` (CE + KL on labeled batches), `unlabeled` (KL only on the unlabeled set, no labels used),
            `semi` (labeled and unlabeled loaders combined).
        temperature: softmax temperature T of the KL term.
        alpha: weight of the KL term on labeled batches, in [0, 1]; the CE term gets 1 - alpha.
        unlabeled_weight: weight of the unlabeled batches' KL term in `semi`.
        teacher_view: `same`: the teacher sees the student's augmented view (function matching, Beyer et al. 2022);
            `clean`: labeled batches give the teacher the un-augmented image, unlabeled batches the weak view
            (`data.weak_augment`; `none` makes it clean). On unlabeled batches the student sees the strong view
            (`data.strong_augment`).
        **kwargs: the student: every `ImageClassifier` argument (model, drop_rate, optimizer, ...).

    The teacher is built in `setup("fit")`, frozen, kept in eval mode and out of the optimizer and of checkpoints:
    a student checkpoint loads without the teacher, also as a plain `ImageClassifier` (see `export_student`).
    """

    def __init__(
        self,
        teacher: str,
        teacher_model: str | None = None,
        teacher_model_kwargs: dict[str, Any] | None = None,
        method: Literal["labeled", "unlabeled", "semi"] = "labeled",
        temperature: float = 4.0,
        alpha: float = 0.9,
        unlabeled_weight: float = 1.0,
        teacher_view: Literal["same", "clean"] = "same",
        **kwargs: Any,
    ) -> None:
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
        self.data_request = DataRequest(
            METHOD_DATA[method], clean_view=teacher_view == "clean" and method != "unlabeled"
        )
        self.teacher: nn.Module | None = None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.teacher is None:
            hp = self.hparams
            kwargs = hp.teacher_model_kwargs or {}
            with torch.random.fork_rng(devices=[]):  # building it must not shift the student's random stream
                teacher = build_teacher(hp.teacher, hp.teacher_model, hp.num_classes, hp.in_chans, **kwargs)
            if hp.channels_last:
                teacher.to(memory_format=torch.channels_last)
            self.teacher = teacher.requires_grad_(False).eval()
            self.check_teacher(getattr(self.trainer, "datamodule", None))

    def check_teacher(self, datamodule: Any) -> None:
        """ConfigError when the teacher's classes or input channels disagree with the data."""
        if datamodule is None or not hasattr(datamodule, "image_shape"):
            return
        try:
            with torch.no_grad():
                out = self.teacher(torch.zeros(2, *datamodule.image_shape))
        except RuntimeError as error:
            raise ConfigError(
                f"the teacher {self.hparams.teacher} cannot take the data's {datamodule.image_shape} images ({error})"
            ) from error
        if out.shape[-1] != datamodule.num_classes:
            raise ConfigError(
                f"the teacher {self.hparams.teacher} predicts {out.shape[-1]} classes but the dataset has "
                f"{datamodule.num_classes}: distill from a teacher trained on the same classes"
            )

    def train(self, mode: bool = True) -> DistillationModule:
        """Lightning puts every submodule in train mode: keep the teacher in eval (BatchNorm stats, dropout)."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The student's parameters only."""
        return [p for p in self.net.parameters() if p.requires_grad]

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher(images)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        labeled = batch if self.data_request.train_data == "labeled" else batch.get("labeled")
        unlabeled = batch if self.data_request.train_data == "unlabeled" else batch.get("unlabeled")
        loss = torch.zeros((), device=self.device)
        if labeled is not None:
            logits = self(labeled["image"])
            teacher = self.teacher_logits(labeled["image_clean" if self.data_request.clean_view else "image"])
            smoothing = hp.label_smoothing
            loss = distillation_loss(logits, teacher, labeled["target"], hp.temperature, hp.alpha, smoothing)
            self.update_metrics("train", logits, labeled["target"], loss)
        if unlabeled is not None:
            student = self(unlabeled["image_strong"])
            teacher = self.teacher_logits(unlabeled["image" if hp.teacher_view == "clean" else "image_strong"])
            kd = kd_kl_divergence(student, teacher, hp.temperature)
            if labeled is None:
                loss = kd
                self.train_loss.update(kd.detach(), weight=len(student))
            else:
                loss = loss + hp.unlabeled_weight * kd
        self.log_step_loss(loss, len((labeled or unlabeled)["image"]))
        return loss

    def on_train_epoch_end(self) -> None:
        if self.data_request.train_data == "unlabeled":  # no labels: the epoch's KL only, no accuracy
            self.log("train/loss", self.train_loss)
        else:
            super().on_train_epoch_end()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the teacher out: it is rebuilt from `teacher` when a fit resumes."""
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("teacher.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming a fit (teacher already built): put its own weights back so strict loading passes."""
        super().on_load_checkpoint(checkpoint)
        if self.teacher is not None:
            checkpoint["state_dict"].update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})


def student_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The `ImageClassifier` arguments among a DistillationModule's hyperparameters: its student alone."""
    keep = set(inspect.signature(ImageClassifier.__init__).parameters) - {"self"}
    return {key: value for key, value in hparams.items() if key in keep}


def export_student(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the student of a DistillationModule checkpoint as a plain ImageClassifier checkpoint (net.* only)."""
    source = read_checkpoint(checkpoint)
    hparams = source.get("hyper_parameters", {})
    if "teacher" not in hparams:
        raise UserError(f"{checkpoint} is not a DistillationModule checkpoint (no teacher hyperparameter)")
    student = {**student_hparams(hparams), "_class_path": IMAGE_CLASSIFIER}
    if "_instantiator" in hparams:
        student["_instantiator"] = hparams["_instantiator"]
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
