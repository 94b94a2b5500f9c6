"""Exact resume from any step: what a Lightning checkpoint lacks for a fit that continues bit-identically.

Lightning saves weights, optimizer, schedulers and loop counters. `ExactResume` adds every RNG's state (python,
numpy, torch, CUDA: Kornia and dropout draw from torch's) and the task's torchmetrics states, of every rank, plus
the training sampler's epoch seed and the number of batches served; it restores them when training starts, so a
fit resumed from a mid-epoch checkpoint serves the rest of the same permutation with the same random draws. The
training loader needs the sampler of `train_sampler` (ImageDataModule's has it) and its own `generator`, so that
creating a loader iterator does not draw from the global RNG.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler
from torch.utils.data.distributed import DistributedSampler
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


class ResumableDistributedSampler(DistributedSampler):
    """The sampler Lightning gives a training loader under DDP (a permutation of seed + epoch, cut into equal padded
    shards) that can start its next epoch at index `start` of this rank's shard (`resume_at`)."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self._start = 0

    def resume_at(self, start: int) -> None:
        self._start = start

    def __iter__(self) -> Iterator[int]:
        start, self._start = self._start, 0
        return itertools.islice(super().__iter__(), start, None)


def train_sampler(dataset: Dataset, trainer: pl.Trainer | None) -> Sampler:
    """A training loader's sampler: `ResumableRandomSampler` in one process; with several ranks the
    `ResumableDistributedSampler` equal to the DistributedSampler Lightning would put in its place."""
    kwargs = getattr(trainer, "distributed_sampler_kwargs", None) or {}
    replace = getattr(getattr(trainer, "_accelerator_connector", None), "use_distributed_sampler", True)
    if kwargs.get("num_replicas", 1) > 1 and replace:
        return ResumableDistributedSampler(dataset, seed=int(os.getenv("PL_GLOBAL_SEED", 0)), **kwargs)
    return ResumableRandomSampler(dataset)


def gather_objects(trainer: pl.Trainer, value: Any) -> list[Any]:
    """`value` of every rank, indexed by global rank (all ranks must call it, as they all save checkpoints)."""
    if trainer.world_size == 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    values: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(values, value)
    return values


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
    """Saves every rank's RNG and metric states, the sampler's epoch seed and the batches served into every
    checkpoint, and restores them when a resumed fit starts training (see the module docstring)."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return
        samplers = [dl.sampler for dl in train_loaders(trainer)]
        checkpoint[RESUME_KEY] = {
            "ranks": gather_objects(trainer, {"rng": rng_states(), "metrics": metric_states(pl_module)}),
            "batches": trainer.fit_loop.epoch_loop.batch_progress.current.ready,
            "seeds": [s.seed if isinstance(s, ResumableRandomSampler) else None for s in samplers],
        }

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._pending = checkpoint.get(RESUME_KEY)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state, self._pending = self._pending, None
        if state is None:
            return
        ranks = state.get("ranks", [state])  # checkpoints before per-rank states held rank 0's only
        same_ranks = len(ranks) == trainer.world_size
        mine = ranks[trainer.global_rank if same_ranks else 0]
        set_rng_states(mine["rng"])
        batches = state["batches"]
        if not 0 < batches < trainer.num_training_batches:
            return  # saved at an epoch's end: the next epoch starts afresh
        loaders = train_loaders(trainer)
        sampler = loaders[0].sampler if len(loaders) == 1 and loaders[0].num_workers == 0 else None
        if isinstance(sampler, ResumableRandomSampler) and state["seeds"][0] is not None and same_ranks:
            sampler.resume_at(state["seeds"][0], batches * loaders[0].batch_size)
        elif isinstance(sampler, ResumableDistributedSampler) and same_ranks:
            sampler.resume_at(batches * loaders[0].batch_size)
        else:
            rank_zero_warn(
                "resuming mid-epoch: the rest of the epoch is served in a new order (exact replay needs one training "
                "loader with the sampler of lit_imgcls.resume.train_sampler, num_workers=0 and the same world size)"
            )
            return
        set_metric_states(pl_module, mine["metrics"])
