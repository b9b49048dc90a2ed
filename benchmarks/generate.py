"""What a user measures: ``model.generate()`` with a static cache and transformers' own compilation.

    python3 -m benchmarks.generate                                  # GPU: Mixtral and Qwen3 shapes
    python3 -m benchmarks.generate --shapes qwen3 --batches 1 --prompts 64 --new-tokens 16
    python3 -m benchmarks.generate --quick                          # CPU smoke test: tiny shapes, backend "eager"

Whole causal LMs with the real layer shapes and vocabulary (Mixtral-8x7B: hidden 4096, FFN 14336,
8 experts, top-2, vocab 32000; Qwen3-30B-A3B: hidden 2048, expert FFN 768, 128 experts, top-8,
vocab 151936; ``--layers`` decoder layers each), random bf16 weights with every expert matrix masked
2:4 (``inference_models.build_model``). Variants: ``dense`` (transformers' ``grouped_mm`` experts, the
baseline), ``2:4`` (:func:`stun_lightning.sparse.sparsify`), ``both`` (a seeded random 25% of each
layer's experts removed with :func:`stun_lightning.keep_experts`, then sparsified); on request
``u50`` / ``u70`` / ``u80`` (expert weights redrawn and masked unstructured at that sparsity by
magnitude, so ``sparsify`` stores them as bitmaps: ``stun_bitmap``) and ``u70-both`` (the same
after 25% of the experts removed).

Each variant runs in its own process: it builds its model, then calls ``generate()`` as a user does,
``CompileConfig(fullgraph=True)`` (``mode="reduce-overhead"``: CUDA graphs; ``dynamic=None``: after the
second batch size dynamo makes the batch dimension dynamic), one ``StaticCache`` per batch size sized
for the longest prompt, greedy, ``min_new_tokens`` = ``max_new_tokens``. A shape's variants build,
compile and warm up (every batch x prompt once) side by side, then time one at a time. Per batch x
prompt: time to first token = ``generate(max_new_tokens=1)`` (the prefill; transformers runs it
uncompiled), decode tokens/s = batch x (N - 1) / (time of ``generate(max_new_tokens=N)`` - time to
first token); medians of ``--repeats``. ``graph breaks``: ``torch._dynamo.explain`` of one decode
step of the model on a static cache.

Byte floor of a decode step (``floor tok/s``): every weight but the input embedding, the routed
experts' bytes (expected distinct experts per layer under uniform routing, E (1 - (1 - k/E)^B); 2:4:
values + metadata) and the KV cache filled so far (prompt + N/2 positions), over the copy bandwidth
measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.generate_tables import COLUMNS as COLUMNS
from benchmarks.generate_tables import dense_result as dense_result
from benchmarks.generate_tables import floor_tokens_per_s as floor_tokens_per_s
from benchmarks.generate_tables import greedy_agreement, report_header, report_notes, table

VOCAB = {"mixtral": 32000, "qwen3": 151936}
LAYERS = {"mixtral": 4, "qwen3": 8}
VARIANTS = ("dense", "2:4", "both")
#: unstructured variants (bitmap experts), run when named in --variants
UNSTRUCTURED = ("u50", "u70", "u80", "u70-both")


# ---------------------------------------------------------------- one variant (child process)


def vocab_of(shape: str, quick: bool) -> int:
    return 1000 if quick else VOCAB[shape]


def device_of(quick: bool) -> str:
    return "cpu" if quick else "cuda"


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build(shape: str, variant: str, layers: int, seed: int, quick: bool = False):
    from benchmarks.inference import QUICK_SHAPES, SHAPES
    from benchmarks.inference_models import build_model

    from stun_lightning import keep_experts, moe_layers
    from stun_lightning.sparse import sparsify

    model = build_model(
        (QUICK_SHAPES if quick else SHAPES)[shape], layers, vocab_of(shape, quick), device_of(quick), seed
    )
    if variant in UNSTRUCTURED:
        from stun_lightning.patterns import mask_from_scores
        from stun_lightning.metrics import weighted_magnitude

        sparsity = int(variant[1:3]) / 100
        torch.manual_seed(seed + 1)
        with torch.no_grad():
            for layer in moe_layers(model):
                for w in layer.expert_matrices().values():
                    for e in range(w.shape[0]):
                        w[e].normal_(0, 0.02)
                        w[e].mul_(mask_from_scores(weighted_magnitude(w[e]), sparsity, "unstructured"))
    if variant in ("both", "u70-both"):
        generator = torch.Generator().manual_seed(seed)
        for layer in list(moe_layers(model)):
            n = layer.num_experts
            keep_experts(model, layer.index, torch.randperm(n, generator=generator)[: n - n // 4].tolist())
    if variant != "dense":
        sparsify(model)
    return model


def sizes(model) -> dict:
    """Bytes: every stored tensor, the experts' (per layer), the input embedding; experts per layer."""
    from benchmarks.inference_models import nbytes

    from stun_lightning.sparse.convert import expert_modules

    experts = [(m, nbytes(m)) for _, m, _ in expert_modules(model)]
    count = [
        m.gate_up_proj_values.shape[0] if hasattr(m, "gate_up_proj_values") else m.gate_up_proj.shape[0]
        for m, _ in experts
    ]
    return dict(
        total=nbytes(model),
        experts=[b for _, b in experts],
        num_experts=count,
        embed=nbytes(model.get_input_embeddings()),
    )


