"""StunCallback's training-time statistics: the window of training batches whose activations feed the
next Wanda / MoE-Pruner mask update.

Hooks (:class:`stun_lightning.activation_stats.ActivationStats`) go on the model only for the
``stats_steps`` optimizer steps just before an update, are paused during validation and closed by
the update; statistics of a window still open at a checkpoint are saved with it and reloaded when the
window reopens after a resume.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from stun_lightning.activation_stats import ActivationStats
from stun_lightning.schedule import SparsitySchedule

from .mask_updates import window_statistics


class StatsWindow:
    """Open :class:`ActivationStats` hooks over the ``stats_steps`` steps before each mask update."""

    def __init__(self, stats_steps: int) -> None:
        self.stats_steps = stats_steps
        self.stats: ActivationStats | None = None
        self.pending: dict | None = None  # statistics of a checkpoint's open window, until it reopens

    def before_batch(self, model: nn.Module, schedule: SparsitySchedule, step: int) -> None:
        """Open (or keep open) the hooks when the schedule's next update is within ``stats_steps``."""
        upcoming = schedule.next_update(step + 1)
        if upcoming is not None and upcoming - step <= self.stats_steps:
            if self.stats is None:
                self.stats = ActivationStats(model, norms=True)
            if self.pending is not None:
                self.stats.load_state_dict(self.pending)
                self.pending = None
            self.stats.open()

    def pause(self, paused: bool) -> None:
        """Validation batches do not count."""
        if self.stats is not None:
            self.stats.paused = paused

    def take(
        self,
        needed: bool,
        metric: str,
        step: int,
        reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> dict | None:
        """Close the window and return its statistics (see :func:`.mask_updates.window_statistics`)."""
        return window_statistics(self.stats, needed, metric, step, reduce_sum)

    def close(self) -> None:
        if self.stats is not None and self.stats.is_open:
            self.stats.close()

    def open_state(self) -> dict | None:
        """What an open window has collected so far (for a checkpoint), else None."""
        return self.stats.state_dict() if self.stats is not None and self.stats.is_open else None
