import pytest
import torch

from stun_lightning import StunRecipe, keep_experts, load_pruned, moe_layers, prune, save_pruned
from stun_lightning.methods.eep import Candidate, _Groups, eep_search, lm_fitness
from stun_lightning.tiny import build_tiny_model

from conftest import clone, logits, random_ids

DUPLICATES = {1: 0, 4: 3}  # expert 1 copies expert 0, expert 4 copies expert 3


def model_with_duplicates(layers=2, seed=0):
    model = build_tiny_model("mixtral", seed=seed, num_experts_per_tok=1, num_hidden_layers=layers)
    with torch.no_grad():
        for layer in moe_layers(model):
            for copy_, source in DUPLICATES.items():
                for _, p in layer.expert_parameters():
                    p[copy_] = p[source]
                layer.router_weight[copy_] = layer.router_weight[source]
    return model


def closeness_to(model, ids):
    """Fitness: minus the relative change of the logits from the unpruned model's."""
    dense = logits(model, ids)

    def fitness(m):
        return -float((logits(m, ids) - dense).norm() / dense.norm())

    return fitness


def search(model, fitness, **options):
    layers = moe_layers(model)
    result, _ = eep_search(model, layers, {layer.index: 6 for layer in layers}, fitness, **options)
    return result


def test_eep_improves_on_its_start_and_beats_random_search_at_equal_forward_passes():
    """Four layers in four groups: random one-hot subsets rarely drop one copy of each duplicate
    pair in every layer (p = (4/28)^4 per candidate); EEP's mutations walk there."""
    model = model_with_duplicates(layers=4)
    fitness = closeness_to(model, random_ids(model, n=4, length=16))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    eep = search(
        model,
        fitness,
        seed=0,
        max_init=4,
        prune_evaluations=10**4,
        total_evaluations=10**4,
        max_forward_passes=40,
        mutate_threshold=0.005,
    )
    random = search(model, fitness, seed=0, max_init=39, prune_evaluations=40, total_evaluations=40)  # inits only
    assert eep.forward_passes <= 40 and random.forward_passes == 40
    assert eep.best_fitness > eep.archive[0][1]
    assert eep.best_fitness > random.best_fitness
    assert eep.best_fitness > -1e-6  # one copy of each pair dropped in every layer: the output is unchanged
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the search leaves the model as it was


def test_eep_is_seeded_and_resumable(tmp_path):
    model = model_with_duplicates()
    fitness = closeness_to(model, random_ids(model, n=2, length=16))
    opts = dict(max_init=3, prune_evaluations=8, total_evaluations=20)
    whole = search(model, fitness, seed=1, **opts)
    again = search(model, fitness, seed=1, **opts)
    other = search(model, fitness, seed=2, **opts)
    history = [f for _, f in whole.archive]
    assert history == [f for _, f in again.archive] != [f for _, f in other.archive]
    state = tmp_path / "eep.pt"
    first = search(model, fitness, seed=1, state_path=str(state), **{**opts, "total_evaluations": 11})
    assert len(first.archive) == 11 and state.exists()
    resumed = search(model, fitness, seed=1, state_path=str(state), **opts)
    assert [f for _, f in resumed.archive] == history
    assert [c.key() for c, _ in resumed.archive] == [c.key() for c, _ in whole.archive]
    assert resumed.forward_passes == whole.forward_passes
    with pytest.raises(ValueError, match="belongs to another search"):
        search(model, fitness, seed=3, state_path=str(state), **opts)


def test_a_merged_candidate_becomes_real_expert_weights_that_save_and_load(tmp_path):
    """Non-one-hot M (true merges) and a T with a repeated router row, evaluated in place, then
    written into the model, sliced by the core's surgery, saved and loaded: identical logits."""
    model = build_tiny_model("gpt_oss", seed=2)  # expert and router biases merge alike
    ids = random_ids(model, n=2, length=16)
    layers = moe_layers(model)
    groups = _Groups(layers, {layer.index: 6 for layer in layers}, groups=4)
    gen = torch.Generator().manual_seed(0)
    M = [
        torch.eye(8, dtype=torch.float64)[[0, 2, 3, 5, 6, 7]]
        + 0.2 * torch.rand(6, 8, generator=gen, dtype=torch.float64)
        for _ in groups.layers
    ]
    T = [[0, 2, 2, 5, 7, 6], [1, 2, 3, 4, 5, 6]]
    cand = Candidate(M, T)
    with groups.installed(cand):
        expected = logits(model, ids)
    assert not torch.allclose(expected, logits(model, ids))  # restored afterwards
    keep = groups.apply(cand)
    assert keep[0] == [0, 1, 2, 5, 6, 7]  # the repeated router row 2 went to the first free slot, 1
    for index, kept in keep.items():
        keep_experts(model, index, kept)
    torch.testing.assert_close(logits(model, ids), expected)
    save_pruned(model, tmp_path / "eep")
    torch.testing.assert_close(logits(load_pruned(tmp_path / "eep"), ids), expected)


def test_eep_through_prune_with_the_default_loss_fitness_round_trips(tmp_path):
    model = build_tiny_model("qwen3_moe", seed=3)
    ids = random_ids(model, n=4, length=16)
    state = tmp_path / "search.pt"
    options = dict(max_init=3, prune_evaluations=6, total_evaluations=14, crossover_rank=2, state_path=str(state))
    pruned = clone(model)
    report = prune(
        pruned,
        StunRecipe(expert_sparsity=0.25, expert_method="eep", layer_budget="uniform", method_options=options),
        calibration=ids,
        progress=False,
    )
    assert all(len(r) == 2 for r in report.removed_experts.values())
    archive = torch.load(state, weights_only=False)["archive"]
    best = max(f for *_, f in archive)
    assert lm_fitness(ids, 8)(pruned) == pytest.approx(best, abs=1e-5)  # the saved model is the evaluated one
    save_pruned(pruned, tmp_path / "m")
    torch.testing.assert_close(logits(load_pruned(tmp_path / "m"), ids), logits(pruned, ids))


def test_bad_settings_fail_clearly():
    model = model_with_duplicates()
    fitness = closeness_to(model, random_ids(model, n=2, length=8))
    with pytest.raises(ValueError, match="max_init >= 0"):
        search(model, fitness, max_init=-1)
    with pytest.raises(ValueError, match="total_evaluations >= 1"):
        search(model, fitness, total_evaluations=0)
    with pytest.raises(ValueError, match="evaluated no candidate"):
        search(model, fitness, max_forward_passes=0)
    with pytest.raises(ValueError, match="finite"):
        search(model, lambda m: float("nan"), total_evaluations=2)
    with pytest.raises(ValueError, match="layer_budget='uniform'"):
        prune(
            model, StunRecipe(expert_sparsity=0.25, expert_method="eep"), calibration=random_ids(model), progress=False
        )
