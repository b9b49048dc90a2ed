"""Bitmap storage for any expert mask, the per-matrix choice of ``sparsify`` and ``stun_bitmap``."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stun_lightning import StunRecipe, prune
from stun_lightning.export import export, load_exported
from stun_lightning.sparse import (
    SparsifyConfig,
    compress_bitmap,
    decompress_bitmap,
    densify,
    is_sparsified,
    plan_formats,
    sparse_formats,
    sparse_nbytes,
    sparsify,
)
from stun_lightning.sparse.bitmap import TILE, bitmap_mask, bitmap_nbytes, estimated_bitmap_nbytes
from stun_lightning.sparse.bitmap_experts import IMPLEMENTATION, grouped_dense
from stun_lightning.sparse.checkpoint import WEIGHTS_NAME
from stun_lightning.sparse.convert import _matrix, choose_format, expert_modules
from stun_lightning.sparse.experts import align_pairs, pairs_layout
from stun_lightning.tiny import build_tiny_model

from conftest import assert_refuses_tampered_checkpoint, logits, random_ids
from test_sparse import mask_24

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernel)")


def random_sparse(shape, sparsity, dtype=torch.bfloat16, seed=0, empty=(1,)):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    w[torch.rand(shape, generator=g) < sparsity] = 0
    for e in empty:
        if e < shape[0]:
            w[e] = 0
    return w.to(dtype)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7, 0.8, 0.97])
@pytest.mark.parametrize("shape", [(3, 5, 130), (2, 4, 64), (4, 6, 7), (1, 2, 200)])
def test_bitmap_is_lossless_for_any_mask_and_odd_sizes(shape, sparsity):
    w = random_sparse(shape, sparsity)
    w[0, 0, -1] = 3.0  # the last input of a padded tile
    w[0, -1, 0] = -2.0  # and a set bit 63 when the tile is full
    bitmap, values, offsets = compress_bitmap(w)
    e, n, k = shape
    t = -(-k // TILE)
    assert bitmap.shape == offsets.shape == (e, n, t) and bitmap.dtype == torch.int64 and offsets.dtype == torch.int32
    nnz = (w != 0).reshape(e, -1).sum(-1)
    assert values.shape == (e, int(nnz.max())) and values.dtype == w.dtype
    assert torch.equal(bitmap_mask(bitmap, k), w != 0)
    assert torch.equal(decompress_bitmap(bitmap, values, offsets, k), w)
    assert torch.equal(
        decompress_bitmap(bitmap[2 % e], values[2 % e], offsets[2 % e], k), w[2 % e]
    )  # one expert's slices
    assert bitmap_nbytes(bitmap, values, offsets) == estimated_bitmap_nbytes(w) == e * n * t * 12 + values.numel() * 2


def test_empty_matrix_and_bytes_model():
    w = torch.zeros(3, 4, 64, dtype=torch.bfloat16)
    bitmap, values, offsets = compress_bitmap(w)
    assert values.shape == (3, 0) and torch.equal(decompress_bitmap(bitmap, values, offsets, 64), w)
    w = random_sparse((8, 64, 1024), 0.7, empty=())
    ratio = estimated_bitmap_nbytes(w) / (w.numel() * 2)
    assert abs(ratio - (2 * 0.3 + 1 / 8 + 1 / 16) / 2) < 0.01  # values + bitmap + offsets per weight


def test_format_choice_follows_the_mask():
    config = SparsifyConfig()
    assert choose_format(mask_24(torch.randn(2, 8, 16)), config) == "2:4"
    assert choose_format(random_sparse((2, 8, 128), 0.7), config) == "bitmap"
    assert choose_format(random_sparse((2, 8, 128), 0.1, empty=()), config) == "dense"  # would not pay
    assert choose_format(random_sparse((2, 8, 128), 0.25, empty=()), config) == "dense"
    assert choose_format(random_sparse((2, 8, 128), 0.25, empty=()), SparsifyConfig(max_bytes_ratio=0.95)) == "bitmap"
    assert choose_format(mask_24(torch.randn(2, 8, 16)), SparsifyConfig(formats=("bitmap", "dense"))) == "bitmap"
    with pytest.raises(ValueError, match="max_bytes_ratio or allow 'dense'"):
        choose_format(random_sparse((2, 8, 128), 0.1), SparsifyConfig(formats=("bitmap",)))
    with pytest.raises(ValueError, match="choose among"):
        SparsifyConfig(formats=("csr",))


def masked_model(family: str):
    """A tiny model whose layers hold every storage: layer 0 gate_up 70% unstructured, down 2:4;
    layer 1 gate_up 10% (stays dense), down 80% unstructured with one empty expert."""
    model = build_tiny_model(family, seed=0)
    with torch.no_grad():
        blocks = list(expert_modules(model))
        for (index, experts, _), masks in zip(blocks, [("u70", "24"), ("u10", "u80")]):
            for name, how in zip(("gate_up_proj", "down_proj"), masks):
                w = _matrix(experts, name)
                if how == "24":
                    w.copy_(mask_24(w))
                else:
                    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(index)) >= int(how[1:]) / 100
                    w.mul_(keep)
                    if how == "u80":
                        w[3] = 0
    return model.eval()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_stun_bitmap_model_equals_the_masked_dense_model(family, caplog):
    model = masked_model(family)
    ids = random_ids(model, n=3, length=12)
    expected = logits(model, ids)
    sparse = copy.deepcopy(model)
    with caplog.at_level("INFO", logger="stun_lightning.sparse"):
        sparsify(sparse)
    assert "sparsify: 1 2:4, 2 bitmap, 1 dense" in caplog.text
    assert sparse_formats(sparse) == {
        0: {"gate_up_proj": "bitmap", "down_proj": "2:4"},
        1: {"gate_up_proj": "dense", "down_proj": "bitmap"},
    }
    assert is_sparsified(sparse) and sparse.config._experts_implementation == IMPLEMENTATION
    _, experts, _ = next(expert_modules(sparse))
    assert "gate_up_proj" not in experts._parameters and experts.gate_up_proj_bitmap.dtype == torch.int64
    torch.testing.assert_close(
        experts.gate_up_proj, next(expert_modules(model))[1].gate_up_proj, rtol=0, atol=0
    )  # inspection view
    torch.testing.assert_close(logits(sparse, ids), expected)
    sizes = sparse_nbytes(sparse)
    assert (
        sizes["expert_bytes_dense"] == sparse_nbytes(model)["expert_bytes"]
        and sizes["expert_bytes"] < 0.75 * sizes["expert_bytes_dense"]
    )
    prompt = ids[:1, :6]
    assert torch.equal(
        sparse.generate(prompt, max_new_tokens=5, do_sample=False),
        model.generate(prompt, max_new_tokens=5, do_sample=False),
    )
    densify(sparse)
    before, after = model.state_dict(), sparse.state_dict()
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)
    assert sparse.config._experts_implementation != IMPLEMENTATION


def test_a_model_too_dense_to_pay_stays_dense_and_pruned_models_go_bitmap():
    model = build_tiny_model("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert plan_formats(model) == {i: {"gate_up_proj": "dense", "down_proj": "dense"} for i in (0, 1)}
    sparsify(model)
    assert not is_sparsified(model) and model.config._experts_implementation != IMPLEMENTATION
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    prune(
        model,
        StunRecipe(expert_sparsity=0.25, sparsity=0.7, metric="magnitude", layer_budget="uniform"),
        calibration=random_ids(model),
        progress=False,
    )
    assert {fmt for formats in plan_formats(model).values() for fmt in formats.values()} == {"bitmap"}


def test_grouped_dense_equals_the_per_pair_product():
    torch.manual_seed(0)
    w = torch.randn(5, 6, 10)
    for tokens, top_k in ((1, 2), (9, 3), (70, 2)):
        a = torch.randn(tokens, 10)
        index = torch.stack([torch.randperm(5)[:top_k] for _ in range(tokens)])
        block_m, _ = pairs_layout(tokens * top_k, 5)
        ids, blocks = align_pairs(index, 5, block_m)
        expected = torch.stack([a[s // top_k] @ w[index.view(-1)[s]].T for s in range(tokens * top_k)])
        torch.testing.assert_close(grouped_dense(a, w, ids, blocks, top_k, block_m), expected)


@cuda
def test_grouped_dense_is_captured_by_a_cuda_graph():
    """The prefill path of bitmap experts runs inside ``reduce-overhead`` CUDA graphs: no host sync
    (a data-dependent size such as a boolean selection fails the capture)."""
    torch.manual_seed(0)
    w = torch.randn(8, 64, 32, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(300, 32, device="cuda", dtype=torch.bfloat16)
    index = torch.stack([torch.randperm(8)[:2] for _ in range(300)]).cuda()
    block_m, _ = pairs_layout(600, 8)
    ids, blocks = align_pairs(index, 8, block_m)
    expected = grouped_dense(a, w, ids, blocks, 2, block_m)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = grouped_dense(a, w, ids, blocks, 2, block_m)
    graph.replay()
    torch.testing.assert_close(out, expected)


def test_bitmap_model_compiles_without_graph_breaks():
    model = masked_model("qwen3_moe")
    ids = random_ids(model, n=1, length=8)
    sparsify(model)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    ops = [str(n.target) for g in explanation.graphs for n in g.graph.nodes]
    for op in ("route_pairs", "bitmap_experts_mm", "dense_experts_mm", "sparse24_experts_mm"):
        assert any(op in o for o in ops), op


def test_checkpoint_round_trips_every_format_without_recompressing(tmp_path):
    model = masked_model("mixtral")
    ids = random_ids(model, n=2, length=10)
    expected = logits(model, ids)
    path = export(model, tmp_path / "sparse", "sparse")
    assert not is_sparsified(model)  # the model given is left dense
    marker = json.loads((path / "config.json").read_text())["stun_sparse"]
    assert (
        marker["pattern"] == "mixed"
        and marker["version"] == 2
        and marker["matrices"]["1"] == {"gate_up_proj": "dense", "down_proj": "bitmap"}
    )
    loaded = load_exported(path)
    assert sparse_formats(loaded) == sparse_formats(sparsify(copy.deepcopy(model)))
    assert loaded.config._experts_implementation == IMPLEMENTATION
    torch.testing.assert_close(logits(loaded, ids), expected)
    _, experts, _ = next(expert_modules(loaded))
    assert experts.gate_up_proj_bitmap.storage_offset() == 0 and experts.gate_up_proj_values.is_contiguous()
    assert_refuses_tampered_checkpoint(
        path, WEIGHTS_NAME, lambda k: k.endswith("experts.down_proj_offsets"), "down_proj_offsets", load_exported
    )


def test_decode_kernel_logic_in_the_triton_interpreter():
    """The Triton kernel's indexing, run by Triton's CPU interpreter (skipped without triton)."""
    pytest.importorskip("triton")
    script = Path(__file__).with_name("bitmap_kernel_check.py")
    env = dict(
        os.environ, TRITON_INTERPRET="1", STUN_SPARSE_AUTOTUNE="0", PYTHONPATH=str(Path(__file__).resolve().parents[1])
    )
    run = subprocess.run([sys.executable, str(script), "cpu"], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ok" in run.stdout


# ---- GPU: the Triton kernel and the whole model ---------------------------------------------------


@cuda
def test_decode_kernel_matches_the_masked_dense_product_on_gpu():
    run = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("bitmap_kernel_check.py")), "cuda"],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, STUN_SPARSE_AUTOTUNE="0"),
    )
    assert run.returncode == 0, run.stdout + run.stderr


@cuda
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_bitmap_model_on_gpu_matches_dense_compiled_and_generates(family):
    model = masked_model(family).to("cuda", torch.bfloat16)
    ids = random_ids(model, n=4, length=40).cuda()
    expected = logits(model, ids)
    sparse = sparsify(copy.deepcopy(model))
    assert sparse_formats(sparse)[1]["down_proj"] == "bitmap"

    def err(x):
        return ((x.float() - expected.float()).norm() / expected.float().norm()).item()

    assert err(logits(sparse, ids)) < 2e-2  # prefill: dense tiles + grouped_mm
    for tokens in (1, 8, 32):  # decode: the bitmap kernel
        step = ids[:, :tokens].reshape(-1, 1)[:tokens]
        ref = logits(model, step)
        got = logits(sparse, step)
        assert ((got.float() - ref.float()).norm() / ref.float().norm()).item() < 2e-2, tokens
    torch._dynamo.reset()
    compiled = torch.compile(sparse, fullgraph=True)
    with torch.no_grad():
        out = compiled(ids[:1, :8]).logits
    torch.testing.assert_close(out.float(), logits(sparse, ids[:1, :8]).float(), rtol=2e-2, atol=2e-2)
    prompt = ids[:1, :6]
    assert sparse.generate(prompt, max_new_tokens=4, do_sample=False).shape == (1, 10)
