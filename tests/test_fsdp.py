"""StunCallback + StunDistillModule under FSDP2 (Lightning's ModelParallelStrategy): 2 processes,
spawned by the test, over gloo on CPUs (always) and over NCCL on 2 GPUs (when there are 2).

One spawn serves every test of a backend: each rank fits (checkpointing a sharded checkpoint), resumes
from that checkpoint in a second fit, and writes what it saw to files (what a rank runs: ``fsdp_fit.py``);
the tests compare those files with each other, with the full masks, and with the consolidated directory
rank 0 saved. On 2 GPUs: ``python -m pytest tests/test_fsdp.py``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from fsdp_fit import RECIPE, WORLD, calibration_ids, worker
from spawn_ranks import spawn_ranks
from stun_lightning import StunRecipe, load_pruned, moe_layers
from stun_lightning.expert_masks import ExpertMasks
from stun_lightning.structured import select_experts
from stun_lightning.tiny import build_tiny_model

TIMEOUT_S = 150  # the whole spawn; a hung collective fails the tests instead of hanging CI
gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < WORLD, reason="NCCL FSDP2 needs 2 CUDA GPUs"
)


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=gpus)])
def ranks(request, tmp_path_factory):
    """What each of the 2 ranks wrote, where, and the spawn's wall time."""
    out = tmp_path_factory.mktemp(f"fsdp_{request.param}")
    seconds = spawn_ranks(worker, out, request.param, world=WORLD, timeout_s=TIMEOUT_S)
    got = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return {"ranks": got, "out": out, "seconds": seconds}


def test_every_rank_removes_the_same_experts_before_sharding(ranks):
    a, b = (r["first"] for r in ranks["ranks"])
    assert a["start"]["kept"] == b["start"]["kept"] == a["end"]["kept"] == b["end"]["kept"]
    model = build_tiny_model("mixtral", seed=0)
    assert a["end"]["kept"] == select_experts(model, StunRecipe(**RECIPE), calibration_ids())
    assert all(len(v) == 5 for v in a["end"]["kept"].values())  # odd: the expert rows split 3 / 2


def test_each_ranks_shard_holds_exactly_the_zeros_of_the_full_mask(ranks):
    a, b = (r["first"] for r in ranks["ranks"])
    assert a["end"]["masks"]
    for key, mask in a["end"]["masks"].items():
        assert torch.equal(mask, b["end"]["masks"][key]), key  # identical full masks on both ranks
    assert 0.45 < 1 - float(torch.cat([m.flatten() for m in a["end"]["masks"].values()]).float().mean()) < 0.55
    for sa, sb in zip(a["end"]["shards"], b["end"]["shards"]):
        key = sa["key"]
        assert sa["sharded"] and sb["sharded"], key  # really FSDP2 DTensors
        full_mask = a["end"]["masks"][key]  # tiny Mixtral stores experts [E, out, in], the masks' own layout
        assert (sa["local"].shape[0], sb["local"].shape[0]) == (3, 2), key
        assert torch.equal(torch.cat([sa["mask"], sb["mask"]]), full_mask), key  # each rank's rows of the full mask
        name = "model.layers.{}.mlp.experts.{}".format(*key.split("."))
        gathered = a["end"]["full"][name]
        assert torch.equal(torch.cat([sa["local"], sb["local"]]), gathered), key
        assert torch.equal(gathered == 0, ~full_mask), key  # zeros exactly where masked, nowhere else
        for moment in ("exp_avg", "exp_avg_sq"):
            local = torch.cat([sa[moment], sb[moment]])
            assert not local[~full_mask].any(), (key, moment)
            assert local[full_mask].any(), (key, moment)  # the live entries do move


def test_masks_hold_after_every_optimizer_step_on_every_shard(ranks):
    for r in ranks["ranks"]:
        for fit in (r["first"], r["resumed"]):
            assert fit["violations"] == 0
            assert fit["masked_steps"] >= 1
        assert r["first"]["steps"] == 4 and r["resumed"]["steps"] == 4  # resumed at step 2, ran to 6


def test_teacher_is_sharded_frozen_and_outside_the_optimizer(ranks):
    for r in ranks["ranks"]:
        assert r["first"]["teacher"] == {
            "sharded": True,
            "frozen": True,
            "in_optimizer": False,
            "training": False,
            "resharded": True,
        }


