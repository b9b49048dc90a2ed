"""One row of ``benchmarks/inference.py``: a shape's variants, how a call is compiled and timed,
and what the row measures (time, the byte / FLOP floor, error against the float32 reference)."""

from __future__ import annotations

import torch
from transformers import StaticCache

from benchmarks.inference_models import (
    RoutingRecorder,
    build_model,
    build_variants,
    decode_step,
    float_reference,
    moe_blocks,
    nbytes,
    nbytes_of_cache,
    prefill_step,
)

DENSE_OF = {
    "dense": "dense",
    "2:4": "dense",
    "experts-25%": "experts-25%",
    "both": "experts-25%",
}  # the float32 reference


# ---------------------------------------------------------------- measurement


def compiled(fn, compile: bool, decode: bool, graphs: str = "capture"):
    """``fn`` under torch.compile; at decode also in a CUDA graph: ``capture`` (default) compiles in
    the default mode and captures the compiled call in one ``torch.cuda.CUDAGraph`` that each call
    replays (as a server does around a compiled model); ``trees`` is ``mode="reduce-overhead"``
    (torch's CUDA-graph trees, whose Python launch path runs on every call)."""
    if not compile:
        return fn
    torch._dynamo.reset()  # a fresh cache per row: no recompile limits, CUDA-graph pools freed
    if decode and graphs == "trees":
        return torch.compile(fn, mode="reduce-overhead", dynamic=False)
    fn = torch.compile(fn, dynamic=False)
    return captured(fn) if decode and torch.cuda.is_available() else fn


def captured(fn):
    """``fn`` captured in a CUDA graph on its first call (after warm-up calls on a side stream, which
    also compile and autotune); every call replays the graph on the same input tensors."""
    state = {}

    def replay(*inputs):
        if "graph" not in state:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    fn(*inputs)
            torch.cuda.current_stream().wait_stream(stream)
            state["graph"] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(state["graph"]):
                state["out"] = fn(*inputs)
        state["graph"].replay()
        return state["out"]

    return replay


def measure(fn, inputs, ref, timer) -> tuple[float, float]:
    """(us per call, relative error of the output against ``ref``) after three warm-up calls."""
    with torch.no_grad():
        for _ in range(3):
            fn(*inputs)
        out = fn(*inputs).float().clone()  # CUDA-graph outputs are overwritten by the next replay
        return timer(lambda: fn(*inputs)), relerr(out, ref)


def relerr(out, ref) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


# ---------------------------------------------------------------- rows


class Setup:
    """One shape's variants, their inputs and (made on first use) their float32 references."""

    def __init__(self, shape, args):
        self.args = args
        dense = build_model(shape, args.layers, args.vocab, args.device, args.seed)
        self.models = build_variants(dense, args.variants, args.seed)
        cfg = dense.config
        self.hidden, self.top_k, self.layers = cfg.hidden_size, cfg.num_experts_per_tok, cfg.num_hidden_layers
        self.attn = cfg.num_attention_heads * cfg.head_dim  # per-token width of attention scores
        experts = [e for _, _, e in moe_blocks(dense)]
        self.expert_params = sum(p[0].numel() for p in (experts[0].gate_up_proj, experts[0].down_proj))
        embed = dense.get_input_embeddings().weight.numel()
        self.other_params = (
            sum(p.numel() for p in dense.parameters())
            - embed
            - self.expert_params * sum(e.num_experts for e in experts)
        )
        g = torch.Generator(device=args.device).manual_seed(args.seed)
        self.layer_in = {
            t: torch.randn(1, t, self.hidden, device=args.device, dtype=torch.bfloat16, generator=g)
            for t in args.all_tokens
        }
        self.ids = {
            t: torch.randint(args.vocab, (t, 1) if t in args.tokens else (1, t), device=args.device, generator=g)
            for t in args.all_tokens
        }
        self.references = {}  # base variant -> float32 copy, made on first use

    def reference(self, variant):
        base = DENSE_OF[variant]
        if base not in self.references:
            self.references[base] = float_reference(self.models[base])
        return self.references[base]

    def model_inputs(self, t):
        decode = t in self.args.tokens
        pos = self.args.cache_len - 1 if decode else 0
        positions = (
            torch.arange(pos, pos + self.ids[t].shape[1], device=self.args.device).expand_as(self.ids[t]).contiguous()
        )
        return self.ids[t], positions

    def model_fn(self, model, t):
        if t not in self.args.tokens:
            return prefill_step(model)
        cache = StaticCache(config=model.config, max_cache_len=self.args.cache_len)
        step = decode_step(model, cache, self.args.cache_len - 1)
        with torch.no_grad():
            step(*self.model_inputs(t))  # allocates the cache outside compile (static addresses for CUDA graphs)
        step.cache = cache
        return step

    def row(self, scope, variant, t, bw, flops, timer):
        model, decode = self.models[variant], t in self.args.tokens
        experts = [e for _, _, e in moe_blocks(model)]
        if scope == "layer":
            block, router, _ = moe_blocks(model)[0]
            x = self.layer_in[t]
            with torch.no_grad():
                _, weights, index = router(x.view(-1, self.hidden))
                eager = block(x)
                ref_experts = moe_blocks(self.reference(variant))[0][2]
                ref = ref_experts(x.view(-1, self.hidden).float(), index, weights.float()).view(x.shape)
            fn, inputs, weight_bytes = (
                compiled(block, self.args.compile, decode, self.args.graphs),
                (x,),
                nbytes(experts[0]),
            )
            routing, other_bytes, other_flops = [(weights, index)], 0, 0
        else:
            step = self.model_fn(model, t)
            inputs = self.model_inputs(t)
            with torch.no_grad(), RoutingRecorder(model) as rec:
                eager = step(*inputs)
            with torch.no_grad(), RoutingRecorder(self.reference(variant), force=rec.routing):
                ref = self.model_fn(self.reference(variant), t)(*inputs).float()
            routing, weight_bytes = rec.routing, nbytes(model)
            fn = compiled(step, self.args.compile, decode, self.args.graphs)
            kv = nbytes_of_cache(step.cache) if decode else 0
            other_bytes = weight_bytes - sum(nbytes(e) for e in experts) + kv
            context = self.args.cache_len if decode else (t + 1) / 2
            other_flops = 2 * t * self.other_params + 4 * t * context * self.attn * self.layers
        touched = [index.unique().numel() for _, index in routing]
        read = other_bytes + sum(n * nbytes(e) / e.num_experts for n, e in zip(touched, experts))
        work = other_flops + 2 * t * self.top_k * self.expert_params * len(routing)
        eager_err = relerr(eager, ref)
        us, err = measure(fn, inputs, ref, timer)
        return dict(
            us=us,
            floor=max(read / bw, work / flops) * 1e6,
            err=err,
            eager_err=eager_err,
            mb=weight_bytes / 2**20,
            experts=touched,
        )
