"""Calibration and StunCallback across processes: 2 CPU processes over gloo, spawned by the test.

One spawn serves every test here (starting processes that import torch, transformers and Lightning
costs most of the time): each rank runs the split calibration, then a short Lightning DDP fit with
StunCallback, and writes what it ended with to a file; the tests compare those files with each
other and with the same work done in this single process.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from spawn_ranks import rank_failures_recorded, set_rank_env, spawn_ranks
from stun_lightning import StunRecipe
from stun_lightning.calibration import LINEAR, NORMS, ROUTING, SALIENCY, calibrate
from stun_lightning.structured import select_experts
from stun_lightning.tiny import build_tiny_model

WORLD = 2
TIMEOUT_S = 150  # the whole spawn; a hung collective fails the tests instead of hanging CI
COLLECT = (ROUTING, NORMS, SALIENCY, LINEAR)
KEEP_BLOCK_IO = 40  # more rows than rank 0's slice holds: the gathered rows span both ranks
FIT_RECIPE = dict(
    expert_method="frequency",
    expert_sparsity=0.25,
    layer_budget="global",
    sparsity=0.5,
    metric="wanda",
    low_token_rule="magnitude",
)


def calibration_case():
    """Model and token ids of the calibration comparison (built identically in every process)."""
    model = build_tiny_model("qwen2_moe", seed=0)  # shared experts: dense linears too
    ids = torch.randint(
        0, model.config.vocab_size, (7, 12), generator=torch.Generator().manual_seed(0)
    )  # 7 rows: uneven split
    return model, ids


def fit_calibration_ids():
    return torch.randint(0, 1000, (6, 32), generator=torch.Generator().manual_seed(1))


def stats_dict(stats):
    out = {"tokens": stats.tokens}
    for i, s in stats.layers.items():
        d = {"tokens": s.tokens}
        for name in ("expert_tokens", "gate_sum", "coactivation", "router_logit_sum", "saliency_sum"):
            d[name] = getattr(s, name)
        for name in ("input_sq", "input_sq_gated", "linear_sq"):
            d.update({f"{name}.{k}": v for k, v in getattr(s, name).items()})
        d["block_inputs"] = torch.cat(s.block_inputs)
        d["block_outputs"] = torch.cat(s.block_outputs)
        out[i] = d
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    set_rank_env(rank, port, WORLD)
    with rank_failures_recorded(out_dir, rank):
        from lightning.pytorch import Trainer

        from stun_lightning.callbacks import SparsitySchedule, StunCallback, StunDataModule, StunDistillModule
        from stun_lightning.distributed import calibrate_distributed

        dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
        model, ids = calibration_case()
        stats = calibrate_distributed(
            model, ids, collect=COLLECT, batch_size=2, keep_block_io=KEEP_BLOCK_IO, progress=False
        )
        torch.save(stats_dict(stats), os.path.join(out_dir, f"calibration{rank}.pt"))

        # Lightning finds the process group above and WORLD_SIZE / LOCAL_RANK: it launches nothing
        dm = StunDataModule(seq_len=32, batch_size=2, max_train_blocks=16, max_val_blocks=2, seed=0)
        mod = StunDistillModule("tiny:mixtral", teacher=None, lr=1e-2, seed=0)
        stun = StunCallback(
            StunRecipe(**FIT_RECIPE),
            SparsitySchedule("cubic", end_step=4),
            update_every=2,
            calibration=fit_calibration_ids(),
        )
        seen = []

        class Batches:  # the first token of each training batch: ranks must read different blocks
            def on_train_batch_start(self, batch, batch_idx):
                seen.append(int(batch["input_ids"][0, 0]))

        mod.on_train_batch_start = Batches().on_train_batch_start
        trainer = Trainer(
            accelerator="cpu",
            devices=WORLD,
            strategy="ddp",
            max_steps=4,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            default_root_dir=out_dir,
            callbacks=[stun],
        )
        trainer.fit(mod, dm)
        torch.save(
            {
                "kept": stun.kept_experts,
                "masks": {k: v.cpu() for k, v in stun.masks.masks.items()},
                "current_sparsity": stun.current_sparsity,
                "weights": {k: v.detach().cpu() for k, v in mod.student.state_dict().items()},
                "batches": seen,
            },
            os.path.join(out_dir, f"fit{rank}.pt"),
        )


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the 2 ranks wrote, and the spawn's wall time."""
    out = tmp_path_factory.mktemp("ranks")
    seconds = spawn_ranks(_worker, out, world=WORLD, timeout_s=TIMEOUT_S)
    return {
        "calibration": [torch.load(out / f"calibration{r}.pt", weights_only=False) for r in range(WORLD)],
        "fit": [torch.load(out / f"fit{r}.pt", weights_only=False) for r in range(WORLD)],
        "seconds": seconds,
    }


