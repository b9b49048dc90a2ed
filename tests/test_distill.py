"""Expert-wise distillation: the loss terms as plain functions, and StunDistillModule under trainer.fit."""

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer

from stun_lightning import StunRecipe, keep_experts, moe_layers, prune
from stun_lightning.callbacks import SparsitySchedule, StunCallback, StunDataModule, StunDistillModule
from stun_lightning.distill import (
    InForwardExpertMSE,
    MoECapture,
    expert_mse,
    init_expert_lambda,
    kept_from_removed,
    logit_kl,
)
from stun_lightning.expert_masks import measured_sparsity
from stun_lightning.tiny import build_tiny_model

from conftest import random_ids


@pytest.fixture(scope="module")
def data():
    dm = StunDataModule(seq_len=32, batch_size=4, max_train_blocks=48, max_val_blocks=4, seed=0)
    dm.setup()
    return dm


def trainer(**kwargs):
    return Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def captured(student, teacher, ids):
    s, t = MoECapture(student, detach=False), MoECapture(teacher, detach=True)
    student(ids)
    with torch.inference_mode():
        teacher(ids)
    return s, t


def test_expert_term_compares_survivors_with_their_originals_on_teacher_routed_tokens():
    teacher = build_tiny_model("olmoe", seed=3)
    student = copy.deepcopy(teacher)
    keep_experts(student, 1, [0, 2, 3, 5, 6, 7])  # the last MoE layer loses experts 1 and 4
    expert_map = {0: list(range(8)), 1: [0, 2, 3, 5, 6, 7]}
    with torch.no_grad():
        moe_layers(student)[1].experts.down_proj[3].mul_(0.5)  # student expert 3 (original 5) drifts
    ids = random_ids(teacher, n=2, length=16)
    s_cap, t_cap = captured(student, teacher, ids)
    loss = expert_mse(s_cap, t_cap, expert_map)

    # reference, written out: every other survivor has the same weights and inputs as its original
    # (nothing changed before the last layer), and the removed experts 1 and 4 are not compared
    t_layer, s_layer = moe_layers(teacher)[1], moe_layers(student)[1]
    x, idx = t_cap.records[1].hidden, t_cap.records[1].index
    assert torch.equal(x, s_cap.records[1].hidden.detach())
    tok = (idx == 5).any(-1).nonzero().squeeze(1)
    assert tok.numel() > 0
    with torch.no_grad():
        target = t_layer.adapter.expert_output(t_layer.experts, 5, x[tok])
        pred = s_layer.adapter.expert_output(s_layer.experts, 3, x[tok])
    expected = F.mse_loss(pred, target)
    assert float(expected) > 0 and loss.item() == pytest.approx(float(expected), rel=1e-5)
    loss.backward()  # the gradient reaches the drifted student expert, and nothing of the teacher
    grad = moe_layers(student)[1].experts.down_proj.grad
    assert grad[3].abs().sum() > 0 and grad[[0, 1, 2, 4, 5]].abs().sum() == 0
    assert all(p.grad is None for p in teacher.parameters())


