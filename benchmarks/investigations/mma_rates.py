"""Peak rates of the tensor-core instructions a 2:4 prefill kernel could use without ``wgmma``.

    python -m benchmarks.investigations.mma_rates [--out FILE.md]     # CUDA only

A prefill GEMM on 2:4 weights pays only if the sparse instruction beats the dense path that
transformers' ``grouped_mm`` takes (cuBLAS/CUTLASS on Hopper's ``wgmma``). Triton exposes no sparse
instruction; ``stun_lightning/sparse/cuda_mma.cu`` uses the warp-level ``mma.sp.m16n8k32``. This
script times, on register operands only (no memory traffic), the warp-level dense ``mma.m16n8k16``
and sparse ``mma.sp.m16n8k32`` bf16 instructions, each counted in the dense-equivalent FLOPs it
stands for (the sparse one: 16 x 8 x 32 x 2 per instruction), against ``torch.matmul`` on an
8192^3 bf16 product. Kernels are compiled by NVRTC (``torch.cuda._compile_kernel``).
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.device_rates import make_timer, measured_rates, no_cuda

SOURCE = r"""
typedef unsigned int u32;
template <int SPARSE>
__global__ void __launch_bounds__(256) mma_loop(float* out, int iterations, u32 seed) {
  u32 a0 = seed ^ threadIdx.x, a1 = a0 * 3u, a2 = a0 * 5u, a3 = a0 * 7u;
  u32 b0 = a0 + 1u, b1 = a0 + 2u, b2 = a0 + 3u, b3 = a0 + 4u;
  a0 &= 0x3f803f80u; a1 &= 0x3f803f80u; a2 &= 0x3f803f80u; a3 &= 0x3f803f80u;
  b0 &= 0x3f803f80u; b1 &= 0x3f803f80u; b2 &= 0x3f803f80u; b3 &= 0x3f803f80u;
  float d[8][4];
#pragma unroll
  for (int c = 0; c < 8; ++c) d[c][0] = d[c][1] = d[c][2] = d[c][3] = 0.f;
  const u32 e = 0x44444444u;  // positions (0, 1) in every group of 4
  for (int it = 0; it < iterations; ++it) {
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      if (SPARSE) {
        asm volatile(
            "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;\n"
            : "+f"(d[c][0]), "+f"(d[c][1]), "+f"(d[c][2]), "+f"(d[c][3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "r"(b2), "r"(b3), "r"(e));
      } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[c][0]), "+f"(d[c][1]), "+f"(d[c][2]), "+f"(d[c][3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
      }
    }
  }
  float s = 0.f;
#pragma unroll
  for (int c = 0; c < 8; ++c) s += d[c][0] + d[c][1] + d[c][2] + d[c][3];
  out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=4096)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if no_cuda("benchmarks.investigations.mma_rates"):
        return 2
    major, minor = torch.cuda.get_device_capability()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    blocks, threads = 8 * sms, 256
    out = torch.empty(blocks * threads, device="cuda")
    timer = make_timer("cuda")
    rows = []
    for name, sparse, flops_per_mma in (
        ("mma.sync m16n8k16 (dense)", 0, 16 * 8 * 16 * 2),
        ("mma.sp m16n8k32 (2:4, dense-equivalent)", 1, 16 * 8 * 32 * 2),
    ):
        kernel = torch.cuda._compile_kernel(SOURCE, f"mma_loop<{sparse}>", compute_capability=f"{major}{minor}")
        us = timer(lambda: kernel(grid=(blocks, 1, 1), block=(threads, 1, 1), args=[out, args.iterations, 7]))
        mmas = blocks * (threads // 32) * args.iterations * 8
        rows.append((name, mmas * flops_per_mma / us / 1e6))
    rows.append(("torch.matmul 8192^3 bf16 (cuBLAS, wgmma)", measured_rates("cuda", timer)[1] / 1e12))
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}", "", "| instruction | TFLOP/s |", "|---|---|"]
    lines += [f"| {name} | {tflops:.0f} |" for name, tflops in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