def test_rank_zero_saves_one_consolidated_directory_that_loads_as_the_gathered_weights(ranks):
    a = ranks["ranks"][0]["first"]
    saved = ranks["out"] / "model"
    assert sorted(p.name for p in saved.iterdir() if p.suffix == ".safetensors") == ["model.safetensors"]
    model = load_pruned(saved)
    assert [l.num_experts for l in moe_layers(model)] == [5, 5]
    state = model.state_dict()
    assert state.keys() == a["end"]["full"].keys()
    for name, value in a["end"]["full"].items():
        assert torch.equal(state[name], value), name
    assert a["end"]["report_sparsity"] == pytest.approx(0.5, abs=0.01)


def test_resume_from_the_sharded_checkpoint_restores_expert_sets_and_masks_and_continues(ranks):
    ckpt = Path(ranks["ranks"][0]["ckpt"])
    assert ckpt.is_dir() and len(list(ckpt.glob("*.distcp"))) == WORLD  # one shard file per rank
    saved = next(
        v
        for k, v in torch.load(ckpt / "meta.pt", weights_only=False)["callbacks"].items()
        if k.startswith("StunCallback")
    )
    saved_masks = ExpertMasks.from_state_dict(saved["masks"])
    assert saved_masks and saved["last_update_step"] == 2
    for r in ranks["ranks"]:
        start = r["resumed"]["start"]
        assert start["step"] == 2
        assert start["kept"] == {int(k): v for k, v in saved["kept_experts"].items()} == r["first"]["end"]["kept"]
        assert ExpertMasks(start["masks"]).equal(saved_masks)
        end = r["resumed"]["end"]
        assert end["step"] == 6 and end["kept"] == start["kept"]
        for key, mask in end["masks"].items():
            assert not (mask & ~saved_masks.masks[key]).any(), key  # nothing pruned at step 2 came back
            assert torch.equal(mask, ranks["ranks"][0]["resumed"]["end"]["masks"][key]), key
    assert (ranks["out"] / "model_resumed1" / "config.json").is_file()
    from stun_lightning.callbacks.resume import callback_state_in

    assert (
        callback_state_in(ckpt, next(k for k in torch.load(ckpt / "meta.pt", weights_only=False)["callbacks"]))[
            "kept_experts"
        ]
        == saved["kept_experts"]
    )


def test_a_resume_that_chooses_the_experts_again_is_checked_against_the_checkpoint(ranks):
    for r in ranks["ranks"]:
        again = r["again"]
        assert again["start"]["step"] == 2 and again["end"]["step"] == 5 and again["violations"] == 0
        assert again["start"]["kept"] == r["first"]["end"]["kept"]
        assert ExpertMasks(again["start"]["masks"]).equal(ExpertMasks(r["resumed"]["start"]["masks"]))


def test_the_expert_wise_term_is_computed_on_sharded_student_and_teacher(ranks):
    for r in ranks["ranks"]:
        end = r["first"]["end"]
        assert end["losses"]["expert"] > 0 and math.isfinite(end["lambda"]) and end["lambda"] > 0
        assert end["losses"]["logit_kl"] > 0


def test_a_model_built_on_the_meta_device_is_sharded_then_materialised_and_trains(ranks):
    for r in ranks["ranks"]:
        meta = r["meta"]
        assert meta["sharded"] and not meta["meta"] and meta["finite"] and math.isfinite(meta["loss"])
        real = build_tiny_model("qwen3_moe", seed=0).model.rotary_emb.inv_freq
        assert torch.equal(meta["inv_freq"], real)  # non-persistent buffers recomputed, not left empty


def test_the_spawn_stays_within_the_ci_budget(ranks):
    assert ranks["seconds"] < TIMEOUT_S


def test_fsdp_needs_the_whole_world_on_the_data_parallel_axis():
    from stun_lightning.callbacks.strategy_checks import data_parallel_mesh

    class Mesh:  # the two axes of ModelParallelStrategy's mesh, as sizes
        mesh_dim_names, ndim = ("data_parallel", "tensor_parallel"), 2

        def __init__(self, dp, tp):
            self.sizes = {"data_parallel": dp, "tensor_parallel": tp}

        def __getitem__(self, name):
            size = self.sizes[name]
            return type("Sub", (), {"size": lambda self: size})()

    with pytest.raises(ValueError, match=r"data_parallel_size=4, tensor_parallel_size=1\).*FSDP2Strategy"):
        data_parallel_mesh(Mesh(1, 4))
    assert data_parallel_mesh(Mesh(4, 1)).size() == 4


