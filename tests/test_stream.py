"""Streaming prune (one decoder layer from disk at a time) == in-memory prune, tensor for tensor."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import random_ids
from stun_lightning import StunRecipe, prune, save_pruned
from stun_lightning import stream as stream_mod
from stun_lightning.stream import pipeline
from stun_lightning.cli import main
from stun_lightning.stream import CorruptShardError, ShardReader, prune_streaming
from stun_lightning.tiny import build_tiny_model, load_tokenizer

RECIPE = dict(
    expert_sparsity=0.25,
    layer_budget="global",
    sparsity=0.4,
    allocation="owl",
    metric="wanda",
    calibration_samples=4,
    calibration_seq_len=32,
)


def _report(report) -> dict:
    data = json.loads(report.to_json())
    data.pop("seconds")
    return data


def assert_same_checkpoint(a, b):
    ra, rb = ShardReader(a), ShardReader(b)
    assert set(ra.files) == set(rb.files)
    for key in ra.files:
        assert torch.equal(ra.get(key), rb.get(key)), key
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


def _in_memory(family, tmp_path, recipe):
    model = build_tiny_model(family)
    model.save_pretrained(tmp_path / "src")
    ids = random_ids(model)
    report = prune(model, recipe, ids, progress=False)
    save_pruned(model, tmp_path / "mem")
    return ids, report


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_streaming_equals_in_memory(family, tmp_path):
    recipe = StunRecipe(**RECIPE)
    ids, report = _in_memory(family, tmp_path, recipe)
    streamed = prune_streaming(tmp_path / "src", tmp_path / "st", recipe, ids, progress=False)
    assert_same_checkpoint(tmp_path / "mem", tmp_path / "st")
    assert _report(streamed) == _report(report)
    assert {"stun_report.json", "stun_recipe.yaml", "model.safetensors.index.json"} <= {
        p.name for p in (tmp_path / "st").iterdir()
    }
    assert not (tmp_path / ".st.stream").exists()


def test_streaming_uniform_magnitude_and_dense_layers(tmp_path):
    recipe = StunRecipe(
        expert_sparsity=0.25,
        layer_budget="uniform",
        expert_method="frequency",
        sparsity=0.5,
        metric="magnitude",
        prune_dense=True,
        calibration_samples=4,
        calibration_seq_len=32,
    )
    ids, report = _in_memory("qwen3_moe", tmp_path, recipe)
    prune_streaming(tmp_path / "src", tmp_path / "st", recipe, ids, progress=False)
    assert_same_checkpoint(tmp_path / "mem", tmp_path / "st")


class _Counting(stream_mod.StreamSource):
    seen: list = []

    def leave(self, i, layer):
        super().leave(i, layer)
        _Counting.seen.append((self.max_live_layers, self.peak_live_bytes))


def test_streaming_holds_one_decoder_layer_at_a_time(tmp_path, monkeypatch):
    recipe = StunRecipe(**RECIPE)
    model = build_tiny_model("mixtral", num_hidden_layers=4)
    model.save_pretrained(tmp_path / "src")
    layer_bytes = max(
        sum(t.numel() * t.element_size() for n, t in layer.state_dict().items() if ".gate." not in "." + n)
        for layer in model.model.layers
    )
    monkeypatch.setattr(pipeline, "StreamSource", _Counting)
    _Counting.seen = []
    prune_streaming(tmp_path / "src", tmp_path / "st", recipe, random_ids(model), progress=False)
    live_layers, peak = _Counting.seen[-1]
    assert live_layers == 1
    assert peak <= layer_bytes
    assert len(_Counting.seen) >= 3 * 4  # stats, OWL and pruning passes, each over every layer


def test_truncated_shard_names_the_file(tmp_path, capsys):
    model = build_tiny_model("mixtral")
    model.save_pretrained(tmp_path / "src")
    load_tokenizer().save_pretrained(tmp_path / "src")
    shard = tmp_path / "src" / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CorruptShardError, match="model.safetensors"):
        prune_streaming(tmp_path / "src", tmp_path / "st", StunRecipe(**RECIPE), random_ids(model), progress=False)
    assert not (tmp_path / "st").exists()
    code = main(
        [
            "prune",
            "--model",
            str(tmp_path / "src"),
            "--stream",
            "--out",
            str(tmp_path / "st2"),
            "--quiet",
            "--calibration-samples",
            "2",
            "--calibration-seq-len",
            "16",
        ]
    )
    assert code == 2 and "model.safetensors" in capsys.readouterr().err


def test_hub_id_through_snapshot_download(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    model = build_tiny_model("qwen3_moe")
    snapshot = tmp_path / "hub" / "models--tiny--moe" / "snapshots" / ("0" * 40)
    model.save_pretrained(snapshot)
    (tmp_path / "hub" / "models--tiny--moe" / "refs").mkdir()
    (tmp_path / "hub" / "models--tiny--moe" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    recipe = StunRecipe(**RECIPE)
    ids = random_ids(model)
    prune_streaming("tiny/moe", tmp_path / "st", recipe, ids, progress=False, local_files_only=True)
    prune(model, recipe, ids, progress=False)
    save_pruned(model, tmp_path / "mem")
    assert_same_checkpoint(tmp_path / "mem", tmp_path / "st")


def test_merging_methods_are_refused(tmp_path):
    with pytest.raises(ValueError, match="merges expert weights"):
        prune_streaming(tmp_path / "nowhere", tmp_path / "st", StunRecipe(expert_method="stun", merge_max_clusters=4))


class _Killed(Exception):
    pass


class _KilledAfter(stream_mod.StreamSource):
    kill_after: int | None = None
    final_entries: list = []

    def enter(self, i, layer, device):
        if self.in_final:
            _KilledAfter.final_entries.append(i)
        super().enter(i, layer, device)

    def layer_done(self, i, outputs):
        super().layer_done(i, outputs)
        if self.in_final and i == _KilledAfter.kill_after:
            raise _Killed


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_resume_after_a_kill_mid_way_gives_the_same_model(family, tmp_path, monkeypatch):
    recipe = StunRecipe(**RECIPE)
    model = build_tiny_model(family, num_hidden_layers=4)
    model.save_pretrained(tmp_path / "src")
    ids = random_ids(model)
    report = prune(model, recipe, ids, progress=False)
    save_pruned(model, tmp_path / "mem")
    monkeypatch.setattr(pipeline, "StreamSource", _KilledAfter)
    _KilledAfter.kill_after, _KilledAfter.final_entries = 1, []
    with pytest.raises(_Killed):
        prune_streaming(tmp_path / "src", tmp_path / "st", recipe, ids, progress=False)
    assert not (tmp_path / "st").exists() and (tmp_path / ".st.stream" / "layer-00001.safetensors").exists()
    _KilledAfter.kill_after, _KilledAfter.final_entries = None, []
    resumed = prune_streaming(tmp_path / "src", tmp_path / "st", recipe, ids, progress=False, resume=True)
    assert _KilledAfter.final_entries == [2, 3]  # the final pass continued after the last finished layer
    assert_same_checkpoint(tmp_path / "mem", tmp_path / "st")
    mine, theirs = _report(resumed), _report(report)
    for key in ("low_token_experts", "layer_passes"):  # the resumed run skipped finished layers
        mine.pop(key), theirs.pop(key)
    assert mine == theirs


def test_cli_stream_writes_the_pruned_directory(tmp_path, capsys):
    model = build_tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path / "src")
    load_tokenizer().save_pretrained(tmp_path / "src")
    args = [
        "prune",
        "--model",
        str(tmp_path / "src"),
        "--stream",
        "--out",
        str(tmp_path / "out"),
        "--quiet",
        "--calibration-samples",
        "2",
        "--calibration-seq-len",
        "16",
    ]
    assert main(args) == 0
    report = json.loads((tmp_path / "out" / "stun_report.json").read_text())
    # the default recipe (auto at 55%); with one held-out block no removal can beat the margin
    assert report["expert_split"]["criterion"] == "model_loss" and report["expert_split"]["held_out_blocks"] == 1
    assert report["expert_param_sparsity"] == pytest.approx(0.55, abs=0.02)
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    assert (
        main(["prune", "--model", str(tmp_path / "src"), "--resume", "--out", str(tmp_path / "y")]) == 2
    )  # --resume needs --stream
