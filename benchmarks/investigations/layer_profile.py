"""Where one MoE layer's time goes: the GPU kernels of a compiled layer call, per variant, in a table.

    python -m benchmarks.investigations.layer_profile [--shapes qwen3] [--tokens 8 32] [--variants dense 2:4]

Needs a CUDA GPU. Builds the layer shapes of ``inference.py`` (one decoder layer), compiles each
variant's MoE block as ``inference.py`` does, and records ``--steps`` calls with ``torch.profiler``:
each kernel's device time per call and their sum; the time of the same compiled call replayed in
a CUDA graph (decode sizes) or called directly (prefill), with the L2 cache flushed before each call
as ``inference.py`` times it; and the device span per call of back-to-back graph replays. The span
minus the kernels' sum is the time the GPU sat between kernels.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

import torch

from benchmarks.device_rates import make_timer, no_cuda
from benchmarks.inference import SHAPES, VARIANTS
from benchmarks.inference_rows import captured
from benchmarks.inference_models import build_model, build_variants, moe_blocks


def kernel_times(fn, x, steps: int, flush: torch.Tensor | None = None) -> tuple[dict[str, list[float]], float]:
    """Per kernel ``fn(x)`` launches: [device microseconds per call, launches per call]; and the
    device span per call (first kernel start to last kernel end over ``steps`` back-to-back calls).
    With ``flush``, that buffer is zeroed before each call (the L2 cache flushed; the span is then
    meaningless) and its kernel is left out."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        fn(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                if flush is not None:
                    flush.zero_()
                with torch.profiler.record_function("call"):
                    fn(x)
            torch.cuda.synchronize()
    times, starts, ends = defaultdict(lambda: [0.0, 0.0]), [], []
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and not (
            flush is not None and "FillFunctor<signed char>" in event.name
        ):
            times[event.name][0] += event.device_time / steps
            times[event.name][1] += 1 / steps
            starts.append(event.time_range.start)
            ends.append(event.time_range.end)
    return dict(times), (max(ends) - min(starts)) / steps if starts else float("nan")


def queued_us(fn, x, steps: int) -> float:
    """us per call, L2 flushed before each, with the GPU held back by a sleep kernel first so that
    the CPU has queued the flush and the call before the GPU reaches them: what the flushed timing
    measures minus any wait for the CPU to launch the call."""
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    times = []
    with torch.no_grad():
        for _ in range(steps):
            torch.cuda._sleep(2_000_000)
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--variants", nargs="+", default=["dense", "2:4"], choices=VARIANTS)
    p.add_argument(
        "--tokens", nargs="+", type=int, default=[1, 8, 32, 2048], help="tokens per call; above 64 counts as prefill"
    )
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--top", type=int, default=12, help="kernels listed per row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--wgmma-group", type=int, default=None, help="CTA order of the Hopper prefill kernel (cuda_mma.WGMMA_GROUP)"
    )
    args = p.parse_args(argv)
    if no_cuda("benchmarks.investigations.layer_profile"):
        return 2
    timer = make_timer("cuda")
    if args.wgmma_group is not None:
        from stun_lightning.sparse import cuda_mma

        cuda_mma.WGMMA_GROUP = args.wgmma_group
    for name in args.shapes:
        dense = build_model(SHAPES[name], 1, 1024, "cuda", args.seed)
        models = build_variants(dense, args.variants, args.seed)
        hidden = dense.config.hidden_size
        for t in args.tokens:
            x = torch.randn(1, t, hidden, device="cuda", dtype=torch.bfloat16)
            for variant in args.variants:
                block = moe_blocks(models[variant])[0][0]
                decode = t <= 64
                torch._dynamo.reset()
                raw = torch.compile(block, dynamic=False)
                fn = captured(raw) if decode else raw  # the graph replays the kernels raw launches one by one
                with torch.no_grad():
                    fn(x)
                    wall = timer(lambda: fn(x))
                times, span = kernel_times(raw, x, args.steps)
                _, graph_span = kernel_times(fn, x, args.steps) if decode else (None, span)
                total = sum(us for us, _ in times.values())
                launches = sum(n for _, n in times.values())
                queued = queued_us(fn, x, args.steps)
                print(
                    f"\n## {name} {variant} T={t}: {wall:.1f} us per call ({'CUDA graph' if decode else 'compiled'}, L2 flushed); "
                    f"{queued:.1f} us flushed with the call queued ahead; device span {graph_span:.1f} us per call (back to back); "
                    f"kernels {total:.1f} us in {launches:.0f} launches"
                )
                cold = (
                    kernel_times(fn, x, args.steps, torch.empty(256 * 2**20, dtype=torch.int8, device="cuda"))[0]
                    if decode
                    else times
                )
                print(f"kernels with the L2 flushed before each call: {sum(us for us, _ in cold.values()):.1f} us")
                print("| us | us, L2 flushed | launches | kernel |\n|---:|---:|---:|---|")
                for kname, (us, n) in sorted(times.items(), key=lambda kv: -kv[1][0])[: args.top]:
                    print(f"| {us:.1f} | {cold.get(kname, [float('nan')])[0]:.1f} | {n:.0f} | {kname[:110]} |")
        del dense, models
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