def child(args) -> None:
    from transformers import CompileConfig, StaticCache

    torch.backends.cuda.matmul.allow_tf32 = True
    device = device_of(args.quick)
    model = build(args.shape, args.variant, args.layers, args.seed, args.quick)
    info = sizes(model)
    config = CompileConfig(fullgraph=True)
    if args.quick:  # the CPU smoke test: dynamo's tracing (fullgraph) without Inductor
        config = CompileConfig(fullgraph=True, backend="eager")
        config._compile_all_devices = True
    longest = max(args.prompts) + args.new_tokens
    caches = {b: StaticCache(config=model.config, max_cache_len=longest) for b in args.batches}
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    prompts = {
        (b, p): torch.randint(0, vocab_of(args.shape, args.quick), (b, p), device=device, generator=gen)
        for b in args.batches
        for p in args.prompts
    }

    def generate(b, p, n):
        cache = caches[b]
        cache.reset()
        ids = prompts[b, p]
        synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                past_key_values=cache,
                compile_config=config,
                pad_token_id=0,
            )
        synchronize(device)
        return time.perf_counter() - start, out[:, p:]

    rows, error = [], None
    try:
        for b in args.batches:  # compile (first two batch sizes), record the CUDA graphs, autotune
            for p in args.prompts:
                generate(b, p, args.new_tokens)
    except Exception as err:  # a graph break under fullgraph=True, an OOM: reported in the table
        error = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
    Path(args.ready).write_text("ready")
    while len(list(Path(args.ready).parent.glob(f"{args.shape}.*.ready"))) < args.siblings:
        time.sleep(0.5)
    import fcntl

    with open(Path(args.ready).parent / f"{args.shape}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one variant of a shape at a time on the GPU
        if error is None:
            for b in args.batches:
                for p in args.prompts:
                    first = [generate(b, p, 1)[0] for _ in range(args.repeats)]
                    runs = [generate(b, p, args.new_tokens) for _ in range(args.repeats)]
                    ttft = statistics.median(first)
                    total = statistics.median(t for t, _ in runs)
                    tokens = runs[0][1][0, :16].tolist() if b == 1 else None
                    rows.append(
                        dict(
                            batch=b,
                            prompt=p,
                            ttft=ttft,
                            decode=b * (args.new_tokens - 1) / max(total - ttft, 1e-9),
                            tokens=tokens,
                        )
                    )
        fcntl.flock(lock, fcntl.LOCK_UN)
    result = dict(
        shape=args.shape,
        variant=args.variant,
        layers=args.layers,
        rows=rows,
        error=error,
        info=info,
        breaks=None,
        reasons=[],
        top_k=model.config.num_experts_per_tok,
        kv=kv_bytes_per_token(model.config),
    )
    print(
        "RESULT " + json.dumps(result), flush=True
    )  # the timings, should the graph-break count below not finish in time
    torch._dynamo.reset()
    cache = StaticCache(config=model.config, max_cache_len=64)
    with torch.no_grad():
        model(input_ids=prompts[args.batches[0], args.prompts[0]][:, :8], past_key_values=cache, use_cache=True)
        explanation = torch._dynamo.explain(model)(
            input_ids=prompts[args.batches[0], args.prompts[0]][:, :1],
            past_key_values=cache,
            cache_position=torch.tensor([8], device=device),
            use_cache=True,
        )
    reasons = sorted({str(r.reason).splitlines()[0][:120] for r in explanation.break_reasons})
    result.update(breaks=explanation.graph_break_count, reasons=reasons)
    print("RESULT " + json.dumps(result), flush=True)


def kv_bytes_per_token(config) -> int:
    """bf16 keys + values of one position in every layer."""
    return 2 * 2 * config.num_key_value_heads * config.head_dim * config.num_hidden_layers


# ---------------------------------------------------------------- the run (parent process)


def run_shape(shape: str, args, log_dir: Path) -> list[dict]:
    ready = log_dir / "sync"
    ready.mkdir(parents=True, exist_ok=True)
    for f in ready.glob(f"{shape}.*"):
        f.unlink()
    procs = []
    for variant in args.variants:
        tag = variant.replace(":", "")
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.generate",
            "--child",
            "--shape",
            shape,
            "--variant",
            variant,
            "--layers",
            str(args.layers[shape]),
            "--batches",
            *map(str, args.batches),
            "--prompts",
            *map(str, args.prompts),
            "--new-tokens",
            str(args.new_tokens),
            "--repeats",
            str(args.repeats),
            "--seed",
            str(args.seed),
            "--ready",
            str(ready / f"{shape}.{tag}.ready"),
            "--siblings",
            str(len(args.variants)),
        ] + (["--quick"] if args.quick else [])
        log = open(log_dir / f"gen_{shape}_{tag}.log", "w")
        procs.append(
            (
                variant,
                subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1")),
                log,
            )
        )
    deadline = time.time() + args.child_timeout_s
    while any(proc.poll() is None for _, proc, _ in procs) and time.time() < deadline:
        for variant, proc, _ in procs:  # a sibling that died never writes its ready file: release the others
            mark = ready / f"{shape}.{variant.replace(':', '')}.ready"
            if proc.poll() is not None and not mark.exists():
                mark.write_text("dead")
        time.sleep(1)
    results = []
    for variant, proc, log in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        text = (log_dir / f"gen_{shape}_{variant.replace(':', '')}.log").read_text()
        found = [json.loads(line[7:]) for line in text.splitlines() if line.startswith("RESULT ")]
        if not found:
            tail = " | ".join(text.strip().splitlines()[-3:])[:400]
            found = [
                dict(
                    shape=shape,
                    variant=variant,
                    rows=[],
                    error=f"process failed (rc {proc.returncode}): {tail}",
                    info=None,
                    breaks=None,
                )
            ]
        results.append(found[-1])
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(VOCAB), choices=list(VOCAB))
    p.add_argument(
        "--layers", nargs="+", default=[f"{k}={v}" for k, v in LAYERS.items()], help="SHAPE=N decoder layers"
    )
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS + UNSTRUCTURED))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--prompts", nargs="+", type=int, default=[64, 2048])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--child-timeout-s", type=int, default=420, help="per shape: its variants' processes are killed after this"
    )
    p.add_argument(
        "--out", default=None, help="markdown file for the table (default benchmarks/results/generate_<card>.md)"
    )
    p.add_argument("--logs", default=os.environ.get("OUT", "/tmp/generate_logs"))
    p.add_argument(
        "--quick", action="store_true", help="CPU smoke test: tiny shapes, vocab 1000, dynamo without Inductor"
    )
    # child-only
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--ready", help=argparse.SUPPRESS)
    p.add_argument("--siblings", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.layers = int(args.layers[0])
        return child(args)
    if not (args.quick or torch.cuda.is_available()):
        sys.exit("python -m benchmarks.generate needs a CUDA GPU (or --quick for a CPU smoke test)")
    args.layers = {**LAYERS, **{k: int(v) for k, v in (s.split("=") for s in args.layers)}}
    from benchmarks.device_rates import measured_rates

    bandwidth, matmul = measured_rates(device_of(args.quick))
    card = "CPU (smoke test)" if args.quick else torch.cuda.get_device_name()
    log_dir = Path(args.logs)
    log_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for shape in args.shapes:
        results += run_shape(shape, args, log_dir)
    text, misses = table(results, args, bandwidth)
    import transformers

    agree = greedy_agreement(results, args.shapes)
    command = "python3 -m benchmarks.generate " + " ".join(sys.argv[1:])
    header = report_header(command, card, args, bandwidth, matmul, torch.__version__, transformers.__version__)
    notes = report_notes(agree, misses)
    print(text + notes)
    short = "h200" if "H200" in card else "h100" if "H100" in card else "cpu" if args.quick else "gpu"
    out = Path(args.out or Path(__file__).resolve().parent / "results" / f"generate_{short}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + text + notes + "\n")
    (log_dir / out.name).write_text(header + text + notes + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
