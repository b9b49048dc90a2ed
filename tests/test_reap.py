import pytest
import torch

from stun_lightning import StunRecipe, calibrate, moe_layers, prune
from stun_lightning.methods.base import keep_top
from stun_lightning.tiny import build_tiny_model

from conftest import random_ids


def direct_saliency(model, ids):
    """REAP's S_j from a plain full forward: what each experts module receives (routed set, gates)."""
    sums, counts, handles = {}, {}, []
    for layer in moe_layers(model):
        E = layer.num_experts
        sums[layer.index], counts[layer.index] = torch.zeros(E, dtype=torch.float64), torch.zeros(E)

        def hook(module, args, layer=layer):
            x, index, weights = args[:3]
            for e in range(layer.num_experts):
                tok, pos = torch.where(index == e)
                out = layer.adapter.expert_output(module, e, x[tok]).double()
                sums[layer.index][e] += (weights[tok, pos].double() * out.norm(dim=-1)).sum()
                counts[layer.index][e] += len(tok)

        handles.append(layer.experts.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return {i: sums[i] / counts[i].clamp_min(1) for i in sums}


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])  # deepseek: sigmoid gates x routed_scaling_factor
def test_saliency_is_the_mean_gate_times_output_norm_over_routed_tokens(family):
    model = build_tiny_model(family, routed_scaling_factor=2.5) if family == "deepseek_v3" else build_tiny_model(family)
    ids = random_ids(model, n=2, length=16)
    stats = calibrate(model, ids, collect=("saliency",), batch_size=1, progress=False)
    for i, expected in direct_saliency(model, ids).items():
        torch.testing.assert_close(stats[i].saliency(), expected, rtol=1e-5, atol=1e-8)
    with pytest.raises(KeyError, match="saliency"):
        calibrate(model, ids, collect=("routing",), progress=False)[moe_layers(model)[0].index].saliency()


def test_reap_removes_zero_saliency_experts_first_and_keeps_the_highest():
    model = build_tiny_model("mixtral", seed=2)
    planted = {0: 3, 1: 5}
    with torch.no_grad():
        for layer in moe_layers(model):
            layer.experts.down_proj[planted[layer.index]] = 0.0  # routed, but outputs nothing: saliency 0
    ids = random_ids(model, n=8, length=32)
    stats = calibrate(model, ids, collect=("saliency",), progress=False)
    saliency = {i: stats[i].saliency() for i in stats.layers}
    assert all(float(saliency[i][e]) == 0.0 and int(stats[i].expert_tokens[e]) > 0 for i, e in planted.items())
    report = prune(
        model,
        StunRecipe(expert_sparsity=0.25, expert_method="reap", layer_budget="uniform"),
        calibration=ids,
        progress=False,
    )
    for i, removed in report.removed_experts.items():
        assert planted[i] in removed
        assert removed == [e for e in range(8) if e not in keep_top(saliency[i], 6)]


def test_reap_removes_dead_experts_never_routed():
    model = build_tiny_model("gpt_oss")
    with torch.no_grad():
        for layer in moe_layers(model):
            layer.router.bias[[2, 6]] = -1e4
    report = prune(
        model,
        StunRecipe(expert_sparsity=0.25, expert_method="reap", layer_budget="uniform"),
        calibration=random_ids(model),
        progress=False,
    )
    assert all(r == [2, 6] for r in report.removed_experts.values())
    with pytest.raises(ValueError, match="layer_budget='uniform'"):
        prune(
            build_tiny_model("gpt_oss"),
            StunRecipe(expert_sparsity=0.25, expert_method="reap"),
            calibration=random_ids(model),
            progress=False,
        )
