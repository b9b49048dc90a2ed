"""``expert_sparsity: "auto"``: the split between expert removal and masking chosen per layer."""

import copy

import pytest
import torch

from stun_lightning import StunRecipe, calibrate, moe_layers, prune
from stun_lightning.split import candidate_removals, choose_split
from stun_lightning.structured import min_keep_per_layer
from stun_lightning.tiny import build_tiny_model

from conftest import DUPLICATES, model_with_duplicates, plant_duplicates, random_ids


def auto(total=0.5, **kwargs):
    return StunRecipe(
        **{"expert_sparsity": "auto", "total_sparsity": total, "expert_method": "frequency", "batch_size": 4, **kwargs}
    )


def block_error(total=0.5, **kwargs):
    return auto(total, split_criterion="block_error", **kwargs)


@pytest.mark.parametrize("criterion", ["model_loss", "block_error"])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
@pytest.mark.parametrize("total", [0.5, 0.8])
def test_auto_meets_the_total_over_expert_parameters_exactly(family, total, criterion):
    model = build_tiny_model(family, seed=1)
    ids = random_ids(model, n=8, length=32)
    report = prune(model, auto(total, split_criterion=criterion), calibration=ids, progress=False)
    assert report.expert_param_sparsity == pytest.approx(total, abs=5e-3)  # mask rounding per row of tiny matrices
    split = report.expert_split
    for layer in moe_layers(model):  # every layer meets the total with its chosen split
        i = layer.index
        assert layer.num_experts == report.experts_before[i] - split["removed"][i]
        assert report.layer_sparsity[i] == pytest.approx(total, abs=5e-3)  # per-matrix rounding on tiny matrices
        within = 1 - (1 - total) * report.experts_before[i] / layer.num_experts
        assert (
            split["within"][i] == pytest.approx(within, abs=1e-6) == report.layer_target_sparsity[i]
        )  # what the curve and the masks used
        if criterion == "block_error":
            assert split["removed"][i] == min(split["errors"][i], key=split["errors"][i].get)


def test_auto_removes_no_expert_when_every_expert_is_distinct_and_needed():
    model = build_tiny_model("mixtral", seed=3, num_experts_per_tok=1)  # random, distinct experts; one per token
    ids = random_ids(model, n=8, length=32)
    report = prune(model, block_error(0.5), calibration=ids, progress=False)
    assert report.removed_experts == {}
    assert set(report.expert_split["removed"].values()) == {0}
    for curve in report.expert_split["errors"].values():  # removal was tried, and cost more
        assert len(curve) == 5 and all(curve[r] > curve[0] for r in curve if r)


def test_auto_removes_the_planted_duplicates_first():
    model = model_with_duplicates("mixtral", top_k=1)
    ids = random_ids(model, n=8, length=32)
    report = prune(model, block_error(0.5, expert_method="stun"), calibration=ids, progress=False)
    assert set(report.removed_experts) == {layer.index for layer in moe_layers(model)}
    for i, removed in report.removed_experts.items():  # one copy of each pair, nothing else
        assert len(removed) == len(DUPLICATES) and all((c in removed) != (s in removed) for c, s in DUPLICATES.items())
        curve = report.expert_split["errors"][i]
        assert curve[2] < curve[0] and curve[2] < curve[3]
        assert report.expert_split["within"][i] == pytest.approx(1 - 0.5 * 8 / 6, abs=1e-6)  # survivors masked less


