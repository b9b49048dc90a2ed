import pytest
import torch

from stun_lightning import StunRecipe, moe_layers, prune
from stun_lightning.methods.stun import expert_distances, greedy_clusters
from stun_lightning.tiny import build_tiny_model

from conftest import DUPLICATES, clone, logits, model_with_duplicates, random_ids, relative_change


def test_stun_removes_planted_duplicates_and_output_barely_moves():
    model = model_with_duplicates(top_k=1)
    ids = random_ids(model, n=8, length=32)
    dense = logits(model, ids)
    stun = clone(model)
    report = prune(stun, StunRecipe(expert_sparsity=0.25, layer_budget="uniform"), progress=False)
    for i, removed in report.removed_experts.items():
        assert len(removed) == 2
        # one of each duplicate pair went, never a unique expert
        assert all(e in DUPLICATES or e in DUPLICATES.values() for e in removed), removed
        assert len({DUPLICATES.get(e, e) for e in removed}) == 2
    stun_change = relative_change(logits(stun, ids), dense)
    random_changes = []
    for seed in range(4):
        rnd = clone(model)
        prune(
            rnd,
            StunRecipe(expert_sparsity=0.25, layer_budget="uniform", expert_method="random", seed=seed),
            progress=False,
        )
        random_changes.append(relative_change(logits(rnd, ids), dense))
    assert stun_change < 1e-3
    assert stun_change * 10 < min(random_changes)


def test_stun_with_top2_still_picks_the_duplicates_and_beats_random():
    model = model_with_duplicates(top_k=2)
    ids = random_ids(model, n=8, length=32)
    dense = logits(model, ids)
    stun = clone(model)
    report = prune(stun, StunRecipe(expert_sparsity=0.25, layer_budget="uniform"), progress=False)
    assert all({DUPLICATES.get(e, e) for e in r} == {0, 3} for r in report.removed_experts.values())
    stun_change = relative_change(logits(stun, ids), dense)
    rnd_changes = []
    for seed in range(4):
        rnd = clone(model)
        prune(
            rnd,
            StunRecipe(expert_sparsity=0.25, layer_budget="uniform", expert_method="random", seed=seed),
            progress=False,
        )
        rnd_changes.append(relative_change(logits(rnd, ids), dense))
    assert stun_change < sum(rnd_changes) / len(rnd_changes)


def test_global_threshold_hits_the_exact_total_and_layers_may_differ():
    model = build_tiny_model("qwen3_moe", num_experts=16, num_hidden_layers=4, seed=3)
    report = prune(model, StunRecipe(expert_sparsity=0.375), progress=False)
    assert sum(report.experts_after.values()) == 64 - 24
    assert all(n >= 2 for n in report.experts_after.values())
    assert "structured" not in report.layer_passes  # router distances: no forward pass


