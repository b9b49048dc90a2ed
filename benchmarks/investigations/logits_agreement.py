"""Does the sparsified whole model compute what the masked dense model computes, at the real shapes?

    python3 -m benchmarks.investigations.logits_agreement --shapes mixtral qwen3 --layers 2

``benchmarks/generate.py`` compares greedy tokens, which a random model's near-tied logits flip at
the first bf16 difference. This compares logits instead, on the inputs each kernel sees: a 64-token
prompt (the prefill kernels) and one token for 1 / 8 / 32 sequences (the decode kernels), eager and
under ``torch.compile(fullgraph=True)``. The noise scale to read them against is the masked dense
model compiled against itself eager (``dense compiled`` rows): same weights, only the order of the
bf16 sums differs.
"""

from __future__ import annotations

import argparse
import copy

import torch

from benchmarks.generate import VOCAB
from benchmarks.inference import QUICK_SHAPES, SHAPES
from benchmarks.inference_models import build_model
from stun_lightning.sparse import sparsify


def compare(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    """(relative error, top-1 agreement, share of positions whose dense top-2 margin is below the max difference)."""
    out, ref = out.float(), ref.float()
    rel = ((out - ref).norm() / ref.norm()).item()
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    top2 = ref.topk(2, dim=-1).values
    margin = top2[..., 0] - top2[..., 1]
    tied = (margin < (out - ref).abs().amax(-1)).float().mean().item()
    return rel, agree, tied


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick", action="store_true", help="CPU smoke test: tiny shapes, vocab 1000, dynamo without Inductor"
    )
    args = p.parse_args()
    print("| shape | model | input | rel err vs dense eager | top-1 agree | near-tied |")
    print("|---|---|---|---:|---:|---:|")
    device, backend = ("cpu", "eager") if args.quick else ("cuda", "inductor")
    for shape in args.shapes:
        vocab = 1000 if args.quick else VOCAB[shape]
        dense = build_model((QUICK_SHAPES if args.quick else SHAPES)[shape], args.layers, vocab, device, args.seed)
        sparse = sparsify(copy.deepcopy(dense))
        gen = torch.Generator(device=device).manual_seed(args.seed)
        inputs = {"prompt 64 x 1": torch.randint(0, vocab, (1, 64), device=device, generator=gen)}
        for b in (1, 8, 32):
            inputs[f"1 token x {b}"] = torch.randint(0, vocab, (b, 1), device=device, generator=gen)
        with torch.no_grad():
            refs = {k: dense(ids, use_cache=False).logits for k, ids in inputs.items()}
            models = {
                "dense compiled": torch.compile(dense, fullgraph=True, backend=backend),
                "2:4 eager": sparse,
                "2:4 compiled": torch.compile(sparse, fullgraph=True, backend=backend),
            }
            for name, model in models.items():
                torch._dynamo.reset()
                for k, ids in inputs.items():
                    rel, agree, tied = compare(model(ids, use_cache=False).logits, refs[k])
                    print(f"| {shape} | {name} | {k} | {rel:.2e} | {agree:.3f} | {tied:.3f} |", flush=True)
        del dense, sparse, models, refs
        if device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
