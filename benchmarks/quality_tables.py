"""How ``benchmarks/quality.py`` reports its rows: one markdown table per model, the summary tables
(STUN's claim, every expert method, pruning for math, distillation), the dense model's expert weight
cosine, and a CSV.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from benchmarks.quality_rows import (
    AUTO_TOTALS,
    EXPERT_METHODS,
    METHOD_FRACTIONS,
    METHODS_TOTAL,
    TASK_FRACTION,
    TASK_METHODS,
    TOTALS,
    Result,
)


def markdown(results: list[Result], title: str) -> str:
    dense = results[0]
    domains = list(dense.ppl)
    head = [
        "group",
        "method",
        "experts removed",
        "total sparsity",
        "inside kept",
        "experts per layer",
        *[f"ppl {d}" for d in domains],
    ]
    head += ["ppl mean", "vs dense", "next-token acc"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [
            r.row.group,
            r.row.method,
            f"{r.experts_removed:.1%}",
            f"{r.total_sparsity:.1%}",
            f"{r.within_sparsity:.1%}",
            r.experts_after,
        ]
        cells += [f"{r.ppl[d]:.2f}" for d in domains]
        cells += [f"{r.mean_ppl:.2f}", f"{r.mean_ppl / dense.mean_ppl - 1:+.1%}", f"{r.accuracy:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def claim_table(results: list[Result], stun_experts: float) -> str:
    """At each total: unstructured-only vs STUN then the same method (mean ppl), and the gap."""
    by = {(r.row.group, r.row.method): r for r in results}
    dense = results[0].mean_ppl
    lines = [
        "| total | second phase | unstructured only | STUN then same | STUN closer to dense? | ppl increase ratio (STUN / only) |",
        "|---|---|---|---|---|---|",
    ]
    for total in TOTALS:
        for name in ("owl+wanda", "moe_pruner"):
            only = by.get((f"total {total:.0%}", f"{name} only"))
            stun = by.get((f"total {total:.0%}", f"STUN {stun_experts:.0%} experts + {name}"))
            if only is None or stun is None:
                continue
            ratio = (stun.mean_ppl - dense) / max(1e-9, only.mean_ppl - dense)
            lines.append(
                f"| {total:.0%} | {name} | {only.mean_ppl:.2f} | {stun.mean_ppl:.2f} | {'yes' if stun.mean_ppl < only.mean_ppl else 'no'} | {ratio:.2f} |"
            )
    return "\n".join(lines)


def methods_table(results: list[Result]) -> str:
    """Issue 11: mean perplexity of every expert method (uniform budget), alone and then OWL+Wanda."""
    by = {(r.row.group, r.row.method.split(" (")[0]): r for r in results}
    groups = [
        f"methods {f:.0%} experts" + s for s in ("", f" + owl+wanda to {METHODS_TOTAL:.0%}") for f in METHOD_FRACTIONS
    ]
    present = [g for g in groups if any(k[0] == g for k in by)]
    if not present:
        return ""
    lines = ["| method | " + " | ".join(present) + " |", "|---|" + "---|" * len(present)]
    for method in EXPERT_METHODS:
        cells = []
        for g in present:
            r = by.get((g, method))
            best = r is not None and r.mean_ppl == min(x.mean_ppl for k, x in by.items() if k[0] == g)
            cells.append("-" if r is None else (f"**{r.mean_ppl:.2f}**" if best else f"{r.mean_ppl:.2f}"))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def task_table(results: list[Result]) -> str:
    """Math-calibrated expert pruning against the same method on the mixed calibration, per domain."""
    by = {(r.row.group, r.row.method.split(" (")[0]): r for r in results}
    domains = list(results[0].ppl)
    lines = [
        "| method | calibration | " + " | ".join(f"ppl {d}" for d in domains) + " | ppl mean |",
        "|---|---|" + "---|" * (len(domains) + 1),
    ]
    lines.append(
        "| dense | - | " + " | ".join(f"{results[0].ppl[d]:.2f}" for d in domains) + f" | {results[0].mean_ppl:.2f} |"
    )
    for method in TASK_METHODS:
        for label, group in (
            ("mixed", f"methods {TASK_FRACTION:.0%} experts"),
            ("math only", f"math-calibrated {TASK_FRACTION:.0%} experts"),
        ):
            r = by.get((group, method))
            if r is not None:
                lines.append(
                    f"| {method} | {label} | "
                    + " | ".join(f"{r.ppl[d]:.2f}" for d in domains)
                    + f" | {r.mean_ppl:.2f} |"
                )
    return "\n".join(lines) if len(lines) > 3 else ""


def distill_table(results: list[Result]) -> str:
    """Perplexity before and after the short fit, and the share of the gap to dense it closes."""
    dense = results[0]
    domains = list(dense.ppl)
    rows = [r for r in results if r.row.distill is not None and r.extra]
    if not rows:
        return ""
    lines = [
        "| row | fit | steps | fit s | ppl before ("
        + " / ".join(domains)
        + ") | mean before | ppl after ("
        + " / ".join(domains)
        + ") | mean after | gap to dense recovered |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        before = math.exp(sum(math.log(v) for v in r.extra["before"].values()) / len(domains))
        recovered = (before - r.mean_ppl) / max(1e-9, before - dense.mean_ppl)
        lines.append(
            f"| {r.row.group} | {'expert-wise KD' if r.row.distill == 'kd' else 'CE only'} | {r.extra['steps']} | {r.extra['fit_seconds']:.0f} | "
            + " / ".join(f"{r.extra['before'][d]:.2f}" for d in domains)
            + f" | {before:.2f} | "
            + " / ".join(f"{r.ppl[d]:.2f}" for d in domains)
            + f" | {r.mean_ppl:.2f} | {recovered:.0%} |"
        )
    return "\n".join(lines)


def auto_table(results: list[Result]) -> str:
    """Issue 22: mean perplexity of each recipe at each total of the ``auto`` rows (bold: best of the column)."""
    groups = [f"auto {t:.0%}" for t in AUTO_TOTALS]
    rows = [r for r in results if r.row.group in groups]
    if not rows:
        return ""
    by = {(r.row.group, r.row.method): r for r in rows}
    methods = list(dict.fromkeys(r.row.method for r in rows))
    lines = [
        "| recipe | " + " | ".join(f"{g.split()[1]} total (experts per layer)" for g in groups) + " |",
        "|---|" + "---|" * len(groups),
    ]
    for method in methods:
        cells = []
        for g in groups:
            r = by.get((g, method))
            best = r is not None and r.mean_ppl == min(x.mean_ppl for k, x in by.items() if k[0] == g)
            if r is None:
                cells.append("-")
                continue
            value = f"**{r.mean_ppl:.2f}**" if best else f"{r.mean_ppl:.2f}"
            cells.append(f"{value} ({r.experts_after})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cosine_text(cosines: dict[int, float]) -> str:
    """The dense model's mean pairwise cosine similarity of expert weights, per MoE layer and averaged over layers."""
    mean = sum(cosines.values()) / len(cosines)
    per_layer = ", ".join(f"{i}: {c:.3f}" for i, c in cosines.items())
    return (
        f"Mean pairwise cosine similarity of expert weights (dense model; each expert's gate_up and down matrices "
        f"flattened and joined; mean over pairs, then over layers): {mean:.3f} (per layer {per_layer})"
    )