@pytest.mark.parametrize("num_experts", [8, 32])
def test_coactivation_costs_one_routing_pass_whatever_the_expert_count(num_experts):
    model = build_tiny_model("qwen3_moe", num_experts=num_experts, num_hidden_layers=2)
    report = prune(
        model,
        StunRecipe(expert_sparsity=0.25, distance="coactivation", layer_budget="uniform"),
        calibration=random_ids(model),
        progress=False,
    )
    assert report.layer_passes["structured"] == 2  # one pass = one forward of each decoder layer
    assert all(n == num_experts - num_experts // 4 for n in report.experts_after.values())


def test_greedy_clustering_follows_the_official_rule():
    # 0-1 close, 2 close to 1 but far from 0: with t=0.5 the pair (1,2) is rejected (0 is too far from 2)
    d = torch.tensor([[0, 0.1, 0.9, 5], [0.1, 0, 0.2, 5], [0.9, 0.2, 0, 5], [5, 5, 5, 0]], dtype=torch.float)
    d.fill_diagonal_(float("inf"))
    assert greedy_clusters(d, 0.5, 1) == [(0, 1), (2,), (3,)]
    assert greedy_clusters(d, 1.0, 1) == [(0, 1, 2), (3,)]
    assert greedy_clusters(d, 1.0, 3) == [(0, 1), (2,), (3,)]  # per-layer minimum stops merging


def test_router_distance_is_scaled_by_router_norm():
    w = torch.randn(6, 10)
    d = expert_distances(w)
    torch.testing.assert_close(d[0, 1], (w[0] - w[1]).norm() / w.norm())
    assert torch.isinf(torch.diagonal(d)).all()


def test_frequency_removes_unrouted_experts_and_random_is_seeded():
    model = build_tiny_model("gpt_oss")
    with torch.no_grad():
        for layer in moe_layers(model):
            layer.router.bias[[2, 6]] = -1e4
    ids = random_ids(model, n=8)
    freq = clone(model)
    report = prune(
        freq,
        StunRecipe(expert_sparsity=0.25, expert_method="frequency", layer_budget="uniform"),
        calibration=ids,
        progress=False,
    )
    assert all(r == [2, 6] for r in report.removed_experts.values())
    a = prune(clone(model), StunRecipe(expert_sparsity=0.25, expert_method="random", seed=1), progress=False)
    b = prune(clone(model), StunRecipe(expert_sparsity=0.25, expert_method="random", seed=1), progress=False)
    c = prune(clone(model), StunRecipe(expert_sparsity=0.25, expert_method="random", seed=2), progress=False)
    assert a.removed_experts == b.removed_experts != c.removed_experts


def test_each_cluster_keeps_the_member_nearest_its_mean():
    """Per layer, experts 2, 3, 4 share a router row (one cluster); in layer 0 the cluster's first
    member is the mean of the other two, in layer 1 its last. The test finds the nearest member
    itself (flattened expert weights) and checks it differs from the farthest."""
    model = build_tiny_model("mixtral", seed=5)
    cluster, survivor_slot = [2, 3, 4], {0: 0, 1: 2}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in moe_layers(model):
            w = layer.router_weight
            for e in cluster[1:]:
                w[e] = w[cluster[0]] + 1e-5 * torch.randn(w.shape[1], generator=gen)
            mid = cluster[survivor_slot[layer.index]]
            others = [e for e in cluster if e != mid]
            for _, p in layer.expert_parameters():
                p[mid] = p[others].mean(0) + 1e-3 * torch.randn(p[mid].shape, generator=gen)
    expected = {}
    for layer in moe_layers(model):
        flat = torch.cat([p.detach()[cluster].flatten(1) for _, p in layer.expert_parameters()], dim=1).double()
        dist = (flat - flat.mean(0)).norm(dim=1)
        nearest, farthest = cluster[int(dist.argmin())], cluster[int(dist.argmax())]
        assert nearest == cluster[survivor_slot[layer.index]] and nearest != farthest
        expected[layer.index] = (nearest, {name: p.detach()[nearest].clone() for name, p in layer.expert_parameters()})
    report = prune(model, StunRecipe(expert_sparsity=0.25, layer_budget="uniform"), progress=False)
    for layer in moe_layers(model):
        nearest, weights = expected[layer.index]
        assert sorted(report.removed_experts[layer.index]) == sorted(e for e in cluster if e != nearest)
        slot = [e for e in range(8) if e not in report.removed_experts[layer.index]].index(nearest)
        for name, p in layer.expert_parameters():
            assert torch.equal(p.detach()[slot], weights[name])  # the survivor itself, not an average


def test_expert_weight_cosine_is_the_mean_pairwise_cosine_of_the_flattened_experts():
    from stun_lightning.methods.stun import expert_weight_cosine

    model = build_tiny_model("mixtral", seed=0)
    layer = moe_layers(model)[0]
    mats = layer.expert_matrices()
    flat = torch.cat([m.detach().flatten(1) for m in mats.values()], dim=1)
    n = flat.shape[0]
    expected = torch.stack(
        [torch.nn.functional.cosine_similarity(flat[i], flat[j], dim=0) for i in range(n) for j in range(i + 1, n)]
    ).mean()
    assert abs(expert_weight_cosine(layer) - float(expected)) < 1e-5

    # every expert a positive multiple of expert 0: cosine 1 whatever the scales (a dot product would not be)
    with torch.no_grad():
        for name, p in (("gate_up_proj", layer.experts.gate_up_proj), ("down_proj", layer.experts.down_proj)):
            for e in range(1, n):
                p[e] = p[0] * (e + 1) * 10.0
    assert abs(expert_weight_cosine(layer) - 1.0) < 1e-6
    # expert 1 the negation of expert 0: that pair counts -1
    with torch.no_grad():
        for p in (layer.experts.gate_up_proj, layer.experts.down_proj):
            p[1] = -p[0]
    pairs = n * (n - 1) // 2
    assert abs(expert_weight_cosine(layer) - (pairs - 2 * (n - 2) - 2) / pairs) < 1e-6
