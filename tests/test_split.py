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
