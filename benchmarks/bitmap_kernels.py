"""Expert matrices of unstructured-sparse MoE layers: bitmap storage against dense and 2:4, one table.

    python -m benchmarks.bitmap_kernels [--shapes mixtral qwen3] [--tokens 1 8 32 2048]
                                        [--sparsity 0.5 0.7 0.8] [--removed 0 0.25] [--out FILE.md]

Needs a CUDA GPU. For the gate_up and down matrices of Mixtral-8x7B and Qwen3-30B-A3B
(:data:`benchmarks.sparse_kernels.SHAPES`), with and without 25% of the experts removed, random
bf16 weights masked at random to each sparsity and random top-k routing, it times in a CUDA graph,
in the same run: transformers' dense ``torch._grouped_mm`` on the masked dense weights (the
baseline), ``stun::bitmap_experts_mm`` (the Triton bitmap kernel at decode, dense tiles +
grouped_mm above 16 pairs per expert) and, at 50%, ``stun::sparse24_experts_mm`` on a 2:4 mask of
the same sparsity. Each time is set against the bitmap byte floor (bitmap + offsets + values of
the touched experts over the measured copy bandwidth; FLOPs over the bf16 matmul rate where that
is larger). ``err``: max |bitmap - float32 reference| over max |reference|.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.device_rates import measured_rates, no_cuda
from benchmarks.sparse_kernels import SHAPES, dense_grouped_inputs, graphed_us, mask_24, random_routing


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 32, 2048])
    parser.add_argument("--sparsity", nargs="+", type=float, default=[0.5, 0.7, 0.8])
    parser.add_argument(
        "--removed", nargs="+", type=float, default=[0.0, 0.25], help="fraction of experts removed before masking"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if no_cuda("benchmarks.bitmap_kernels"):
        return 2
    from stun_lightning.sparse.bitmap import bitmap_nbytes, compress_bitmap
    from stun_lightning.sparse.bitmap_experts import bitmap_experts_mm
    from stun_lightning.sparse.experts import route_pairs, sparse24_experts_mm
    from stun_lightning.sparse.format import compress_24

    bw, flops = measured_rates("cuda")
    lines = [
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}; copy {bw / 1e12:.2f} TB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s",
        "",
        "| shape | matrix | experts | sparsity | T | dense us | bitmap us | x dense | bitmap floor us | of floor | 2:4 us | 2:4 x dense | err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for name in args.shapes:
        s = SHAPES[name]
        for removed in args.removed:
            experts = max(s["top_k"], round(s["experts"] * (1 - removed)))
            for matrix, (n, k) in {"gate_up": (2 * s["ffn"], s["hidden"]), "down": (s["hidden"], s["ffn"])}.items():
                for sparsity in args.sparsity:
                    torch.manual_seed(0)
                    dense = torch.randn(experts, n, k, device="cuda", dtype=torch.bfloat16) * 0.02
                    dense *= torch.rand(experts, n, k, device="cuda") >= sparsity
                    bitmap, values, offsets = compress_bitmap(dense)
                    per_expert = bitmap_nbytes(bitmap, values, offsets) / experts
                    values24 = meta24 = None
                    if abs(sparsity - 0.5) < 1e-6:
                        values24, meta24 = compress_24(mask_24(dense.masked_fill(dense == 0, 1e-3)))
                    for tokens in args.tokens:
                        index = random_routing(experts, s["top_k"], tokens)
                        rows_per_a = s["top_k"] if matrix == "gate_up" else 1
                        a = torch.randn(
                            tokens * (1 if matrix == "gate_up" else s["top_k"]), k, device="cuda", dtype=torch.bfloat16
                        )
                        n_pairs = tokens * s["top_k"]
                        touched = index.unique().numel()
                        floor = max(touched * per_expert / bw, 2 * n_pairs * n * k * (1 - sparsity) / flops) * 1e6
                        rows, offs = dense_grouped_inputs(a, index, experts, rows_per_a)
                        dense_us = graphed_us(lambda: torch._grouped_mm(rows, dense.transpose(1, 2), offs=offs))
                        ids, blocks = route_pairs(index, experts)
                        out = bitmap_experts_mm(a, bitmap, values, offsets, ids, blocks, rows_per_a, k)
                        flat = index.reshape(-1)
                        ref = torch.empty(n_pairs, n, device="cuda", dtype=torch.float32)
                        for e in flat.unique().tolist():
                            sel = (flat == e).nonzero().flatten()
                            ref[sel] = a[sel // rows_per_a].float() @ dense[e].float().t()
                        err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                        bitmap_us = graphed_us(
                            lambda: bitmap_experts_mm(a, bitmap, values, offsets, ids, blocks, rows_per_a, k)
                        )
                        if values24 is not None:
                            us24 = graphed_us(lambda: sparse24_experts_mm(a, values24, meta24, ids, blocks, rows_per_a))
                            s24 = f"{us24:.1f} | {dense_us / us24:.2f}"
                        else:
                            s24 = "- | -"
                        line = (
                            f"| {name} | {matrix} | {experts} | {sparsity:.0%} | {tokens} | {dense_us:.1f} | {bitmap_us:.1f} | {dense_us / bitmap_us:.2f} | "
                            f"{floor:.1f} | {floor / bitmap_us:.2f} | {s24} | {err:.1e} |"
                        )
                        lines.append(line)
                        print(line, flush=True)
                    torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
