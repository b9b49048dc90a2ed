"""The 2:4 model compiled whole: by ``torch.compile(model)`` with static or dynamic shapes, and by
``generate()`` with a static cache and transformers' own compilation (``CompileConfig``), with no
graph break (``fullgraph=True``) at any batch size (issue 24)."""

import contextlib
import copy

import pytest
import torch
from transformers import CompileConfig

from stun_lightning.sparse import sparsify
from stun_lightning.sparse.experts import (
    BLOCK_MS,
    tracing_for_aoti,
    align_pairs,
    layout_bound,
    pairs_layout,
    route_pairs,
)

from conftest import logits
from test_sparse import cuda, pruned_24


class GraphCounter:
    """A torch.compile backend that runs ``aot_eager`` (the fake kernels and functionalization, as
    Inductor sees them) and keeps each graph's input shapes as dynamo traced them (ints or symbols)."""

    def __init__(self):
        self.shapes = []

    def __deepcopy__(self, memo):  # CompileConfig.to_dict deep-copies its backend: keep this one
        return self

    def __call__(self, gm, example_inputs, **_):  # generate() passes CompileConfig.mode along
        from torch._dynamo.backends.common import aot_autograd

        values = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
        self.shapes.append([tuple(v.shape) for v in values if isinstance(v, torch.Tensor)])
        return aot_autograd(fw_compiler=lambda g, _: g)(gm, example_inputs)

    def symbolic(self, i: int) -> bool:
        return any(isinstance(d, torch.SymInt) and not d.node.is_constant() for shape in self.shapes[i] for d in shape)


@pytest.mark.parametrize("num_experts,top_k", [(8, 2), (128, 8), (6, 1)])
def test_route_pairs_holds_the_layout_of_align_pairs_as_a_prefix(num_experts, top_k):
    torch.manual_seed(num_experts)
    for tokens in (1, 3, 17, 300, 2100):
        index = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(tokens)])
        n_pairs = index.numel()
        sorted_ids, block_expert = route_pairs(index, num_experts)
        block_m, n_blocks = pairs_layout(n_pairs, num_experts)
        want_ids, want_blocks = align_pairs(index, num_experts, block_m)
        assert torch.equal(sorted_ids[: n_blocks * block_m], want_ids) and torch.equal(
            block_expert[:n_blocks], want_blocks
        )
        # the bound holds every block size, not only the one chosen for this many pairs
        ids_len, blocks_len = layout_bound(n_pairs, num_experts)
        for m in BLOCK_MS:
            blocks = -(-n_pairs // m) + min(num_experts, n_pairs)
            assert blocks * m <= ids_len and blocks <= blocks_len, (tokens, m)


@pytest.mark.parametrize("dynamic", [None, True])
def test_compiled_sparse_model_is_one_graph_at_every_batch_size(dynamic):
    """``dynamic=None``: static first, then automatic dynamic after the batch size changes;
    ``dynamic=True``: symbolic from the start (batch 1 is specialized). Either way the shapes go
    symbolic, with no graph break, and later batch sizes reuse that graph."""
    model, ids = pruned_24("qwen3_moe")
    sparsify(model)
    backend = GraphCounter()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=dynamic)
    with torch.no_grad():
        for n in (1, 3, 4):
            torch.testing.assert_close(compiled(ids[:n]).logits, logits(model, ids[:n]))
            if n == 3:
                assert backend.symbolic(-1), backend.shapes[-1]
                graphs = len(backend.shapes)
    assert len(backend.shapes) == graphs  # batch 4 ran the symbolic graph


def test_generate_with_transformers_compilation_on_cpu():
    """``generate()`` compiles the forward itself (static cache, ``CompileConfig(fullgraph=True)``;
    its ``_compile_all_devices`` lets it compile on the CPU), at two batch sizes: the tokens are
    the dense masked model's."""
    model, ids = pruned_24("mixtral")
    dense = copy.deepcopy(model)
    sparsify(model)
    backend = GraphCounter()
    config = CompileConfig(fullgraph=True, backend=backend)
    config._compile_all_devices = True
    torch._dynamo.reset()
    for n in (1, 2):
        prompt = ids[:n, :6]
        want = dense.generate(prompt, max_new_tokens=4, do_sample=False, cache_implementation="static")
        got = model.generate(
            prompt, max_new_tokens=4, do_sample=False, cache_implementation="static", compile_config=config
        )
        assert torch.equal(got, want)
        assert_greedy_under_the_dense_model(model, dense, got, prompt_len=6)
        wrong = got.clone()
        wrong[:, -1] = dense(got[:, :-1]).logits[:, -1].argmin(-1)  # the least likely token
        with pytest.raises(AssertionError):
            assert_greedy_under_the_dense_model(model, dense, wrong, prompt_len=6)
    assert backend.shapes, "generate() did not compile the forward"
    assert backend.symbolic(-1)  # the second batch size made the compiled forward dynamic


