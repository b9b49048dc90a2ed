"""Which teacher expert each student expert of a StunDistillModule is compared with, when no
``expert_map`` was given: the kept experts of the trainer's StunCallback, or the identity when no
expert was removed. Either way the expert counts must match the teacher's, or the error says how
to build the map."""

from __future__ import annotations

from torch import nn

from stun_lightning.adapters import moe_layers
from stun_lightning.distill import identity_expert_map

from .stun_callback import StunCallback


def default_expert_map(teacher: nn.Module, student: nn.Module, stun: StunCallback | None) -> dict[int, list[int]]:
    """Per MoE layer, the teacher index of every expert of ``student`` (``stun``: the trainer's
    StunCallback that chose the expert sets, or None)."""
    teacher_counts = {layer.index: layer.num_experts for layer in moe_layers(teacher)}
    if stun is not None:
        if stun.dense_expert_counts != teacher_counts:
            raise ValueError(
                f"{type(stun).__name__} found a student with {stun.dense_expert_counts} experts per layer, but the "
                f"teacher has {teacher_counts}: experts were removed before it ran, so its expert sets do not "
                "index the teacher; pass expert_map= (kept_from_removed(teacher, report.removed_experts))"
            )
        return stun.kept_experts
    student_counts = {layer.index: layer.num_experts for layer in moe_layers(student)}
    if student_counts != teacher_counts:
        raise ValueError(
            f"the student has {student_counts} experts per layer and the teacher {teacher_counts}; pass expert_map= "
            "(the kept original indices per layer, e.g. kept_from_removed(teacher, report.removed_experts))"
        )
    return identity_expert_map(student)
