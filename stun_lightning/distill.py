"""Expert-wise knowledge distillation from the unpruned model (MoE-Pruner, Xie et al. 2024, arXiv 2410.12013).

Loss, as the paper defines it: ``L = L_CE + lambda * sum_layers sum_experts MSE(student expert out,
teacher expert out)`` with ``lambda`` initialised to ``L_CE / L_expert`` at the first step and then
kept fixed. Deviation: our loss is ``ce * L_CE + lambda * L_expert + ...`` with a CE weight ``ce``
(:class:`DistillWeights`, ``StunDistillModule(ce_weight=...)``; the paper has none), and
:func:`init_expert_lambda` ignores it: ``lambda = L_CE / L_expert`` from the *unweighted*
cross-entropy, so the two terms start at ``ce * L_CE`` and ``L_CE``, equal only at ``ce = 1`` (the
default). With ``expert=None`` (auto), ``lambda`` is set at the first step at or after ``lambda_init_step``
where the expert term is not zero, not necessarily the first step; until then that term adds 0.
The paper leaves two points open; our choices:

* Tokens compared: each surviving student expert is compared with its *teacher original* (the
  expert of the unpruned model it was kept from) on the tokens the *teacher* routes to that
  original. The teacher expert sees the teacher's MoE-block input at those tokens; the student
  expert sees the student's own MoE-block input at the same token positions, so the gradient
  reaches the whole student, not only the expert weights.
* Removed experts are not compared (the student has no counterpart); their tokens still count in
  the cross-entropy and in the optional MoE-block-output term.

Options: a logit KL term ``T^2 * KL(softmax(t/T) || softmax(s/T))`` (Hinton et al.) and an MSE between
the MoE blocks' outputs, each with its own weight. The expert term costs one extra expert pass of
the student and of the teacher over the teacher-routed tokens (about one MoE layer's forward each).

Everything here is plain torch: forward hooks record what the loss needs during the models' own
forward passes (:class:`MoECapture`, ``stun_lightning.moe_capture``), the loss functions read those
records, and ``stun_lightning.distill_weights`` weights and adds up the terms.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import MoELayer, moe_layers
from .distill_weights import (
    RECOVERY_LOSSES,
    DistillLosses,
    DistillWeights,
    check_recovery_loss,
    combine,
    init_expert_lambda,
)
from .moe_capture import CapturedLayer, MoECapture


def identity_expert_map(model: nn.Module) -> dict[int, list[int]]:
    """Student expert j is teacher expert j (no expert was removed)."""
    return {layer.index: list(range(layer.num_experts)) for layer in moe_layers(model)}


def kept_from_removed(teacher: nn.Module, removed: dict[int, list[int]]) -> dict[int, list[int]]:
    """Expert map from a PruneReport's ``removed_experts``: kept original indices per layer."""
    return {
        layer.index: [e for e in range(layer.num_experts) if e not in set(removed.get(layer.index, []))]
        for layer in moe_layers(teacher)
    }


def check_expert_map(student: nn.Module, teacher: nn.Module, expert_map: dict[int, list[int]]) -> None:
    s_layers = {layer.index: layer.num_experts for layer in moe_layers(student)}
    t_layers = {layer.index: layer.num_experts for layer in moe_layers(teacher)}
    problems = []
    if set(s_layers) != set(t_layers):
        problems.append(f"student MoE layers {sorted(s_layers)} differ from the teacher's {sorted(t_layers)}")
    for i, n in s_layers.items():
        kept = expert_map.get(i)
        if kept is None or len(kept) != n:
            problems.append(
                f"layer {i}: student has {n} experts, expert map lists {None if kept is None else len(kept)}"
            )
        elif i in t_layers and (min(kept) < 0 or max(kept) >= t_layers[i]):
            problems.append(f"layer {i}: expert map {kept} outside the teacher's 0..{t_layers[i] - 1}")
    if problems:
        raise ValueError(
            "student and teacher do not match under the expert map (pass the kept original indices per layer, "
            "e.g. from StunCallback.kept_experts or kept_from_removed(report.removed_experts)):\n  "
            + "\n  ".join(problems)
        )


