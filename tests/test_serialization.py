import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from stun_lightning import StunRecipe, load_pruned, moe_layers, prune, save_pruned
from stun_lightning.surgery import PER_LAYER_COUNTS_FIELD
from stun_lightning.tiny import build_tiny_model

from conftest import assert_refuses_tampered_checkpoint, logits, random_ids


def pruned_model(family, layer_budget, seed=0):
    model = build_tiny_model(family, seed=seed, num_hidden_layers=3 if family != "deepseek_v3" else 4)
    ids = random_ids(model, n=8)
    prune(
        model,
        StunRecipe(expert_sparsity=0.25, sparsity=0.5, layer_budget=layer_budget),
        calibration=ids,
        progress=False,
    )
    return model, ids


def test_uniform_counts_round_trip_through_plain_transformers(family, tmp_path):
    model, ids = pruned_model(family, "uniform")
    path = save_pruned(model, tmp_path / "out")
    assert not json.loads((path / "config.json").read_text()).get(PER_LAYER_COUNTS_FIELD)
    plain = AutoModelForCausalLM.from_pretrained(path)
    torch.testing.assert_close(logits(plain, ids), logits(model, ids))
    torch.testing.assert_close(logits(load_pruned(path), ids), logits(model, ids))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_per_layer_counts_round_trip_through_the_library_loader(family, tmp_path):
    model = build_tiny_model(family, num_hidden_layers=3)
    ids = random_ids(model, n=8)
    from stun_lightning import keep_experts

    for layer, keep in zip(moe_layers(model), ([0, 1, 2, 3, 4, 5, 6], [1, 3, 5, 7], list(range(8)))):
        keep_experts(model, layer.index, keep)
    path = save_pruned(model, tmp_path / "out")
    counts = json.loads((path / "config.json").read_text())[PER_LAYER_COUNTS_FIELD]
    assert counts == {"0": 7, "1": 4, "2": 8}
    loaded = load_pruned(path)
    assert [l.num_experts for l in moe_layers(loaded)] == [7, 4, 8]
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids))
    with pytest.raises(Exception):  # plain transformers cannot build per-layer shapes
        m, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
        assert not info["mismatched_keys"] and not info["missing_keys"]


def test_global_stun_result_round_trips(tmp_path):
    model, ids = pruned_model("qwen3_moe", "global", seed=5)
    path = save_pruned(model, tmp_path / "out")
    torch.testing.assert_close(logits(load_pruned(path), ids), logits(model, ids))


@pytest.mark.parametrize("layer_budget", ["uniform", "global"])
def test_missing_or_unused_tensors_are_refused(layer_budget, tmp_path):
    model, _ = pruned_model("mixtral", layer_budget)
    path = save_pruned(model, tmp_path / "out")
    # an expert tensor, saved in the family's checkpoint format
    assert_refuses_tampered_checkpoint(path, "model.safetensors", lambda k: ".experts." in k, "experts", load_pruned)


def test_existing_output_is_not_overwritten_and_failures_leave_nothing(tmp_path):
    model = build_tiny_model("mixtral")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        save_pruned(model, out)
    save_pruned(model, out, overwrite=True)
    assert (out / "config.json").exists()

    class Boom(RuntimeError):
        pass

    def fail(*args, **kwargs):
        raise Boom

    model.save_pretrained = fail
    with pytest.raises(Boom):
        save_pruned(model, tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_load_of_a_missing_directory_names_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pruned(tmp_path / "nope")
