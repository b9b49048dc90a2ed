import pytest
import torch

from stun_lightning import calibrate, moe_layers
from stun_lightning.tiny import build_tiny_model

from conftest import random_ids


def record_experts_calls(model, ids):
    """Reference: what each MoE layer's experts module receives in a plain full forward."""
    seen, handles = {}, []
    for layer in moe_layers(model):

        def hook(module, args, i=layer.index):
            seen.setdefault(i, []).append(tuple(a.detach().clone() for a in args[:3]))

        handles.append(layer.experts.register_forward_pre_hook(hook))
    with torch.no_grad():
        for batch in ids.split(2):
            model(batch)
    for h in handles:
        h.remove()
    return {i: [torch.cat(parts) for parts in zip(*calls)] for i, calls in seen.items()}


def test_layerwise_pass_reproduces_the_full_forward(family):
    """Stats from the layer-by-layer stream equal a direct computation from a full forward pass
    (this checks the captured per-layer kwargs, e.g. GPT-OSS's sliding/full attention masks)."""
    model = build_tiny_model(family)
    ids = random_ids(model, n=4, length=24)
    reference = record_experts_calls(model, ids)
    stats = calibrate(model, ids, batch_size=2, progress=False)
    assert set(stats.layers) == set(reference)
    for i, (x, index, weights) in reference.items():
        s = stats[i]
        E = s.num_experts
        assert s.tokens == ids.numel()
        assert int(s.expert_tokens.sum()) == ids.numel() * s.top_k
        counts = torch.bincount(index.flatten(), minlength=E)
        assert torch.equal(s.expert_tokens, counts)
        assert torch.equal(torch.diagonal(s.coactivation).long(), counts)
        layer = [l for l in moe_layers(model) if l.index == i][0]
        for e in range(E):
            tok, pos = torch.where(index == e)
            g = weights[tok, pos][:, None].float()
            xe = x[tok].float()
            torch.testing.assert_close(s.input_norms("gate_up_proj")[e], xe.norm(dim=0), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(
                s.input_norms("gate_up_proj", gated=True)[e], (xe * g).norm(dim=0), rtol=1e-4, atol=1e-5
            )
            with torch.no_grad():
                h = layer.adapter.expert_hidden(layer.experts, e, x[tok]).float()
            torch.testing.assert_close(
                s.input_norms("down_proj", gated=True)[e], (h * g).norm(dim=0), rtol=1e-4, atol=1e-5
            )


def test_on_layer_changes_propagate_to_later_layers():
    model = build_tiny_model("mixtral")
    ids = random_ids(model)
    plain = calibrate(model, ids, progress=False)

    def zero_first_layer(i, layer, stats):
        if i == 0:
            with torch.no_grad():
                layer.experts.down_proj.zero_()
            return True
        return False

    changed = calibrate(model, ids, on_layer=zero_first_layer, progress=False)
    torch.testing.assert_close(changed[0].input_sq["gate_up_proj"], plain[0].input_sq["gate_up_proj"])
    assert not torch.allclose(changed[1].input_sq["gate_up_proj"], plain[1].input_sq["gate_up_proj"])
    assert changed.layer_passes == plain.layer_passes + 1


def test_experts_no_token_reaches_are_reported_without_nan():
    model = build_tiny_model("gpt_oss")
    layer = moe_layers(model)[0]
    with torch.no_grad():
        layer.router.bias[5] = -1e4  # expert 5 of layer 0 is never routed
    stats = calibrate(model, random_ids(model), progress=False)
    assert stats.low_token_report() == {0: [5]}
    for name in ("gate_up_proj", "down_proj"):
        assert torch.isfinite(stats[0].input_norms(name)).all()
        assert float(stats[0].input_norms(name)[5].abs().sum()) == 0.0


def test_block_io_is_kept_on_request():
    model = build_tiny_model("qwen3_moe")
    stats = calibrate(model, random_ids(model, n=4, length=16), keep_block_io=40, progress=False)
    x = torch.cat(stats[0].block_inputs)
    y = torch.cat(stats[0].block_outputs)
    assert x.shape == y.shape == (40, model.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(moe_layers(model)[0].block(x[None])[0], y, rtol=1e-4, atol=1e-5)


# Every statistic that is a sum over tokens, written out here independently of LayerStats' own list.
SUMS = (
    "expert_tokens",
    "gate_sum",
    "coactivation",
    "router_logit_sum",
    "saliency_sum",
    "input_sq",
    "input_sq_gated",
    "linear_sq",
)


def _flat_sums(s):
    out = {}
    for name in SUMS:
        value = getattr(s, name)
        for key, t in value.items() if isinstance(value, dict) else [(None, value)]:
            out[(name, key)] = t
    return out


def test_statistics_of_two_halves_add_up_to_the_whole_in_every_summed_field():
    from stun_lightning.activation_stats import reduce_stats
    from stun_lightning.calibration import LINEAR, NORMS, SALIENCY

    model = build_tiny_model("qwen2_moe", num_hidden_layers=2)
    ids = random_ids(model, 4, 16)
    collect = (NORMS, SALIENCY, LINEAR)
    whole, first, second = (
        calibrate(model, x, collect=collect, batch_size=2, progress=False).layers for x in (ids, ids[:2], ids[2:])
    )
    for i, s in first.items():
        s.add_state(second[i].summed_state())  # a checkpointed window added to the next
        want, got = _flat_sums(whole[i]), _flat_sums(s)
        assert want.keys() == got.keys() and all(t is not None for t in want.values())
        assert {name for name, _ in want} == set(SUMS)  # every kind collected, dense linears included
        assert s.tokens == whole[i].tokens
        for key in want:
            torch.testing.assert_close(got[key].double(), want[key].double(), rtol=1e-5, atol=1e-6, msg=str(key))
    doubled = reduce_stats(
        {i: calibrate(model, ids, collect=collect, batch_size=2, progress=False).layers[i] for i in whole},
        lambda t: 2 * t,
    )
    for i, s in doubled.items():  # "two ranks" with the same data: every sum doubles
        assert s.tokens == 2 * whole[i].tokens
        for key, t in _flat_sums(s).items():
            torch.testing.assert_close(t.double(), 2 * _flat_sums(whole[i])[key].double(), msg=str(key))


def _training_statistics(model, batches):
    """What StunCallback's window collects: ActivationStats on train-mode forwards with autograd on."""
    from stun_lightning.activation_stats import ActivationStats

    model.train()
    window = ActivationStats(model, norms=True)
    window.open()
    for ids in batches:
        model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad()
    model.eval()
    return window.close()


def test_training_time_statistics_equal_the_one_shot_calibration_on_the_same_batches(family):
    model = build_tiny_model(family, seed=2)
    ids = random_ids(model, n=4, length=16, seed=3)
    during = _training_statistics(model, ids.split(2))
    one_shot = calibrate(model, ids, batch_size=2, progress=False).layers
    assert during.keys() == one_shot.keys()
    for i, s in during.items():
        assert s.tokens == one_shot[i].tokens == ids.numel()
        want, got = dict(((n, k), t) for n, k, t in one_shot[i].summed()), dict(((n, k), t) for n, k, t in s.summed())
        assert want.keys() == got.keys() and ("input_sq_gated", "down_proj") in got
        for key in want:
            torch.testing.assert_close(
                got[key].double(), want[key].double(), rtol=1e-4, atol=1e-5, msg=f"layer {i} {key}"
            )
        # the gate matters here: MoE-Pruner's norms are not Wanda's
        assert not torch.allclose(s.input_sq_gated["gate_up_proj"], s.input_sq["gate_up_proj"], rtol=1e-2)


def test_training_time_moe_pruner_statistics_weight_each_token_by_its_router_gate():
    """Mixtral's gate written out from the router weight (softmax, top-2, renormalised), applied to
    the MoE block's input captured in the same training forward."""
    model = build_tiny_model("mixtral", seed=4)
    ids = random_ids(model, n=2, length=16, seed=1)
    inputs, handles = {}, []
    for layer in moe_layers(model):
        handles.append(
            layer.block.register_forward_pre_hook(
                lambda m, a, i=layer.index: inputs.__setitem__(i, a[0].detach().reshape(-1, a[0].shape[-1]))
            )
        )
    stats = _training_statistics(model, [ids])
    for h in handles:
        h.remove()
    for layer in moe_layers(model):
        x = inputs[layer.index]
        probs = torch.softmax(x @ layer.router_weight.detach().t(), dim=-1)
        top, index = probs.topk(2, dim=-1)
        top = top / top.sum(-1, keepdim=True)
        w_up = layer.experts.gate_up_proj.detach()
        s = stats[layer.index]
        for e in range(8):
            tok, pos = torch.where(index == e)
            if len(tok) == 0:
                continue
            g = top[tok, pos][:, None]
            gate, up = (x[tok] @ w_up[e].t()).chunk(2, dim=-1)
            h = layer.experts.act_fn(gate) * up
            torch.testing.assert_close(
                s.input_sq_gated["gate_up_proj"][e], (x[tok] * g).square().sum(0), rtol=1e-4, atol=1e-6
            )
            torch.testing.assert_close(s.input_sq_gated["down_proj"][e], (h * g).square().sum(0), rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(s.input_sq["down_proj"][e], h.square().sum(0), rtol=1e-4, atol=1e-6)
            assert float(s.gate_sum[e]) == pytest.approx(float(g.sum()), rel=1e-5)
