"""``StunDistillModule``: fine-tune a pruned MoE student against its unpruned original.

Loss (``stun_lightning.distill``, MoE-Pruner's expert-wise distillation): cross-entropy on the
labels plus lambda times the sum over layers and surviving experts of the MSE between each student
expert's output and its teacher original's, on the tokens the teacher routes to that original
(removed experts are not compared); lambda starts at ``L_CE / L_expert``. Optional logit KL with a
temperature and an MoE-block-output MSE. With ``teacher=None`` it is a plain causal-LM fine-tune.

Recovery options, one switch (``loss``), so they compare side by side at the same steps and seed:
``ce`` (cross-entropy only, the control), ``logit_kd`` (CE + lambda * T^2 KL of the next-token
distributions), ``expert_kd`` (the default, above), ``block_kd`` (CE + lambda * MSE of the MoE block
outputs), ``router_kd`` (only the routers train, on CE + lambda * KL of their routing against the
teacher's over the kept experts). Each distillation term's lambda follows MoE-Pruner's rule,
``L_CE / L_term`` at ``lambda_init_step`` (our choice for the options other than ``expert_kd``), or
is fixed by ``expert_weight``. ``lora_rank`` > 0 makes any of them a LoRA fit (needs peft).

The teacher is frozen, runs under ``torch.inference_mode`` (bf16 by default) and is never updated.
It is deliberately *not* a registered submodule: it is not in the checkpoint (re-created from
``teacher`` on resume), the optimizer never sees it, and the strategy never moves, wraps or shards it.

Memory: teacher and student on one GPU cost the student's weights, gradients and optimizer state
plus the teacher's weights (half the student's in bf16 when the student trains in fp32) and one
batch of the teacher's activations (no autograd graph). To put the teacher elsewhere pass
``teacher_device`` ("cuda:1", or "cpu" to trade speed for memory); inputs go there and the
captured outputs come back.

FSDP2 (``ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)`` or
:class:`~stun_lightning.callbacks.FSDP2Strategy`): ``configure_model`` shards the student per decoder
layer over the data-parallel mesh (``stun_lightning.sharding``) after the StunCallback's structured
phase, and the teacher the same way as its own FSDP2 model: frozen, no gradients, never in the
optimizer or the checkpoint, its gathered weights freed after each forward. ``teacher_device``
keeps it whole on that device instead (e.g. ``"cpu"``). Models built on the ``meta`` device get
storage after sharding (each rank only its shard) and are initialised by :meth:`init_meta_weights`.
Under sharding the teacher runs before the student and the expert-wise term is computed inside each
student layer's forward (``stun_lightning.distill.InForwardExpertMSE``), while that layer's
weights are gathered. LoRA is not supported with FSDP2.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn

from stun_lightning.adapters import moe_layers
from stun_lightning.distill import (
    DistillWeights,
    InForwardExpertMSE,
    MoECapture,
    block_mse,
    check_expert_map,
    check_recovery_loss,
    combine,
    expert_mse,
    init_expert_lambda,
    logit_kl,
    router_kl,
)
from stun_lightning.lora import with_expert_targets
from stun_lightning.sharding import is_sharded, materialize, reshard, shard_decoder_layers

from .expert_map import default_expert_map
from .model_lookup import base_model
from .model_spec import DTYPES, load_causal_lm
from .optimizer import adamw_warmup_cosine
from .strategy_checks import data_parallel_mesh
from .stun_callback import StunCallback


class StunDistillModule(LightningModule):
    """Causal-LM fine-tuning of a (to be) pruned MoE student, optionally distilled from its original.

    Args:
        student: the model (module, ``"reference"``, ``"tiny:<family>"`` or a ``from_pretrained`` path). A
            :class:`~stun_lightning.callbacks.StunCallback` prunes it at fit start.
        teacher: ``"copy"`` (a frozen copy of the student taken here, before any pruning), a model
            or path, or None for no distillation. A model passed in is used as is, not copied (a
            teacher can be tens of GB): it is frozen and, with ``teacher_dtype``, cast in place.
        expert_map: per MoE layer, the teacher index of every student expert; default the
            kept experts of the trainer's StunCallback (:meth:`StunCallback.of`), or the identity when
            nothing was removed.
        loss: the recovery option (module docstring): ``ce``, ``logit_kd``, ``expert_kd`` (default),
            ``block_kd`` or ``router_kd``.
        ce_weight / expert_weight / logit_kl_weight / block_weight / temperature: loss weights.
            ``expert_weight`` is the lambda of ``loss``'s distillation term (the expert term for
            ``expert_kd``); None: lambda = L_CE / L_term at the first step, MoE-Pruner.
            ``logit_kl_weight`` / ``block_weight`` add those terms to any option with fixed weights.
        lambda_init_step: with ``expert_weight=None``, lambda is set at the first step at or after
            this one where the expert term is not zero (before that the term adds nothing). When the
            StunCallback masks progressively, set it to the schedule's ``end_step``: lambda then
            balances the terms of the final student, not of a nearly dense one whose expert term is
            tiny (which would give a huge lambda).
        lr / weight_decay / warmup_steps / min_lr_ratio: AdamW with linear warmup then cosine decay
            (MoE-Pruner: lr 2e-5, cosine).
        teacher_dtype / teacher_device: where and in which precision the teacher runs.
        lora: peft ``LoraConfig`` keyword arguments for a cheaper recovery (e.g. ``{"r": 16,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}``); LoRA is added after the
            structured phase and merged before the masks are made permanent. ``target_parameters``
            (e.g. ``["experts.gate_up_proj", "experts.down_proj"]``) puts LoRA on the fused expert
            tensors too (peft requires ``lora_dropout=0`` there).
        lora_experts: add the family's fused expert tensors to ``lora``'s ``target_parameters``.
        lora_rank: shorthand for ``lora={"r": rank, "lora_alpha": 2 * rank, "target_modules":
            ["q_proj", "k_proj", "v_proj", "o_proj"]}`` (0 = full fine-tune).

    LoRA on experts and masks: the base expert tensors stay frozen, so their pruned zeros stay zero
    during the fit, but each expert's low-rank delta is dense. Merging keeps the masks: the
    StunCallback re-applies its masks after ``merge_and_unload``, and :func:`merge_lora` (without
    the callback) zeroes again every expert entry that was exactly zero in the base. The merged
    expert is therefore ``mask * (W + delta)``; during the fit the adapted forward computes
    ``mask * W + delta``, so the masked part of the delta (trained but dropped) is a deviation
    between the fitted and the merged student. The expert-wise loss compares the student's experts
    through their adapted weights (``stun_lightning.distill.lora_adapted``).
    """

    def __init__(
        self,
        student: str | nn.Module = "tiny:mixtral",
        teacher: str | nn.Module | None = "copy",
        expert_map: dict[int, list[int]] | None = None,
        ce_weight: float = 1.0,
        expert_weight: float | None = None,
        loss: str = "expert_kd",
        logit_kl_weight: float = 0.0,
        block_weight: float = 0.0,
        temperature: float = 2.0,
        lr: float = 2e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        dtype: str | None = None,
        teacher_dtype: str | None = "bfloat16",
        teacher_device: str | None = None,
        lambda_init_step: int = 0,
        lora: dict[str, Any] | None = None,
        lora_experts: bool = False,
        lora_rank: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.loss_term = check_recovery_loss(loss)
        self.loss = loss
        if lora_rank < 0 or (lora_rank and lora):
            raise ValueError(
                f"lora_rank must be >= 0 and not given together with lora=, got lora_rank={lora_rank}, lora={lora}"
            )
        if lora_rank:
            lora = {
                "r": lora_rank,
                "lora_alpha": 2 * lora_rank,
                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
            }
        if loss == "router_kd" and lora:
            raise ValueError("loss='router_kd' trains the routers only; drop lora / lora_rank")
        self.save_hyperparameters(ignore=["student", "teacher"] if isinstance(student, nn.Module) else ["teacher"])
        self.student = load_causal_lm(student, dtype, seed).train()  # from_pretrained returns eval mode
        if teacher == "copy":
            teacher = copy.deepcopy(self.student)
        elif teacher is not None:
            teacher = load_causal_lm(teacher, teacher_dtype, seed)
        if teacher is not None:
            if teacher_dtype:
                teacher = teacher.to(DTYPES[teacher_dtype])
            teacher.eval().requires_grad_(False)
        self._teacher_box = [teacher]  # a list: not a registered submodule (see the module docstring)
        self.weights = DistillWeights(ce_weight, expert_weight, logit_kl_weight, block_weight, temperature)
        self.expert_map = expert_map
        self.lr, self.weight_decay, self.warmup_steps, self.min_lr_ratio = lr, weight_decay, warmup_steps, min_lr_ratio
        self.teacher_device = teacher_device
        self.lambda_init_step = lambda_init_step
        if lora_experts and not lora:
            raise ValueError(
                "lora_experts=True needs the LoRA settings too: pass lora={'r': 16, 'target_modules': [...]}"
            )
        self.lora = with_expert_targets(lora, self.student) if lora_experts else lora
        # lambda lives in the checkpoint so a resumed fit keeps the value of the first step
        if loss == "ce":
            expert_weight = 0.0  # the control: no distillation term
        self.register_buffer("expert_lambda", torch.tensor(float("nan") if expert_weight is None else expert_weight))
        self._captures: tuple[MoECapture, MoECapture] | None = None
        self._in_forward: InForwardExpertMSE | None = None
        self._val_nll = self._val_tokens = None
        self._teacher_val_nll = None  # the teacher's validation NLL, scored once (the dense reference)
        self._teacher_val_ppl: float | None = None
        self.last_losses: dict[str, torch.Tensor] = {}  # terms of the latest training step (detached)

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher_box[0]

    def configure_model(self) -> None:
        """LoRA goes on, or FSDP2 shards the models, after the StunCallback's structured phase
        (callback ``setup`` runs first)."""
        mesh = getattr(self, "_device_mesh", None)  # set by ModelParallelStrategy only
        if mesh is not None:
            self._shard(mesh)
            return
        if self.loss == "router_kd":
            self.student.requires_grad_(False)
            for layer in moe_layers(self.student):
                layer.router.requires_grad_(True)
        if self.lora and not hasattr(self.student, "peft_config"):
            try:
                from peft import LoraConfig, get_peft_model
            except ImportError:
                raise ImportError(
                    "LoRA recovery needs peft: pip install 'stun-lightning[lora]' (or pip install peft)"
                ) from None

            # peft's ParamWrappers around mlp.experts are looked through by stun_lightning.adapters
            self.student = get_peft_model(self.student, LoraConfig(**self.lora))

    def _shard(self, mesh) -> None:
        if self.lora:
            raise ValueError(
                "StunDistillModule(lora=...) is not supported with FSDP2 (ModelParallelStrategy); use strategy='ddp' for LoRA"
            )
        dp = data_parallel_mesh(mesh)
        device = self.trainer.strategy.root_device
        models = [self.student] + ([self.teacher] if self.teacher is not None and self.teacher_device is None else [])
        for model in models:
            if not is_sharded(model):
                shard_decoder_layers(model, dp)
            materialize(model, device, self.init_meta_weights)

    def init_meta_weights(self, model: nn.Module) -> None:
        """Initialise a model built on the ``meta`` device once FSDP2 has given it storage (override to
        load real weights; the default is transformers' random ``init_weights``, so a ``"copy"``
        teacher of a meta student gets its own random weights, not the student's)."""
        model.init_weights()

    # ------------------------------------------------------------------ distillation plumbing

    def _student_model(self) -> nn.Module:
        return base_model(self.student)

    def _resolve_expert_map(self) -> dict[int, list[int]]:
        if self.expert_map is not None:
            return {int(k): list(v) for k, v in self.expert_map.items()}
        return default_expert_map(self.teacher, self._student_model(), StunCallback.of(self._trainer))

    def on_fit_start(self) -> None:
        if self.teacher is None:
            return
        if not is_sharded(self.teacher):
            self.teacher.to(self.teacher_device or self.device)
        expert_map = self._resolve_expert_map()
        check_expert_map(self._student_model(), self.teacher, expert_map)
        self.expert_map = expert_map
        blocks = self.weights.block > 0 or self.loss_term == "block"
        routers = self.loss_term == "router"
        self._captures = (
            MoECapture(self._student_model(), detach=False, block_outputs=blocks, router_logits=routers),
            MoECapture(self.teacher, detach=True, block_outputs=blocks, router_logits=routers),
        )
        if is_sharded(self._student_model()):
            self._in_forward = InForwardExpertMSE(*self._captures, expert_map)

    def on_fit_end(self) -> None:
        if self._captures is not None:
            for c in self._captures:
                c.close()
            self._captures = None
            self._in_forward = None

    # ------------------------------------------------------------------ steps

    def forward(self, input_ids: torch.Tensor, **kwargs):
        return self.student(input_ids=input_ids, **kwargs)

    def _teacher_forward(self, batch: dict[str, torch.Tensor]):
        t_dev = self.device if is_sharded(self.teacher) else next(self.teacher.parameters()).device
        mask = batch.get("attention_mask")
        with torch.inference_mode():
            out = self.teacher(
                input_ids=batch["input_ids"].to(t_dev), attention_mask=None if mask is None else mask.to(t_dev)
            )
        if is_sharded(self.teacher):
            reshard(self.teacher)  # no backward will free the root's gathered weights
        return out

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids = batch["input_ids"]
        labels = batch.get("labels", ids)
        distil = self.teacher is not None and self._captures is not None
        want_kd = self.expert_lambda.isnan() or float(self.expert_lambda) > 0
        want_expert = want_kd and self.loss_term == "expert"
        want_kl = self.weights.logit_kl > 0 or (want_kd and self.loss_term == "logit_kl")
        want_block = self.weights.block > 0 or (want_kd and self.loss_term == "block")
        want_router = want_kd and self.loss_term == "router"
        distil = distil and (want_expert or want_kl or want_block or want_router)
        t_out = None
        if distil:
            s_cap, t_cap = self._captures
            s_cap.clear()
            t_cap.clear()
            if self._in_forward is not None:  # sharded: targets first, the student adds its terms in its forward
                self._in_forward.enabled = bool(want_expert)
                t_out = self._teacher_forward(batch)
        out = self.student(input_ids=ids, attention_mask=batch.get("attention_mask"), labels=labels)
        ce = out.loss
        expert = kl = block = router = None
        if distil:
            if t_out is None:
                t_out = self._teacher_forward(batch)
            if want_expert:
                expert = (
                    self._in_forward.loss(ce.device)
                    if self._in_forward is not None
                    else expert_mse(s_cap, t_cap, self.expert_map)
                )
            if want_kl:
                kl = logit_kl(out.logits, t_out.logits, self.weights.temperature)
            if want_block:
                block = block_mse(s_cap, t_cap)
            if want_router:
                router = router_kl(s_cap, t_cap, self.expert_map)
            s_cap.clear()
            t_cap.clear()
            term = {"expert": expert, "logit_kl": kl, "block": block, "router": router}.get(self.loss_term)
            if term is not None and self.expert_lambda.isnan() and self.global_step >= self.lambda_init_step:
                lam = init_expert_lambda(ce, term)
                if lam is not None:
                    self.expert_lambda.fill_(lam)
        lam = float(self.expert_lambda)
        losses = combine(
            self.weights,
            None if math.isnan(lam) else lam,
            ce,
            expert,
            kl,
            block,
            router,
            primary=self.loss_term or "expert",
        )
        if self._captures is not None:  # records of a step with no distillation term
            for c in self._captures:
                c.clear()
        self.last_losses = {"total": losses.total.detach(), **{k: v.detach() for k, v in losses.terms.items()}}
        for name, value in losses.terms.items():
            self.log(f"train/{name}", value.detach(), prog_bar=name == "ce")
        self.log("train/loss", losses.total.detach(), prog_bar=True)
        if self.loss_term is not None and not math.isnan(lam):
            self.log("train/expert_lambda", lam)
        return losses.total

    def on_validation_epoch_start(self) -> None:
        if self._captures is not None:
            for c in self._captures:
                c.enabled = False
        self._val_nll = torch.zeros((), dtype=torch.float64, device=self.device)
        self._val_tokens = torch.zeros((), dtype=torch.float64, device=self.device)
        scored = self.teacher is None or self._teacher_val_ppl is not None
        self._teacher_val_nll = None if scored else torch.zeros((), dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        ids = batch["input_ids"]
        logits = self.student(input_ids=ids).logits
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
        self._val_nll += nll.double()
        self._val_tokens += ids[:, 1:].numel()
        if self._teacher_val_nll is not None and next(self.teacher.parameters()).device.type != "meta":
            t_logits = self._teacher_forward({"input_ids": ids}).logits.to(logits.device)
            self._teacher_val_nll += F.cross_entropy(
                t_logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum"
            ).double()

    def on_validation_epoch_end(self) -> None:
        nll = self.trainer.strategy.reduce(self._val_nll, reduce_op="sum")
        tokens = self.trainer.strategy.reduce(self._val_tokens, reduce_op="sum")
        if self._captures is not None:
            for c in self._captures:
                c.enabled = True
        loss = float(nll / tokens.clamp_min(1))
        self.log("val_loss", loss, prog_bar=True, sync_dist=False)
        self.log("val_ppl", math.exp(min(loss, 50.0)), prog_bar=True, sync_dist=False)
        if self._teacher_val_nll is not None:  # the dense model's perplexity on the same blocks, logged every time
            t_nll = self.trainer.strategy.reduce(self._teacher_val_nll, reduce_op="sum")
            self._teacher_val_ppl = math.exp(min(float(t_nll / tokens.clamp_min(1)), 50.0))
        if self._teacher_val_ppl is not None:
            self.log("val_ppl_teacher", self._teacher_val_ppl, sync_dist=False)

    def configure_optimizers(self):
        params = [p for p in self.student.parameters() if p.requires_grad]
        total = max(1, int(self.trainer.estimated_stepping_batches))
        return adamw_warmup_cosine(params, self.lr, self.weight_decay, total, self.warmup_steps, self.min_lr_ratio)


__all__ = ["StunDistillModule"]
