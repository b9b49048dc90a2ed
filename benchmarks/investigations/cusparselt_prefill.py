"""Could sparse tensor cores carry 2:4 prefill? One MoE layer's expert products on cuSPARSELt vs dense.

    python -m benchmarks.investigations.cusparselt_prefill [--tokens 2048] [--out FILE.md]

Needs a CUDA GPU. Triton exposes no sparse tensor-core instruction, so our 2:4 kernels run dense
math at prefill; the one library with Hopper 2:4 kernels in torch's wheels is cuSPARSELt
(``torch._cslt_sparse_mm``, which costs 0.6-0.8 ms of CPU per call for its plan). This script calls
it through ``cusparselt_ctypes.py`` (plans cached, one launch per product) on the layer shapes of
``inference.py`` with random top-k routing: each touched expert's gate_up and down products on its
tokens (grouped in 128-row blocks, as a kernel would take them), against the same products dense
(``torch._grouped_mm``, transformers' ``grouped_mm`` kernel, and cuBLAS per expert), all graphed
the same way. It prints the sums per layer; ``benchmarks/results/sparse_kernels_h100.md`` has the run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from benchmarks.device_rates import no_cuda
from benchmarks.sparse_kernels import SHAPES, graphed_us, mask_24, random_routing


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if no_cuda("benchmarks.investigations.cusparselt_prefill"):
        return 2
    from benchmarks.investigations import cusparselt_ctypes as cslt

    from stun_lightning.sparse.experts import align_pairs

    torch.manual_seed(0)
    lines = [
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {args.tokens} tokens, random top-k routing",
        "",
        "| shape | matrix | experts touched | rows (padded) | dense grouped_mm us | dense cuBLAS per expert us | cuSPARSELt per expert us | x grouped_mm | x cuBLAS | err |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in args.shapes:
        s = SHAPES[name]
        idx = random_routing(s["experts"], s["top_k"], args.tokens)
        ids, block_expert = align_pairs(idx, s["experts"], 128)
        n_pairs = idx.numel()
        experts, n_blocks = torch.unique_consecutive(block_expert[block_expert >= 0], return_counts=True)
        first = (n_blocks.cumsum(0) - n_blocks) * 128
        runs = list(
            zip(experts.tolist(), first.tolist(), (n_blocks * 128).tolist())
        )  # (expert, first row, rows) of each expert's 128-row blocks
        counts = torch.bincount(idx.reshape(-1), minlength=s["experts"])
        offs = counts.cumsum(0).to(torch.int32)
        for matrix, (n, k) in {"gate_up": (2 * s["ffn"], s["hidden"]), "down": (s["hidden"], s["ffn"])}.items():
            dense = mask_24(torch.randn(s["experts"], n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
            compressed = {
                e: torch._cslt_compress(dense[e]) for e, _, _ in runs
            }  # cuSPARSELt's layout, the descriptor we use
            rows = torch.randn(ids.numel(), k, device="cuda", dtype=torch.bfloat16) * (ids < n_pairs)[:, None]
            packed = torch.randn(n_pairs, k, device="cuda", dtype=torch.bfloat16)
            out_t = torch.empty(n, ids.numel(), device="cuda", dtype=torch.bfloat16)

            def sparse():
                for e, r0, m in runs:
                    cslt.linear_t_into(out_t[:, r0 : r0 + m], rows[r0 : r0 + m], compressed[e])

            def cublas():
                return [rows[r0 : r0 + m] @ dense[e].t() for e, r0, m in runs]

            sparse()
            e0, r0, m0 = runs[0]
            ref = rows[r0 : r0 + m0].float() @ dense[e0].float().t()
            err = ((out_t[:, r0 : r0 + m0].t().float() - ref).norm() / ref.norm()).item()
            grouped = graphed_us(lambda: torch._grouped_mm(packed, dense.transpose(1, 2), offs=offs))
            per_expert = graphed_us(cublas)
            cslt_us = graphed_us(sparse)
            line = (
                f"| {name} | {matrix} | {len(runs)} | {ids.numel()} | {grouped:.0f} | {per_expert:.0f} | {cslt_us:.0f} | "
                f"{grouped / cslt_us:.2f} | {per_expert / cslt_us:.2f} | {err:.1e} |"
            )
            print(line, flush=True)
            lines.append(line)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
