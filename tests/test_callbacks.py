"""The Lightning layer: StunCallback during trainer.fit, its masks, resume and bad configs, and the
validation perplexity of StunDistillModule (the datamodule: test_datamodule.py; the command line:
test_fit_cli.py).

Real tiny transformers MoE models, real forward/backward passes, on the CPU.
"""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from stun_lightning import StunRecipe, load_pruned, moe_layers
from stun_lightning.callbacks import SparsitySchedule, StunCallback, StunDataModule, StunDistillModule
from stun_lightning.evaluate import perplexity
from stun_lightning.expert_masks import (
    ExpertMasks,
    apply_masks,
    mask_gradients,
    mask_optimizer_state,
    measured_sparsity,
)
from stun_lightning.unstructured import compute_masks
from stun_lightning.schedule import InvalidScheduleError
from stun_lightning.tiny import build_tiny_model


@pytest.fixture(scope="module")
def data():
    """Six batches of two 32-token blocks per epoch, plus two validation blocks."""
    dm = StunDataModule(seq_len=32, batch_size=2, max_train_blocks=12, max_val_blocks=2, seed=0)
    dm.setup()
    return dm


def make_trainer(tmp_path=None, **kwargs):
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(tmp_path) if tmp_path else None,
    )
    defaults.update(kwargs)
    return Trainer(**defaults)


def module(seed=0, **kwargs):
    return StunDistillModule("tiny:mixtral", teacher=None, lr=1e-2, seed=seed, **kwargs)


def expert_weights(model):
    return {(l.index, name): p for l in moe_layers(model) for name, p in l.expert_parameters()}


class Probe(Callback):
    """Checks, right after every optimizer step (after the StunCallback's own post-step hook), that
    masked weights and their optimizer state are exactly zero and that masks never shrink."""

    def __init__(self, stun: StunCallback, keep_at=()):
        self.stun, self.keep_at = stun, set(keep_at)
        self.violations, self.steps, self.optimizer_params = [], 0, []
        self.expert_counts, self.targets, self.kept, self.weights = set(), {}, {}, {}
        self.start_masks = self.start_kept = None
        self._previous: ExpertMasks | None = None

    def on_train_start(self, trainer, pl_module):
        self.start_masks = copy.deepcopy(self.stun.masks)
        self.start_kept = copy.deepcopy(self.stun.kept_experts)
        self.optimizer_params = [p for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]]
        for opt in trainer.optimizers:
            opt.register_step_post_hook(lambda o, a, k, pl_module=pl_module: self._check(o, pl_module))

    def _check(self, optimizer, pl_module):
        self.steps += 1
        model = self.stun.target(pl_module)
        self.expert_counts.add(tuple(l.num_experts for l in moe_layers(model)))
        masks = self.stun.masks
        from stun_lightning.expert_masks import iter_masked

        for param, keep in iter_masked(model, masks):
            if bool((param.detach()[~keep] != 0).any()):
                self.violations.append(("weight", self.steps))
            for name, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape and bool((value[~keep] != 0).any()):
                    self.violations.append((name, self.steps))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.stun.last_update_step == step and step not in self.targets:
            self.targets[step] = self.stun.current_sparsity
            masks = self.stun.masks
            if self._previous and masks:
                for key, m in masks.masks.items():
                    if bool((m & ~self._previous.masks[key].to(m.device)).any()):
                        self.violations.append(("mask revived", step))
            self._previous = copy.deepcopy(masks)
        if step in self.keep_at and step not in self.kept:
            self.kept[step] = (copy.deepcopy(self.stun.masks), copy.deepcopy(self.stun.kept_experts))
            self.weights[step] = {k: v.detach().clone() for k, v in pl_module.student.state_dict().items()}


# ---------------------------------------------------------------------------- mask state, no Trainer


def test_momentum_revives_pruned_weights_unless_the_optimizer_state_is_masked():
    torch.manual_seed(0)
    model = build_tiny_model("qwen3_moe")
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    masks = compute_masks(model, 0.5, StunRecipe(metric="magnitude")).masks
    results = {}
    for expert_masks in (False, True):
        m = copy.deepcopy(model).train()
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        m(input_ids=ids, labels=ids).loss.backward()
        opt.step()  # momentum of the soon-to-be-pruned weights is now non-zero
        opt.zero_grad()
        apply_masks(m, masks)
        if expert_masks:
            mask_optimizer_state(opt, m, masks)
        m(input_ids=ids, labels=ids).loss.backward()
        mask_gradients(m, masks)
        opt.step()
        results[expert_masks] = measured_sparsity(m)
    assert results[False] < 0.1  # Adam's momentum moved masked weights off zero
    assert results[True] == 0.5


def test_masks_survive_a_checkpoint_bit_for_bit():
    model = build_tiny_model("gpt_oss")  # transposed expert storage
    masks = compute_masks(model, 0.375, StunRecipe(metric="magnitude")).masks
    again = ExpertMasks.from_state_dict(masks.state_dict())
    assert again.equal(masks)
    packed = sum(v["bits"].numel() for v in masks.state_dict().values())
    assert packed * 8 == sum(m.numel() for m in masks.masks.values())
    apply_masks(model, again)
    assert measured_sparsity(model) == pytest.approx(0.375)


