import torch

from stun_lightning import StunRecipe, calibrate, moe_layers, prune
from stun_lightning.methods.base import keep_top
from stun_lightning.tiny import build_tiny_model

from conftest import random_ids


def direct_ean(model, ids):
    """EAN from a plain full forward: sum over routed tokens of the unweighted expert output norm."""
    sums, handles = {}, []
    for layer in moe_layers(model):
        sums[layer.index] = torch.zeros(layer.num_experts, dtype=torch.float64)

        def hook(module, args, layer=layer):
            x, index = args[:2]
            for e in range(layer.num_experts):
                tok, _ = torch.where(index == e)
                sums[layer.index][e] += layer.adapter.expert_output(module, e, x[tok]).double().norm(dim=-1).sum()

        handles.append(layer.experts.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return sums


def test_ean_is_the_summed_output_norm_over_routed_tokens_not_gate_weighted():
    model = build_tiny_model("mixtral", seed=1)
    ids = random_ids(model, n=2, length=16)
    stats = calibrate(model, ids, collect=("saliency",), batch_size=1, progress=False)
    for i, expected in direct_ean(model, ids).items():
        torch.testing.assert_close(stats[i].output_norm_sum, expected, rtol=1e-5, atol=1e-8)
        assert not torch.allclose(stats[i].output_norm_sum, stats[i].saliency_sum)  # gates < 1 make them differ


def test_ean_prunes_the_lowest_activation_norms():
    model = build_tiny_model("mixtral", seed=2)
    ids = random_ids(model, n=8, length=32)
    expected = direct_ean(model, ids)
    report = prune(
        model,
        StunRecipe(expert_sparsity=0.25, expert_method="ean", layer_budget="uniform"),
        calibration=ids,
        progress=False,
    )
    for i, removed in report.removed_experts.items():
        assert removed == [e for e in range(8) if e not in keep_top(expected[i], 6)]