@torch.inference_mode()
def _teacher_expert_outputs(
    teacher_layers: dict[int, MoELayer], records: dict[int, CapturedLayer], expert_map: dict[int, list[int]]
):
    out = {}
    for i, rec in records.items():
        layer = teacher_layers[i]
        for j, e in enumerate(expert_map[i]):
            tok = (rec.index == e).any(-1).nonzero().squeeze(1)
            if tok.numel():
                out[(i, j)] = (tok, layer.adapter.expert_output(layer.experts, e, rec.hidden[tok]))
    return out


@contextmanager
def lora_adapted(layers: Iterable[MoELayer]) -> Iterator[None]:
    """Inside, the fused expert tensors of ``layers`` read as their peft-LoRA-adapted values.

    peft's ``ParamWrapper`` adds ``scaling * B @ A`` to a wrapped 3-D parameter only during its own
    forward (a temporary ``torch.nn.utils.parametrize`` proxy), so code that reads the tensors
    directly, such as ``MoEAdapter.expert_output``, sees the frozen base weights. This enters the
    same activation peft's forward uses (autograd reaches the LoRA factors), for every wrapper of
    every layer; layers without wrappers, merged or disabled adapters are left as they are.
    """
    with ExitStack() as stack:
        for layer in layers:
            module = getattr(layer.block, layer.adapter.experts_attr)
            while module is not layer.experts:
                if not (getattr(module, "merged", False) or getattr(module, "disable_adapters", False)):
                    activate = getattr(module, "_activate_lora", None)
                    if activate is None:
                        raise TypeError(
                            f"layer {layer.index}: {type(module).__name__} wraps the experts but has no "
                            "_activate_lora (peft 0.21's LoRA ParamWrapper has it), so expert-wise distillation cannot "
                            "read its adapted weights: use peft 0.21, merge the adapters first (merge_and_unload), or "
                            "put LoRA on attention only"
                        )
                    stack.enter_context(activate(module.active_adapters))
                module = module.base_layer
        yield


def expert_mse(
    student: MoECapture,
    teacher: MoECapture,
    expert_map: dict[int, list[int]],
) -> torch.Tensor:
    """``sum_layers sum_surviving experts MSE(student expert j, teacher expert expert_map[i][j])`` on the
    tokens the teacher routes to the original expert (fp32; experts with no such token add nothing)."""
    # inference tensors cannot be saved for backward: clone the targets outside inference mode
    targets = {
        k: (tok.clone(), y.clone())
        for k, (tok, y) in _teacher_expert_outputs(teacher.layers, teacher.records, expert_map).items()
    }
    total = None
    with lora_adapted(student.layers.values()):  # a LoRA-wrapped student is compared through its adapted weights
        for (i, j), (tok, target) in targets.items():
            layer, rec = student.layers[i], student.records[i]
            tok = tok.to(rec.hidden.device)
            pred = layer.adapter.expert_output(layer.experts, j, rec.hidden[tok])
            term = F.mse_loss(pred.float(), target.to(pred.device).float())
            total = term if total is None else total + term
    if total is None:
        return torch.zeros((), device=next(iter(student.records.values())).hidden.device)
    return total


