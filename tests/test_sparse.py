import copy

import pytest
import torch

from stun_lightning import StunRecipe, prune
from stun_lightning.sparse import (
    IMPLEMENTATION,
    Not24SparseError,
    NotSparseExpertsError,
    SparsifyConfig,
    align_pairs,
    compress_24,
    decompress_24,
    densify,
    is_sparsified,
    sparse_nbytes,
    sparsify,
)
from stun_lightning.sparse.convert import expert_modules
from stun_lightning.sparse.experts import _grouped_forward, _reference_forward, grouped_mm_reference
from stun_lightning.tiny import build_tiny_model

from conftest import logits, random_ids

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernel)")


def mask_24(w: torch.Tensor) -> torch.Tensor:
    groups = w.reshape(*w.shape[:-1], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().topk(2, -1).indices, True)
    return (groups * keep).reshape(w.shape)


def pruned_24(family: str, seed: int = 0, **kwargs):
    model = build_tiny_model(family, seed=seed, **kwargs)
    ids = random_ids(model, n=4, length=16)
    prune(
        model,
        StunRecipe(expert_sparsity=0.25, pattern="2:4", metric="magnitude", layer_budget="uniform"),
        calibration=ids,
        progress=False,
    )
    return model.eval(), ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 8, 16), (2, 5, 12), (4, 20)])
