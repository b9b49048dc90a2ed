"""Sparsity schedules for pruning during training: how the unstructured target grows with the step.

``cubic`` is Zhu & Gupta's gradual pruning ("To prune, or not to prune", 2017, eq. 1):
``s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (n * dt)) ** 3`` for ``t`` in ``[t_0, t_0 + n * dt]``,
masks recomputed every ``dt`` steps; it prunes fast while many redundant weights remain and slowly
near the end. ``linear`` ramps at a constant rate; ``one_shot`` jumps from the initial to the final
value at ``start_step``.

Deviation from the paper: ``end_step - start_step`` need not be a multiple of ``update_every``;
``end_step`` is always an update step, so the final sparsity is reached exactly at ``end_step``.
Steps count optimizer steps (Lightning's ``global_step``), not micro-batches.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .patterns import check_sparsity, parse_pattern

KINDS = ("cubic", "linear", "one_shot")


class InvalidScheduleError(ValueError):
    """A sparsity schedule that cannot run as asked."""


@dataclass
class SparsitySchedule:
    """Target sparsity per optimizer step.

    Attributes:
        kind: ``cubic`` (Zhu & Gupta), ``linear`` or ``one_shot``.
        initial: sparsity at and before ``start_step``.
        final: sparsity at and after ``end_step``; None takes the recipe's (resolved by the callback).
        start_step: first step of the ramp (``one_shot``: the step where ``final`` is applied).
        end_step: last step of the ramp; None means the fit's last optimizer step (resolved by the
            callback). Ending earlier leaves steps to recover with the final masks.
        update_every: masks are recomputed every this many steps from ``start_step`` (Zhu & Gupta's dt).
    """

    kind: str = "cubic"
    initial: float = 0.0
    final: float | None = None
    start_step: int = 0
    end_step: int | None = None
    update_every: int = 10

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidScheduleError(f"schedule kind {self.kind!r} is not one of {KINDS}")
        check_sparsity(self.initial, "initial sparsity")
        if self.final is not None:
            check_sparsity(self.final, "final sparsity")
            if self.final < self.initial:
                raise InvalidScheduleError(
                    f"final sparsity {self.final} is below the initial {self.initial}; masks only grow during "
                    "training: raise final or lower initial"
                )
        if self.start_step < 0:
            raise InvalidScheduleError(f"start_step must be >= 0, got {self.start_step}")
        if self.end_step is not None and self.end_step < self.start_step:
            raise InvalidScheduleError(f"end_step={self.end_step} is before start_step={self.start_step}")
        if self.update_every < 1:
            raise InvalidScheduleError(f"update_every must be >= 1, got {self.update_every}")

    def resolved(self, final: float, end_step: int) -> "SparsitySchedule":
        """A copy with ``final`` / ``end_step`` filled in where they were None (checked again)."""
        return dataclasses.replace(
            self,
            final=self.final if self.final is not None else final,
            end_step=self.end_step if self.end_step is not None else end_step,
        )

    def _require_resolved(self) -> tuple[float, int]:
        if self.final is None or self.end_step is None:
            raise InvalidScheduleError(
                "schedule has no final sparsity or end_step yet: call .resolved(final, end_step)"
            )
        return self.final, self.end_step

    def sparsity_at(self, step: int) -> float:
        """Target sparsity after ``step`` optimizer steps."""
        final, end = self._require_resolved()
        if self.kind == "one_shot":
            return final if step >= self.start_step else self.initial
        if step <= self.start_step:
            return self.initial if end > self.start_step else final
        if step >= end:
            return final
        progress = (step - self.start_step) / (end - self.start_step)
        if self.kind == "linear":
            return self.initial + (final - self.initial) * progress
        return final + (self.initial - final) * (1.0 - progress) ** 3

    def update_steps(self) -> list[int]:
        """Every step where masks are recomputed (``end_step`` always included)."""
        _, end = self._require_resolved()
        if self.kind == "one_shot":
            return [self.start_step]
        steps = list(range(self.start_step, end + 1, self.update_every))
        if steps[-1] != end:
            steps.append(end)
        return steps

    def is_update_step(self, step: int) -> bool:
        _, end = self._require_resolved()
        if self.kind == "one_shot":
            return step == self.start_step
        if step < self.start_step or step > end:
            return False
        return step == end or (step - self.start_step) % self.update_every == 0

    def next_update(self, step: int) -> int | None:
        """The first update step at or after ``step`` (None when the schedule is over)."""
        _, end = self._require_resolved()
        if self.kind == "one_shot":
            return self.start_step if step <= self.start_step else None
        if step > end:
            return None
        if step <= self.start_step:
            return self.start_step
        k = -(-(step - self.start_step) // self.update_every)
        return min(self.start_step + k * self.update_every, end)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_training_schedule(
    schedule: SparsitySchedule,
    *,
    pattern: str = "unstructured",
    needs_stats: bool = False,
    stats_steps: int = 1,
    max_steps: int | None = None,
) -> None:
    """Refuse, before any work, a schedule that cannot run in a fit.

    ``needs_stats``: the metric reads activation statistics gathered on the ``stats_steps``
    optimizer steps before each update (Wanda, MoE-Pruner), so no update with a non-zero target may
    come before that many training steps. ``max_steps``: the fit's step limit, when known.
    """
    if stats_steps < 1:
        raise InvalidScheduleError(f"stats_steps must be >= 1, got {stats_steps}")
    if parse_pattern(pattern) is not None and schedule.kind != "one_shot":
        raise InvalidScheduleError(
            f"pattern {pattern} fixes the sparsity at N/M and cannot ramp: use SparsitySchedule(kind='one_shot')"
        )
    if needs_stats:
        ramps_from_zero = (
            schedule.kind != "one_shot" and schedule.initial == 0 and schedule.end_step != schedule.start_step
        )
        if schedule.start_step < stats_steps and not ramps_from_zero:
            raise InvalidScheduleError(
                f"the metric needs activation statistics from forward hooks on training batches, but the first mask "
                f"update (step {schedule.start_step}) comes before {stats_steps} training step(s) have run: set "
                f"start_step >= {stats_steps} or use metric='magnitude'"
            )
        if schedule.kind != "one_shot" and stats_steps > schedule.update_every:
            raise InvalidScheduleError(
                f"stats_steps={stats_steps} is longer than update_every={schedule.update_every}: statistics windows "
                "would overlap; lower stats_steps or raise update_every"
            )
    if max_steps is not None and max_steps > 0 and schedule.end_step is not None and schedule.end_step > max_steps:
        raise InvalidScheduleError(
            f"schedule end_step={schedule.end_step} is after the fit's max_steps={max_steps}: the final sparsity "
            "would never be reached; lower end_step or raise max_steps"
        )
