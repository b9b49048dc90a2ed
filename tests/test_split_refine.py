"""``split_groups``: the non-uniform refinement of ``split_criterion="model_loss"``, the margin that
guards more removals, and ``prune()`` applying exactly the scored candidate."""

from __future__ import annotations

import copy

import pytest
import torch

from stun_lightning import moe_layers, prune
from stun_lightning.split import beats_margin, layer_groups, refine_counts
from stun_lightning.structured import min_keep_per_layer
from stun_lightning.tiny import build_tiny_model

from conftest import DUPLICATES, random_ids
from test_split import auto


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
        model,
        auto(0.7, expert_method="stun", metric="wanda", allocation="owl"),
        calibration=ids,
        progress=False,
    )
    assert len(trials) == len(scored) <= 5 + 2 * 2  # bounded: uniform fractions + two moves per group
    (k,) = [n for n, s in enumerate(scored) if s.candidate is plans[0].candidate]
    got = model.state_dict()
    assert got.keys() == trials[k].keys() and all(torch.equal(got[n], trials[k][n]) for n in got)
    # the choice may remove nothing (the margin decides); the masks must still be the candidate's own
    assert report.layer_target_sparsity == plans[0].candidate.layer_targets