def test_expert_term_computed_inside_the_forward_equals_the_one_after_it():
    """The FSDP2 path (targets in the teacher's forward, terms in the student's) gives the same loss
    and the same gradients as expert_mse computed after both forwards."""
    teacher = build_tiny_model("mixtral", seed=2)
    student = copy.deepcopy(teacher)
    keep_experts(student, 0, [0, 1, 3, 4, 6, 7])
    expert_map = {0: [0, 1, 3, 4, 6, 7], 1: list(range(8))}
    with torch.no_grad():
        for layer in moe_layers(student):
            layer.experts.gate_up_proj.mul_(0.9)
    ids = random_ids(teacher, n=2, length=16)
    s_cap, t_cap = captured(student, teacher, ids)
    after = expert_mse(s_cap, t_cap, expert_map)
    after.backward()
    want = [None if p.grad is None else p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    in_forward = InForwardExpertMSE(s_cap, t_cap, expert_map)
    with torch.inference_mode():
        teacher(ids)  # teacher first: its layers leave the targets
    student(ids)
    during = in_forward.loss(ids.device)
    assert float(after) > 0 and during.item() == pytest.approx(after.item(), rel=1e-6)
    during.backward()
    for g, w in zip((p.grad for p in student.parameters()), want):
        assert (g is None) == (w is None) and (g is None or torch.allclose(g, w, atol=1e-7))
    in_forward.enabled = False  # e.g. expert weight 0: nothing computed
    with torch.inference_mode():
        teacher(ids)
    student(ids)
    assert in_forward.loss(ids.device).item() == 0.0


def test_lambda_starts_the_two_terms_equal_and_waits_for_a_nonzero_expert_term():
    ce, ex = torch.tensor(6.0), torch.tensor(0.25)
    lam = init_expert_lambda(ce, ex)
    assert lam == 24.0 and lam * float(ex) == float(ce)
    assert init_expert_lambda(ce, torch.tensor(0.0)) is None
    with pytest.raises(ValueError, match="explicitly"):
        init_expert_lambda(ce, torch.tensor(float("nan")))


def test_logit_kl_is_zero_only_for_equal_distributions():
    s = torch.randn(2, 5, 11)
    assert float(logit_kl(s, s.clone(), 2.0)) == pytest.approx(0.0, abs=1e-6)
    t = torch.randn(2, 5, 11)
    ref = F.kl_div(F.log_softmax(s / 3, -1), F.softmax(t / 3, -1), reduction="sum") / 10 * 9
    assert float(logit_kl(s, t, 3.0)) == pytest.approx(float(ref), rel=1e-5)


class Losses(Callback):
    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(
            {k: float(v) for k, v in pl_module.last_losses.items()} | {"lambda": float(pl_module.expert_lambda)}
        )


def test_lambda_is_ce_over_expert_at_the_first_step_and_the_teacher_never_changes(data):
    module = StunDistillModule("tiny:mixtral", teacher="copy", lr=1e-2, logit_kl_weight=0.5)
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    assert all(v.dtype == torch.bfloat16 for v in teacher_before.values() if v.is_floating_point())
    stun = StunCallback(
        StunRecipe(expert_sparsity=0.25, sparsity=0.5, metric="magnitude"), SparsitySchedule("one_shot", start_step=0)
    )
    losses = Losses()
    fit = trainer(max_steps=3, limit_val_batches=0, callbacks=[stun, losses])
    fit.fit(module, data)

    first = losses.steps[0]
    assert first["expert"] > 0 and first["lambda"] == pytest.approx(first["ce"] / first["expert"], rel=1e-5)
    assert first["total"] == pytest.approx(2 * first["ce"] + 0.5 * first["logit_kl"], rel=1e-5)
    assert all(s["lambda"] == first["lambda"] for s in losses.steps)  # fixed after the first step
    # the teacher: frozen, unchanged, outside the optimizer and the checkpoint
    after = module.teacher.state_dict()
    assert all(torch.equal(teacher_before[k], after[k]) for k in teacher_before)
    assert not any(p.requires_grad for p in module.teacher.parameters())
    optimized = {id(p) for opt in fit.optimizers for g in opt.param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in module.teacher.parameters()}
    assert not any(k.startswith("teacher") for k in module.state_dict())
    # the student kept its masks and lost its experts; the teacher kept all 8
    assert [l.num_experts for l in moe_layers(module.teacher)] == [8, 8]
    assert measured_sparsity(module.student) == 0.5


SYNTHETIC = (
    ["cat", "dog", "fox", "owl", "bee", "elk", "yak", "emu"],
    ["red", "blue", "green", "black", "white", "brown"],
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Mixtral trained for 20 steps on regular synthetic text (val ppl ~20 instead of ~8000)."""
    rng = random.Random(0)
    animals, colors = SYNTHETIC
    text = "\n".join(
        f"The {rng.choice(colors)} {rng.choice(animals)} sees {rng.randint(2, 9)} {rng.choice(animals)}s."
        for _ in range(2000)
    )
    path = tmp_path_factory.mktemp("synthetic") / "train.txt"
    path.write_text(text, encoding="utf-8")
    dm = StunDataModule(train=str(path), seq_len=32, batch_size=4, max_val_blocks=8, seed=0)
    dm.setup()
    model = build_tiny_model("mixtral").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids = dm.train_blocks[torch.randint(0, len(dm.train_blocks), (4,), generator=gen)]
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, dm


def test_distillation_recovers_the_pruned_student(trained):
    """Val perplexity after a short distillation fit is lower than right after one-shot pruning."""
    model, dm = trained
    module = StunDistillModule(copy.deepcopy(model), teacher="copy", teacher_dtype=None, lr=1e-3)
    dense_ppl = trainer().validate(module, dm, verbose=False)[0]["val_ppl"]
    report = prune(
        module.student,
        StunRecipe(expert_sparsity=0.5, layer_budget="uniform", sparsity=0.75, metric="wanda"),
        calibration=dm.calibration_ids()[:8],
        progress=False,
    )
    module.expert_map = kept_from_removed(module.teacher, report.removed_experts)
    pruned_ppl = trainer().validate(module, dm, verbose=False)[0]["val_ppl"]
    # masks fixed during the fine-tune (MoE-Pruner): the callback keeps the pruned zeros at zero
    stun = StunCallback(
        StunRecipe(expert_sparsity=0.0, sparsity=0.75, metric="magnitude"), SparsitySchedule("one_shot", start_step=0)
    )
    losses = Losses()
    trainer(max_steps=8, limit_val_batches=0, callbacks=[stun, losses]).fit(module, dm)
    distilled_ppl = trainer().validate(module, dm, verbose=False)[0]["val_ppl"]

    assert pruned_ppl > 1.1 * dense_ppl  # pruning hurt
    assert distilled_ppl < 0.9 * pruned_ppl  # distillation recovered part of it
    totals = [s["total"] for s in losses.steps]
    assert sum(totals[-3:]) < 0.8 * sum(totals[:3])
    assert losses.steps[0]["lambda"] == pytest.approx(losses.steps[0]["ce"] / losses.steps[0]["expert"], rel=1e-5)
    assert measured_sparsity(module.student) == 0.75  # recovery did not undo the pruning


def test_a_student_pruned_elsewhere_needs_an_expert_map(data):
    module = StunDistillModule("tiny:mixtral", teacher="copy", teacher_dtype=None)
    keep_experts(module.student, 0, range(6))
    with pytest.raises(ValueError, match="expert_map="):
        trainer(max_steps=1, limit_val_batches=0).fit(module, data)


def test_the_expert_map_is_the_trainers_stun_callback_sets_and_must_index_the_teacher(data):
    def stun():
        return StunCallback(
            StunRecipe(expert_sparsity=0.25, layer_budget="uniform", sparsity=0.5, metric="magnitude"),
            SparsitySchedule("one_shot", start_step=0),
        )

    module, callback = StunDistillModule("tiny:mixtral", teacher="copy", teacher_dtype=None), stun()
    fit = trainer(max_steps=1, limit_val_batches=0, callbacks=[callback])
    fit.fit(module, data)
    assert StunCallback.of(fit) is callback and StunCallback.of(None) is None
    assert module.expert_map == callback.kept_experts and [len(v) for v in module.expert_map.values()] == [6, 6]
    # experts removed before the callback ran: its sets index the pruned student, not the teacher
    module = StunDistillModule("tiny:mixtral", teacher="copy", teacher_dtype=None)
    keep_experts(module.student, 0, range(7))
    with pytest.raises(ValueError, match="experts were removed before it ran"):
        trainer(max_steps=1, limit_val_batches=0, callbacks=[stun()]).fit(module, data)


def test_lora_recovery_trains_adapters_only_and_keeps_the_masks(data):
    module = StunDistillModule(
        "tiny:qwen3_moe",
        teacher="copy",
        teacher_dtype=None,
        lr=1e-2,
        lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    )
    stun = StunCallback(
        StunRecipe(expert_sparsity=0.25, layer_budget="uniform", sparsity=0.5, metric="magnitude"),
        SparsitySchedule("one_shot", start_step=0),
    )
    fit = trainer(max_steps=2, limit_val_batches=0, callbacks=[stun])
    fit.fit(module, data)
    trained = [p for opt in fit.optimizers for g in opt.param_groups for p in g["params"]]
    assert trained and len(trained) == 2 * 2 * 2  # A and B of q and v in two layers
    # LoRA merged at the end, masks made permanent on the merged plain model
    assert not hasattr(module.student, "peft_config")
    assert [l.num_experts for l in moe_layers(module.student)] == [6, 6]
    assert measured_sparsity(module.student) == 0.5


def _heldout_expert_mse(student, teacher, ids):
    s_cap, t_cap = captured(student, teacher, ids)
    with torch.no_grad():
        value = float(
            expert_mse(s_cap, t_cap, {layer.index: list(range(layer.num_experts)) for layer in moe_layers(student)})
        )
    s_cap.close(), t_cap.close()
    return value


def test_the_expert_term_drives_the_student_experts_towards_the_teacher(data):
    """Same pruned student, same batches and seed: with the expert-wise term its experts end much
    closer to the teacher's on held-out tokens than with cross-entropy alone (expert_weight=0).
    Measured: about 30x closer (lambda = L_CE / L_expert, 12 AdamW steps at lr 3e-3)."""
    teacher = build_tiny_model("mixtral", seed=6)
    pruned = copy.deepcopy(teacher)
    prune(pruned, StunRecipe(expert_sparsity=0.0, sparsity=0.6, metric="magnitude"), progress=False)
    heldout = data.val_blocks[:4]
    start = _heldout_expert_mse(pruned, teacher, heldout)
    assert start > 0
    after = {}
    for weight in (None, 0.0):
        torch.manual_seed(0)
        module = StunDistillModule(
            copy.deepcopy(pruned), teacher=copy.deepcopy(teacher), teacher_dtype=None, expert_weight=weight, lr=3e-3
        )
        trainer(max_steps=12, limit_val_batches=0).fit(module, data)
        after[weight] = _heldout_expert_mse(module.student, teacher, heldout)
    # cross-entropy alone pulls the experts far from their originals; the expert term holds them close
    assert after[0.0] > 5 * start and after[None] < 0.2 * after[0.0], (start, after)
