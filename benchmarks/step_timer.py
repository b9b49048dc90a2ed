"""A Lightning callback timing every training batch (device synchronised), shared by the fit benchmarks."""

from __future__ import annotations

import time

import torch
from lightning.pytorch import Callback


def device_sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer(Callback):
    """``times``: (step, seconds) of every training batch; ``losses``: the loss it returned."""

    def __init__(self, sync=device_sync):
        self.sync, self.times, self.losses = sync, [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.sync()
        self._t, self._step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.sync()
        self.times.append((self._step, time.perf_counter() - self._t))
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.losses.append(float(loss.detach().float()))