def test_compression_is_lossless_and_compact(shape, dtype):
    w = mask_24(torch.randn(shape)).to(dtype)
    w.view(-1, 4)[::3] = 0  # groups with no nonzero
    w.view(-1, 4)[1::5, 1:] = 0  # groups with one
    values, meta = compress_24(w)
    assert values.shape == (*shape[:-1], shape[-1] // 2) and values.dtype == dtype
    assert meta.shape == (*shape[:-1], (shape[-1] // 4 + 1) // 2) and meta.dtype == torch.uint8
    assert torch.equal(decompress_24(values, meta), w)
    nbytes = values.numel() * values.element_size() + meta.numel()
    if dtype == torch.bfloat16 and shape[-1] % 8 == 0:
        assert nbytes == w.numel() * 2 * 0.5625


def test_not_24_tensors_are_refused_with_the_fix():
    w = mask_24(torch.randn(2, 4, 16))
    w[1, 2, 5:8] = 1.0  # one group with 3 nonzeros
    with pytest.raises(
        Not24SparseError,
        match=r'layer 3 down_proj is not 2:4 sparse: 1 of 32 groups.*expert=1, row=2, group=1.*pattern: "2:4"',
    ):
        compress_24(w, "layer 3 down_proj")
    with pytest.raises(Not24SparseError, match="divisible by 4"):
        compress_24(torch.zeros(2, 6), "w")


def test_align_pairs_groups_every_pair_once_in_expert_blocks():
    torch.manual_seed(0)
    num_experts, top_k, block_m = 6, 2, 4
    index = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(11)])
    ids, block_expert = align_pairs(index, num_experts, block_m)
    n_pairs = index.numel()
    assert block_expert.numel() == -(-n_pairs // block_m) + num_experts  # static: depends on shapes only
    real = ids[ids < n_pairs]
    assert sorted(real.tolist()) == list(range(n_pairs))
    for b, e in enumerate(block_expert.tolist()):
        block = ids[b * block_m : (b + 1) * block_m]
        block = block[block < n_pairs]
        if e < 0:
            assert block.numel() == 0
        else:
            assert block.numel() > 0 and (index.view(-1)[block.long()] == e).all()


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"])
def test_sparsified_model_matches_the_dense_pruned_model(family):
    model, ids = pruned_24(family)
    dense = logits(model, ids)
    sparse = sparsify(copy.deepcopy(model))
    assert is_sparsified(sparse) and sparse.config._experts_implementation == IMPLEMENTATION
    for _, experts, _ in expert_modules(sparse):
        assert "gate_up_proj" not in experts._parameters and experts.gate_up_proj_meta.dtype == torch.uint8
    torch.testing.assert_close(logits(sparse, ids), dense)
    sizes = sparse_nbytes(sparse)
    assert sizes["expert_bytes"] < 0.57 * sizes["expert_bytes_dense"]


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_grouped_path_equals_the_reference_path(family):
    model, _ = pruned_24(family)
    sparsify(model)
    _, experts, _ = next(expert_modules(model))
    torch.manual_seed(1)
    for tokens in (1, 7, 40):
        x = torch.randn(tokens, model.config.hidden_size)
        index = torch.stack([torch.randperm(experts.num_experts)[:2] for _ in range(tokens)])
        weights = torch.rand(tokens, 2)
        torch.testing.assert_close(
            _grouped_forward(experts, x, index, weights), _reference_forward(experts, x, index, weights)
        )


def test_generate_runs_from_compressed_experts():
    model, ids = pruned_24("mixtral")
    expected = model.generate(ids[:1, :8], max_new_tokens=6, do_sample=False)
    sparsify(model)
    assert torch.equal(model.generate(ids[:1, :8], max_new_tokens=6, do_sample=False), expected)


def test_moe_block_compiles_without_graph_breaks():
    model, ids = pruned_24("qwen3_moe")
    sparsify(model)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(ids[:1])
    assert explanation.graph_break_count == 0, explanation.break_reasons
    ops = [str(n.target) for g in explanation.graphs for n in g.graph.nodes]
    assert any("sparse24_experts_mm" in op for op in ops) and any("route_pairs" in op for op in ops)


def test_refusal_leaves_the_model_dense_and_densify_restores_exactly():
    model = build_tiny_model("mixtral")
    prune(
        model,
        StunRecipe(expert_sparsity=0.25, sparsity=0.5, metric="magnitude", layer_budget="uniform"),
        calibration=random_ids(model),
        progress=False,
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(Not24SparseError, match=r'layer 0 gate_up_proj is not 2:4.*pattern: "2:4"'):
        sparsify(model, SparsifyConfig(formats=("2:4",)))
    assert not is_sparsified(model) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    model, ids = pruned_24("gpt_oss")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = logits(model, ids)
    densify(sparsify(model))
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert model.config._experts_implementation != IMPLEMENTATION
    torch.testing.assert_close(logits(model, ids), out)


def test_dense_experts_with_the_sparse_implementation_are_an_error():
    model, ids = pruned_24("mixtral")
    model.set_experts_implementation(IMPLEMENTATION)
    with pytest.raises(NotSparseExpertsError, match="sparsify"):
        logits(model, ids)


# ---- GPU: the Triton kernel -------------------------------------------------------------------


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(8, 2 * 96, 256, 2), (4, 40, 76, 3)])  # E, N, K, top-k; the second has ragged tiles
@pytest.mark.parametrize("tokens", [1, 33, 300])
def test_kernel_matches_reference_on_gpu(shape, tokens, dtype):
    from stun_lightning.sparse.experts import block_m_for, sparse24_grouped_mm

    num_experts, n, k, top_k = shape
    torch.manual_seed(tokens)
    w = mask_24(torch.randn(num_experts, n, k, device="cuda")).to(dtype)
    values, meta = compress_24(w)
    x = torch.randn(tokens, k, device="cuda", dtype=dtype)
    index = torch.stack([torch.randperm(num_experts, device="cuda")[:top_k] for _ in range(tokens)])
    block_m = block_m_for(tokens * top_k, num_experts)
    ids, block_expert = align_pairs(index, num_experts, block_m)
    ref = grouped_mm_reference(x.double(), values.double(), meta, ids, block_expert, top_k, block_m)
    out = sparse24_grouped_mm(x, values, meta, ids, block_expert, top_k, block_m)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < (1e-2 if dtype != torch.float32 else 1e-5), err


@cuda
@pytest.mark.parametrize("num_experts,top_k", [(8, 2), (128, 8), (6, 2), (3, 1)])
@pytest.mark.parametrize("tokens", [1, 5, 32, 300, 2048])
@pytest.mark.parametrize("block_m", [16, 64, 128])
@pytest.mark.parametrize("routed", ["all", "some"])
def test_align_kernels_equal_the_torch_ops_on_gpu(num_experts, top_k, tokens, block_m, routed):
    """The one-program kernel (up to 256 pairs) and the one-program-per-expert kernel (prefill)."""
    from stun_lightning.sparse.experts import align

    torch.manual_seed(tokens)
    pool = num_experts if routed == "all" else max(top_k, num_experts // 2)  # "some": the last experts see no token
    index = torch.stack([torch.randperm(pool, device="cuda")[:top_k] for _ in range(tokens)])
    index[0, :] = index[-1, :]  # two tokens with the same experts: the rank within an expert must be stable
    ids, block_expert = align(index, num_experts, block_m)
    want_ids, want_blocks = align_pairs(index, num_experts, block_m)
    assert torch.equal(ids, want_ids) and torch.equal(block_expert, want_blocks)


@cuda
@pytest.mark.parametrize("shape", [(8, 2 * 96, 512, 2), (4, 40, 76, 3), (6, 24, 40, 2)])
def test_every_autotuner_candidate_is_correct_on_gpu(shape):
    """The autotuners may pick any candidate on some shape: each must compute the same product."""
    from stun_lightning.sparse import triton_decode
    from stun_lightning.sparse.experts import block_m_for
    from stun_lightning.sparse.triton_kernel import DECODE_CONFIGS, PREFILL_CONFIGS, launch_grouped_mm, rows_bucket_for

    num_experts, n, k, top_k = shape
    torch.manual_seed(0)
    values, meta = compress_24(mask_24(torch.randn(num_experts, n, k, device="cuda")).bfloat16())
    for tokens, configs in ((3, DECODE_CONFIGS), (200, PREFILL_CONFIGS), (600, PREFILL_CONFIGS)):
        x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
        index = torch.stack([torch.randperm(num_experts, device="cuda")[:top_k] for _ in range(tokens)])
        block_m = block_m_for(tokens * top_k, num_experts)
        ids, block_expert = align_pairs(index, num_experts, block_m)
        ref = grouped_mm_reference(x.double(), values.double(), meta, ids, block_expert, top_k, block_m)
        runs = [
            lambda c=c: launch_grouped_mm(x, values, meta, ids, block_expert, top_k, block_m, config=c) for c in configs
        ]
        if block_m <= 16 and triton_decode.fits(values):  # K % 8 == 0: the CUDA-core decode kernel too
            bucket = rows_bucket_for(tokens * top_k, num_experts)
            runs += [
                lambda c=c: triton_decode.launch_decode(
                    x, values, meta, ids, block_expert, top_k, block_m, bucket, config=c
                )
                for c in triton_decode.CONFIGS
            ]
        for run in runs:
            out = run()
            err = ((out.double() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, err


@cuda
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_sparse_model_on_gpu_matches_dense_and_generates(family):
    model, ids = pruned_24(family)
    ids = ids.cuda()
    reference = logits(copy.deepcopy(model).cuda(), ids)  # float32, the dense pruned model
    model = model.to("cuda", torch.bfloat16)
    dense = logits(model, ids).float()
    expected = model.generate(ids[:1, :8], max_new_tokens=8, do_sample=False)
    sparsify(model)
    out = logits(model, ids).float()

    def err(x):
        return ((x - reference).norm() / reference.norm()).item()

    # bf16 rounding compounds over the layers; the sparse path must be as close to float32 as dense bf16 is
    assert err(out) < max(1.5 * err(dense), 1e-2), (err(out), err(dense))
    generated = model.generate(ids[:1, :8], max_new_tokens=8, do_sample=False)
    assert generated.shape == expected.shape
    assert (generated == expected).float().mean() > 0.8  # bf16 may flip a near-tie


@cuda
def test_sparse_model_compiles_on_gpu_without_graph_breaks():
    model, ids = pruned_24("qwen3_moe")
    ids = ids.cuda()
    reference = logits(copy.deepcopy(model).cuda(), ids)
    model = model.to("cuda", torch.bfloat16)
    dense = logits(model, ids).float()
    sparsify(model)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(ids[:1])
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        again = compiled(ids).logits.float()

    def err(x):
        return ((x - reference).norm() / reference.norm()).item()

    assert err(again) < max(1.5 * err(dense), 1e-2), (err(again), err(dense))
