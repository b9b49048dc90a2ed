"""How ``benchmarks/inference.py`` reports its rows: the markdown table (ratios to ``dense`` of the
same run), issue 12's targets, and the configs the Triton autotuners chose."""

from __future__ import annotations

import sys

COLUMNS = [
    "scope",
    "shape",
    "variant",
    "tokens",
    "us",
    "tokens/s",
    "x dense",
    "floor us",
    "of floor",
    "err",
    "err eager",
    "weights MB",
    "experts",
]


def cells(row: dict, dense: dict | None) -> list[str]:
    if "error" in row:
        return [f"error: {row['error']}"] + ["-"] * 8
    ratio = f"{dense['us'] / row['us']:.2f}" if dense and "us" in dense else "-"
    return [
        f"{row['us']:.1f}",
        f"{row['tokens'] / row['us'] * 1e6:,.0f}",
        ratio,
        f"{row['floor']:.1f}",
        f"{row['floor'] / row['us']:.2f}",
        f"{row['err']:.1e}",
        f"{row['eager_err']:.1e}",
        f"{row['mb']:,.1f}" if row["mb"] >= 100 else f"{row['mb']:.3g}",
        "/".join(map(str, row["experts"])),
    ]


def table(rows) -> str:
    dense = {(r["scope"], r["shape"], r["tokens"]): r for r in rows if r["variant"] == "dense"}
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        key = (r["scope"], r["shape"], r["tokens"])
        lines.append(
            "| "
            + " | ".join([*map(str, (r["scope"], r["shape"], r["variant"], r["tokens"])), *cells(r, dense.get(key))])
            + " |"
        )
    return "\n".join(lines)


def targets(rows, args) -> str:
    """Issue 12's targets for one MoE layer at 2:4: decode >= 1.5x dense and >= 0.75 of the byte floor,
    prefill >= 1.2x dense; every output within 1e-2 of the float32 masked dense model."""
    lines = []
    for name in args.shapes if "layer" in args.scope else []:
        dense = {
            r["tokens"]: r
            for r in rows
            if (r["scope"], r["shape"], r["variant"]) == ("layer", name, "dense") and "us" in r
        }
        sparse = {
            r["tokens"]: r
            for r in rows
            if (r["scope"], r["shape"], r["variant"]) == ("layer", name, "2:4") and "us" in r
        }

        def ratio(t):
            return f"{dense[t]['us'] / sparse[t]['us']:.2f}" if t in dense and t in sparse else "-"

        frac = "/".join(f"{sparse[t]['floor'] / sparse[t]['us']:.2f}" if t in sparse else "-" for t in args.tokens)
        lines.append(
            f"- {name} layer, 2:4: decode x dense {'/'.join(map(ratio, args.tokens))} (target 1.5), of floor {frac} "
            f"(target 0.75); prefill x dense {ratio(args.prefill)} (target 1.2)"
        )
    if any("err" in r for r in rows):
        worst = {k: max(r[k] for r in rows if k in r) for k in ("err", "eager_err")}
        lines.append(f"- largest error of any row {worst['err']:.1e}, eager {worst['eager_err']:.1e} (target 1e-2)")
    return "Targets (issue 12):\n" + "\n".join(lines)


def autotuned() -> str:
    """Configs the Triton autotuners of the sparse package chose in this run (key: N, K, BLOCK_M, ...)."""
    modules = [m for name, m in sorted(sys.modules.items()) if name.startswith("stun_lightning.sparse.")]
    found = [
        f"- {m.__name__.rsplit('.', 1)[1]}.{name} {tuple(key)[:4]}: {config}"
        for m in modules
        for name, obj in vars(m).items()
        if isinstance(getattr(obj, "cache", None), dict) and hasattr(obj, "configs")
        for key, config in obj.cache.items()
    ]
    return "Autotuned kernels:\n" + "\n".join(found) if found else "Autotuned kernels: none ran"
