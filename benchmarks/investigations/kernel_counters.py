"""Hardware counters of the Hopper 2:4 prefill kernel against the dense grouped GEMM, through Nsight Compute.

    python -m benchmarks.investigations.kernel_counters [--shape mixtral] [--matrix gate_up] [--tokens 2048] [--out DIR]

Needs a CUDA GPU and ``ncu`` (Nsight Compute; ``/usr/local/cuda/bin/ncu`` on the H100 host). Runs
itself under ``ncu`` (``--child``): one expert product of ``sparse_kernels.py``'s layer shapes
(random bf16 weights masked 2:4, random top-k routing, 2048 tokens) through
``cuda_mma.wgmma_grouped_mm`` (the shipped launch) and through ``torch._grouped_mm`` on the masked
dense weights, each launched three times, the third profiled with the speed-of-light, memory,
compute and warp-state sections. Prints the counters that say what bounds each kernel: duration,
tensor-pipe and SM throughput, L2 and DRAM throughput and bytes, and the top stall reasons;
``--sass`` adds the stall samples of every SASS instruction (a CSV beside the report).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.device_rates import no_cuda
from benchmarks.sparse_kernels import SHAPES, dense_grouped_inputs, mask_24, random_routing

SECTIONS = (
    "SpeedOfLight",
    "MemoryWorkloadAnalysis",
    "ComputeWorkloadAnalysis",
    "WarpStateStats",
    "Occupancy",
    "LaunchStats",
)
#: the counters printed per kernel (as ncu's details page names them), with the lines that mention stalls or tensor pipes
WANTED = (
    "Duration",
    "Compute (SM) Throughput",
    "Memory Throughput",
    "L2 Cache Throughput",
    "DRAM Throughput",
    "L1/TEX Hit Rate",
    "L2 Hit Rate",
    "Executed Ipc Active",
    "Issue Slots Busy",
    "Achieved Occupancy",
    "Registers Per Thread",
    "Dynamic Shared Memory Per Block",
)


def child(shape: str, matrix: str, tokens: int) -> None:
    from stun_lightning.sparse import align_pairs, compress_24, cuda_mma

    s = SHAPES[shape]
    n, k = (2 * s["ffn"], s["hidden"]) if matrix == "gate_up" else (s["hidden"], s["ffn"])
    torch.manual_seed(0)
    dense = mask_24(torch.randn(s["experts"], n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
    values, meta = compress_24(dense)
    index = random_routing(s["experts"], s["top_k"], tokens)
    rows_per_a = s["top_k"] if matrix == "gate_up" else 1
    a = torch.randn(tokens * s["top_k"] // rows_per_a, k, device="cuda", dtype=torch.bfloat16)
    ids, blocks = align_pairs(index, s["experts"], 128)
    rows, offs = dense_grouped_inputs(a, index, s["experts"], rows_per_a)
    for _ in range(3):
        cuda_mma.wgmma_grouped_mm(a, values, meta, ids, blocks, rows_per_a, **cuda_mma.WGMMA_LAUNCHES[256])
        torch._grouped_mm(rows, dense.transpose(1, 2), offs=offs)
    torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="mixtral", choices=list(SHAPES))
    p.add_argument("--matrix", default="gate_up", choices=["gate_up", "down"])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--out", type=Path, default=Path("."), help="where the .ncu-rep report goes")
    p.add_argument(
        "--sass", action="store_true", help="also sample stalls per instruction (SourceCounters) and write them as CSV"
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if no_cuda("benchmarks.investigations.kernel_counters"):
        return 2
    if args.child:
        child(args.shape, args.matrix, args.tokens)
        return 0
    ncu = shutil.which("ncu") or "/usr/local/cuda/bin/ncu"
    if not Path(ncu).exists():
        print("benchmarks/investigations/kernel_counters.py needs Nsight Compute (ncu) on the PATH", file=sys.stderr)
        return 2
    report = args.out / f"counters_{args.shape}_{args.matrix}"
    command = [
        ncu,
        "--force-overwrite",
        "--export",
        str(report),
        "--kernel-name",
        "regex:sparse24_wgmma|device_kernel",
        "--launch-skip",
        "4",
        "--launch-count",
        "2",
        *[x for section in SECTIONS + (("SourceCounters",) if args.sass else ()) for x in ("--section", section)],
        sys.executable,
        "-m",
        "benchmarks.investigations.kernel_counters",
        "--child",
        "--shape",
        args.shape,
        "--matrix",
        args.matrix,
        "--tokens",
        str(args.tokens),
    ]
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode:
        print(run.stdout[-3000:], run.stderr[-3000:], sep="\n", file=sys.stderr)
        return run.returncode
    details = subprocess.run(
        [ncu, "--import", f"{report}.ncu-rep", "--page", "details", "--print-units", "base"],
        capture_output=True,
        text=True,
    ).stdout
    (args.out / f"{report.name}.txt").write_text(details)
    if args.sass:  # per SASS instruction: stall samples by reason, one CSV per kernel
        sass = subprocess.run(
            [ncu, "--import", f"{report}.ncu-rep", "--page", "source", "--csv", "--print-source", "sass"],
            capture_output=True,
            text=True,
        ).stdout
        (args.out / f"{report.name}_sass.csv").write_text(sass)
    print(
        f"{torch.cuda.get_device_name()}; {args.shape} {args.matrix}, {args.tokens} tokens; report {report}.ncu-rep, "
        f"all counters in {report}.txt\n"
    )
    for line in details.splitlines():
        words = " ".join(line.split())
        if ", Context " in line:
            print(f"\n## {words[:120]}")
        elif any(words.startswith(name) for name in WANTED) or "stall" in words.lower() or "tensor" in words.lower():
            print("  " + words[:400])
    return 0


if __name__ == "__main__":
    sys.exit(main())
