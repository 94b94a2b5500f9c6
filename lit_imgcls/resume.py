"""Exact resume from any step: what a Lightning checkpoint lacks for a fit that continues bit-identically.

Lightning saves weights, optimizer, schedulers and loop counters. `ExactResume` adds every RNG's state (python,
numpy, torch, CUDA: Kornia and dropout draw from torch's), the training sampler's epoch seed and the number of
batches served, and the task's torchmetrics states; it restores them when training starts, so a fit resumed from a
mid-epoch checkpoint serves the rest of the same permutation with the same random draws. The training loader needs
a `ResumableRandomSampler` (ImageDataModule's has one) and its own `generator`, so that creating a loader iterator
does not draw from the global RNG.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, RandomSampler
from torchmetrics import Metric

RESUME_KEY = "lit_imgcls_resume"


class ResumableRandomSampler(RandomSampler):
    """torch's RandomSampler (the same permutations: a seed drawn from the global RNG each epoch) that remembers
    its epoch's seed, so a resumed fit can serve the rest of that epoch (`resume_at`)."""

    def __init__(self, data_source: Any) -> None:
        super().__init__(data_source)
        self.seed: int | None = None
        self._resume: tuple[int, int] | None = None

    def resume_at(self, seed: int, start: int) -> None:
        """The next epoch replays the permutation of `seed` from index `start` (no draw from the global RNG)."""
        self._resume = (seed, start)

    def __iter__(self) -> Iterator[int]:
        if self._resume is not None:
            self.seed, start = self._resume
            self._resume = None
        else:
            self.seed, start = int(torch.empty((), dtype=torch.int64).random_().item()), 0
        generator = torch.Generator()
        generator.manual_seed(self.seed)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()[start:]


def rng_states() -> dict[str, Any]:
    """The state of every global RNG a fit draws from, as tensors and numbers (loadable with weights_only)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    numpy_state = [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss]
    states = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def train_loaders(trainer: pl.Trainer) -> list[DataLoader]:
    """The fit's training DataLoaders (one, or those of a CombinedLoader)."""
    loaders = trainer.train_dataloader
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    return [dl for dl in (loaders if isinstance(loaders, list | tuple) else [loaders]) if isinstance(dl, DataLoader)]


def metric_states(module: torch.nn.Module) -> dict[str, tuple[dict[str, Any], int]]:
    """The accumulated state of every torchmetrics Metric in `module` (not in its state_dict by default)."""
    states = {}
    for name, metric in module.named_modules():
        if isinstance(metric, Metric):
            values = {key: _clone(value) for key, value in metric.metric_state.items()}
            states[name] = (values, metric._update_count)
    return states


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    return [_clone(v) for v in value] if isinstance(value, list) else value


def set_metric_states(module: torch.nn.Module, states: dict[str, tuple[dict[str, Any], int]]) -> None:
    metrics = dict(module.named_modules())
    for name, (values, count) in states.items():
        metric = metrics.get(name)
        if not isinstance(metric, Metric):
            continue
        for key, value in values.items():
            device_value = value.to(metric.device) if isinstance(value, torch.Tensor) else value
            setattr(metric, key, device_value)
        metric._update_count = count
        metric._computed = None


class ExactResume(Callback):
    """Saves RNG states, the sampler's epoch seed and position and the metric states into every checkpoint, and
    restores them when a resumed fit starts training (see the module docstring)."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return
        samplers = [dl.sampler for dl in train_loaders(trainer)]
        checkpoint[RESUME_KEY] = {
            "rng": rng_states(),
            "batches": trainer.fit_loop.epoch_loop.batch_progress.current.ready,
            "seeds": [s.seed if isinstance(s, ResumableRandomSampler) else None for s in samplers],
            "metrics": metric_states(pl_module),
        }

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._pending = checkpoint.get(RESUME_KEY)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state, self._pending = self._pending, None
        if state is None:
            return
        set_rng_states(state["rng"])
        batches = state["batches"]
        if not 0 < batches < trainer.num_training_batches:
            return  # saved at an epoch's end: the next epoch starts afresh
        loaders = train_loaders(trainer)
        resumable = len(loaders) == 1 and isinstance(loaders[0].sampler, ResumableRandomSampler)
        if not resumable or state["seeds"][0] is None or loaders[0].num_workers > 0:
            rank_zero_warn(
                "resuming mid-epoch: the rest of the epoch is served in a new order (exact replay needs one training "
                "loader with a ResumableRandomSampler, num_workers=0 and one process)"
            )
            return
        loaders[0].sampler.resume_at(state["seeds"][0], batches * loaders[0].batch_size)
        set_metric_states(pl_module, state["metrics"])
