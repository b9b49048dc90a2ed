"""LoRA through peft on the fused expert tensors: the core sees through peft's wrappers, expert-wise
distillation trains the adapters only, and merging keeps the pruned zeros."""

import copy

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from peft import LoraConfig, get_peft_model

from stun_lightning import StunRecipe, load_pruned, moe_layers, prune, save_pruned
from stun_lightning.calibration import calibrate
from stun_lightning.callbacks import SparsitySchedule, StunCallback, StunDataModule, StunDistillModule
from stun_lightning.lora import merge_lora
from stun_lightning.distill import kept_from_removed, lora_adapted
from stun_lightning.expert_masks import measured_sparsity
from stun_lightning.tiny import build_tiny_model

from conftest import random_ids

EXPERT_TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


def wrapped(model, **lora):
    return get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=EXPERT_TARGETS, **lora)
    )


def test_a_peft_wrapped_moe_exposes_its_experts_and_calibrates_like_the_plain_one():
    plain = build_tiny_model("qwen3_moe", seed=1)
    peft_model = wrapped(copy.deepcopy(plain))  # B = 0 at init: the same function as the plain model
    layers = moe_layers(peft_model)
    assert [l.index for l in layers] == [l.index for l in moe_layers(plain)]
    assert type(layers[0].block.experts).__name__ == "ParamWrapper"  # peft did wrap them
    assert type(layers[0].experts) is type(moe_layers(plain)[0].experts)
    assert layers[0].experts.gate_up_proj.shape == moe_layers(plain)[0].experts.gate_up_proj.shape

    ids = random_ids(plain, n=4, length=16)
    got = calibrate(peft_model, ids, progress=False)
    ref = calibrate(plain, ids, progress=False)
    for i, s in ref.layers.items():
        assert s.expert_tokens.sum() > 0 and torch.equal(got[i].expert_tokens, s.expert_tokens)
        for name in ("gate_up_proj", "down_proj"):  # the pre-hook saw the experts' real forward inputs
            torch.testing.assert_close(got[i].input_sq[name], s.input_sq[name])


def test_expert_outputs_read_the_adapted_weights_inside_lora_adapted():
    peft_model = wrapped(build_tiny_model("mixtral", seed=2), init_lora_weights=False)  # B != 0
    layer = moe_layers(peft_model)[0]
    x = torch.randn(6, layer.experts.gate_up_proj.shape[-1])
    index = torch.arange(6).remainder(layer.num_experts)[:, None]
    with torch.no_grad():
        forward = layer.block.experts(x, index, torch.ones(6, 1))  # through peft's wrappers
        base = torch.stack(
            [layer.adapter.expert_output(layer.experts, int(e), x[t : t + 1])[0] for t, e in enumerate(index[:, 0])]
        )
        with lora_adapted([layer]):
            adapted = torch.stack(
                [layer.adapter.expert_output(layer.experts, int(e), x[t : t + 1])[0] for t, e in enumerate(index[:, 0])]
            )
    torch.testing.assert_close(adapted, forward)
    assert (base - forward).abs().max() > 1e-3  # outside the context LoRA is not applied
    assert not hasattr(layer.experts, "parametrizations")  # and nothing is left registered


class Losses(Callback):
    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({k: float(v) for k, v in pl_module.last_losses.items()})


def fit(module, data, steps, callbacks=()):
    trainer = Trainer(
        accelerator="cpu",
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    trainer.fit(module, data)
    return trainer


@pytest.fixture(scope="module")
def one_batch():
    dm = StunDataModule(
        seq_len=32, batch_size=4, max_train_blocks=4, max_val_blocks=2, seed=0
    )  # the same batch every step
    dm.setup()
    return dm


def test_lora_distillation_of_a_pruned_student_trains_adapters_only_and_merges_without_undoing_pruning(
    one_batch, tmp_path
):
    module = StunDistillModule(
        "tiny:qwen3_moe", teacher="copy", teacher_dtype=None, lr=1e-2, min_lr_ratio=1.0, ce_weight=0.0, expert_weight=1.0,
        lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}, lora_experts=True,
    )  # fmt: skip
    report = prune(
        module.student,
        StunRecipe(expert_sparsity=0.25, layer_budget="uniform", sparsity=0.5, metric="magnitude"),
        progress=False,
    )
    module.expert_map = kept_from_removed(module.teacher, report.removed_experts)
    base_before = {k: v.clone() for k, v in module.student.state_dict().items()}
    losses = Losses()
    trainer = fit(module, one_batch, 6, [losses])

    student = module.student
    assert hasattr(student, "peft_config")  # no StunCallback: the adapters stay until merged
    trained = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
    lora_params = {n: p for n, p in student.named_parameters() if "lora_" in n}
    assert trained == {id(p) for p in lora_params.values()}
    assert sum("experts" in n for n in lora_params) == 2 * 2 * 2  # A and B of both expert tensors, two layers
    after = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v
        for k, v in student.state_dict().items()
        if "lora_" not in k
    }
    assert after.keys() == base_before.keys()
    assert all(
        torch.equal(after[k], base_before[k]) for k in base_before
    )  # base weights untouched, pruned zeros included
    assert any(lora_params[n].abs().sum() > 0 for n in lora_params if "experts" in n and "lora_B" in n)
    totals = [s["total"] for s in losses.steps]
    assert totals[-1] < 0.7 * totals[0]  # the expert-wise loss alone (ce_weight=0) falls through the expert adapters

    # a plain merge re-densifies the masked entries; merge_lora keeps them exactly zero
    assert measured_sparsity(copy.deepcopy(student).merge_and_unload()) < 0.4
    merged = merge_lora(student)
    assert not hasattr(merged, "peft_config") and measured_sparsity(merged) == 0.5
    ids = random_ids(merged, n=2, length=16)
    merged.eval()
    with torch.no_grad():
        want = merged(ids).logits
    save_pruned(merged, tmp_path / "merged")
    loaded = load_pruned(tmp_path / "merged").eval()
    saved = merged.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())
    with torch.no_grad():  # close, not bitwise: the reloaded model attends with sdpa, the tiny one eagerly
        torch.testing.assert_close(loaded(ids).logits, want)
    assert measured_sparsity(loaded) == 0.5


def test_with_the_stun_callback_expert_lora_is_merged_and_masked_at_fit_end(one_batch):
    module = StunDistillModule(
        "tiny:mixtral", teacher="copy", teacher_dtype=None, lr=1e-2,
        lora={"r": 4, "lora_alpha": 8, "init_lora_weights": False}, lora_experts=True,
    )  # fmt: skip
    assert module.lora["target_modules"] == [] and module.lora["target_parameters"] == EXPERT_TARGETS
    stun = StunCallback(
        StunRecipe(expert_sparsity=0.25, layer_budget="uniform", sparsity=0.5, metric="magnitude"),
        SparsitySchedule("one_shot", start_step=0),
    )
    losses = Losses()
    fit(module, one_batch, 3, [stun, losses])
    assert all(s["expert"] > 0 for s in losses.steps)
    assert not hasattr(module.student, "peft_config")
    assert [l.num_experts for l in moe_layers(module.student)] == [6, 6]
    assert measured_sparsity(module.student) == 0.5


def test_lora_experts_needs_lora_settings():
    with pytest.raises(ValueError, match="lora="):
        StunDistillModule("tiny:mixtral", teacher=None, lora_experts=True)
