"""CPU time per call of the 2:4 expert ops, and of a compiled MoE layer, against the dense ones.

    python -m benchmarks.investigations.launch_overhead [--calls 200] [--profile]

Needs a CUDA GPU. Prefill runs compiled without CUDA graphs, so every call pays its launch cost on
the CPU; where that exceeds the GPU time the GPU waits. Each row is the CPU microseconds per call
(``time.perf_counter`` over ``--calls`` calls, no synchronisation inside), on products small enough
that the GPU never holds the CPU back (first part), and for one compiled Qwen3-30B-shaped MoE block
at 2048 tokens (second part), next to the GPU time of the same call. ``--profile`` adds the CPU
profile (``torch.profiler``, 10 calls) of the compiled 2:4 block: which ops hold the CPU.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from benchmarks.device_rates import make_timer, no_cuda


def cpu_us(fn, calls: int) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--profile", action="store_true", help="also print the CPU profile of the compiled 2:4 block")
    args = p.parse_args(argv)
    if no_cuda("benchmarks.investigations.launch_overhead"):
        return 2
    from inference import SHAPES
    from inference_models import build_model, build_variants, moe_blocks
    from sparse_kernels import dense_grouped_inputs, mask_24, random_routing

    from stun_lightning.sparse import align_pairs, compress_24, cuda_mma

    torch.manual_seed(0)
    experts, n, k, tokens, top_k = 8, 256, 256, 256, 2
    dense = mask_24(torch.randn(experts, n, k, device="cuda", dtype=torch.bfloat16))
    values, meta = compress_24(dense)
    index = random_routing(experts, top_k, tokens)
    ids, blocks = align_pairs(index, experts, 128)
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
    rows, offs = dense_grouped_inputs(x, index, experts, top_k)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| call | CPU us per call |\n|---|---:|")
    ops = {
        "torch._grouped_mm (dense)": lambda: torch._grouped_mm(rows, dense.transpose(1, 2), offs=offs),
        "stun::sparse24_mma_tile (torch op)": lambda: cuda_mma.sparse24_mma_tile(x, values, meta, ids, blocks, top_k),
        "cuda_mma.wgmma_grouped_mm (no op wrapper)": lambda: cuda_mma.wgmma_grouped_mm(
            x, values, meta, ids, blocks, top_k, 256, 4, 1, 2
        ),
        "cuda_mma.tile_grouped_mm (no op wrapper)": lambda: cuda_mma.tile_grouped_mm(
            x, values, meta, ids, blocks, top_k
        ),
    }
    for name, fn in ops.items():
        print(f"| {name} | {cpu_us(fn, args.calls):.1f} |", flush=True)

    timer = make_timer("cuda")
    model = build_model(SHAPES["qwen3"], 1, 1024, "cuda", 0)
    models = build_variants(model, ["dense", "2:4"], 0)
    x = torch.randn(1, 2048, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    print(
        "\n| Qwen3-30B MoE block, 2048 tokens, compiled | CPU us per call | GPU us per call (L2 flushed) |\n|---|---:|---:|"
    )
    for variant, m in models.items():
        torch._dynamo.reset()
        block = torch.compile(moe_blocks(m)[0][0], dynamic=False)
        with torch.no_grad():
            cpu = cpu_us(lambda: block(x), min(args.calls, 20))  # 20 calls stay within the launch queue
            gpu = timer(lambda: block(x))
        print(f"| {variant} | {cpu:.1f} | {gpu:.1f} |", flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:  # block: the 2:4 one, compiled last
            for _ in range(10):
                block(x)
            torch.cuda.synchronize()
        print("\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))
    return 0


if __name__ == "__main__":
    sys.exit(main())
