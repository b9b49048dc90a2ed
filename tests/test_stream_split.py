"""Streaming ``expert_sparsity: auto`` (and the block-error budgets) == in-memory prune, split and tensors."""

from __future__ import annotations

import json
import re
import threading
from collections import Counter, defaultdict

import pytest

from conftest import random_ids
from stun_lightning import StunRecipe, prune, save_pruned
from stun_lightning.adapters import moe_layers
from stun_lightning.serialization import load_pruned
from stun_lightning.stream import ShardReader, prune_streaming, split_scoring
from stun_lightning.tiny import build_tiny_model
from test_stream import assert_same_checkpoint

AUTO = dict(
    expert_sparsity="auto",
    expert_method="frequency",
    total_sparsity=0.55,
    allocation="owl",
    metric="wanda",
    split_held_out=0.25,
    split_groups=1,  # streaming keeps the uniform choice (the group refinement is not streamed)
    split_margin=0.0,  # the least loss: on these tiny models a real choice (2 SE keeps zero removals)
)


def _report(report) -> dict:
    data = json.loads(report.to_json())
    for key in ("seconds", "layer_passes"):  # streaming scores every candidate, so it spends other passes
        data.pop(key)
    return data


def _in_memory(family, tmp_path, recipe, seed=0):
    build_tiny_model(family).save_pretrained(tmp_path / "src")
    model = load_pruned(tmp_path / "src")  # loaded as the CLI loads it (the skeleton's attention implementation)
    ids = random_ids(model, seed=seed)
    report = prune(model, recipe, ids, progress=False)
    save_pruned(model, tmp_path / "mem")
    return ids, report


_EXPERT_KEY = re.compile(r"layers\.(\d+)\..*experts\.(\d+)\.")


def _expert_reads(monkeypatch) -> dict[str, Counter]:
    """Per thread name, how often each ``(layer, expert)`` matrix is read from the checkpoint."""
    reads: dict[str, Counter] = defaultdict(Counter)
    get = ShardReader.get

    def counted(self, key):
        if m := _EXPERT_KEY.search(key):
            reads[threading.current_thread().name][int(m.group(1)), int(m.group(2))] += 1
        return get(self, key)

    monkeypatch.setattr(ShardReader, "get", counted)
    return reads


# mixtral seed 0: 3 of 4 removals chosen among 5 candidates; qwen3_moe seed 4: the in-memory search
# stops after 4 candidates (the loss rose twice) and keeps 1 removal
@pytest.mark.parametrize("family, seed", [("mixtral", 0), ("qwen3_moe", 4)])
def test_streaming_auto_split_equals_in_memory(family, seed, tmp_path, monkeypatch):
    recipe = StunRecipe(**AUTO)
    ids, report = _in_memory(family, tmp_path, recipe, seed)
    reads = _expert_reads(monkeypatch)
    streamed = prune_streaming(tmp_path / "src", tmp_path / "st", recipe, ids, progress=False)
    split = report.expert_split
    tried = list(split["candidates"].values())
    assert len(tried) >= 4 and split["removed"] not in (tried[0], tried[-1])  # the choice is not an end
    assert streamed.expert_split == split
    assert_same_checkpoint(tmp_path / "mem", tmp_path / "st")
    assert _report(streamed) == _report(report)
    # each candidate reads only the experts it keeps, once per layer and pass (OWL ratios, pruning)
    experts = {layer.index: layer.num_experts for layer in moe_layers(load_pruned(tmp_path / "src"))}
    for f, removed in split["candidates"].items():
        read = reads[f"candidate {f}"]
        assert set(read.values()) == {2 * 3}  # gate, up and down matrices
        assert {i: sum(layer == i for layer, _ in read) for i in experts} == {
            i: n - removed[i] for i, n in experts.items()
        }


@pytest.mark.parametrize(
    "recipe",
    [
        dict(AUTO, split_criterion="block_error"),
        dict(expert_sparsity=0.25, layer_budget="error_curve", expert_method="frequency", sparsity=0.4, metric="wanda"),
    ],
    ids=["auto-block_error", "error_curve"],
)
def test_streaming_block_error_choices_equal_in_memory(recipe, tmp_path):
    recipe = StunRecipe(**recipe)
    ids, report = _in_memory("qwen3_moe", tmp_path, recipe)
    streamed = prune_streaming(tmp_path / "src", tmp_path / "st", recipe, ids, progress=False)
    assert streamed.expert_split == report.expert_split and report.expert_split
    assert_same_checkpoint(tmp_path / "mem", tmp_path / "st")


