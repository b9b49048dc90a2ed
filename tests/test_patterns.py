import pytest
import torch

from stun_lightning import StunRecipe, moe_layers, prune
from stun_lightning.patterns import InvalidSparsityError, mask_from_scores, owl_allocation
from stun_lightning.tiny import build_tiny_model

from conftest import clone, random_ids


def routed_inputs(model, ids, layer_index):
    """Reference capture: the experts module's (hidden, index, weights) in a full forward pass."""
    layer = [l for l in moe_layers(model) if l.index == layer_index][0]
    calls = []
    h = layer.experts.register_forward_pre_hook(lambda m, a: calls.append(tuple(t.detach().clone() for t in a[:3])))
    with torch.no_grad():
        model(ids)
    h.remove()
    return [torch.cat(parts) for parts in zip(*calls)]


def reference_mask(weight, column_norms, sparsity):
    """Wanda, written out: per output row, zero the k lowest |W| * ||X|| entries."""
    scores = weight.abs() * column_norms[None, :]
    keep = torch.ones_like(weight, dtype=torch.bool)
    k = round(weight.shape[1] * sparsity)
    for r in range(weight.shape[0]):
        order = torch.argsort(scores[r])
        keep[r, order[:k]] = False
    return keep


@pytest.mark.parametrize("metric", ["wanda", "moe_pruner"])
def test_first_layer_masks_match_a_straightforward_reference(metric):
    model = build_tiny_model("mixtral", seed=1)
    ids = random_ids(model, n=4, length=32)
    x, index, weights = routed_inputs(model, ids, 0)
    dense = {name: w.detach().clone() for name, w in moe_layers(model)[0].expert_matrices().items()}
    layer = moe_layers(model)[0]
    prune(model, StunRecipe(expert_sparsity=0.0, sparsity=0.5, metric=metric), calibration=ids, progress=False)
    pruned = moe_layers(model)[0].expert_matrices()
    for e in range(8):
        tok, pos = torch.where(index == e)
        if len(tok) == 0:
            continue
        g = weights[tok, pos][:, None] if metric == "moe_pruner" else torch.ones(len(tok), 1)
        xin = x[tok]
        with torch.no_grad():
            hidden = layer.adapter.expert_hidden(layer.experts, e, xin)
        # expert_hidden used the already-pruned gate_up; recompute with the dense weights instead
        with torch.no_grad():
            gu = xin @ dense["gate_up_proj"][e].t()
            gate, up = gu.chunk(2, dim=-1)
            hidden = layer.experts.act_fn(gate) * up
        for name, inp in (("gate_up_proj", xin), ("down_proj", hidden)):
            expected = reference_mask(dense[name][e], (inp * g).norm(dim=0), 0.5)
            got = pruned[name][e] != 0
            assert torch.equal(got, expected), (metric, e, name)


def nm_reference_keep(scores, n, m):
    """N:M written out (this repository's convention: N of every M consecutive inputs are zeroed,
    sparsity N/M): in each group keep the M - N highest scores, by a per-group argsort."""
    keep = torch.zeros(scores.shape, dtype=torch.bool)
    rows = scores.reshape(-1, scores.shape[-1])
    flat = keep.view(-1, scores.shape[-1])
    for r in range(rows.shape[0]):
        for start in range(0, rows.shape[1], m):
            order = torch.argsort(rows[r, start : start + m], descending=True)
            flat[r, start + order[: m - n]] = True
    return keep


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
def test_n_m_mask_keeps_the_highest_scores_of_every_group(pattern):
    n, m = (int(v) for v in pattern.split(":"))
    gen = torch.Generator().manual_seed(n * 10 + m)
    scores = torch.randn(6, 32, generator=gen).abs()  # continuous: no ties
    keep = mask_from_scores(scores, 0.0, pattern)
    assert torch.equal(keep, nm_reference_keep(scores, n, m))
    # every kept score beats every dropped one of its group (not only the count per group)
    groups, kept = scores.reshape(6, -1, m), keep.reshape(6, -1, m)
    lowest_kept = groups.masked_fill(~kept, float("inf")).amin(-1)
    highest_dropped = groups.masked_fill(kept, float("-inf")).amax(-1)
    assert bool((lowest_kept > highest_dropped).all())


def test_two_four_prune_keeps_the_two_largest_magnitudes_of_every_group(family):
    model = build_tiny_model(family)
    dense = {(l.index, n): w.detach().clone() for l in moe_layers(model) for n, w in l.expert_matrices().items()}
    prune(model, StunRecipe(expert_sparsity=0.0, pattern="2:4", metric="magnitude"), progress=False)
    for layer in moe_layers(model):
        for name, w in layer.expert_matrices().items():
            expected = nm_reference_keep(dense[(layer.index, name)].abs(), 2, 4)
            assert torch.equal(w.detach() != 0, expected), (family, layer.index, name)