def test_error_curve_is_the_block_error_of_the_pruned_layer():
    """The r=0 point equals the relative block-output error prune() really gets at that target."""
    model = build_tiny_model("qwen2_moe", seed=2)
    ids = random_ids(model, n=4, length=32)
    dense = copy.deepcopy(model)
    recipe = block_error(0.6)
    plan = choose_split(model, recipe, ids, min_keep=min_keep_per_layer(model, recipe))
    prune(model, StunRecipe(expert_sparsity=0.0, total_sparsity=0.6, sequential=False), calibration=ids, progress=False)
    io = calibrate(dense, ids, collect=(), keep_block_io=10**6, progress=False)
    for layer in moe_layers(model):
        x, z = torch.cat(io[layer.index].block_inputs), torch.cat(io[layer.index].block_outputs)
        with torch.no_grad():
            y = layer.block(x[None]).reshape(z.shape)
        expected = float((y.double() - z.double()).pow(2).sum() / z.double().pow(2).sum())
        assert plan.errors[layer.index][0] == pytest.approx(expected, rel=1e-4)


def test_candidates_respect_top_k_and_expert_groups():
    assert candidate_removals(8, min_keep=2) == {0.0: 0, 0.125: 1, 0.25: 2, 0.375: 3, 0.5: 4}
    assert candidate_removals(8, min_keep=6) == {0.0: 0, 0.125: 1, 0.25: 2}
    # 16 experts in 4 groups, top-4 over 2 groups: multiples of 4, every group keeps >= 2
    assert set(candidate_removals(16, min_keep=4, n_group=4, topk_group=2, top_k=4).values()) == {0, 4, 8}
    assert set(candidate_removals(8, min_keep=2, n_group=4, topk_group=1, top_k=2).values()) == {
        0
    }  # groups of 2 stay whole
    model = build_tiny_model("deepseek_v3", seed=1)
    n_group = model.config.n_group
    report = prune(model, block_error(0.8), calibration=random_ids(model, n=8, length=32), progress=False)
    for i, curve in report.expert_split["errors"].items():
        assert all(r % n_group == 0 for r in curve) and len(curve) > 1
        assert all((report.experts_before[i] - r) // n_group >= 2 for r in curve)


def test_auto_refuses_a_recipe_without_a_total_or_with_n_m():
    with pytest.raises(ValueError, match="set total_sparsity"):
        StunRecipe(expert_sparsity="auto")
    with pytest.raises(ValueError, match="pattern='unstructured'"):
        StunRecipe(expert_sparsity="auto", total_sparsity=0.5, pattern="2:4")
    with pytest.raises(ValueError, match="'auto'"):
        StunRecipe(expert_sparsity="half")
    with pytest.raises(ValueError, match="changes weights"):
        StunRecipe(expert_sparsity="auto", total_sparsity=0.5, expert_method="eep")


def test_cli_prints_the_chosen_split(tmp_path, capsys):
    from stun_lightning.cli import main

    rc = main(
        [
            "prune",
            "--expert-sparsity",
            "auto",
            "--total-sparsity",
            "0.7",
            "--expert-method",
            "frequency",
            "--calibration-samples",
            "4",
            "--calibration-seq-len",
            "32",
            "--eval-tokens",
            "0",
            "--quiet",
            "--device",
            "cpu",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "auto split: experts removed per layer" in out
    assert main(["prune", "--expert-sparsity", "auto", "--pattern", "2:4", "--eval-tokens", "0", "--quiet"]) == 2
    assert "set total_sparsity" in capsys.readouterr().err
    assert main(["prune", "--split-groups", "0", "--eval-tokens", "0", "--quiet"]) == 2
    assert "split_groups=0" in capsys.readouterr().err
    from stun_lightning.cli import build_parser
    from stun_lightning.cli_prune import recipe_from_args

    args = build_parser().parse_args(["prune", "--split-groups", "1"])
    assert recipe_from_args(args).split_groups == 1 and StunRecipe().split_groups == 4


@pytest.mark.parametrize("criterion", ["block_error", "model_loss"])
def test_callback_and_prune_choose_the_same_split(criterion):
    from test_callbacks import make_trainer, module

    from stun_lightning.callbacks import SparsitySchedule, StunCallback, StunDataModule

    data = StunDataModule(seq_len=32, batch_size=2, max_train_blocks=4, max_val_blocks=1, seed=0)
    data.setup()
    mod = module()
    plant_duplicates(mod.student)  # so that auto removes experts
    dense = copy.deepcopy(mod.student)
    ids = random_ids(dense, n=8, length=32)
    recipe = auto(0.7, expert_method="stun", metric="magnitude", split_criterion=criterion)
    stun = StunCallback(recipe, SparsitySchedule("one_shot", start_step=0), calibration=ids)
    make_trainer(max_steps=1, callbacks=[stun]).fit(mod, data)
    report = prune(dense, recipe, calibration=ids, progress=False)
    assert stun.report.expert_split == report.expert_split and stun.report.removed_experts == report.removed_experts
    assert (report.removed_experts or criterion == "model_loss") and stun.report.experts_after == report.experts_after
    assert stun.layer_targets == pytest.approx(report.layer_target_sparsity)
    assert stun.report.expert_param_sparsity == pytest.approx(report.expert_param_sparsity)


# ---------------------------------------------------------------- split_criterion="model_loss"

from stun_lightning.evaluate import block_nll  # noqa: E402
from stun_lightning.split import held_out_blocks  # noqa: E402


def successor_blocks(n=16, length=32, vocab=64, seed=0):
    """Token blocks that follow one fixed random successor per token (learnable in a few steps)."""
    gen = torch.Generator().manual_seed(seed)
    successor = torch.randperm(vocab, generator=gen)
    blocks = torch.empty(n, length, dtype=torch.long)
    blocks[:, 0] = torch.randint(0, vocab, (n,), generator=gen)
    for t in range(1, length):
        blocks[:, t] = successor[blocks[:, t - 1]]
    return blocks


@pytest.fixture(scope="module")
def trained():
    """(tiny top-1 model trained on successor_blocks, its blocks): every expert carries what its tokens need."""
    torch.manual_seed(0)
    model = build_tiny_model("mixtral", seed=0, num_experts_per_tok=1, vocab_size=128)
    ids = successor_blocks()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert loss.item() < 0.5  # it learned the successors
    return model, ids


def chosen_fraction(split):
    return next(f for f, counts in split["candidates"].items() if counts == split["removed"])


def test_model_loss_chooses_the_candidate_of_least_held_out_loss(trained):
    model, ids = trained
    model = plant_duplicates(
        copy.deepcopy(model)
    )  # removing the copies costs nothing; survivors then lose less to masking
    report = prune(model, auto(0.8, expert_method="stun"), calibration=ids, progress=False)
    split = report.expert_split
    losses = split["losses"]
    assert len(set(losses.values())) > 1
    assert chosen_fraction(split) == min(losses, key=lambda f: (losses[f], sum(split["candidates"][f].values())))
    assert split["removed"] == {0: 2, 1: 2} and all(sorted(r) == [1, 4] for r in report.removed_experts.values())
    assert report.experts_after == {i: 8 - 2 for i in report.experts_after}
    tried = list(losses.values())  # the early stop: every candidate, unless the last two losses each rose
    rising = [k for k in range(2, len(tried)) if tried[k - 2] < tried[k - 1] < tried[k]]
    assert rising in ([], [len(tried) - 1]) and (len(tried) == 5 or rising == [len(tried) - 1])


def test_model_loss_of_a_candidate_is_the_held_out_nll_of_that_prune(trained):
    model, ids = trained
    model = copy.deepcopy(model)
    with torch.no_grad():  # uneven routing: expert 0's router row dominates
        for layer in moe_layers(model):
            layer.router_weight[0] *= 3.0
    recipe = auto(0.7, allocation="owl", metric="wanda")
    dense = copy.deepcopy(model)
    report = prune(model, recipe, calibration=ids, progress=False)
    counts = report.expert_split["candidates"][0.25]
    assert set(counts.values()) == {2}
    statistics, held_out = ids[:-2], ids[-2:]  # the last 1/8 of 16 blocks
    fixed = StunRecipe(
        expert_sparsity=0.25,
        layer_budget="uniform",
        expert_method="frequency",
        total_sparsity=0.7,
        allocation="owl",
        metric="wanda",
        allocation_base="layer",
        batch_size=4,
    )
    prune(dense, fixed, calibration=statistics, progress=False)
    with torch.no_grad():
        logits = dense(input_ids=held_out).logits[:, :-1]
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), held_out[:, 1:].flatten()).item()
    assert report.expert_split["losses"][0.25] == pytest.approx(expected, abs=1e-6)  # the report rounds to 6 places
    assert report.expert_split["held_out_blocks"] == 2


def test_model_loss_removes_no_expert_at_a_low_target_where_removal_hurts(trained):
    model, ids = trained
    report = prune(copy.deepcopy(model), auto(0.3), calibration=ids, progress=False)
    assert report.expert_split["removed"] == {0: 0, 1: 0} and report.removed_experts == {}
    losses = report.expert_split["losses"]
    assert len(losses) > 1 and all(losses[f] > losses[0.0] for f in losses if f)  # removal was tried, and cost more
    moves = report.expert_split["moves"]  # split_groups=4 (two groups here): each layer's removal tried, none kept
    assert [m["removed"] for m in moves] == [{0: 1, 1: 0}, {0: 0, 1: 1}] and not any(m["accepted"] for m in moves)


def test_model_loss_refuses_too_few_blocks_and_bad_options():
    model = build_tiny_model("mixtral", seed=1)
    with pytest.raises(ValueError, match="holds out 1 of 1 calibration blocks"):
        prune(model, auto(0.5), calibration=random_ids(model, n=1, length=32), progress=False)
    with pytest.raises(ValueError, match="split_criterion='loss' is not one of"):
        auto(0.5, split_criterion="loss")
    with pytest.raises(ValueError, match="split_held_out=1.0"):
        auto(0.5, split_held_out=1.0)
    with pytest.raises(ValueError, match="split_groups=0"):
        auto(0.5, split_groups=0)
    with pytest.raises(ValueError, match="split_margin=-1"):
        auto(0.5, split_margin=-1)
    from stun_lightning.recipe import SPLIT_CRITERIA
    from stun_lightning.split import CRITERIA

    assert set(CRITERIA) == set(SPLIT_CRITERIA)
    statistics, held = held_out_blocks(torch.zeros(9, 4), 0.125)
    assert statistics.shape[0] == 8 and held.shape[0] == 1
    assert block_nll(model, random_ids(model, n=2, length=8)) > 0


# ---------------------------------------------------------------- split_groups: non-uniform refinement

from stun_lightning.split import beats_margin, layer_groups, refine_counts  # noqa: E402


def with_layer0_duplicates(model):
    """``model`` with experts 1 and 4 of its first MoE layer exact copies of experts 0 and 3 (the
    second layer left distinct): removal is free in one layer only."""
    first = moe_layers(model)[0]
    with torch.no_grad():
        for copy_, source in DUPLICATES.items():
            for _, p in first.expert_parameters():
                p[copy_] = p[source]
            first.router_weight[copy_] = first.router_weight[source]
    return model


def test_refinement_moves_one_group_and_meets_the_total_exactly(trained):
    model, ids = trained
    model = with_layer0_duplicates(copy.deepcopy(model))
    uniform = prune(
        copy.deepcopy(model), auto(0.7, expert_method="stun", split_groups=1), calibration=ids, progress=False
    )
    report = prune(model, auto(0.7, expert_method="stun"), calibration=ids, progress=False)
    split = report.expert_split
    assert uniform.expert_split["removed"] == {0: 0, 1: 0} == split["candidates"][split["uniform"]]  # uniform: none
    assert split["removed"] == {0: 1, 1: 0}  # refined: a copy out of the layer with copies only
    assert split["removed"] not in split["candidates"].values()  # no uniform candidate is this
    (accepted,) = [m for m in split["moves"] if m["accepted"]]
    assert accepted["removed"] == split["removed"] and accepted["gain"] > 2.0 * accepted["se"] > 0
    assert report.experts_after == {0: 7, 1: 8} and report.removed_experts[0][0] in set(DUPLICATES) | set(
        DUPLICATES.values()
    )
    assert report.expert_param_sparsity == pytest.approx(0.7, abs=5e-3)  # mask rounding of tiny matrices
    for i, kept in report.experts_after.items():  # each layer re-solved for its own count
        assert split["within"][i] == pytest.approx(1 - 0.3 * 8 / kept, abs=1e-6) == report.layer_target_sparsity[i]
        assert report.layer_sparsity[i] == pytest.approx(0.7, abs=5e-3)
    assert len(split["moves"]) <= 2 * 2  # two groups (two MoE layers), at most one step up and one down each


def test_split_groups_1_is_the_uniform_choice_and_an_unbeatable_margin_changes_nothing(trained):
    model, ids = trained
    model = with_layer0_duplicates(copy.deepcopy(model))
    one = copy.deepcopy(model)
    r1 = prune(one, auto(0.7, expert_method="stun", split_groups=1), calibration=ids, progress=False)
    assert (
        r1.expert_split["moves"] == []
        and r1.expert_split["removed"] == r1.expert_split["candidates"][r1.expert_split["uniform"]]
    )
    strict = copy.deepcopy(model)
    r4 = prune(strict, auto(0.7, expert_method="stun", split_margin=1e9), calibration=ids, progress=False)
    assert r4.expert_split["moves"] and not any(m["accepted"] for m in r4.expert_split["moves"])
    assert r4.expert_split["removed"] == r1.expert_split["removed"]
    a, b = one.state_dict(), strict.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Losses:
    def __init__(self, per_block):
        self.block_losses = torch.tensor(per_block, dtype=torch.float64)
        self.loss = float(self.block_losses.mean())


@pytest.mark.parametrize("margin, chosen", [(2.0, 0.0), (0.0, 0.125)])
def test_uniform_choice_takes_more_removals_only_past_the_margin(margin, chosen, monkeypatch):
    """Fractions rise from 0: 1/8 lowers the mean held-out loss by a noisy 0.005 (inside 2 paired SE),
    1/4 and 3/8 are worse (the search stops there). With the margin the zero-removal candidate stays;
    at margin 0 the least loss (1/8) wins, as before the margin."""
    from types import SimpleNamespace

    from stun_lightning.split import model_loss
    from stun_lightning.split.candidate import Scored

    model = build_tiny_model("mixtral")
    base = [1.0, 1.2, 0.8, 1.0]
    noisy_gain = [0.03, -0.02, 0.025, -0.015]
    by_removed = {0: base, 2: [b - g for b, g in zip(base, noisy_gain)], 4: [b + 0.1 for b in base]}

    def fake_score(model, recipe, selection, statistics, held_out, device=None):
        removed = sum(8 - len(kept) for kept in selection.keep.values())
        per_block = torch.tensor(by_removed.get(removed, [b + 0.2 for b in base]), dtype=torch.float64)
        return Scored(per_block, float(per_block.mean()), 0, SimpleNamespace(keep=selection.keep))

    monkeypatch.setattr(model_loss, "score_candidate", fake_score)
    ids = random_ids(model, n=8)
    recipe = auto(0.6, expert_method="frequency", split_groups=1, split_margin=margin, split_held_out=0.5).validate()
    plan = model_loss.choose_split_by_loss(model, recipe, ids, min_keep=min_keep_per_layer(model, recipe))
    assert plan.uniform == chosen and list(plan.losses) == [0.0, 0.125, 0.25, 0.375]  # stopped: rose twice
    assert model_loss.removes_more_for_less(torch.tensor(base), torch.tensor(by_removed[2]), 0.0)
    assert not model_loss.removes_more_for_less(torch.tensor(base), torch.tensor(by_removed[2]), 2.0)


def test_refinement_never_accepts_a_move_whose_gain_is_inside_the_margin():
    current = Losses([1.0, 1.2, 0.8, 1.0])
    noisy_gain = [0.03, -0.02, 0.025, -0.015]  # mean 0.005, paired SE 0.0125: inside 2 SE
    steady_gain = [0.010, 0.011, 0.009, 0.010]  # mean 0.01, paired SE 0.0004: far outside
    by_counts = {  # (layer 0, layer 1) removals -> per-block losses
        (1, 0): [c - g for c, g in zip(current.block_losses.tolist(), noisy_gain)],
        (0, 1): [c - g for c, g in zip(current.block_losses.tolist(), steady_gain)],
    }
    calls = []

    def score(counts):
        calls.append(dict(counts))
        worse = [c + 0.1 for c in current.block_losses.tolist()]
        return Losses(by_counts.get((counts[0], counts[1]), worse))

    options = {0: [0, 1, 2], 1: [0, 1, 2]}
    counts, chosen, moves = refine_counts({0: 0, 1: 0}, options, [[0], [1]], score, current, 2.0)
    assert counts == {0: 0, 1: 1} and chosen.block_losses.tolist() == by_counts[0, 1]
    assert [(m["removed"], m["accepted"]) for m in moves] == [({0: 1, 1: 0}, False), ({0: 0, 1: 1}, True)]
    assert calls == [{0: 1, 1: 0}, {0: 0, 1: 1}]  # nothing below 0 removals to try
    counts, _, moves = refine_counts({0: 0, 1: 0}, options, [[0], [1]], score, current, 0.0)
    assert counts == {0: 1, 1: 0} and moves[0]["accepted"]  # any gain counts at margin 0 ...
    assert [m["removed"] for m in moves] == [{0: 1, 1: 0}, {0: 1, 1: 1}] and not moves[1]["accepted"]  # worse
    assert not beats_margin(0.02, 0.01, 2.0) and beats_margin(0.0201, 0.01, 2.0) and not beats_margin(-1.0, 0.0, 0.0)
    assert not beats_margin(0.5, float("inf"), 2.0)  # one held-out block: no error estimate, no move
    assert layer_groups([3, 5, 7, 9, 11], 2) == [[3, 5, 7], [9, 11]] and layer_groups([3, 5], 4) == [[3], [5]]


def test_prune_applies_exactly_the_candidate_it_scored(trained, monkeypatch):
    """The pruned model's tensors equal the scored trial copy's, masks included (Wanda: masks
    calibrated on every block would differ from the candidate's)."""
    import stun_lightning.split as split_pkg
    from stun_lightning.split import candidate as cand_mod

    model, ids = trained
    model = with_layer0_duplicates(copy.deepcopy(model))
    trials, plans = [], []
    real_losses, real_choose = cand_mod.block_losses, split_pkg.choose_split

    def record_trial(trial, *args):
        trials.append({k: v.clone() for k, v in trial.state_dict().items()})
        return real_losses(trial, *args)

    def record_plan(*args, **kwargs):
        plans.append(real_choose(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(cand_mod, "block_losses", record_trial)
    monkeypatch.setattr(split_pkg, "choose_split", record_plan)
    scored = []
    real_score = cand_mod.score_candidate
    from stun_lightning.split import model_loss

    monkeypatch.setattr(model_loss, "score_candidate", lambda *a, **k: scored.append(real_score(*a, **k)) or scored[-1])
    report = prune(
        model, auto(0.7, expert_method="stun", metric="wanda", allocation="owl"), calibration=ids, progress=False
    )
    assert len(trials) == len(scored) <= 5 + 2 * 2  # bounded: uniform fractions + two moves per group
    (k,) = [n for n, s in enumerate(scored) if s.candidate is plans[0].candidate]
    got = model.state_dict()
    assert got.keys() == trials[k].keys() and all(torch.equal(got[n], trials[k][n]) for n in got)
    assert report.removed_experts and report.layer_target_sparsity == plans[0].candidate.layer_targets


# ---------------------------------------------------------------- layer_budget="error_curve"

from stun_lightning.split import allocate_removals  # noqa: E402


def test_allocation_meets_the_count_exactly_and_puts_removals_where_they_cost_least():
    cheap, dear = {0: 0.1, 2: 0.15, 4: 0.3}, {0: 0.1, 2: 0.5, 4: 0.9}
    assert allocate_removals({0: cheap, 1: dear}, 4) == {0: 4, 1: 0}
    assert allocate_removals({0: dear, 1: cheap}, 3) == {0: 0, 1: 3}  # interpolated between measured counts
    assert allocate_removals({0: cheap, 1: dear}, 6) == {0: 4, 1: 2}
    assert allocate_removals({0: cheap, 1: dear}, 4, step=2) == {0: 4, 1: 0}
    with pytest.raises(ValueError, match="at most 8 removals"):
        allocate_removals({0: cheap, 1: dear}, 10)


def test_error_curve_budget_takes_experts_from_the_layer_with_duplicates():
    model = build_tiny_model("mixtral", seed=0, num_experts_per_tok=1)
    first = moe_layers(model)[0]
    with torch.no_grad():  # experts 1 and 4 of layer 0 only copy experts 0 and 3
        for copy_, source in DUPLICATES.items():
            for _, p in first.expert_parameters():
                p[copy_] = p[source]
            first.router_weight[copy_] = first.router_weight[source]
    ids = random_ids(model, n=8, length=32)
    recipe = StunRecipe(expert_sparsity=0.125, layer_budget="error_curve", expert_method="stun", batch_size=4)
    report = prune(model, recipe, calibration=ids, progress=False)
    assert report.expert_split["removed"] == {0: 2, 1: 0}
    assert sorted(report.removed_experts) == [0] and len(report.removed_experts[0]) == 2
    uniform = prune(
        build_tiny_model("mixtral", seed=0, num_experts_per_tok=1),
        StunRecipe(expert_sparsity=0.125, layer_budget="uniform"),
        calibration=ids,
        progress=False,
    )
    assert uniform.experts_after == {0: 7, 1: 7}


@pytest.mark.parametrize("family, top_k", [("deepseek_v3", None), ("mixtral", 6)])
def test_error_curve_budgets_respect_top_k_and_expert_groups(family, top_k):
    model = build_tiny_model(family, seed=1, **({"num_experts_per_tok": top_k} if top_k else {}))
    ids = random_ids(model, n=8, length=32)
    before = {layer.index: layer.num_experts for layer in moe_layers(model)}
    report = prune(
        model,
        StunRecipe(expert_sparsity=0.25, layer_budget="error_curve", expert_method="frequency", batch_size=4),
        calibration=ids,
        progress=False,
    )
    n_group = getattr(model.config, "n_group", 1) or 1
    assert sum(before.values()) - sum(report.experts_after.values()) == round(sum(before.values()) * 0.25)
    for layer in moe_layers(model):
        assert layer.num_experts >= layer.top_k and layer.num_experts % n_group == 0
        if n_group > 1:
            assert layer.num_experts // n_group >= 2  # the group score sums two experts
    if n_group > 1:
        assert len(set(report.experts_after.values())) > 1  # not uniform: the curves chose
    model(ids[:1])  # the pruned model runs


def test_error_curve_budget_refuses_more_than_its_curves_cover_before_any_work():
    from stun_lightning.surgery import InfeasiblePruningError

    model = build_tiny_model("mixtral", seed=1)
    with pytest.raises(InfeasiblePruningError, match="removes at most 8 experts"):
        prune(
            model,
            StunRecipe(expert_sparsity=0.625, layer_budget="error_curve", expert_method="frequency"),
            calibration=None,
            progress=False,
        )
