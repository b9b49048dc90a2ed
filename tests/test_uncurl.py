import logging

import pytest
import torch

from stun_lightning import StunRecipe, calibrate, load_pruned, moe_layers, prune, save_pruned
from stun_lightning.methods.uncurl import average_linkage, merge_cluster, pruning_factor
from stun_lightning.tiny import build_tiny_model

from conftest import DUPLICATES, clone, logits, model_with_duplicates, random_ids, relative_change


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_uncurl_merges_planted_duplicates_and_reports_the_pruning_factor(family, caplog):
    model = model_with_duplicates(family, noise=1e-4)
    ids = random_ids(model, n=8, length=32)
    dense = logits(model, ids)
    pruned = clone(model)
    with caplog.at_level(logging.INFO, logger="stun_lightning.methods.uncurl"):
        report = prune(
            pruned,
            StunRecipe(expert_sparsity=0.25, expert_method="uncurl", layer_budget="uniform"),
            calibration=ids,
            progress=False,
        )
    for removed in report.removed_experts.values():
        assert len(removed) == 2 and {DUPLICATES.get(e, e) for e in removed} == {0, 3}
    # duplicates merge into one expert with (almost) the same router row: the output barely moves
    assert relative_change(logits(pruned, ids), dense) < 1e-3
    assert "pruning factor 1.33" in caplog.text and pruning_factor(8, 6) == pytest.approx(4 / 3)


def test_merging_is_frequency_weighted_for_experts_and_router_rows():
    model = build_tiny_model("gpt_oss")  # expert and router biases merge alike
    layer = moe_layers(model)[0]
    before = {name: p.detach().clone() for name, p in layer.expert_parameters()}
    router = {name: getattr(layer.router, name).detach().clone() for name in ("weight", "bias")}
    survivor = merge_cluster(layer, [2, 5, 7], torch.tensor([0, 0, 10, 0, 0, 30, 0, 0]))
    assert survivor == 5  # the most frequently routed member
    for name, p in [*layer.expert_parameters(), *((n, getattr(layer.router, n)) for n in router)]:
        src = before.get(name, router.get(name))
        torch.testing.assert_close(p[5], 0.25 * src[2] + 0.75 * src[5] + 0.0 * src[7])
        torch.testing.assert_close(p[7], src[7])  # only the survivor changes; surgery drops the rest


def test_uncurl_keeps_the_task_expert(tmp_path):
    """Expert 6 is made the one every token of the task routes to; pruning half the experts for
    that task keeps it (as its cluster's survivor) and the result saves and loads."""
    model = build_tiny_model("mixtral", seed=3)
    task = random_ids(model, n=8, length=32, seed=4)
    stats = calibrate(model, task, keep_block_io=task.numel(), progress=False)
    with torch.no_grad():
        for layer in moe_layers(model):
            x = torch.cat(stats[layer.index].block_inputs)
            direction = x.mean(0) / x.mean(0).norm()
            layer.router_weight[6] = 4 * direction * x.norm(dim=-1).mean() / (x @ direction).mean().abs()
    routed = calibrate(model, task, progress=False)
    assert all(int(routed[i].expert_tokens.argmax()) == 6 for i in routed.layers)
    pruned = clone(model)
    report = prune(
        pruned,
        StunRecipe(expert_sparsity=0.5, expert_method="uncurl", layer_budget="uniform"),
        calibration=task,
        progress=False,
    )
    assert all(6 not in removed for removed in report.removed_experts.values())
    save_pruned(pruned, tmp_path / "task")
    torch.testing.assert_close(logits(load_pruned(tmp_path / "task"), task), logits(pruned, task))


def test_average_linkage_and_bad_task_data():
    d = torch.tensor([[0, 0.1, 0.8, 0.9], [0.1, 0, 0.7, 0.9], [0.8, 0.7, 0, 0.2], [0.9, 0.9, 0.2, 0]])
    assert average_linkage(d, 2) == [[0, 1], [2, 3]]
    assert average_linkage(d, 3) == [[0, 1], [2], [3]]
    model = build_tiny_model("mixtral")
    with pytest.raises(ValueError, match="non-empty"):
        prune(
            model,
            StunRecipe(expert_sparsity=0.25, expert_method="uncurl", layer_budget="uniform"),
            calibration=torch.zeros(0, 16, dtype=torch.long),
            progress=False,
        )
