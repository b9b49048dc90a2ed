"""Every candidate configuration of the 2:4 expert kernels, timed alone at real expert shapes.

    python -m benchmarks.sparse_kernels [--tokens 1 8 32 2048] [--out FILE.md]

Needs a CUDA GPU. For the gate_up and down matrices of Mixtral-8x7B (hidden 4096, FFN 14336, 8
experts, top-2) and Qwen3-30B-A3B (hidden 2048, expert FFN 768, 128 experts, top-8), random bf16
weights masked 2:4 and random top-k routing, it times each candidate of the decode kernel
(:mod:`stun_lightning.sparse.triton_decode`) and of the tensor-core kernel
(:mod:`stun_lightning.sparse.triton_kernel`, both block heights for prefill) in a CUDA graph, and
prints its time against the 2:4 byte floor (values + metadata of the touched experts over the
measured copy bandwidth; FLOPs over the measured bf16 matmul rate where that is larger) and
against transformers' dense grouped matmul (``torch._grouped_mm``) on the same touched experts.
It is the data behind the candidate lists and ``DECODE_MAX_ROWS``; ``benchmarks/inference.py``
times whole layers and models.
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.device_rates import measured_rates, no_cuda

SHAPES = {
    "mixtral": dict(hidden=4096, ffn=14336, experts=8, top_k=2),
    "qwen3": dict(hidden=2048, ffn=768, experts=128, top_k=8),
}


def graphed_us(fn) -> float:
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return do_bench(g.replay, warmup=10, rep=50, return_mode="median") * 1e3


def random_routing(experts: int, top_k: int, tokens: int) -> torch.Tensor:
    """``[tokens, top_k]`` distinct experts per token, uniformly at random (CUDA)."""
    return torch.stack([torch.randperm(experts, device="cuda")[:top_k] for _ in range(tokens)])


def dense_grouped_inputs(
    a: torch.Tensor, index: torch.Tensor, experts: int, rows_per_a: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``torch._grouped_mm`` (the dense kernel of transformers' grouped_mm experts) takes for
    the pairs of ``index``: the rows of ``a`` sorted by expert and each expert's end offset."""
    flat = index.reshape(-1)
    rows = a[flat.argsort(stable=True) // rows_per_a]
    return rows, torch.bincount(flat, minlength=experts).cumsum(0).to(torch.int32)


def mask_24(w: torch.Tensor) -> torch.Tensor:
    groups = w.view(*w.shape[:-1], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().topk(2, -1).indices, True)
    return (groups * keep).view_as(w)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 32, 2048])
    parser.add_argument(
        "--kernels",
        nargs="+",
        default=["mma", "tile", "wgmma", "decode", "tensor"],
        choices=["mma", "tile", "wgmma", "decode", "tensor"],
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if no_cuda("benchmarks.sparse_kernels"):
        return 2
    from triton.testing import do_bench

    from stun_lightning.sparse import cuda_mma
    from stun_lightning.sparse.experts import align_pairs, block_m_for
    from stun_lightning.sparse.format import compress_24, compressed_nbytes
    from stun_lightning.sparse.triton_decode import CONFIGS as GEMV_CONFIGS
    from stun_lightning.sparse.triton_decode import launch_decode
    from stun_lightning.sparse.triton_kernel import DECODE_CONFIGS, PREFILL_CONFIGS, launch_grouped_mm, rows_bucket_for

    torch.manual_seed(0)
    # the sparse tensor-core kernel's launch shapes (template warps x unroll, CTAs per SM before split-K)
    MMA_LAUNCHES = [
        dict(warps=w, unroll=u, ctas_per_sm=c)
        for w, u, c in ((4, 4, 4), (4, 8, 4), (2, 4, 8), (2, 8, 8), (4, 8, 16), (8, 8, 4))
    ]
    # the prefill tile kernel's tile heights and pipeline depths
    TILE_LAUNCHES = ((128, 3), (128, 4), (128, 5), (256, 3), (256, 4))
    # the Hopper prefill kernel's tile heights, pipeline depths and CTAs per multiprocessor
    # (and blocks of pairs per group of CTAs: 0 = grid order)
    WGMMA_LAUNCHES = [
        dict(rows=r, stages=st, ctas=c, consumers=0, group=gr) for r, st, c, gr in ((128, 3, 2, 0), (256, 5, 1, 0))
    ]
    # ... and its warp-specialized form (2 consumer warpgroups)
    WGMMA_LAUNCHES += [
        dict(rows=r, stages=st, consumers=2, group=gr)
        for r, st, gr in ((256, 4, 0), (256, 4, 4), (256, 3, 0), (256, 5, 0))
    ]
    bw, flops = measured_rates("cuda")
    lines = [
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}; copy {bw / 1e12:.2f} TB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s",
        "",
        "| shape | matrix | T | experts | kernel | config | us | 2:4 floor | of floor | dense grouped_mm | x dense | err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    best = {}
    for name in args.shapes:
        s = SHAPES[name]
        mats = {"gate_up": (2 * s["ffn"], s["hidden"]), "down": (s["hidden"], s["ffn"])}
        for matrix, (n, k) in mats.items():
            dense = mask_24(torch.randn(s["experts"], n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
            values, meta = compress_24(dense)
            for tokens in args.tokens:
                idx = random_routing(s["experts"], s["top_k"], tokens)
                rows_per_a = s["top_k"] if matrix == "gate_up" else 1
                a = torch.randn(
                    tokens * (1 if matrix == "gate_up" else s["top_k"]), k, device="cuda", dtype=torch.bfloat16
                )
                n_pairs = tokens * s["top_k"]
                touched = idx.unique().numel()
                floor = max(touched * compressed_nbytes(n, k) / bw, 2 * n_pairs * n * k / flops) * 1e6
                # the same pairs through torch._grouped_mm on the masked dense weights (the dense kernel
                # transformers' grouped_mm experts run), and a float32 reference expert by expert
                flat = idx.reshape(-1)
                rows, offs = dense_grouped_inputs(a, idx, s["experts"], rows_per_a)
                ref = torch.empty(n_pairs, n, device="cuda", dtype=torch.float32)
                for e in flat.unique().tolist():
                    sel = (flat == e).nonzero().flatten()
                    ref[sel] = a[sel // rows_per_a].float() @ dense[e].float().t()
                try:
                    dense_us = graphed_us(lambda: torch._grouped_mm(rows, dense.transpose(1, 2), offs=offs))
                except Exception as exc:  # noqa: BLE001
                    print(f"dense grouped_mm failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                    dense_us = float("nan")
                candidates = []
                bm = block_m_for(n_pairs, s["experts"])
                ids, be = align_pairs(idx, s["experts"], 16)
                bucket = rows_bucket_for(n_pairs, s["experts"])
                if bm <= 16:
                    candidates += [("mma", c, 16, ids, be) for c in MMA_LAUNCHES]
                    candidates += [("decode", c, 16, ids, be) for c in GEMV_CONFIGS]
                    candidates += [("tensor", c, 16, ids, be) for c in DECODE_CONFIGS]
                else:
                    for block_m in (64, 128):
                        ids_m, be_m = align_pairs(idx, s["experts"], block_m)
                        candidates += [("tensor", c, block_m, ids_m, be_m) for c in PREFILL_CONFIGS]
                    candidates += [
                        ("tile", dict(rows=r, stages=st), 128, ids_m, be_m) for r, st in TILE_LAUNCHES if n % r == 0
                    ]
                    if torch.cuda.get_device_capability() == (9, 0):
                        candidates += [("wgmma", c, 128, ids_m, be_m) for c in WGMMA_LAUNCHES if n % c["rows"] == 0]
                for kind, config, block_m, ids_c, be_c in [c for c in candidates if c[0] in args.kernels]:
                    if kind in ("mma", "tile", "wgmma"):
                        label = f"BM{block_m} " + " ".join(f"{key}={v}" for key, v in config.items())
                    else:
                        label = (
                            f"BM{block_m} "
                            + " ".join(f"{key}={v}" for key, v in config.kwargs.items())
                            + f" w{config.num_warps} s{config.num_stages}"
                        )
                    try:
                        if kind == "mma":
                            fn = lambda: cuda_mma.mma_sp_grouped_mm(a, values, meta, ids_c, be_c, rows_per_a, **config)  # noqa: E731
                        elif kind == "tile":
                            fn = lambda: cuda_mma.tile_grouped_mm(a, values, meta, ids_c, be_c, rows_per_a, **config)  # noqa: E731
                        elif kind == "wgmma":
                            fn = lambda: cuda_mma.wgmma_grouped_mm(a, values, meta, ids_c, be_c, rows_per_a, **config)  # noqa: E731
                        elif kind == "decode":
                            fn = lambda: launch_decode(
                                a, values, meta, ids_c, be_c, rows_per_a, block_m, bucket, config=config
                            )  # noqa: E731
                        else:
                            fn = lambda: launch_grouped_mm(
                                a, values, meta, ids_c, be_c, rows_per_a, block_m, config=config
                            )  # noqa: E731
                        out = fn().float()
                        err = ((out - ref).norm() / ref.norm()).item()
                        us = (
                            graphed_us(fn)
                            if tokens <= 64
                            else do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3
                        )
                    except Exception as exc:  # noqa: BLE001
                        print(
                            f"| {name} | {matrix} | {tokens} | {touched} | {kind} | {label} | FAILED {type(exc).__name__}: {str(exc)[:200]} |",
                            flush=True,
                        )
                        continue
                    line = (
                        f"| {name} | {matrix} | {tokens} | {touched} | {kind} | {label} | {us:.1f} | {floor:.1f} | {floor / us:.2f} | "
                        f"{dense_us:.1f} | {dense_us / us:.2f} | {err:.1e} |"
                    )
                    print(line, flush=True)
                    lines.append(line)
                    key = (name, matrix, tokens, kind)
                    if key not in best or us < best[key][0]:
                        best[key] = (us, label, floor, dense_us)
    summary = [
        "",
        "Best per kernel:",
        "| shape | matrix | T | kernel | best config | us | of floor | x dense |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (name, matrix, tokens, kind), (us, label, floor, dense_us) in best.items():
        summary.append(
            f"| {name} | {matrix} | {tokens} | {kind} | {label} | {us:.1f} | {floor / us:.2f} | {dense_us / us:.2f} |"
        )
    print("\n".join(summary), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines + summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
