"""The sparse tensor-core decode kernel (stun_lightning/sparse/cuda_mma.py): its layout on the CPU, its
products and the models that run it on a GPU."""

import copy
import functools

import pytest
import torch

from stun_lightning.sparse import align_pairs, compress_24, sparsify
from stun_lightning.sparse import cuda_mma
from stun_lightning.sparse.experts import grouped_mm_reference

from conftest import logits
from test_sparse import cuda, mask_24, pruned_24


def _fragment_order() -> torch.Tensor:
    """The activation order of one 64-input step from the mma.sp fragment rule, entry by entry (see
    ``cuda_mma.permute_activations``)."""
    perm = []
    for m in range(2):
        for t in range(4):
            for r in range(8):
                j = (2 * t + 8 * (r // 2)) // 4
                group = 4 * j + 2 * m if j < 4 else 4 * (j - 4) + 2 * m + 1
                perm.append(4 * group + 2 * (t % 2) + r % 2)
    return torch.tensor(perm)


def test_activation_permutation_reorders_each_step_of_64_inputs():
    perm = _fragment_order()
    assert sorted(perm.tolist()) == list(range(64))
    # lane 0's B fragment of mma 0 starts with inputs 0-1 (its group 0 is our group 0), of mma 1
    # with inputs 8-9 (its group 0 is our group 2: lane 0 loads our groups 0-3 for both)
    assert perm[:2].tolist() == [0, 1] and perm[32:34].tolist() == [8, 9]


def test_permuted_activations_are_the_listed_order_of_each_step():
    a = torch.randn(3, 128, dtype=torch.bfloat16)
    out = cuda_mma.permute_activations(a)
    assert torch.equal(out, a.view(3, 2, 64)[:, :, _fragment_order()].reshape(3, 128))


def test_the_kernels_are_never_chosen_off_the_gpu_and_can_be_disabled():
    values = torch.zeros(2, 128, 64, dtype=torch.bfloat16)
    meta = torch.zeros(2, 128, 16, dtype=torch.uint8)
    assert not cuda_mma.fits(torch.zeros(1, 128, dtype=torch.bfloat16), values, meta, 16)  # CPU
    assert not cuda_mma.fits_tile(torch.zeros(512, 128, dtype=torch.bfloat16), values, meta, 128)
    with cuda_mma.disabled():
        assert not cuda_mma._enabled
    assert cuda_mma._enabled


def test_the_hopper_kernel_refuses_a_launch_it_has_no_form_for(monkeypatch):
    launch = functools.partial(
        cuda_mma.wgmma_grouped_mm,
        torch.zeros(4, 128, dtype=torch.bfloat16),
        torch.zeros(2, 256, 64, dtype=torch.bfloat16),
        torch.zeros(2, 256, 16, dtype=torch.uint8),
        torch.zeros(128, dtype=torch.int32),
        torch.zeros(1, dtype=torch.int32),
        1,
    )
    with pytest.raises(ValueError, match="2 consumer warpgroups"):
        launch(consumers=4)
    monkeypatch.setattr(cuda_mma, "MAX_ACT_ELEMENTS", 100)  # its producer's 32-bit offsets into the activations
    with pytest.raises(ValueError, match="at most 100 elements"):
        launch()


# ---- GPU ------------------------------------------------------------------------------------------


def _routed(num_experts, top_k, tokens, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.stack([torch.randperm(num_experts, device="cuda", generator=g)[:top_k] for _ in range(tokens)])


@cuda
@pytest.mark.parametrize("shape", [(8, 256, 1024, 2), (16, 96, 192, 4), (2, 64, 128, 1)])  # E, N, K, top-k
@pytest.mark.parametrize("tokens", [1, 5, 16, 40])
@pytest.mark.parametrize(
    "launch",
    [dict(), dict(warps=2, unroll=2, ctas_per_sm=1), dict(warps=8, unroll=4, ctas_per_sm=16), dict(warps=4, unroll=8)],
)
def test_mma_kernel_matches_reference_on_gpu(shape, tokens, launch):
    """Blocks of 16 pairs: one or two n8 tiles, several blocks per expert, padding rows, split-K or not."""
    num_experts, n, k, top_k = shape
    torch.manual_seed(tokens)
    w = mask_24(torch.randn(num_experts, n, k, device="cuda")).bfloat16()
    w.view(-1, 4)[::5] = 0  # groups with no nonzero (stored at positions 0, 1)
    values, meta = compress_24(w)
    index = _routed(num_experts, top_k, tokens, seed=tokens)
    ids, block_expert = align_pairs(index, num_experts, 16)
    for rows_per_a in (top_k, 1):  # gate_up reads a token's row per pair, down_proj a row per pair
        x = torch.randn(tokens * top_k // rows_per_a, k, device="cuda", dtype=torch.bfloat16)
        ref = grouped_mm_reference(x.double(), values.double(), meta, ids, block_expert, rows_per_a, 16)
        out = cuda_mma.mma_sp_grouped_mm(x, values, meta, ids, block_expert, rows_per_a, **launch)
        assert out.shape == ref.shape and out.dtype == torch.bfloat16
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err < 1e-2, err


def _assert_prefill_launches_match(shape, tokens, launches):
    """Each ``(rows, launch)`` of a prefill kernel on blocks of 128 pairs (partial and full, several
    per expert) against the float64 reference, for gate_up-like (rows_per_a = top-k) and down-like
    calls; launches whose tile height does not divide the outputs are skipped."""
    num_experts, n, k, top_k = shape
    torch.manual_seed(tokens)
    values, meta = compress_24(mask_24(torch.randn(num_experts, n, k, device="cuda")).bfloat16())
    index = _routed(num_experts, top_k, tokens, seed=tokens)
    ids, block_expert = align_pairs(index, num_experts, 128)
    for rows_per_a in (top_k, 1):
        x = torch.randn(tokens * top_k // rows_per_a, k, device="cuda", dtype=torch.bfloat16)
        ref = grouped_mm_reference(x.double(), values.double(), meta, ids, block_expert, rows_per_a, 128)
        for rows, launch in launches:
            if n % rows:
                continue
            out = launch(x, values, meta, ids, block_expert, rows_per_a)
            err = ((out.double() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, (launch, err)


@cuda
@pytest.mark.parametrize("shape", [(8, 256, 512, 2), (4, 128, 192, 1), (2, 384, 64, 2)])  # E, N, K, top-k
@pytest.mark.parametrize("tokens", [70, 300])
def test_prefill_tile_kernel_matches_reference_on_gpu(shape, tokens):
    """The mma.sp tile kernel: 128 / 256-row tiles, 1 to 8 steps of 64 inputs, 3 or 5 stages."""
    launches = [
        (rows, functools.partial(cuda_mma.tile_grouped_mm, rows=rows, stages=stages))
        for rows, stages in ((128, 3), (128, 5), (256, 3))
    ]
    _assert_prefill_launches_match(shape, tokens, launches)


hopper = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)),
    reason="needs a Hopper GPU (sm_90)",
)


@hopper
@pytest.mark.parametrize(
    "shape", [(8, 256, 512, 2), (4, 128, 192, 1), (2, 384, 64, 2), (3, 256, 1024, 3)]
)  # E, N, K, top-k
@pytest.mark.parametrize("tokens", [70, 300])
def test_hopper_prefill_kernel_matches_reference(shape, tokens):
    """The sparse ``wgmma`` kernels: tiles of 64 / 128 / 256 rows, 1 to 16 steps, every warp copying
    and multiplying or warp-specialized (K shorter or longer than the pipeline), CTAs in grid order
    or in groups of blocks (one, or a size that leaves a remainder)."""
    launches = [
        (
            rows,
            functools.partial(
                cuda_mma.wgmma_grouped_mm, rows=rows, stages=stages, ctas=ctas, consumers=consumers, group=group
            ),
        )
        for rows, stages, ctas, consumers, group in (
            (128, 4, 2, 0, 0),
            (64, 3, 3, 0, 3),
            (128, 2, 2, 0, 1),
            (256, 3, 1, 0, 2),
            (256, 4, 1, 2, 4),
            (256, 3, 1, 2, 1),
            (128, 5, 1, 2, 3),
            (256, 4, 1, 2, 0),
        )
    ]
    _assert_prefill_launches_match(shape, tokens, launches)


def _sparse_qwen3(ids_of):
    """A pruned, sparsified bf16 tiny Qwen3 whose expert shapes fit the kernels, ``ids_of(ids)`` as
    its input, and the float32 logits of the masked dense model."""
    model, ids = pruned_24("qwen3_moe", moe_intermediate_size=128)  # gate_up 256 x 64, down 64 x 128
    ids = ids_of(ids.cuda())
    reference = logits(copy.deepcopy(model).cuda(), ids)
    model = model.to("cuda", torch.bfloat16)
    sparsify(model)
    return model, ids, lambda x: ((x - reference).norm() / reference.norm()).item()


def _logits_counting(model, ids, launcher: str):
    """Logits, and how many times ``cuda_mma.<launcher>`` ran for them."""
    calls = []
    original = getattr(cuda_mma, launcher)
    setattr(cuda_mma, launcher, lambda *a, **kw: calls.append(1) or original(*a, **kw))
    try:
        return logits(model, ids).float(), len(calls)
    finally:
        setattr(cuda_mma, launcher, original)


@cuda
def test_prefill_of_a_model_runs_the_tile_kernel_and_matches_the_triton_path():
    # 2 x 512 tokens: 2048 pairs, 256 per expert
    model, ids, err = _sparse_qwen3(lambda ids: torch.randint(0, ids.max().item() + 1, (2, 512), device="cuda"))
    launcher = "wgmma_grouped_mm" if cuda_mma.hopper_ready(torch.cuda.current_device()) else "tile_grouped_mm"
    out, calls = _logits_counting(model, ids, launcher)
    assert calls, f"the prefill did not run {launcher}"
    with cuda_mma.disabled():
        triton_path = logits(model, ids).float()
    assert err(out) < max(1.5 * err(triton_path), 1e-2), (err(out), err(triton_path))


@cuda
def test_models_route_decode_through_the_mma_kernel_and_compile_into_a_cuda_graph():
    """A model whose expert shapes fit: eager and compiled (CUDA graphs) logits match the Triton path,
    and the compiled MoE block calls ``stun::sparse24_mma`` with no graph break."""
    model, ids, err = _sparse_qwen3(lambda ids: ids[:4, :4])  # 16 tokens: 4 pairs per routed expert
    experts = model.model.layers[0].mlp.experts
    assert cuda_mma.fits(
        torch.zeros(2, 64, device="cuda", dtype=torch.bfloat16),
        experts.gate_up_proj_values,
        experts.gate_up_proj_meta,
        16,
    )
    eager, calls = _logits_counting(model, ids, "_launch")
    assert calls, "the decode step did not run the mma kernel"
    with cuda_mma.disabled():
        triton_path = logits(model, ids).float()
    assert err(eager) < max(1.5 * err(triton_path), 1e-2), (err(eager), err(triton_path))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for _ in range(3):  # warm-up, record, replay
            again = compiled(ids).logits.float()
    assert err(again) < max(1.5 * err(triton_path), 1e-2), (err(again), err(triton_path))
