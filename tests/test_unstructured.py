"""The one unstructured phase: one-shot ``prune()`` and ``StunCallback`` give the same masks.

The callback's one-shot schedule runs on exactly the calibration set (same batches, same batch size,
learning rate 0 so the weights do not move, the statistics window covering every batch); ``prune()``
runs non-sequentially on the same tokens. Both must zero exactly the same weights, for every metric,
allocation and pattern, with some experts under the low-token rule.
"""

import copy

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader

from stun_lightning import StunRecipe, moe_layers, prune
from stun_lightning.callbacks import SparsitySchedule, StunCallback
from stun_lightning.metrics import METRICS, get_metric
from stun_lightning.tiny import build_tiny_model
from stun_lightning.unstructured import compute_masks, expert_scores

BATCH, STEPS, SEQ = 2, 3, 24
MIN_TOKENS = 25  # some experts of the tiny models see fewer (routing is uneven)


class FrozenFit(LightningModule):
    """Trains ``model`` at learning rate 0: the forward passes happen, the weights stay put."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def calibration_ids(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (BATCH * STEPS, SEQ), generator=g)


def callback_masks(model, recipe, ids):
    stun = StunCallback(recipe, SparsitySchedule("one_shot", start_step=STEPS), stats_steps=STEPS)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[stun],
    )
    trainer.fit(FrozenFit(model), DataLoader(ids, batch_size=BATCH, shuffle=False))
    return stun


def zero_patterns(model):
    return {(layer.index, name): (w == 0) for layer in moe_layers(model) for name, w in layer.expert_matrices().items()}


CASES = [
    (metric, allocation, pattern, "dense")
    for metric in METRICS
    for allocation in ("uniform", "owl")
    for pattern in ("unstructured", "2:4")
]
CASES += [("wanda", "owl", "unstructured", "magnitude")]


@pytest.mark.parametrize("metric,allocation,pattern,low_token_rule", CASES)
def test_one_shot_prune_and_the_callback_mask_the_same_weights(metric, allocation, pattern, low_token_rule):
    model = build_tiny_model("mixtral", seed=3)
    ids = calibration_ids(model)
    recipe = StunRecipe(
        expert_sparsity=0.0,
        sparsity=0.5,
        metric=metric,
        allocation=allocation,
        owl_lambda=0.2,
        pattern=pattern,
        sequential=False,
        batch_size=BATCH,
        low_token_rule=low_token_rule,
        min_tokens=MIN_TOKENS,
    )
    one_shot = copy.deepcopy(model)
    report = prune(one_shot, recipe, calibration=ids, progress=False)
    trained = copy.deepcopy(model)
    stun = callback_masks(trained, recipe, ids)

    assert stun.layer_targets == pytest.approx(report.layer_target_sparsity, abs=1e-12)
    if get_metric(metric).needs_data:  # the rule is exercised: some experts saw fewer than min_tokens
        assert (
            stun.low_token_experts == {int(k): v for k, v in report.low_token_experts.items()}
            and stun.low_token_experts
        )
    expected, got = zero_patterns(one_shot), zero_patterns(trained)
    for key in expected:
        assert torch.equal(expected[key], got[key]), f"layer {key[0]} {key[1]}: masks differ"
        assert torch.equal(~stun.masks.get(*key), got[key])  # the callback's masks are what it applied
    if allocation == "owl":
        assert len(set(stun.layer_targets.values())) > 1


def test_low_token_experts_keep_their_previous_mask_and_masks_only_grow():
    model = build_tiny_model("qwen3_moe", seed=1)
    ids = calibration_ids(model)
    stats = _stats(model, ids)
    recipe = StunRecipe(expert_sparsity=0.0, sparsity=0.3, metric="wanda", min_tokens=MIN_TOKENS)
    low = {i: s.low_token_experts(MIN_TOKENS) for i, s in stats.items()}
    assert any(low.values())
    first = compute_masks(model, 0.3, recipe, stats).masks
    for key, m in first.masks.items():  # low-token experts are left dense ("dense" rule)
        layer = int(key.split(".")[0])
        for e in low[layer]:
            assert bool(m[e].all())
    # a previous mask on a low-token expert is kept as it is; everywhere the new masks contain the old
    previous = compute_masks(model, 0.3, StunRecipe(expert_sparsity=0.0, metric="magnitude")).masks
    second = compute_masks(model, 0.5, recipe, stats, previous=previous).masks
    for key, m in second.masks.items():
        layer = int(key.split(".")[0])
        old = previous.masks[key]
        assert not bool((m & ~old).any())
        for e in low[layer]:
            assert torch.equal(m[e], old[e])


def test_expert_scores_are_the_metric_of_each_expert_and_matrix():
    model = build_tiny_model("gpt_oss", seed=2)  # transposed expert storage
    ids = calibration_ids(model)
    stats = _stats(model, ids)
    layer = moe_layers(model)[0]
    s = stats[layer.index]
    weights = layer.expert_matrices()
    for metric in METRICS:
        recipe = StunRecipe(expert_sparsity=0.0, sparsity=0.5, metric=metric, min_tokens=0)
        for name, e, sc in expert_scores(layer, weights, s, recipe):
            w = weights[name][e].abs()
            if metric == "magnitude":
                want = w
            else:  # independent: sqrt of the collected sums of squares, gated for MoE-Pruner
                sq = (s.input_sq_gated if metric == "moe_pruner" else s.input_sq)[name][e]
                want = w * sq.sqrt()[None, :]
            torch.testing.assert_close(sc, want.float(), rtol=0, atol=0)


def _stats(model, ids):
    from stun_lightning.calibration import NORMS, calibrate

    return calibrate(model, ids, collect=(NORMS,), batch_size=BATCH, progress=False).layers


def test_the_callback_refuses_prune_dense_which_only_one_shot_pruning_supports():
    with pytest.raises(ValueError, match="prune_dense=True is supported by one-shot prune"):
        StunCallback(StunRecipe(expert_sparsity=0.0, sparsity=0.5, prune_dense=True))
