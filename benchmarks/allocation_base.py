"""Layer targets over kept experts or over whole layers, after a global structured phase (CPU).

    python -m benchmarks.allocation_base [--out FILE.md]

On the shipped reference model (``stun_lightning.reference``), 25% of the experts removed with a
global budget (layers keep different counts), Wanda to a total sparsity over the original expert
parameters, with ``allocation`` uniform or OWL and ``allocation_base`` ``kept`` (official) or
``layer``; held-out perplexity on the first 8192 tokens of the shipped held-out text. About a minute on
a few CPU cores. Last run: ``benchmarks/results/allocation_base_cpu.md``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path


from stun_lightning import StunRecipe, prune
from stun_lightning.evaluate import perplexity
from stun_lightning.reference import load_reference_model

CASES = [("frequency", 0.8), ("stun", 0.8), ("frequency", 0.7), ("stun", 0.7)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    model, tok = load_reference_model()
    dense = perplexity(model, tok, max_tokens=args.max_tokens, progress=False)
    lines = [
        f"Shipped reference model, dense perplexity {dense:.2f} ({args.max_tokens} held-out tokens); 25% of experts, "
        "layer_budget global, Wanda, low_token_rule magnitude.",
        "",
        "| expert method | total sparsity | allocation | base kept | base layer | experts per layer |",
        "|---|---|---|---|---|---|",
    ]
    print(lines[0], flush=True)
    for method, total in CASES:
        for allocation in ("uniform", "owl"):
            ppl, counts = {}, None
            for base in ("kept", "layer"):
                recipe = StunRecipe(
                    expert_method=method,
                    expert_sparsity=0.25,
                    layer_budget="global",
                    total_sparsity=total,
                    metric="wanda",
                    allocation=allocation,
                    allocation_base=base,
                    low_token_rule="magnitude",
                )
                pruned = copy.deepcopy(model)
                report = prune(pruned, recipe, tokenizer=tok, progress=False)
                ppl[base], counts = (
                    perplexity(pruned, tok, max_tokens=args.max_tokens, progress=False),
                    report.experts_after,
                )
            lines.append(
                f"| {method} | {total:.0%} | {allocation} | {ppl['kept']:.2f} | {ppl['layer']:.2f} | {list(counts.values())} |"
            )
            print(lines[-1], flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