def test_two_four_prune_keeps_the_two_highest_wanda_scores_of_every_group():
    model = build_tiny_model("mixtral", seed=1)
    ids = random_ids(model, n=4, length=32)
    x, index, _ = routed_inputs(model, ids, 0)
    layer = moe_layers(model)[0]
    dense = {name: w.detach().clone() for name, w in layer.expert_matrices().items()}
    prune(
        model,
        StunRecipe(expert_sparsity=0.0, pattern="2:4", metric="wanda", min_tokens=1),
        calibration=ids,
        progress=False,
    )
    pruned = moe_layers(model)[0].expert_matrices()
    checked = 0
    for e in range(8):
        tok = (index == e).any(-1)
        if not bool(tok.any()):
            continue
        xin = x[tok]
        with torch.no_grad():  # the expert's activation, from the dense weights
            gate, up = (xin @ dense["gate_up_proj"][e].t()).chunk(2, dim=-1)
            hidden = layer.experts.act_fn(gate) * up
        for name, inp in (("gate_up_proj", xin), ("down_proj", hidden)):
            scores = dense[name][e].abs() * inp.norm(dim=0)[None, :]
            assert torch.equal(pruned[name][e] != 0, nm_reference_keep(scores, 2, 4)), (e, name)
            checked += 1
    assert checked >= 12


def test_two_four_leaves_exactly_two_zeros_in_every_group(family):
    model = build_tiny_model(family)
    report = prune(
        model,
        StunRecipe(expert_sparsity=0.0, pattern="2:4", metric="wanda"),
        calibration=random_ids(model, n=8),
        progress=False,
    )
    for layer in moe_layers(model):
        for name, w in layer.expert_matrices().items():
            groups = (w.detach() == 0).reshape(w.shape[0], w.shape[1], -1, 4).sum(-1)
            dense_experts = set(report.low_token_experts.get(layer.index, []))
            for e in range(w.shape[0]):
                if e not in dense_experts:
                    assert torch.all(groups[e] == 2), (family, name, e)


def test_owl_layer_sparsities_average_exactly_to_the_target():
    ratios = {0: 0.01, 1: 0.05, 2: 0.02, 3: 0.03}
    sizes = {0: 100, 1: 300, 2: 200, 3: 50}
    s = owl_allocation(ratios, sizes, 0.6, lam=0.08)
    mean = sum(s[i] * sizes[i] for i in s) / sum(sizes.values())
    assert abs(mean - 0.6) < 1e-12
    assert s[1] < s[3] < s[2] < s[0]  # more outliers -> lower sparsity
    assert max(s.values()) - min(s.values()) == pytest.approx(0.16)
    # clipping at the bounds still averages to the target
    s = owl_allocation({0: 0.0, 1: 1.0}, {0: 1, 1: 1}, 0.02, lam=0.5)
    assert abs((s[0] + s[1]) / 2 - 0.02) < 1e-12 and min(s.values()) >= 0


def test_owl_prune_hits_the_target_over_kept_experts():
    model = build_tiny_model("qwen3_moe", num_hidden_layers=4, seed=2)
    report = prune(
        model,
        StunRecipe(expert_sparsity=0.0, sparsity=0.5, allocation="owl", metric="wanda"),
        calibration=random_ids(model, n=8),
        progress=False,
    )
    assert len(set(round(v, 6) for v in report.layer_target_sparsity.values())) > 1
    # per-row counts are rounded: within half a weight per row (1/64 here) of the target
    assert abs(0.5 - report.within_expert_sparsity) < 1 / 64


def test_reported_sparsity_equals_counted_zeros():
    model = build_tiny_model("olmoe", seed=4)
    original_total = sum(p.numel() for l in moe_layers(model) for _, p in l.expert_parameters())
    report = prune(
        model, StunRecipe(expert_sparsity=0.25, sparsity=0.5), calibration=random_ids(model, n=8), progress=False
    )
    nonzero = sum(int((p != 0).sum()) for l in moe_layers(model) for _, p in l.expert_parameters())
    kept_total = sum(p.numel() for l in moe_layers(model) for _, p in l.expert_parameters())
    assert report.expert_param_sparsity == pytest.approx(1 - nonzero / original_total)
    assert report.within_expert_sparsity == pytest.approx(1 - nonzero / kept_total)
    all_nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    assert report.nonzero_after == all_nonzero
    # STUN's multiplicative budget: (1 - total) = (1 - expert removal) * (1 - within)
    assert 1 - report.expert_param_sparsity == pytest.approx(0.75 * (1 - report.within_expert_sparsity), rel=1e-6)


