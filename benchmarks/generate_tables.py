"""How ``benchmarks/generate.py`` reports its variants: the markdown table (ratios to ``dense`` of the
same run), the byte floor of a decode step, the greedy tokens' agreement with dense, the header and
the targets missed."""

from __future__ import annotations

COLUMNS = [
    "shape",
    "variant",
    "batch",
    "prompt",
    "TTFT ms",
    "TTFT x dense",
    "decode tok/s",
    "decode x dense",
    "floor tok/s",
    "of floor",
    "graph breaks",
    "weights GB",
]


def floor_tokens_per_s(result: dict, batch: int, prompt: int, new_tokens: int, bandwidth: float) -> float:
    info, k = result["info"], result["top_k"]
    routed = 0.0
    for layer_bytes, e in zip(info["experts"], info["num_experts"]):
        touched = e * (1 - (1 - k / e) ** batch)
        routed += layer_bytes / e * touched
    step = (
        info["total"] - sum(info["experts"]) - info["embed"] + routed + batch * (prompt + new_tokens / 2) * result["kv"]
    )
    return batch / (step / bandwidth)


def table(results: list[dict], args, bandwidth: float) -> tuple[str, list[str]]:
    dense = {
        (r["shape"], row["batch"], row["prompt"]): row for r in results if r["variant"] == "dense" for row in r["rows"]
    }
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    misses = []
    for r in results:
        if r["error"]:
            lines.append(f"| {r['shape']} | {r['variant']} | - | - | {r['error']} |" + " |" * (len(COLUMNS) - 5))
        for row in r["rows"]:
            base = dense.get((r["shape"], row["batch"], row["prompt"]))
            xd = row["decode"] / base["decode"] if base else float("nan")
            xt = base["ttft"] / row["ttft"] if base else float("nan")
            floor = floor_tokens_per_s(r, row["batch"], row["prompt"], args.new_tokens, bandwidth)
            cells = [
                r["shape"],
                r["variant"],
                row["batch"],
                row["prompt"],
                f"{row['ttft'] * 1e3:,.1f}",
                f"{xt:.2f}",
                f"{row['decode']:,.0f}",
                f"{xd:.2f}",
                f"{floor:,.0f}",
                f"{row['decode'] / floor:.2f}",
                r["breaks"],
                f"{r['info']['total'] / 1e9:.1f}",
            ]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
            if r["variant"] == "2:4" and (xd < 1.4 or xt < 1.0):
                misses.append(
                    f"{r['shape']} batch {row['batch']} prompt {row['prompt']}: decode {xd:.2f}x (target 1.4), prefill {xt:.2f}x (target 1.0); "
                    f"2:4 decode floor over the dense one {floor / floor_tokens_per_s(dense_result(results, r['shape']), row['batch'], row['prompt'], args.new_tokens, bandwidth):.2f}x"
                )
    for r in results:
        if r.get("reasons"):
            lines.append(f"\n{r['shape']} {r['variant']}: graph breaks: {'; '.join(r['reasons'])}")
    return "\n".join(lines), misses


def dense_result(results, shape):
    return next(r for r in results if r["shape"] == shape and r["variant"] == "dense" and r["info"])


def greedy_agreement(results: list[dict], shapes: list[str]) -> list[str]:
    """Per shape and prompt, the share of 2:4's first greedy tokens (batch 1) equal to dense's."""
    agree = []
    for shape in shapes:
        base = {
            row["prompt"]: row["tokens"]
            for r in results
            if r["shape"] == shape and r["variant"] == "dense"
            for row in r["rows"]
            if row["tokens"]
        }
        for r in results:
            if r["shape"] == shape and r["variant"] == "2:4":
                for row in r["rows"]:
                    if row["tokens"] and row["prompt"] in base:
                        same = sum(a == b for a, b in zip(row["tokens"], base[row["prompt"]])) / len(row["tokens"])
                        agree.append(f"{shape} prompt {row['prompt']}: {same:.0%}")
    return agree


def report_header(
    command: str, card: str, args, bandwidth: float, matmul: float, torch_version: str, transformers_version: str
) -> str:
    return (
        f"# `generate()` with a static cache and transformers' compilation: `python -m benchmarks.generate`, one {card}\n\n"
        f"`{command}`\n\ntorch {torch_version}, transformers {transformers_version}; copy {bandwidth / 1e12:.2f} TB/s, "
        f"bf16 matmul {matmul / 1e12:.1f} TFLOP/s (measured in this run). Layers: "
        f"{', '.join(f'{s} {args.layers[s]}' for s in args.shapes)}; {args.new_tokens} new tokens; medians of {args.repeats}.\n\n"
        "TTFT: `generate(max_new_tokens=1)` (prefill, run uncompiled by transformers); decode tok/s: batch x (N-1) / (t(N) - TTFT), "
        "CompileConfig(fullgraph=True), mode reduce-overhead; x dense: same shape, same batch and prompt, this run. "
        "floor tok/s: byte floor of a decode step (weights but the embedding, expected routed experts, filled KV cache) at the copy bandwidth.\n\n"
    )


def report_notes(agree: list[str], misses: list[str]) -> str:
    notes = (
        "\n\nGreedy tokens of 2:4 equal to dense (batch 1, first 16): "
        + (", ".join(agree) or "n/a")
        + " (random weights: near-tied logits flip at the first bf16 difference, then the sequences part;"
        " `python3 -m benchmarks.investigations.logits_agreement` compares the logits themselves)"
    )
    notes += "\n\nTargets missed (2:4: decode >= 1.4x dense, prefill >= 1.0x):\n" + (
        "\n".join(f"- {m}" for m in misses) or "- none"
    )
    return notes