def test_all_reduced_calibration_statistics_equal_the_single_process_ones(ranks):
    model, ids = calibration_case()
    single = stats_dict(
        calibrate(model, ids, collect=COLLECT, batch_size=2, keep_block_io=KEEP_BLOCK_IO, progress=False)
    )
    for got in ranks["calibration"]:
        assert got["tokens"] == single["tokens"] == ids.numel()
        assert got.keys() == single.keys()
        for layer in (k for k in single if k != "tokens"):
            assert got[layer].keys() == single[layer].keys()
            assert got[layer]["tokens"] == single[layer]["tokens"] == ids.numel()
            for name, want in single[layer].items():
                if name == "tokens":
                    continue
                have = got[layer][name]
                assert have.dtype == want.dtype and have.shape == want.shape, (layer, name)
                if want.dtype.is_floating_point:
                    assert torch.allclose(have, want, rtol=1e-5, atol=1e-5), (layer, name)
                else:
                    assert torch.equal(have, want), (layer, name)
    # the statistics are not trivially equal: a rank's own half alone gives different counts
    half = calibrate(model, ids[:4], collect=(ROUTING,), progress=False)
    assert not torch.equal(
        half[next(iter(half.layers))].expert_tokens, single[next(iter(half.layers))]["expert_tokens"]
    )


def test_ddp_fit_ends_with_identical_expert_sets_and_masks_on_every_rank(ranks):
    a, b = ranks["fit"]
    assert a["batches"] != b["batches"]  # each rank read its own blocks: statistics differ before the all-reduce
    assert a["kept"] == b["kept"]
    # the structured decision is the single-process one (calibration split over ranks, statistics summed)
    model = build_tiny_model("mixtral", seed=0)
    assert a["kept"] == select_experts(model, StunRecipe(**FIT_RECIPE), fit_calibration_ids())
    assert a["masks"].keys() == b["masks"].keys() and a["masks"]
    for key in a["masks"]:
        assert torch.equal(a["masks"][key], b["masks"][key]), key
    assert a["current_sparsity"] == b["current_sparsity"] == pytest.approx(0.5)
    for name, value in a["weights"].items():
        assert torch.equal(value, b["weights"][name]), name
    assert [len(v) for v in a["kept"].values()] != [8] * len(a["kept"])


def test_spawned_ranks_stay_within_the_ci_budget(ranks):
    assert ranks["seconds"] < TIMEOUT_S


def test_fsdp1_is_refused_with_the_fix_named():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from stun_lightning.callbacks.strategy_checks import check_strategy

    # Lightning itself refuses FSDP1 on CPUs, so the check is called as StunCallback.setup calls it
    with pytest.raises(RuntimeError, match="FSDP1.*FSDP2Strategy"):
        check_strategy(SimpleNamespace(strategy=FSDPStrategy()))
    # FSDP2 (ModelParallelStrategy) runs, on CPUs too: tests/test_fsdp.py