def test_a_sharded_checkpoint_with_other_expert_sets_is_refused_before_any_tensor_loads(tmp_path):
    from stun_lightning.callbacks.resume import (
        callback_state_in,
        check_expert_sets_before_load,
        intercept_strategy_load,
    )

    ckpt = tmp_path / "step=2.ckpt"
    ckpt.mkdir()
    torch.save({"callbacks": {"StunCallback": {"kept_experts": {0: [0, 1, 2]}}}}, ckpt / "meta.pt")
    assert callback_state_in(ckpt, "StunCallback") == {"kept_experts": {0: [0, 1, 2]}}
    loaded = []

    class Strategy:
        def load_checkpoint(self, path, weights_only=None):
            loaded.append(path)

    strategy = Strategy()
    undo = intercept_strategy_load(
        strategy,
        lambda path: check_expert_sets_before_load(path, callback_state_in(path, "StunCallback"), {0: [0, 1, 3]}),
    )
    with pytest.raises(RuntimeError, match=r"trainer.ckpt_path = .*before trainer.fit"):
        strategy.load_checkpoint(ckpt)
    assert loaded == []
    undo()
    strategy.load_checkpoint(ckpt)
    assert loaded == [ckpt]
    check_expert_sets_before_load(ckpt, callback_state_in(ckpt, "StunCallback"), {0: [0, 1, 2]})  # same sets: no error


def test_cli_fit_with_the_fsdp_config_on_two_cpu_processes(tmp_path):
    """``stun-lightning fit --config configs/fit_tiny_fsdp.yaml --trainer.devices=2``, shortened, on CPUs:
    Lightning launches the second process itself."""
    import subprocess
    import sys

    import yaml

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "fit_tiny_fsdp.yaml").read_text())
    config["trainer"]["logger"]["init_args"]["save_dir"] = config["trainer"]["default_root_dir"] = str(tmp_path)
    stun, checkpoint = (c["init_args"] for c in config["trainer"]["callbacks"])
    stun["save_dir"] = str(tmp_path / "model")
    stun["schedule"]["end_step"], stun["update_every"] = 4, 2
    checkpoint["dirpath"], checkpoint["every_n_train_steps"] = str(tmp_path / "checkpoints"), 2
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(config))
    cmd = [
        sys.executable,
        "-m",
        "stun_lightning.callbacks.cli",
        "fit",
        "--config",
        str(tmp_path / "fit.yaml"),
        "--trainer.devices=2",
        "--trainer.accelerator=cpu",
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=4",
        "--data.max_train_blocks=16",
        "--model.lambda_init_step=0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = load_pruned(tmp_path / "model")
    assert [l.num_experts for l in moe_layers(saved)] == [6, 6]
    assert json.loads((tmp_path / "model" / "stun_report.json").read_text())["within_expert_sparsity"] == 0.5
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step=2.ckpt", "step=4.ckpt"]
    assert len(list((tmp_path / "checkpoints" / "step=2.ckpt").glob("*.distcp"))) == 2  # sharded, one file per rank


def test_a_meta_model_is_counted_dense_and_loses_experts_before_it_has_storage():
    """The meta path of the distributed benchmark: census, random expert removal and the report
    work on a model with no storage yet (nothing reads values)."""
    from transformers import AutoModelForCausalLM

    from stun_lightning import StunRecipe, moe_layers
    from stun_lightning.report import ModelCensus
    from stun_lightning.structured import apply_expert_sets, select_experts

    config = build_tiny_model("qwen3_moe").config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    before = config.num_experts
    census = ModelCensus.of(model)
    assert census.model.nonzero == census.model.total == sum(p.numel() for p in model.parameters())
    keep = select_experts(model, StunRecipe(expert_method="random", expert_sparsity=0.25, layer_budget="uniform"))
    apply_expert_sets(model, keep, lower_top_k=True)
    assert all(layer.num_experts == len(keep[layer.index]) == before * 3 // 4 for layer in moe_layers(model))
    assert all(p.is_meta for p in model.parameters())
