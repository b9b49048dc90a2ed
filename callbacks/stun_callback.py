"""``StunCallback``: STUN during ``trainer.fit``: remove experts before the optimizer exists, then
mask weights inside the survivors progressively while the model trains.

Hooks only decide *when*; the work is done by the framework-free core (``stun_lightning.structured``,
``.expert_masks``, ``.schedule``, ``.activation_stats``), each tested without a Trainer, through
``callbacks/structured_phase.py`` (expert removal), ``callbacks/stats_window.py`` (the training
batches' statistics) and ``callbacks/mask_updates.py`` (one mask update).

When, in Lightning's order of a fit:

* ``setup``: structured phase on the dense model (the recipe's expert method, budget and checks, as
  ``prune()``), before ``strategy.setup`` builds the optimizers; optimizers that already exist are
  rebuilt so none holds a removed tensor.
* Resume: Lightning restores the module's weights *before* any callback state, into a model the
  user re-created dense. The callback therefore also wraps the module's ``on_load_checkpoint`` (the
  one hook that runs before the weights are loaded) and there rebuilds the checkpoint's expert sets;
  when ``trainer.ckpt_path`` is already known at ``setup`` it replays them there instead, with no
  selection work. Masks and the schedule position come back through ``load_state_dict``.
* Every optimizer step: masked gradients zeroed before the step (so gradient clipping sees only live
  weights, and Adam's moments or SGD's momentum, zeroed when the masks change, stay zero), masked
  weights zeroed right after it (a ``torch.optim`` post-step hook, so it holds with gradient
  accumulation, AMP / bf16-mixed and skipped steps alike).
* Every ``update_every`` steps of the schedule: masks recomputed at the schedule's sparsity from
  the recipe's metric; Wanda / MoE-Pruner statistics come from forward hooks on the training
  batches of the ``stats_steps`` optimizer steps just before the update (no extra data pass).
* ``on_train_end``: masks made permanent (LoRA merged first if the model is a peft model), the
  :class:`stun_lightning.PruneReport` logged through the trainer's loggers and written next to the
  logs; the model saved with ``save_pruned`` when ``save_dir`` is set.

Strategies: single device, DDP and FSDP2 (``ModelParallelStrategy``, ``FSDP2Strategy``); every
rank ends with the same expert sets and masks. How each is handled, resume of sharded checkpoints
included: ``callbacks/strategy_checks.py``. FSDP1 and DeepSpeed are refused at ``setup``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from stun_lightning.expert_masks import (
    ExpertMasks,
    apply_masks,
    mask_gradients,
    mask_optimizer_state,
    measured_sparsity,
)
from stun_lightning.metrics import get_metric
from stun_lightning.recipe import StunRecipe
from stun_lightning.report import ModelCensus, PruneReport
from stun_lightning.schedule import SparsitySchedule, check_training_schedule

from .final_model import log_report, save_final_model
from .model_lookup import base_model, model_owner
from .mask_updates import final_sparsity, fitted_schedule, masks_at
from .resume import (
    callback_state_in,
    check_expert_sets_before_load,
    dump_state,
    intercept_on_load_checkpoint,
    intercept_strategy_load,
    rebuild_expert_sets,
    restore_state,
)
from .stats_window import StatsWindow
from .strategy_checks import check_strategy
from .structured_phase import calibration_for, select_and_remove_experts


class StunCallback(Callback):
    """Structured-then-unstructured pruning of the MoE model inside a LightningModule during fit.

    Args:
        recipe: what to prune (``StunRecipe``); its ``sparsity`` / ``total_sparsity`` is the final
            within-expert target of the schedule unless ``schedule.final`` is set.
        schedule: how the target grows (``SparsitySchedule``: cubic / linear / one_shot, initial,
            start_step, end_step); default cubic from 0 over the whole fit.
        update_every: recompute masks every N optimizer steps (overrides ``schedule.update_every``).
        stats_steps: optimizer steps of training batches whose activations feed a Wanda / MoE-Pruner
            update (hooks are on only then, so other steps pay nothing for them).
        model_attr: attribute of the LightningModule holding the transformers MoE model (dotted
            paths allowed); default: ``student``, then ``model``.
        calibration: token ids ``[N, L]`` for expert methods that need a routing pass; default the
            datamodule's ``calibration_ids()`` when it has one.
        optimizer_state: when masked entries of the optimizer state are zeroed: ``"on_update"``
            (default: whenever masks change or are restored; gradients are masked before every step,
            so Adam's moments and SGD's momentum stay exactly zero there in between),
            ``"every_step"`` (also after every step, for optimizers whose state moves without a
            gradient) or ``"off"``.
        save_dir: where to ``save_pruned`` the final model (checked at fit start; ``overwrite``).
    """

    def __init__(
        self,
        recipe: StunRecipe | None = None,
        schedule: SparsitySchedule | None = None,
        update_every: int | None = None,
        stats_steps: int = 1,
        model_attr: str | None = None,
        calibration: torch.Tensor | None = None,
        optimizer_state: str = "on_update",
        save_dir: str | None = None,
        overwrite: bool = False,
    ) -> None:
        self.recipe = (recipe or StunRecipe()).validate()
        if self.recipe.prune_dense:
            raise ValueError(
                "recipe prune_dense=True is supported by one-shot prune() only (the training-time statistics cover "
                "expert inputs, not dense linears); set prune_dense: false for StunCallback"
            )
        schedule = schedule or SparsitySchedule()
        if update_every is not None:
            schedule = SparsitySchedule(**{**schedule.to_dict(), "update_every": update_every})
        self.schedule = schedule
        self.stats_steps = stats_steps
        self.model_attr = model_attr
        self.calibration = calibration
        if optimizer_state not in ("on_update", "every_step", "off"):
            raise ValueError(f"optimizer_state must be 'on_update', 'every_step' or 'off', got {optimizer_state!r}")
        self.optimizer_state = optimizer_state
        self.save_dir = save_dir
        self.overwrite = overwrite

        # state saved in checkpoints
        self.kept_experts: dict[int, list[int]] | None = None
        self.removed_experts: dict[int, list[int]] = {}
        self.top_k: dict[int, int] = {}
        self.expert_split: dict = {}  # expert_sparsity="auto": the chosen split, for the report
        self.masks = ExpertMasks()
        self.last_update_step = -1
        self.current_sparsity = 0.0
        self.layer_targets: dict[int, float] = {}
        self.low_token_experts: dict[int, list[int]] = {}

        self.report: PruneReport | None = None
        self._resolved: SparsitySchedule | None = None
        self._census: ModelCensus | None = None
        self._window = StatsWindow(stats_steps)
        self._handles: list = []
        self._undo_wrap = None
        self._undo_load_check = None
        self._seconds: dict[str, float] = {}
        self._seen_step = -1

    # ------------------------------------------------------------------ model lookup

    def target(self, pl_module: LightningModule) -> nn.Module:
        """The transformers MoE model this callback prunes (peft wrappers unwrapped)."""
        owner, name = model_owner(pl_module, self.model_attr)
        return base_model(getattr(owner, name))

    @property
    def dense_expert_counts(self) -> dict[int, int] | None:
        """Experts per MoE layer of the model as the callback found it (before its structured phase)."""
        return dict(self._census.num_experts) if self._census is not None else None

    @property
    def _uses_stats(self) -> bool:
        return self.recipe.prunes_weights and get_metric(self.recipe.metric).needs_data

    # ------------------------------------------------------------------ checks

    def _check_static(self, trainer: Trainer) -> None:
        """Config errors that need no model: raised before any work."""
        needs_stats = self._uses_stats
        check_training_schedule(
            self.schedule,
            pattern=self.recipe.pattern,
            needs_stats=needs_stats,
            stats_steps=self.stats_steps,
            max_steps=trainer.max_steps,
        )
        if self.save_dir and Path(self.save_dir).exists() and not self.overwrite:
            raise FileExistsError(
                f"save_dir {self.save_dir} already exists; choose another path or pass overwrite=True"
            )
        check_strategy(trainer)

    def _final_sparsity(self, model: nn.Module) -> float:
        return final_sparsity(self.recipe, self.schedule, self._census, model)

    # ------------------------------------------------------------------ structured phase

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._wrap_on_load_checkpoint(trainer, pl_module)
        if stage != "fit":
            return
        self._check_static(trainer)
        model = self.target(pl_module)
        if self._census is None:
            self._census = ModelCensus.of(model)
        if self.kept_experts is None:
            state = callback_state_in(trainer.ckpt_path, self.state_key)
            if state is not None:
                self._replay(trainer, model, state)
            else:
                self._structured_phase(trainer, model)
        if trainer.strategy.restore_checkpoint_after_setup and self._undo_load_check is None:
            self._undo_load_check = intercept_strategy_load(trainer.strategy, self._check_before_sharded_load)
        if trainer.optimizers:  # a second fit: optimizers built before may hold removed tensors
            trainer.strategy.setup_optimizers(trainer)

    def _structured_phase(self, trainer: Trainer, model: nn.Module) -> None:
        start = time.perf_counter()
        calibration = calibration_for(self.recipe, self.calibration, trainer.datamodule)
        self.kept_experts, self.removed_experts, self.top_k, self.expert_split = select_and_remove_experts(
            model, self.recipe, calibration, trainer.strategy.root_device
        )
        self._seconds["structured"] = time.perf_counter() - start
        n = sum(len(v) for v in self.removed_experts.values())
        rank_zero_info(f"StunCallback: removed {n} experts before training: {self.removed_experts}")

    def _replay(self, trainer: Trainer, model: nn.Module, state: dict) -> None:
        """Give ``model`` the checkpoint's expert sets, before the checkpoint's weights are loaded."""
        rebuilt = rebuild_expert_sets(model, state, self.kept_experts)
        if rebuilt is not None:
            self.kept_experts, self.removed_experts, self.top_k = rebuilt
            if trainer.optimizers:
                trainer.strategy.setup_optimizers(trainer)

    def _wrap_on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._undo_wrap is not None:
            return

        def before_weights_load(checkpoint: dict) -> None:
            state = checkpoint.get("callbacks", {}).get(self.state_key)
            if state is not None:
                if self._census is None:
                    self._census = ModelCensus.of(self.target(pl_module))
                self._replay(trainer, self.target(pl_module), state)

        self._undo_wrap = intercept_on_load_checkpoint(pl_module, before_weights_load)

    def _check_before_sharded_load(self, path) -> None:
        check_expert_sets_before_load(path, callback_state_in(path, self.state_key), self.kept_experts)

    # ------------------------------------------------------------------ unstructured phase

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        total = (
            int(trainer.max_steps)
            if trainer.max_steps and trainer.max_steps > 0
            else int(trainer.estimated_stepping_batches)
        )
        self._resolved = fitted_schedule(self.schedule, self._final_sparsity(self.target(pl_module)), total)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        model = self.target(pl_module)
        for optimizer in trainer.optimizers:
            self._handles.append(optimizer.register_step_post_hook(self._after_step(model)))
        if self.masks:
            apply_masks(model, self.masks)
            self._mask_state(trainer, model)
        self._seen_step = trainer.global_step
        if (
            self.recipe.prunes_weights
            and self._resolved.is_update_step(trainer.global_step)
            and trainer.global_step > self.last_update_step
        ):
            if self._resolved.sparsity_at(trainer.global_step) == 0 or not self._uses_stats:
                self._update(trainer, pl_module, trainer.global_step)

    def _after_step(self, model: nn.Module):
        def hook(optimizer, args, kwargs) -> None:
            if self.masks:
                apply_masks(model, self.masks)
                if self.optimizer_state == "every_step":
                    mask_optimizer_state(optimizer, model, self.masks)

        return hook

    def _mask_state(self, trainer: Trainer, model: nn.Module) -> None:
        if self.optimizer_state != "off":
            for optimizer in trainer.optimizers:
                mask_optimizer_state(optimizer, model, self.masks)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        if self.masks:
            mask_gradients(self.target(pl_module), self.masks)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        if not (self.recipe.prunes_weights and self._uses_stats) or self._resolved is None:
            return
        self._window.before_batch(self.target(pl_module), self._resolved, trainer.global_step)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._window.pause(True)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._window.pause(False)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step != self._seen_step:
            self._seen_step = step
            if self.recipe.prunes_weights and self._resolved.is_update_step(step) and step > self.last_update_step:
                self._update(trainer, pl_module, step)
        pl_module.log("stun/target_sparsity", self.current_sparsity, on_step=True, on_epoch=False)

    def _update(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        start = time.perf_counter()
        model = self.target(pl_module)
        target = self._resolved.sparsity_at(step)
        across_ranks = None
        if trainer.world_size > 1:
            across_ranks = lambda t: trainer.strategy.reduce(t.to(trainer.strategy.root_device), reduce_op="sum").cpu()  # noqa: E731
        stats = self._window.take(self._uses_stats and target > 0, self.recipe.metric, step, across_ranks)
        if target > 0:
            update = masks_at(
                model,
                target,
                self.recipe,
                stats,
                previous=self.masks or None,
                original_experts=self.dense_expert_counts,
            )
            self.masks = update.masks
            self.layer_targets = update.layer_targets
            self.low_token_experts = update.low_token_experts
            apply_masks(model, self.masks)
            self._mask_state(trainer, model)
        self.current_sparsity = target
        self.last_update_step = step
        self._seconds["mask_updates"] = self._seconds.get("mask_updates", 0.0) + time.perf_counter() - start

    # ------------------------------------------------------------------ end of fit

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._window.close()
        owner, name = model_owner(pl_module, self.model_attr)
        wrapped = getattr(owner, name)
        if hasattr(wrapped, "merge_and_unload"):  # peft: fold LoRA into the weights, then re-apply the masks
            setattr(owner, name, wrapped.merge_and_unload())
        model = self.target(pl_module)
        if self.masks:
            apply_masks(model, self.masks)
        self.report = PruneReport.compare(
            self._census,
            ModelCensus.of(model),
            {**self.recipe.to_dict(), "schedule": self._resolved.to_dict() if self._resolved else None},
            self.removed_experts,
            layer_target_sparsity=self.layer_targets,
            low_token_experts=self.low_token_experts,
            seconds=dict(self._seconds),
            expert_split=self.expert_split,
        )
        log_report(trainer, self.report)
        if self.save_dir:
            save_final_model(trainer, model, self.save_dir, self.report, self.overwrite)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._undo_wrap is not None:
            self._undo_wrap()
            self._undo_wrap = None
        if self._undo_load_check is not None:
            self._undo_load_check()
            self._undo_load_check = None

    # ------------------------------------------------------------------ checkpoint state

    @property
    def state_key(self) -> str:
        return self._generate_state_key(model_attr=self.model_attr)

    def state_dict(self) -> dict[str, Any]:
        return dump_state(self, self._resolved, self._window.open_state())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._window.pending = restore_state(self, state_dict)

    @classmethod
    def of(cls, trainer: Trainer | None) -> StunCallback | None:
        """The trainer's StunCallback that has chosen expert sets (the first, if several), or None:
        how a LightningModule reads them (``kept_experts``, ``dense_expert_counts``)."""
        for cb in trainer.callbacks if trainer is not None else []:
            if isinstance(cb, cls) and cb.kept_experts is not None:
                return cb
        return None

    def measured_sparsity(self, pl_module: LightningModule) -> float:
        """Zeros inside the surviving experts, counted from the weights."""
        return measured_sparsity(self.target(pl_module))