# ---------------------------------------------------------------------------- fit


def test_fit_prunes_experts_first_then_reaches_the_final_sparsity_with_masks_held(data, tmp_path):
    mod = module()
    dense_experts = list(expert_weights(mod.student).values())  # references: ids cannot be reused
    stun = StunCallback(
        # an expert that no token of a short statistics window reached falls back to magnitude
        StunRecipe(
            expert_sparsity=0.25, layer_budget="uniform", sparsity=0.5, metric="wanda", low_token_rule="magnitude"
        ),
        SparsitySchedule("cubic", end_step=6),
        update_every=2,
        save_dir=str(tmp_path / "model"),
    )
    probe = Probe(stun)
    trainer = make_trainer(
        tmp_path,
        max_steps=8,
        accumulate_grad_batches=2,
        gradient_clip_val=0.05,
        callbacks=[stun, probe],
        logger=CSVLogger(str(tmp_path)),
    )
    trainer.fit(mod, data)

    # structured phase happened before the optimizer was built: it holds only the pruned tensors
    assert stun.removed_experts and all(len(v) == 2 for v in stun.removed_experts.values())
    assert {id(p) for p in probe.optimizer_params} == {id(p) for p in mod.student.parameters()}
    assert not {id(p) for p in probe.optimizer_params} & {id(p) for p in dense_experts}
    assert probe.expert_counts == {(6, 6)}  # removed experts never came back
    # masks held after every optimizer step, with accumulation, clipping and AdamW's momentum
    assert probe.steps == 8 and probe.violations == []
    # cubic schedule, recomputed every 2 steps, reaching the final value exactly
    sched = SparsitySchedule("cubic", final=0.5, end_step=6, update_every=2)
    assert probe.targets == {t: pytest.approx(sched.sparsity_at(t)) for t in (0, 2, 4, 6)}
    assert measured_sparsity(mod.student) == 0.5

    # the report, counted from the tensors, reached the loggers and the log directory
    report = stun.report
    assert report.removed_experts == stun.removed_experts and report.within_expert_sparsity == 0.5
    rows = (Path(trainer.logger.log_dir) / "metrics.csv").read_text()
    assert "stun/expert_param_sparsity" in rows and "stun/layer_1/sparsity" in rows
    assert json.loads((Path(trainer.logger.log_dir) / "stun_report.json").read_text())["within_expert_sparsity"] == 0.5
    # the fitted model saves and reloads with identical logits
    reloaded = load_pruned(tmp_path / "model")
    ids = data.val_blocks[:1]
    mod.student.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, mod.student(ids).logits, atol=1e-5)


def test_bf16_mixed_one_shot_magnitude_masks_stay_exact(data):
    mod = module()
    stun = StunCallback(
        StunRecipe(expert_sparsity=0.0, sparsity=0.5, metric="magnitude"), SparsitySchedule("one_shot", start_step=0)
    )
    probe = Probe(stun)
    make_trainer(max_steps=3, precision="bf16-mixed", callbacks=[stun, probe]).fit(mod, data)
    assert probe.steps == 3 and probe.violations == []
    assert measured_sparsity(mod.student) == 0.5


RESUME_RECIPE = StunRecipe(
    expert_sparsity=0.25, layer_budget="global", sparsity=0.5, metric="wanda", low_token_rule="magnitude"
)