def report_text(results: list[Result], title: str, stun_experts: float, cosines: dict[int, float] | None = None) -> str:
    text = markdown(results, title) + "\n"
    if cosines:
        text += "\n" + cosine_text(cosines) + "\n"
    claim = claim_table(results, stun_experts)
    if claim.count("\n") > 1:
        text += f"\nSTUN's claim (mean perplexity over domains; dense {results[0].mean_ppl:.2f}):\n\n{claim}\n"
    for heading, table in (
        (
            f"Every expert method, the same count per layer (mean perplexity; OWL+Wanda rows at {METHODS_TOTAL:.0%} total; bold: best of the column)",
            methods_table(results),
        ),
        (
            f"Pruning for math: {TASK_FRACTION:.0%} of the experts, calibrated on math only vs the mixed calibration",
            task_table(results),
        ),
        ("Expert-wise distillation with the masks held fixed", distill_table(results)),
        (
            "The split chosen per layer (auto), error-curve budgets and merging (mean perplexity; bold: best of the column)",
            auto_table(results),
        ),
    ):
        if table:
            text += f"\n{heading}:\n\n{table}\n"
    return text


def write_csv(results: list[Result], path: Path, model_name: str) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        domains = list(results[0].ppl)
        w.writerow(
            [
                "model",
                "group",
                "method",
                "seeds",
                "experts_removed",
                "total_sparsity",
                "within_sparsity",
                "experts_per_layer",
                *[f"ppl_{d}" for d in domains],
                "ppl_mean",
                "accuracy",
                "seconds",
            ]
        )
        for r in results:
            w.writerow(
                [
                    model_name,
                    r.row.group,
                    r.row.method,
                    len(r.row.seeds),
                    f"{r.experts_removed:.4f}",
                    f"{r.total_sparsity:.4f}",
                    f"{r.within_sparsity:.4f}",
                    r.experts_after,
                    *[f"{r.ppl[d]:.4f}" for d in domains],
                    f"{r.mean_ppl:.4f}",
                    f"{r.accuracy:.4f}",
                    f"{r.seconds:.2f}",
                ]
            )
