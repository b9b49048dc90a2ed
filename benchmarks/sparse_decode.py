"""Decode and prefill time of one MoE layer: stun_sparse24 (our Triton kernel) vs dense grouped_mm.

    python benchmarks/sparse_decode.py [--shapes mixtral qwen3] [--tokens 1 8 32 2048]

Needs a CUDA GPU. For Mixtral-8x7B (hidden 4096, FFN 14336, 8 experts, top-2) and Qwen3-30B-A3B
(hidden 2048, expert FFN 768, 128 experts, top-8) layer shapes, random bf16 weights masked 2:4, it
times in one run, all under torch.compile (CUDA graphs, ``mode="reduce-overhead"``, for decode;
default mode for prefill):

* dense: transformers' ``grouped_mm`` experts on the masked weights (the fastest stock path);
* sparse: the same block after :func:`stun_lightning.sparse.sparsify` (``stun_sparse24``), whole
  layer (router, routing sort, both kernels, activation, weighted sum), and its two expert kernels
  alone (graphed);
* floors: bytes of the touched experts (dense bf16, and 2:4 values + metadata) over the measured
  device-copy bandwidth; FLOPs over the measured bf16 matmul rate;
* cuSPARSELt (the backend of ``torch.sparse.to_sparse_semi_structured``): the touched experts'
  gate_up and down products with the routing known on the host, graphed; a lower bound for the
  stock path (no routing, no activation), tokens padded to 16.

Correctness: relative error of each output against the dense layer in float32 (which routes some
tokens differently where bf16 router logits tie, so dense bf16 shows the same error), and of the
sparse output against the dense bf16 output (same routing). One table at the end.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

SHAPES = {
    "mixtral": dict(hidden=4096, ffn=14336, experts=8, top_k=2),
    "qwen3": dict(hidden=2048, ffn=768, experts=128, top_k=8),
}


def build_block(name: str):
    from transformers import MixtralConfig, Qwen3MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    s = SHAPES[name]
    if name == "mixtral":
        cfg = MixtralConfig(hidden_size=s["hidden"], intermediate_size=s["ffn"], num_local_experts=s["experts"], num_experts_per_tok=s["top_k"])
        cls = MixtralSparseMoeBlock
    else:
        cfg = Qwen3MoeConfig(hidden_size=s["hidden"], moe_intermediate_size=s["ffn"], num_experts=s["experts"], num_experts_per_tok=s["top_k"], norm_topk_prob=True)
        cls = Qwen3MoeSparseMoeBlock
    cfg._experts_implementation = "grouped_mm"
    block = cls(cfg).to("cuda", torch.bfloat16).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
        for w in (block.experts.gate_up_proj, block.experts.down_proj):
            groups = w.view(*w.shape[:-1], -1, 4)
            keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().topk(2, -1).indices, True)
            groups.mul_(keep)
    return block, cfg


class _Holder(torch.nn.Module):
    """A model-shaped wrapper so sparsify() finds the block (decoder layers -> mlp -> experts)."""

    def __init__(self, block, cfg):
        super().__init__()
        self.config = cfg
        layer = torch.nn.Module()
        layer.mlp = block
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList([layer])


def sparse_block(block, cfg):
    from stun_lightning.sparse.convert import compress_experts_

    sparse = copy.deepcopy(block)
    sparse.config = copy.deepcopy(cfg)
    with torch.no_grad():
        compress_experts_(sparse.experts, "bench")
    sparse.experts.config = sparse.config
    sparse.config._experts_implementation = "stun_sparse24"
    return sparse


def graphed(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3  # us


def compiled(block, tokens: int, fullgraph: bool):
    torch._dynamo.reset()
    mode = "reduce-overhead" if tokens <= 64 else "default"
    return torch.compile(block, mode=mode, dynamic=False, fullgraph=fullgraph)


def relerr(out, ref) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 32, 2048])
    parser.add_argument("--no-cusparselt", action="store_true")
    parser.add_argument("--budget-s", type=float, default=None, help="skip the rows left once this many seconds have passed")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/sparse_decode.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import transformers

    from stun_lightning.sparse.experts import align_pairs, block_m_for, sparse24_grouped_mm
    from stun_lightning.sparse.format import compressed_nbytes

    torch.manual_seed(0)
    print("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name(), flush=True)
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    bw = 2 * x.numel() / (bench(lambda: y.copy_(x)) * 1e-6)
    del x, y
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    flops = 2 * 8192**3 / (bench(lambda: a @ b) * 1e-6)
    del a, b
    print(f"copy {bw / 1e12:.2f} TB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s", flush=True)

    def f(row, key, fmt="{:8.1f}"):
        return fmt.format(row[key]) if key in row else "       -"

    def line(r) -> str:
        speed = f"{r['dense'] / r['sparse']:7.2f}" if "dense" in r and "sparse" in r else "      -"
        frac = f"{r['floor_24'] / r['sparse']:8.2f}" if "sparse" in r else "       -"
        frac_k = f"{r['floor_24'] / r['kernels']:9.2f}" if "kernels" in r else "        -"
        return (f"{r['shape']:8s} {r['T']:5d} {r['touched']:4d} | {f(r, 'dense')} {f(r, 'sparse')} {speed} | {f(r, 'kernels')} {r['floor_24']:9.1f} "
                f"{frac} {frac_k} | {r['floor_dense']:8.1f} {f(r, 'cslt')} | {f(r, 'dense_err', '{:9.1e}')} {f(r, 'sparse_err', '{:8.1e}')} {f(r, 'sp_vs_dn', '{:8.1e}')}")

    header = (f"{'shape':8s} {'T':>5s} {'exp':>4s} | {'dense':>8s} {'sparse':>8s} {'x dense':>7s} | {'kernels':>8s} {'2:4 floor':>9s} {'floor/sp':>8s} "
              f"{'floor/krn':>9s} | {'dn floor':>8s} {'cuSPLt':>8s} | {'err dense':>9s} {'err sp':>8s} {'sp-vs-dn':>8s}")

    setups = {}
    for name in args.shapes:
        s = SHAPES[name]
        block, cfg = build_block(name)
        sparse = sparse_block(block, cfg)
        ref_block = copy.deepcopy(block).float()
        ref_block.experts.config._experts_implementation = "eager"  # grouped_mm has no float32 CUDA kernel
        cslt = None
        if not args.no_cusparselt:
            try:
                cslt = [(torch._cslt_compress(block.experts.gate_up_proj[e].contiguous()), torch._cslt_compress(block.experts.down_proj[e].contiguous())) for e in range(s["experts"])]
            except Exception as err:  # noqa: BLE001
                print(f"cuSPARSELt unavailable: {type(err).__name__}: {err}", flush=True)
        setups[name] = (block, sparse, ref_block, cslt)

    rows = []
    started = time.perf_counter()
    for tokens in args.tokens:  # tokens outer: a run cut short still covers both shapes at decode
        for name in args.shapes:
            if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
                print(f"time budget spent: skipping {name} T={tokens}", flush=True)
                continue
            s = SHAPES[name]
            h_dim, ffn, n_exp, top_k = s["hidden"], s["ffn"], s["experts"], s["top_k"]
            block, sparse, ref_block, cslt = setups[name]
            dense_expert = 3 * h_dim * ffn * 2
            sparse_expert = compressed_nbytes(2 * ffn, h_dim) + compressed_nbytes(h_dim, ffn)
            row = dict(shape=name, T=tokens)
            hs = torch.randn(1, tokens, h_dim, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                _, _, idx = block.gate(hs.view(-1, h_dim))
                ref = ref_block(hs.float())
                ref = ref[0] if isinstance(ref, tuple) else ref
            touched = idx.unique().numel()
            row["touched"] = touched
            row["floor_dense"] = max(touched * dense_expert / bw, 2 * tokens * top_k * 3 * h_dim * ffn / flops) * 1e6
            row["floor_24"] = max(touched * sparse_expert / bw, 2 * tokens * top_k * 3 * h_dim * ffn / flops) * 1e6
            for label, blk, fullgraph in (("dense", block, False), ("sparse", sparse, True), ("sparse", sparse, False)):
                if label in row:
                    continue
                try:
                    with torch.no_grad():
                        fn = compiled(blk, tokens, fullgraph)
                        for _ in range(3):
                            out = fn(hs)
                        out = out[0] if isinstance(out, tuple) else out
                        row[f"{label}_err"] = relerr(out, ref)
                        row[f"{label}_out"] = out.float()
                        row[label] = bench(lambda: fn(hs))
                except Exception as err:  # noqa: BLE001
                    print(f"{name} T={tokens} {label} compiled (fullgraph={fullgraph}) FAILED {type(err).__name__}: {str(err)[:600]}", flush=True)
            if "dense_out" in row and "sparse_out" in row:
                row["sp_vs_dn"] = relerr(row["sparse_out"], row["dense_out"])
            row.pop("dense_out", None)
            row.pop("sparse_out", None)
            try:  # the two expert kernels alone, graphed
                with torch.no_grad():
                    ex = sparse.experts
                    flat_h = hs.view(-1, h_dim)
                    bm = block_m_for(tokens * top_k, n_exp)
                    ids, be = align_pairs(idx, n_exp, bm)
                    mid = torch.randn(tokens * top_k, ffn, device="cuda", dtype=torch.bfloat16)

                    def kernels():
                        sparse24_grouped_mm(flat_h, ex.gate_up_proj_values, ex.gate_up_proj_meta, ids, be, top_k, bm)
                        sparse24_grouped_mm(mid, ex.down_proj_values, ex.down_proj_meta, ids, be, 1, bm)

                    row["kernels"] = bench(graphed(kernels))
            except Exception as err:  # noqa: BLE001
                print(f"{name} T={tokens} kernels FAILED {type(err).__name__}: {str(err)[:400]}", flush=True)
            if cslt is not None:
                try:
                    with torch.no_grad():
                        inputs = {}
                        for e in idx.unique().tolist():
                            tok = (idx == e).any(-1).nonzero().flatten()
                            pad = max(16, -(-tok.numel() // 16) * 16)
                            xe = torch.zeros(pad, h_dim, device="cuda", dtype=torch.bfloat16)
                            xe[: tok.numel()] = hs.view(-1, h_dim)[tok]
                            inputs[e] = (xe, torch.zeros(pad, ffn, device="cuda", dtype=torch.bfloat16))

                        def stock():
                            for e, (xe, he) in inputs.items():
                                torch._cslt_sparse_mm(cslt[e][0], xe.t())
                                torch._cslt_sparse_mm(cslt[e][1], he.t())

                        row["cslt"] = bench(graphed(stock))
                except Exception as err:  # noqa: BLE001
                    print(f"{name} T={tokens} cuSPARSELt FAILED {type(err).__name__}: {str(err)[:300]}", flush=True)
            rows.append(row)
            print(f"[{time.perf_counter() - started:6.0f}s] {line(row)}", flush=True)

    from stun_lightning.sparse import triton_kernel

    for kernel_name in ("decode_kernel", "prefill_kernel"):
        for key, config in getattr(triton_kernel, kernel_name).cache.items():
            print(f"autotuned {kernel_name} {key[:3]} -> {config}", flush=True)
    print(f"\nMoE layer, bf16, {torch.cuda.get_device_name()}; us per layer call (median). x dense = dense compiled / sparse compiled;")
    print("floor/sp, floor/krn = 2:4 byte (or FLOP) floor over the whole sparse layer, over its two expert kernels alone.")
    print(header)
    for r in rows:
        print(line(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