def resume_callback():
    # stats_steps=3: the checkpoint at step 6 falls inside the window feeding the update at step 8
    return StunCallback(RESUME_RECIPE, SparsitySchedule("cubic", end_step=8), update_every=4, stats_steps=3)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """A 10-step fit checkpointing at step 6 (the end of the first epoch), with its state at steps 6 and 10."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    stun = resume_callback()
    probe = Probe(stun, keep_at=(6, 10))
    ckpt = ModelCheckpoint(dirpath=tmp, filename="{step}", every_n_train_steps=6, save_top_k=-1)
    make_trainer(tmp, max_steps=10, callbacks=[stun, probe, ckpt], enable_checkpointing=True).fit(module(), data)
    assert (tmp / "step=6.ckpt").exists()
    return tmp / "step=6.ckpt", probe


@pytest.mark.parametrize("how", ["fit_ckpt_path", "trainer_ckpt_path", "differently_initialised"])
def test_resume_mid_fit_restores_masks_and_expert_sets(data, tmp_path, uninterrupted, how):
    path, probe_a = uninterrupted
    # a new process: the module is re-created dense (another init for "differently_initialised",
    # whose own expert selection differs: the checkpoint's sets must win)
    stun_b = resume_callback()
    probe_b = Probe(stun_b, keep_at=(10,))
    mod_b = module(seed=3 if how == "differently_initialised" else 0)  # seed 3 keeps 5 + 7 experts, not 6 + 6
    trainer = make_trainer(tmp_path, max_steps=10, callbacks=[stun_b, probe_b], enable_checkpointing=True)
    if how == "trainer_ckpt_path":
        trainer.ckpt_path = str(path)  # known at setup: replayed there, no expert selection at all
        trainer.fit(mod_b, data)
    else:
        trainer.fit(mod_b, data, ckpt_path=str(path))

    masks_6, kept_6 = probe_a.kept[6]
    assert probe_b.start_kept == kept_6 and probe_b.start_masks.equal(masks_6)
    masks_10, kept_10 = probe_a.kept[10]
    assert stun_b.kept_experts == kept_10 and stun_b.masks.equal(masks_10)
    assert probe_b.violations == [] and probe_b.steps == 4
    for name, value in probe_a.weights[10].items():
        assert torch.allclose(value, probe_b.weights[10][name], atol=1e-6), name


# ---------------------------------------------------------------------------- bad configs


def test_schedule_ending_after_max_steps_fails_before_any_pruning(data):
    mod = module()
    stun = StunCallback(
        StunRecipe(expert_sparsity=0.25, sparsity=0.5, metric="magnitude"), SparsitySchedule(end_step=50)
    )
    with pytest.raises(InvalidScheduleError, match="end_step=50 is after the fit's max_steps=10"):
        make_trainer(max_steps=10, callbacks=[stun]).fit(mod, data)
    assert [l.num_experts for l in moe_layers(mod.student)] == [8, 8]


def test_statistics_metric_with_no_training_batch_before_the_update_fails_at_fit_start(data):
    mod = module()
    stun = StunCallback(
        StunRecipe(expert_sparsity=0.25, sparsity=0.5, metric="moe_pruner"), SparsitySchedule("one_shot", start_step=0)
    )
    with pytest.raises(InvalidScheduleError, match="needs activation statistics from forward hooks"):
        make_trainer(max_steps=4, callbacks=[stun]).fit(mod, data)
    assert [l.num_experts for l in moe_layers(mod.student)] == [8, 8]


def test_recipe_target_below_the_schedule_start_fails_at_fit_start(data):
    stun = StunCallback(
        StunRecipe(expert_sparsity=0.0, sparsity=0.3, metric="magnitude"), SparsitySchedule(initial=0.5, end_step=4)
    )
    probe = Probe(stun)
    with pytest.raises(InvalidScheduleError, match="below the initial"):
        make_trainer(max_steps=4, callbacks=[stun, probe]).fit(module(), data)
    assert probe.steps == 0


def test_n_m_patterns_cannot_ramp_and_existing_save_dir_is_refused(data, tmp_path):
    with pytest.raises(InvalidScheduleError, match="one_shot"):
        make_trainer(max_steps=2, callbacks=[StunCallback(StunRecipe(pattern="2:4"), SparsitySchedule("cubic"))]).fit(
            module(), data
        )
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_trainer(max_steps=2, callbacks=[StunCallback(StunRecipe(), save_dir=str(tmp_path / "out"))]).fit(
            module(), data
        )


def test_model_attribute_must_exist(data):
    with pytest.raises(ValueError, match="model_attr="):
        make_trainer(max_steps=1, callbacks=[StunCallback(StunRecipe(), model_attr="nope")]).fit(module(), data)


def test_validation_perplexity_is_logged_each_epoch_and_matches_the_evaluator(data):
    mod = module()
    trainer = make_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=None, callbacks=[])
    trainer.fit(mod, data)
    ppl = float(trainer.callback_metrics["val_ppl"])
    assert ppl == pytest.approx(math.exp(float(trainer.callback_metrics["val_loss"])), rel=1e-5)
    stream = data.val_blocks.flatten()
    expected = perplexity(mod.student.eval(), stream, seq_len=data.seq_len, progress=False)
    assert ppl == pytest.approx(expected, rel=1e-4)


def test_owl_allocation_under_the_callback_spreads_the_target_over_layers(data):
    # the callback's OWL path once crashed at the first mask update ('list' object is not callable)
    mod = module()
    stun = StunCallback(
        StunRecipe(
            expert_sparsity=0.0,
            sparsity=0.5,
            metric="wanda",
            allocation="owl",
            owl_lambda=0.2,
            low_token_rule="magnitude",
        ),
        SparsitySchedule("one_shot", start_step=2),
    )
    make_trainer(max_steps=3, callbacks=[stun]).fit(mod, data)
    targets = stun.layer_targets
    assert len(targets) == len(moe_layers(mod.student)) and len(set(targets.values())) > 1
    sizes = {l.index: sum(w.numel() for w in l.expert_matrices().values()) for l in moe_layers(mod.student)}
    assert sum(targets[i] * n for i, n in sizes.items()) / sum(sizes.values()) == pytest.approx(0.5, abs=1e-9)
    for layer in moe_layers(mod.student):  # each layer holds its own target, up to one weight per row
        w = torch.cat([m.reshape(-1) for m in layer.expert_matrices().values()])
        in_dim = min(m.shape[2] for m in layer.expert_matrices().values())
        assert float((w == 0).double().mean()) == pytest.approx(targets[layer.index], abs=0.5 / in_dim + 1e-9)