def test_cli_stream_keeps_the_default_recipe(tmp_path):
    from stun_lightning.cli import main
    from stun_lightning.tiny import load_tokenizer

    build_tiny_model("qwen3_moe").save_pretrained(tmp_path / "src", max_shard_size="100KB")
    load_tokenizer().save_pretrained(tmp_path / "src")
    assert len(list((tmp_path / "src").glob("*.safetensors"))) > 2
    args = ["prune", "--model", str(tmp_path / "src"), "--quiet", "--calibration-samples", "8"]
    args += ["--calibration-seq-len", "32", "--eval-tokens", "0"]
    assert main(args + ["--stream", "--out", str(tmp_path / "st")]) == 0
    # the in-memory run of the same recipe (streaming keeps auto's uniform choice: split_groups 1)
    assert main(args + ["--split-groups", "1", "--out", str(tmp_path / "mem")]) == 0
    streamed = json.loads((tmp_path / "st" / "stun_report.json").read_text())
    assert streamed["recipe"]["expert_sparsity"] == "auto" and streamed["expert_split"]["criterion"] == "model_loss"
    assert streamed["recipe"]["split_groups"] == 1
    in_memory = json.loads((tmp_path / "mem" / "stun_report.json").read_text())
    assert streamed["expert_split"] == in_memory["expert_split"]
    assert_same_checkpoint(tmp_path / "mem", tmp_path / "st")
    # a fraction inside the experts keeps the fixed split under --stream too
    assert main(args + ["--stream", "--sparsity", "0.4", "--out", str(tmp_path / "fixed")]) == 0
    fixed = json.loads((tmp_path / "fixed" / "stun_report.json").read_text())
    assert fixed["recipe"]["expert_sparsity"] == 0.25 and not fixed.get("expert_split")


def test_auto_resume_after_a_kill_keeps_the_split(tmp_path, monkeypatch):
    from stun_lightning.stream import pipeline
    from test_stream import _Killed, _KilledAfter

    recipe = StunRecipe(**AUTO)
    ids, report = _in_memory("mixtral", tmp_path, recipe)
    monkeypatch.setattr(pipeline, "StreamSource", _KilledAfter)
    _KilledAfter.kill_after, _KilledAfter.final_entries = 0, []
    with pytest.raises(_Killed):
        prune_streaming(tmp_path / "src", tmp_path / "st", recipe, ids, progress=False)
    _KilledAfter.kill_after, _KilledAfter.final_entries = None, []
    monkeypatch.setattr(split_scoring, "score_candidates", None)  # the resumed run must not score again
    resumed = prune_streaming(tmp_path / "src", tmp_path / "st", recipe, ids, progress=False, resume=True)
    assert _KilledAfter.final_entries == [1]
    assert json.loads(json.dumps(resumed.expert_split)) == json.loads(json.dumps(report.expert_split))
    assert_same_checkpoint(tmp_path / "mem", tmp_path / "st")


def test_benchmark_checkpoint_streams_like_in_memory(tmp_path):
    """The benchmark's checkpoint (per-expert tensors, a config without ``architectures``) gives the
    in-memory directory under the default recipe."""
    import torch

    from benchmarks.stream_prune import build_checkpoint

    shape = dict(hidden_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2)
    shape.update(num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512)
    build_checkpoint(tmp_path / "src", 2, torch.float32, **shape)
    assert "architectures" not in json.loads((tmp_path / "src" / "config.json").read_text())
    recipe = StunRecipe(**AUTO)
    model = load_pruned(tmp_path / "src")
    ids = random_ids(model)
    prune(model, recipe, ids, progress=False)
    save_pruned(model, tmp_path / "mem")
    prune_streaming(tmp_path / "src", tmp_path / "st", recipe, ids, progress=False)
    assert_same_checkpoint(tmp_path / "mem", tmp_path / "st")


def test_streaming_auto_replays_the_margin_of_the_in_memory_choice(tmp_path):
    """At the default 2 paired SE the in-memory choice differs from the least-loss one on this model;
    the streamed run must make the same margin-guarded choice."""
    guarded = StunRecipe(**dict(AUTO, split_margin=2.0))
    ids, report = _in_memory("mixtral", tmp_path, guarded)
    least = prune(load_pruned(tmp_path / "src"), StunRecipe(**AUTO), ids, progress=False)
    assert report.expert_split["removed"] != least.expert_split["removed"]  # the margin decided
    streamed = prune_streaming(tmp_path / "src", tmp_path / "st", guarded, ids, progress=False)
    assert streamed.expert_split == report.expert_split
    assert_same_checkpoint(tmp_path / "mem", tmp_path / "st")