def test_total_sparsity_is_split_the_stun_way():
    model = build_tiny_model("mixtral")
    report = prune(
        model, StunRecipe(expert_sparsity=0.25, total_sparsity=0.6), calibration=random_ids(model, n=8), progress=False
    )
    assert report.expert_param_sparsity == pytest.approx(0.6, abs=0.01)
    with pytest.raises(InvalidSparsityError, match="below what expert removal"):
        prune(
            build_tiny_model("mixtral"),
            StunRecipe(expert_sparsity=0.5, total_sparsity=0.3),
            calibration=random_ids(model),
            progress=False,
        )


def test_low_token_experts_stay_dense_or_fall_back_to_magnitude():
    model = build_tiny_model("gpt_oss")
    with torch.no_grad():
        moe_layers(model)[0].router.bias[5] = -1e4
    ids = random_ids(model, n=8)
    dense_rule = clone(model)
    report = prune(dense_rule, StunRecipe(expert_sparsity=0.0, sparsity=0.5), calibration=ids, progress=False)
    assert report.low_token_experts == {0: [5]}
    w = moe_layers(dense_rule)[0].expert_matrices()["gate_up_proj"]
    assert int((w[5] == 0).sum()) == 0 and int((w[4] == 0).sum()) > 0
    magnitude_rule = clone(model)
    prune(
        magnitude_rule,
        StunRecipe(expert_sparsity=0.0, sparsity=0.5, low_token_rule="magnitude"),
        calibration=ids,
        progress=False,
    )
    w = moe_layers(magnitude_rule)[0].expert_matrices()["gate_up_proj"]
    assert torch.equal(
        w[5] != 0, mask_from_scores(moe_layers(model)[0].expert_matrices()["gate_up_proj"][5].abs(), 0.5)
    )
    for p in magnitude_rule.parameters():
        assert torch.isfinite(p).all()


def test_bad_sparsity_and_patterns_are_refused():
    with pytest.raises(InvalidSparsityError, match=r"\[0, 1\)"):
        StunRecipe(sparsity=1.0)
    with pytest.raises(InvalidSparsityError):
        StunRecipe(expert_sparsity=-0.1)
    with pytest.raises(InvalidSparsityError, match="N:M"):
        StunRecipe(pattern="4:2")
    model = build_tiny_model("mixtral", intermediate_size=30)  # down_proj has 30 inputs
    with pytest.raises(InvalidSparsityError, match="divisible by 4"):
        prune(model, StunRecipe(pattern="2:4"), calibration=random_ids(model), progress=False)
    assert moe_layers(model)[0].num_experts == 8  # nothing was done


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_dense_linears_stay_dense_unless_asked(family):
    ids = None
    for prune_dense in (False, True):
        model = build_tiny_model(family)
        ids = random_ids(model, n=8) if ids is None else ids
        prune(
            model,
            StunRecipe(expert_sparsity=0.0, sparsity=0.5, prune_dense=prune_dense),
            calibration=ids,
            progress=False,
        )
        attn = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "self_attn" in n]
        shared = [
            m.weight
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "shared_expert" in n and "gate" not in n.split(".")[-1]
        ]
        zeros = [float((w == 0).float().mean()) for w in attn + shared]
        assert attn and shared
        if prune_dense:  # per-row rounding: within half a weight per row
            assert all(abs(z - 0.5) <= 0.5 / w.shape[1] for z, w in zip(zeros, attn + shared)), zeros
        else:
            assert all(z == 0 for z in zeros)
        assert float((model.lm_head.weight == 0).float().mean()) == 0


