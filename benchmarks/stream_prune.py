"""Streaming vs in-memory prune: peak host RSS, peak GPU memory, seconds per decoder layer.

    python -m benchmarks.stream_prune --preset cpu                       # few-hundred-MB model, both paths
    python -m benchmarks.stream_prune --preset qwen3-235b --layers 8 --device cuda --skip-memory

Builds a random-weight Qwen3-MoE-shaped checkpoint as sharded safetensors (one shard per layer,
written one layer at a time, so building it never needs the whole model in memory), then prunes
it with the CLI's default recipe in a child process per path; the child's peak RSS is its
``ru_maxrss``. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PRESETS = {
    # Qwen3-235B-A22B: hidden 4096, 128 experts of width 1536, top-8 (64 heads, 4 KV heads, head 128)
    "qwen3-235b": dict(
        hidden_size=4096,
        moe_intermediate_size=1536,
        num_experts=128,
        num_experts_per_tok=8,
        num_attention_heads=64,
        num_key_value_heads=4,
        head_dim=128,
        vocab_size=151936,
    ),
    "cpu": dict(
        hidden_size=512,
        moe_intermediate_size=256,
        num_experts=32,
        num_experts_per_tok=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=8192,
    ),
}


def build_checkpoint(out: Path, layers: int, dtype: torch.dtype, **shape) -> int:
    """A random Qwen3-MoE checkpoint in ``out`` (per-expert tensors, as transformers saves them); returns bytes."""
    from safetensors.torch import save_file
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from stun_lightning.stream import _Layout, layer_to_checkpoint
    from stun_lightning.tiny import load_tokenizer

    config = Qwen3MoeConfig(
        num_hidden_layers=layers, intermediate_size=shape["moe_intermediate_size"], tie_word_embeddings=False, **shape
    )
    config.dtype = dtype
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0

    def random(shape_):
        return (torch.randn(shape_, generator=gen) * 0.02).to(dtype)

    def norm_or_random(name, t):
        return torch.ones(t.shape, dtype=dtype) if "norm" in name else random(t.shape)

    n = layers + 1
    for i, layer in enumerate(model.model.layers):
        tensors = {k: norm_or_random(k, t) for k, t in layer.state_dict().items()}
        tensors = layer_to_checkpoint(tensors, f"model.layers.{i}.", _Layout(per_expert=True))
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    rest = {k: norm_or_random(k, t) for k, t in model.state_dict().items() if not k.startswith("model.layers.")}
    name = f"model-{n:05d}-of-{n:05d}.safetensors"
    save_file(rest, str(out / name), metadata={"format": "pt"})
    weight_map.update({k: name for k in rest})
    total += sum(t.numel() * t.element_size() for t in rest.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    config.save_pretrained(out)
    load_tokenizer().save_pretrained(out)
    return total


def child(mode: str, model_dir: str, out: str, device: str, samples: int) -> None:
    """Prune in this process and print one JSON line (run as a child: its ru_maxrss is the path's peak)."""
    from stun_lightning import StunRecipe, prune
    from stun_lightning.cli import DEFAULT_RECIPE
    from stun_lightning.serialization import load_pruned, save_pruned
    from stun_lightning.stream import prune_streaming

    recipe = StunRecipe.from_dict({**DEFAULT_RECIPE, "calibration_samples": samples, "calibration_seq_len": 128})
    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (samples, 128), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    if mode == "imports only":
        pass
    elif mode == "stream":
        prune_streaming(model_dir, out, recipe, ids, device=device, progress=False)
    else:
        model = load_pruned(model_dir)
        prune(model, recipe, ids, device=device, progress=False)
        save_pruned(model, out)
    seconds = time.perf_counter() - start
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    print(json.dumps({"seconds": seconds, "gpu_bytes": gpu}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=16, help="calibration windows of 128 tokens")
    parser.add_argument(
        "--skip-memory", action="store_true", help="do not run the in-memory path (model larger than RAM)"
    )
    parser.add_argument("--workdir", help="where the checkpoint and outputs go (default: a temp dir)")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "MODEL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child, args.device, args.samples)
        return 0
    work = Path(args.workdir or tempfile.mkdtemp(prefix="stream_prune_"))
    size = build_checkpoint(work / "model", args.layers, getattr(torch, args.dtype), **PRESETS[args.preset])
    rows = []
    for mode in ["imports only", "stream"] + ([] if args.skip_memory else ["memory"]):
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.stream_prune",
            "--device",
            args.device,
            "--samples",
            str(args.samples),
            "--child",
            mode,
            str(work / "model"),
            str(work / f"out-{mode}"),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
        result = json.loads(done.stdout.strip().splitlines()[-1])
        # ru_maxrss of children is the max over all of them: rows run in increasing order of memory
        rows.append(
            (mode, rss if rss > before * 1024 else float("nan"), result["gpu_bytes"], result["seconds"] / args.layers)
        )
    gib = 2**30
    print(
        f"\nmodel: {args.preset}-shaped, {args.layers} layers, {args.dtype}, {size / gib:.2f} GiB on disk (~{size / args.layers / gib:.2f} GiB per decoder layer); device {args.device}; {torch.__version__}\n"
    )
    print("| path | peak host RSS (GiB) | RSS / model size | peak GPU memory (GiB) | s / layer |")
    print("|---|---|---|---|---|")
    for mode, rss, gpu, spl in rows:
        print(f"| {mode} | {rss / gib:.2f} | {rss / size:.2f} | {gpu / gib:.2f} | {spl:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