def assert_greedy_under_the_dense_model(sparse, dense, got: torch.Tensor, prompt_len: int) -> None:
    """Every token ``sparse`` generated is the dense model's greedy choice at that point, up to bf16
    noise: the dense logits of the chosen token are within twice the largest difference between the
    two models' logits (teacher-forced on ``got``) of the dense maximum. Comparing whole sequences
    instead fails on a random model once a near-tie flips, and counting prompt tokens hides errors."""
    with torch.no_grad():
        ref = dense(got[:, :-1]).logits.float()[:, prompt_len - 1 :]
        out = sparse(got[:, :-1]).logits.float()[:, prompt_len - 1 :]
    noise = (out - ref).abs().max().item()
    assert noise < 0.02 * ref.abs().max().item(), noise  # the eager sparse model computes the dense model's logits
    chosen = ref.gather(-1, got[:, prompt_len:, None]).squeeze(-1)
    gap = (ref.max(-1).values - chosen).max().item()
    assert gap <= 2 * noise + 1e-3, (gap, noise, got)


# ---- GPU ------------------------------------------------------------------------------------------


@cuda
def test_generate_compiled_by_transformers_matches_the_dense_model_on_gpu():
    """Tiny Qwen3 whose expert shapes fit every kernel; ``generate()`` with a static cache,
    ``reduce-overhead`` (CUDA graphs) and ``fullgraph=True``, at batch 1 and then 3 (automatic
    dynamic); then ``torch.compile(model, dynamic=True, fullgraph=True)`` at two batch sizes."""
    model, ids = pruned_24("qwen3_moe", moe_intermediate_size=128)
    model = model.to("cuda", torch.bfloat16)
    ids = ids.cuda()
    dense = copy.deepcopy(model)
    sparsify(model)
    torch._dynamo.reset()
    config = CompileConfig(fullgraph=True)
    for n in (1, 3):
        prompt = ids[:n, :8]
        want = dense.generate(prompt, max_new_tokens=8, do_sample=False, cache_implementation="static")
        got = model.generate(
            prompt, max_new_tokens=8, do_sample=False, cache_implementation="static", compile_config=config
        )
        assert got.shape == want.shape
        assert torch.equal(got[:, :8], prompt)
        assert_greedy_under_the_dense_model(model, dense, got, prompt_len=8)
    assert hasattr(model, "_compiled_call"), "generate() did not compile the forward"

    # bf16 kernels fused differently by Inductor move logits by ~1% on their own, and a token whose
    # router scores nearly tie can change experts: the compiled sparse model's median token must stay as
    # close to its eager self as the dense model compiled the same way does to its own (measured on the
    # H100: whole-tensor errors 0.0159 vs 0.0066 at batch 2, which a single re-routed token can make).
    def compiled_error(m: torch.nn.Module, n: int) -> float:
        compiled = torch.compile(m, dynamic=True, fullgraph=True, mode="reduce-overhead")
        with torch.no_grad():
            for _ in range(3):  # warm-up, record, replay
                out = compiled(ids[:n]).logits.float()
        ref = logits(m, ids[:n]).float()
        return ((out - ref).norm(dim=-1) / ref.norm(dim=-1)).median().item()

    for n in (2, 4):
        torch._dynamo.reset()
        sparse_error = compiled_error(model, n)
        torch._dynamo.reset()
        dense_error = compiled_error(dense, n)
        assert sparse_error < 2 * dense_error + 2e-3, (n, sparse_error, dense_error)


def test_only_the_aoti_trace_goes_into_the_kernels():
    """``torch.compile`` sees the opaque ``stun::route_pairs``; only inside ``tracing_for_aoti`` (the
    AOTInductor export) is the routing traced into plain ops (torch 2.11's ``is_exporting()`` is True
    under compile too, so it cannot tell the two apart)."""
    model, ids = pruned_24("qwen3_moe")
    sparsify(model)
    for aoti in (False, True):
        graphs = []

        def backend(gm, example_inputs):
            graphs.append(str(gm.graph))
            return gm.forward

        torch._dynamo.reset()
        with tracing_for_aoti() if aoti else contextlib.nullcontext(), torch.no_grad():
            torch.compile(model, backend=backend)(ids[:1])
        assert graphs and any("route_pairs" in g for g in graphs) != aoti
