import pytest
import torch

from stun_lightning import InfeasiblePruningError, keep_experts, moe_layers, remove_experts
from stun_lightning.surgery import PER_LAYER_COUNTS_FIELD, PER_LAYER_TOP_K_FIELD
from stun_lightning.tiny import build_tiny_model

from conftest import clone, logits, random_ids, router_logits_forced_to_minus_inf


def drops_for(model):
    """Experts to remove per layer; for DeepSeek one per expert group, so groups stay aligned."""
    if model.config.model_type == "deepseek_v3":
        return {layer.index: [1, 6] for layer in moe_layers(model)}
    return {layer.index: [layer.index % 8, 5] for layer in moe_layers(model)}


def test_removing_experts_equals_forcing_their_router_logits_to_minus_inf(family):
    """Holds in every family: softmax routers (renormalised or not), GPT-OSS's top-k softmax, and
    DeepSeek's sigmoid + group-limited router when one expert is removed from each group (then the
    re-formed contiguous groups hold the same survivors; removing unevenly would change groups)."""
    model = build_tiny_model(family)
    ids = random_ids(model)
    drop = drops_for(model)
    pruned = clone(model)
    for index, experts in drop.items():
        remove_experts(pruned, index, experts)
    with router_logits_forced_to_minus_inf(model, drop):
        expected = logits(model, ids)
    got = logits(pruned, ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # and the removal really changed the model
    assert not torch.allclose(got, logits(model, ids), atol=1e-4)


def test_surgery_slices_every_per_expert_tensor_and_updates_config(family):
    model = build_tiny_model(family)
    layer = moe_layers(model)[0]
    before = {name: p.detach().clone() for name, p in layer.expert_parameters()}
    router_before = layer.router_weight.detach().clone()
    router_tensors = {
        n: getattr(layer.router, n).detach().clone()
        for n in layer.adapter.router_expert_tensors
        if getattr(layer.router, n, None) is not None
    }
    # biases are real values in the tiny models (a wrongly sliced zero bias would go unnoticed)
    for name, t in [*before.items(), *router_tensors.items()]:
        if name.endswith("bias"):
            assert bool((t != 0).all()) and torch.unique(t.reshape(t.shape[0], -1), dim=0).shape[0] == t.shape[0], (
                family,
                name,
            )
    keep = [0, 2, 3, 4, 6, 7] if family != "deepseek_v3" else [0, 2, 3, 4, 6, 7]
    kept = keep_experts(model, layer.index, keep)
    assert kept == keep
    layer = moe_layers(model)[0]
    for name, p in layer.expert_parameters():
        torch.testing.assert_close(p.detach(), before[name][keep])
    torch.testing.assert_close(layer.router_weight.detach(), router_before[keep])
    for name, t in router_tensors.items():
        assert torch.equal(getattr(layer.router, name).detach(), t[keep]), (family, name)
    assert layer.experts.num_experts == 6
    counts = getattr(model.config, PER_LAYER_COUNTS_FIELD)
    assert counts[str(layer.index)] == 6 and max(counts.values()) == 8
    for other in moe_layers(model)[1:]:
        keep_experts(model, other.index, keep)
    assert not getattr(model.config, PER_LAYER_COUNTS_FIELD, None)  # uniform again
    from stun_lightning import get_adapter

    assert getattr(model.config, get_adapter(model).count_field) == 6


def test_fewer_experts_than_top_k_is_refused_unless_top_k_is_lowered():
    model = build_tiny_model("mixtral")
    index = moe_layers(model)[0].index
    with pytest.raises(InfeasiblePruningError, match="top-k"):
        keep_experts(model, index, [3])
    keep_experts(model, index, [3], lower_top_k=True)
    layer = moe_layers(model)[0]
    assert layer.top_k == 1 and layer.num_experts == 1
    assert getattr(model.config, PER_LAYER_TOP_K_FIELD) == {"0": 1, "1": 2}
    out = logits(model, random_ids(model))
    assert torch.isfinite(out).all()


def test_deepseek_groups_must_stay_even():
    model = build_tiny_model("deepseek_v3")
    with pytest.raises(InfeasiblePruningError, match="n_group"):
        remove_experts(model, 1, [0])