def test_expert_masks_are_held_at_one_bit_per_weight_and_round_trip():
    from stun_lightning.expert_masks import ExpertMasks

    gen = torch.Generator().manual_seed(0)
    up, down = torch.rand(3, 10, 8, generator=gen) > 0.4, torch.rand(3, 8, 5, generator=gen) > 0.6
    masks = ExpertMasks({"0.gate_up_proj": up})
    masks.set(0, "down_proj", down)
    assert masks.nbytes == (up.numel() + 7) // 8 + (down.numel() + 7) // 8
    assert torch.equal(masks.get(0, "gate_up_proj"), up) and torch.equal(masks.get(0, "down_proj"), down)
    assert abs(masks.sparsity() - (1 - (up.sum() + down.sum()).item() / (up.numel() + down.numel()))) < 1e-12
    again = ExpertMasks.from_state_dict(masks.state_dict())
    assert again.equal(masks) and not again.equal(ExpertMasks({"0.gate_up_proj": up}))
    # a parameter's view: its layout (transposed here), cached until the mask is replaced
    param = torch.nn.Parameter(torch.ones(3, 8, 10))
    view = masks.local(0, "gate_up_proj", param, transposed=True)
    assert torch.equal(view, up.transpose(1, 2)) and masks.local(0, "gate_up_proj", param, transposed=True) is view
    masks.set(0, "gate_up_proj", ~up)
    assert torch.equal(masks.local(0, "gate_up_proj", param, transposed=True), (~up).transpose(1, 2))


def test_whole_layer_allocation_gives_layers_that_lost_experts_fewer_pruned_weights():
    from stun_lightning.patterns import whole_layer_allocation

    kept_experts, original = {0: 3, 1: 7, 2: 8}, {0: 8, 1: 8, 2: 8}
    kept_sizes = {i: 100 * n for i, n in kept_experts.items()}
    within = 0.6
    s = whole_layer_allocation(kept_sizes, kept_experts, original, within)
    # the kept-weighted mean is the recipe's within-expert budget
    assert sum(s[i] * kept_sizes[i] for i in s) / sum(kept_sizes.values()) == pytest.approx(within)
    # every layer ends at the same sparsity over its original experts (removed ones count as pruned)
    totals = [1 - (1 - s[i]) * kept_experts[i] / original[i] for i in s]
    assert max(totals) - min(totals) < 1e-9
    assert s[0] < s[1] < s[2]
    # equal expert counts: the usual allocations
    same = {i: 8 for i in kept_experts}
    assert all(
        v == pytest.approx(within) for v in whole_layer_allocation({i: 800 for i in same}, same, same, within).values()
    )
    ratios = {0: 0.02, 1: 0.05, 2: 0.03}
    owl = whole_layer_allocation({i: 800 for i in same}, same, same, within, ratios)
    assert owl == pytest.approx(owl_allocation(ratios, {i: 800 for i in same}, within))


def test_prune_with_a_global_expert_budget_allocates_over_whole_layers_when_asked():
    model = build_tiny_model("qwen3_moe", num_hidden_layers=4, seed=2)
    ids = random_ids(model, n=8)
    recipe = dict(
        expert_method="frequency",
        expert_sparsity=0.25,
        layer_budget="global",
        total_sparsity=0.7,
        metric="wanda",
        low_token_rule="magnitude",
    )
    report = prune(clone(model), StunRecipe(**recipe, allocation_base="layer"), calibration=ids, progress=False)
    kept = report.experts_after
    assert len(set(kept.values())) > 1  # the global budget left unequal expert counts
    assert report.expert_param_sparsity == pytest.approx(0.7, abs=0.01)
    fewest, most = min(kept, key=kept.get), max(kept, key=kept.get)
    assert report.layer_target_sparsity[fewest] < report.layer_target_sparsity[most]
    baseline = prune(clone(model), StunRecipe(**recipe), calibration=ids, progress=False)
    assert (
        len(set(round(v, 6) for v in baseline.layer_target_sparsity.values())) == 1
    )  # "kept": one within-expert target
    with pytest.raises(ValueError, match="allocation_base='layer'"):
        StunRecipe(pattern="2:4", allocation_base="layer")


def test_masks_during_training_follow_the_whole_layer_allocation():
    from stun_lightning.unstructured import compute_masks
    from stun_lightning.structured import apply_expert_sets

    model = build_tiny_model("mixtral", num_hidden_layers=2, seed=1)
    original = {layer.index: layer.num_experts for layer in moe_layers(model)}
    apply_expert_sets(model, {0: [0, 1, 2], 1: list(range(original[1] - 1))})
    update = compute_masks(
        model, 0.5, StunRecipe(metric="magnitude", allocation_base="layer"), original_experts=original
    )
    assert update.layer_targets[0] < 0.5 < update.layer_targets[1]
    kept = {layer.index: sum(w.numel() for w in layer.expert_matrices().values()) for layer in moe_layers(model)}
    assert sum(update.layer_targets[i] * kept[i] for i in kept) / sum(kept.values()) == pytest.approx(0.5)
    assert 1 - update.masks.sparsity() == pytest.approx(0.5, abs=0.02)
    with pytest.raises(ValueError, match="original_experts"):
        compute_masks(model, 0.5, StunRecipe(metric="magnitude", allocation_base="layer"))