class InForwardExpertMSE:
    """:func:`expert_mse` computed inside each MoE layer's own forward, for models whose expert
    weights exist whole only then (FSDP2 gathers a decoder layer's shards for its forward and frees
    them after; autograd then reaches the gathered weights and FSDP2 reduce-scatters their
    gradients). The teacher must run first: its layer records the targets, the student's layer
    adds its terms. Same value as ``expert_mse`` on the same records."""

    def __init__(self, student: MoECapture, teacher: MoECapture, expert_map: dict[int, list[int]]):
        self.student, self.teacher, self.expert_map = student, teacher, expert_map
        self.enabled = True
        self._targets: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._total: torch.Tensor | None = None
        teacher.on_record, student.on_record = self._teacher_layer, self._student_layer

    def clear(self) -> None:
        self._targets, self._total = {}, None

    def _teacher_layer(self, i: int, rec: CapturedLayer) -> None:
        if self.enabled:
            self._targets.update(_teacher_expert_outputs({i: self.teacher.layers[i]}, {i: rec}, self.expert_map))

    def _student_layer(self, i: int, rec: CapturedLayer) -> None:
        if not self.enabled:
            return
        layer = self.student.layers[i]
        with lora_adapted([layer]):
            for j in range(len(self.expert_map[i])):
                if (i, j) not in self._targets:
                    continue
                tok, target = self._targets.pop((i, j))
                tok = tok.clone().to(rec.hidden.device)  # inference tensors cannot be saved for backward
                pred = layer.adapter.expert_output(layer.experts, j, rec.hidden[tok])
                term = F.mse_loss(pred.float(), target.clone().to(pred.device).float())
                self._total = term if self._total is None else self._total + term

    def loss(self, device: torch.device) -> torch.Tensor:
        """The sum of the terms of the last student forward (zero when no expert was compared)."""
        total = self._total if self._total is not None else torch.zeros((), device=device)
        self.clear()
        return total


def block_mse(student: MoECapture, teacher: MoECapture) -> torch.Tensor:
    """Sum over MoE layers of the MSE between the student's and the teacher's MoE block outputs."""
    terms = []
    for i, rec in student.records.items():
        t = teacher.records[i].block_output
        if rec.block_output is None or t is None:
            raise ValueError("block outputs were not captured: build the MoECapture with block_outputs=True")
        terms.append(F.mse_loss(rec.block_output.float(), t.clone().to(rec.block_output.device).float()))
    return torch.stack(terms).sum()


def router_kl(
    student: MoECapture, teacher: MoECapture, expert_map: dict[int, list[int]], temperature: float = 1.0
) -> torch.Tensor:
    """Router distillation: sum over MoE layers of ``T^2 * KL(teacher routing || student routing)``, mean per token.

    The teacher's routing distribution is the softmax of its router logits restricted to the experts
    the student kept (``expert_map``, renormalised over them), so removed experts' probability mass
    is spread over the survivors as the teacher would rank them; the student's is the softmax of its
    own router logits at its own MoE-block input. Our reading of router KD for compressed MoEs
    (arXiv 2603.02217: train the routers of the pruned model against the original's routing); a
    router that scores by sigmoid (DeepSeek-V3) is still compared through a softmax of its logits.
    """
    terms = []
    for i, rec in student.records.items():
        t = teacher.records[i].router_logits
        if rec.router_logits is None or t is None:
            raise ValueError("router logits were not captured: build the MoECapture with router_logits=True")
        s = rec.router_logits.float() / temperature
        kept = torch.as_tensor(expert_map[i], device=t.device)
        t = t.clone().index_select(-1, kept).to(s.device).float() / temperature
        terms.append(
            F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
            * temperature**2
        )
    return torch.stack(terms).sum()


def logit_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """``T^2 * KL(teacher || student)`` of the temperature-softened next-token distributions, mean per token."""
    t = teacher_logits.clone().to(student_logits.device).float() / temperature
    s = student_logits.float() / temperature
    kl = F.kl_div(
        F.log_softmax(s, -1).flatten(0, -2), F.log_softmax(t, -1).flatten(0, -2), log_target=True, reduction="batchmean"
    )
    return kl * temperature**2


__all__ = [
    "CapturedLayer",
    "DistillLosses",
    "DistillWeights",
    "InForwardExpertMSE",
    "MoECapture",
    "RECOVERY_LOSSES",
    "block_mse",
    "check_expert_map",
    "check_recovery_loss",
    "combine",
    "expert_mse",
    "identity_expert_map",
    "init_expert_lambda",
    "kept_from_removed",
    "logit_kl",
    "lora_adapted",
    "router_kl",
]
