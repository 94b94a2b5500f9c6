"""Callbacks that the reliability tests inject into CLI subprocesses (`--trainer.callbacks+=...`)."""

import os
import signal

import lightning.pytorch as pl


class SignalAtStep(pl.Callback):
    """Sends `signal_name` to this process (`group`: to its process group, every DDP rank) at the end of training
    step `step` (SIGKILL: dies there)."""

    def __init__(self, step: int, signal_name: str = "SIGKILL", group: bool = False) -> None:
        self.step, self.signum, self.group = step, signal.Signals[signal_name], group

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            if self.group:
                os.killpg(os.getpgrp(), self.signum)
            else:
                os.kill(os.getpid(), self.signum)
