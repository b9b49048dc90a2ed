"""``expert_merge``: removed experts averaged into their nearest survivor before the surgery."""

import copy

import pytest
import torch

from stun_lightning import StunRecipe, calibrate, moe_layers, prune
from stun_lightning.tiny import build_tiny_model

from conftest import DUPLICATES, logits, model_with_duplicates, random_ids


def recipe(merge="frequency", **kwargs):
    return StunRecipe(
        **{
            "expert_sparsity": 0.25,
            "expert_method": "frequency",
            "layer_budget": "uniform",
            "expert_merge": merge,
            "batch_size": 4,
            **kwargs,
        }
    )


def test_merging_identical_experts_keeps_the_function_exactly():
    model = model_with_duplicates(
        "mixtral", top_k=1, noise=0.0
    )  # top-1, renormalised: a copy's tokens go to its source
    ids = random_ids(model, n=4, length=32)
    dense = copy.deepcopy(model)
    keep = {layer.index: [e for e in range(layer.num_experts) if e not in DUPLICATES] for layer in moe_layers(model)}
    from stun_lightning.structured import apply_expert_sets

    stats = calibrate(model, ids, collect=(), progress=False)
    mass = {i: stats[i].expert_tokens.double() + 1.0 for i in keep}  # every copy carries mass
    apply_expert_sets(model, keep, merge_mass=mass)
    torch.testing.assert_close(logits(model, ids), logits(dense, ids), rtol=0, atol=1e-6)


@pytest.mark.parametrize("merge, field", [("frequency", "expert_tokens"), ("router_weighted", "gate_sum")])
def test_each_survivor_becomes_the_mass_weighted_mean_of_what_it_absorbed(merge, field):
    model = build_tiny_model("qwen2_moe", seed=4)
    ids = random_ids(model, n=8, length=32)
    dense = copy.deepcopy(model)
    stats = calibrate(dense, ids, collect=(), progress=False)
    report = prune(model, recipe(merge, expert_sparsity=0.5), calibration=ids, progress=False)
    changed = 0
    for before, after in zip(moe_layers(dense), moe_layers(model)):
        removed = report.removed_experts[before.index]
        kept = [e for e in range(before.num_experts) if e not in removed]
        rows = torch.nn.functional.normalize(before.router_weight.double(), dim=1)
        target = {r: kept[int((rows[kept] @ rows[r]).argmax())] for r in removed}
        mass = getattr(stats[before.index], field).double()
        for j, s in enumerate(kept):
            group = [s] + [r for r in removed if target[r] == s]
            m = mass[group] / mass[group].sum()
            for (name, p0), (_, p1) in zip(before.expert_parameters(), after.expert_parameters()):
                expected = sum(w * p0[g].double() for w, g in zip(m, group))
                torch.testing.assert_close(p1[j].double(), expected, rtol=1e-5, atol=1e-6)
            changed += len(group) > 1
    assert changed  # some survivor did absorb another expert


def test_callback_structured_phase_merges_as_prune_does():
    from stun_lightning.callbacks.structured_phase import select_and_remove_experts

    model = build_tiny_model("mixtral", seed=5)
    ids = random_ids(model, n=8, length=32)
    other = copy.deepcopy(model)
    prune(model, recipe("router_weighted"), calibration=ids, progress=False)
    select_and_remove_experts(other, recipe("router_weighted"), ids, torch.device("cpu"))
    for a, b in zip(moe_layers(model), moe_layers(other)):
        for (_, p), (_, q) in zip(a.expert_parameters(), b.expert_parameters()):
            assert torch.equal(p, q)
    unmerged = build_tiny_model("mixtral", seed=5)
    prune(unmerged, recipe("none"), calibration=ids, progress=False)
    assert not torch.equal(moe_layers(unmerged)[0].experts.gate_up_proj, moe_layers(model)[0].experts.gate_up_proj)


def test_expert_merge_is_a_recipe_choice():
    with pytest.raises(ValueError, match="expert_merge"):
        StunRecipe(expert_merge="average")
