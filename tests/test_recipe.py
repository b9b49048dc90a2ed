from pathlib import Path

import pytest

from stun_lightning import StunRecipe, prune
from stun_lightning.tiny import build_tiny_model

from conftest import random_ids

CONFIGS = sorted(p for p in (Path(__file__).parent.parent / "configs").glob("*.yaml") if not p.name.startswith("fit_"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_recipe_loads_and_prunes_a_tiny_model(path):
    recipe = StunRecipe.from_yaml(path)
    recipe.calibration_samples, recipe.calibration_seq_len = 4, 32
    family = (
        path.stem.replace("stun_", "")
        if path.stem.replace("stun_", "") in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss")
        else "mixtral"
    )
    model = build_tiny_model(family)
    report = prune(model, recipe, calibration=random_ids(model, n=4, length=32), progress=False)
    target = recipe.total_sparsity or (
        1 - (1 - recipe.expert_sparsity) * (1 - (0.5 if recipe.pattern == "2:4" else recipe.sparsity))
    )
    assert abs(report.expert_param_sparsity - target) < 0.06


def test_recipe_round_trips_through_yaml(tmp_path):
    recipe = StunRecipe(expert_sparsity=0.3, metric="moe_pruner", pattern="2:4")
    recipe.to_yaml(tmp_path / "r.yaml")
    assert StunRecipe.from_yaml(tmp_path / "r.yaml") == recipe


def test_unknown_fields_and_values_are_named():
    with pytest.raises(ValueError, match="unknown recipe fields"):
        StunRecipe.from_dict({"expert_sparsty": 0.2})
    with pytest.raises(ValueError, match="metric"):
        StunRecipe(metric="sparsegpt")


def test_method_options_a_method_does_not_read_are_refused_with_a_suggestion():
    with pytest.raises(ValueError, match=r"'max_subset' -> 'max_subsets'"):
        StunRecipe(expert_method="naee", layer_budget="uniform", method_options={"max_subset": 10})
    with pytest.raises(ValueError, match="not options of expert method 'frequency'.*reads: none"):
        StunRecipe(expert_method="frequency", method_options={"max_tokens": 10})
    with pytest.raises(ValueError, match="method_options"):
        StunRecipe.from_dict({"expert_method": "stun", "method_options": {"distanse": "router"}})
    # what each method reads passes
    StunRecipe(expert_method="stun", method_options={"distance": "router", "merge_max_clusters": 1})
    StunRecipe(
        expert_method="eep", layer_budget="uniform", method_options={"total_evaluations": 8, "fitness_ids": None}
    )


def test_prune_without_a_recipe_uses_the_recommended_auto_split():
    model = build_tiny_model("qwen3_moe")
    report = prune(model, calibration=random_ids(model, n=16, length=32), progress=False)
    assert report.recipe == StunRecipe.default().validate().to_dict()
    assert report.recipe["expert_sparsity"] == "auto" and report.expert_split
    assert abs(report.expert_param_sparsity - 0.55) < 0.03
