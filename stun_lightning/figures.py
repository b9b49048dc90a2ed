"""What pruning did, as pictures: the numbers behind them (torch only) and the PNG/HTML writer (matplotlib).

:func:`record_figures` measures, on the calibration tokens, the routing frequency of every expert
before and after pruning (fraction of routed slots, original expert indices; removed experts get
0 after) and, for STUN, the distance table it clustered (``methods.stun.expert_distances`` with the
recipe's options, on the unpruned router); the per-expert sparsity is counted from the pruned tensors.
``prune(..., record_figures=True)`` stores this in ``PruneReport.figures`` (``stun_report.json``).

:func:`figure_data` turns a report into one data set per picture; :func:`write_report` draws each
(matplotlib, Agg backend: ``pip install stun-lightning[report]``) as ``NAME.png`` and one
self-contained ``report.html`` (images embedded as base64) and returns the data it plotted, so
what a picture shows can be checked against the report's numbers.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import torch
from torch import nn

from .adapters import moe_layers
from .sharding import count_nonzero


def routing_frequency(
    model: nn.Module, calibration: torch.Tensor, *, batch_size: int = 8, device=None, progress: bool = False
) -> dict[int, list[float]]:
    """Fraction of routed slots per expert of every MoE layer (current indices), on ``calibration``."""
    from .calibration import ROUTING, calibrate

    stats = calibrate(
        model,
        calibration,
        collect=(ROUTING,),
        batch_size=batch_size,
        device=device,
        progress=progress,
        desc="routing frequency",
    )
    return {layer.index: stats[layer.index].frequency().tolist() for layer in moe_layers(model)}


def expert_sparsity(model: nn.Module) -> dict[int, list[float]]:
    """Fraction of zeros in each expert's weights and biases (current indices), counted from the tensors."""
    out = {}
    for layer in moe_layers(model):
        total, nonzero = [0] * layer.num_experts, [0] * layer.num_experts
        for _, p in layer.expert_parameters():
            for e in range(layer.num_experts):
                total[e] += p[e].numel()
                nonzero[e] += count_nonzero(p[e])
        out[layer.index] = [1.0 - n / t if t else 0.0 for n, t in zip(nonzero, total)]
    return out


def stun_distances(
    model: nn.Module, recipe, calibration: torch.Tensor | None, *, device=None
) -> dict[int, list[list[float]]]:
    """STUN's distance table per layer, as its structured phase computes it (diagonal: None)."""
    from .methods.stun import expert_distances

    opts = recipe.method_kwargs()
    coactivation = {}
    if opts.get("distance", "router") != "router":
        from .calibration import ROUTING, calibrate

        stats = calibrate(
            model, calibration, collect=(ROUTING,), batch_size=recipe.batch_size, device=device, progress=False
        )
        coactivation = {layer.index: stats[layer.index].coactivation for layer in moe_layers(model)}
    out = {}
    for layer in moe_layers(model):
        d = expert_distances(
            layer.router_weight,
            coactivation.get(layer.index),
            opts.get("distance", "router"),
            opts.get("divide_by_norm", True),
            opts.get("mix_weight", 1.0),
        )
        out[layer.index] = [[float(v) if torch.isfinite(v) else None for v in row] for row in d]
    return out


def to_original(
    values: dict[int, list[float]], removed: dict[int, list[int]], experts_before: dict[int, int], fill=None
) -> dict[int, list]:
    """Per-expert values of a pruned model spread back to original indices (``fill`` where removed)."""
    out = {}
    for i, row in values.items():
        gone = set(removed.get(i, []))
        kept = [e for e in range(experts_before[i]) if e not in gone]
        full = [fill] * experts_before[i]
        for e, v in zip(kept, row):
            full[e] = v
        out[i] = full
    return out


# --- report -> picture data -------------------------------------------------------------------------


def _layers(d: dict) -> list[str]:
    return sorted(d, key=int)


def figure_data(report: dict, evals: dict | None = None) -> dict[str, dict]:
    """One data set per picture, from a ``stun_report.json`` dict (and ``eval_results.json``)."""
    figs = report.get("figures") or {}
    layers = _layers(report["experts_before"])
    out = {
        "experts_per_layer": {
            "layers": [int(i) for i in layers],
            "before": [report["experts_before"][i] for i in layers],
            "after": [report["experts_after"][i] for i in layers],
        },
        "sparsity_per_layer": {
            "layers": [int(i) for i in layers],
            "sparsity": [report["layer_sparsity"][i] for i in layers],
            "target": [report.get("layer_target_sparsity", {}).get(i) for i in layers],
        },
    }
    if figs.get("expert_sparsity"):
        out["sparsity_per_expert"] = {
            "layers": [int(i) for i in layers],
            "matrix": [figs["expert_sparsity"][i] for i in layers],
        }
    if figs.get("routing_before") and figs.get("routing_after"):
        out["routing_frequency"] = {
            "layers": [int(i) for i in layers],
            "before": [figs["routing_before"][i] for i in layers],
            "after": [figs["routing_after"][i] for i in layers],
        }
    if figs.get("distances"):
        out["expert_distances"] = {
            "layers": [int(i) for i in layers],
            "matrices": [figs["distances"][i] for i in layers],
            "survivors": [
                [e for e in range(report["experts_before"][i]) if e not in report.get("removed_experts", {}).get(i, [])]
                for i in layers
            ],
        }
    quality = {"perplexity": dict(report["perplexity"])} if report.get("perplexity") else {}
    if evals and evals.get("baseline"):
        for task, metrics in evals["tasks"].items():
            for metric, value in metrics.items():
                before = evals["baseline"]["tasks"].get(task, {}).get(metric)
                if before is not None:
                    quality[f"{task} {metric}"] = {"before": before, "after": value}
    if quality:
        out["quality"] = quality
    return out


# --- drawing -----------------------------------------------------------------------------------------


def _plot(name: str, data: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if name == "experts_per_layer":
        fig, ax = plt.subplots(figsize=(6, 3.2), layout="constrained")
        x = np.arange(len(data["layers"]))
        ax.bar(x - 0.2, data["before"], 0.4, label="before", color="#bbbbbb")
        ax.bar(x + 0.2, data["after"], 0.4, label="after", color="#1f77b4")
        for xi, v in zip(x, data["after"]):
            ax.text(xi + 0.2, v, str(v), ha="center", va="bottom", fontsize=8)
        ax.set(
            xticks=x, xticklabels=data["layers"], xlabel="MoE layer", ylabel="experts", title="Experts kept per layer"
        )
        ax.set_ylim(0, max(data["before"]) * 1.15)
        ax.legend(loc="lower right")
    elif name == "sparsity_per_layer":
        fig, ax = plt.subplots(figsize=(6, 3.2), layout="constrained")
        x = np.arange(len(data["layers"]))
        ax.bar(x, [100 * v for v in data["sparsity"]], color="#d62728", label="measured")
        targets = [t for t in data["target"] if t is not None]
        if len(targets) == len(x):
            ax.plot(x, [100 * t for t in data["target"]], "k_", markersize=20, label="within-expert target")
        ax.set(
            xticks=x,
            xticklabels=data["layers"],
            xlabel="MoE layer",
            ylabel="% of original expert params",
            title="Sparsity per layer (removed experts count as zeros)",
            ylim=(0, 100),
        )
        ax.legend(loc="lower right")
    elif name in ("sparsity_per_expert", "routing_frequency"):
        panels = (
            [("sparsity (%)", data["matrix"])]
            if name == "sparsity_per_expert"
            else [("before", data["before"]), ("after", data["after"])]
        )
        fig, axes = plt.subplots(
            1, len(panels), figsize=(4.2 * len(panels) + 1, 3.4), squeeze=False, layout="constrained"
        )
        width = max(len(r) for _, m in panels for r in m)
        scale = 100 if name == "sparsity_per_expert" else 1
        vmax = (
            100 if name == "sparsity_per_expert" else max(v for _, m in panels for r in m for v in r if v is not None)
        )
        for ax, (label, matrix) in zip(axes[0], panels):
            arr = np.full((len(matrix), width), np.nan)
            for r, row in enumerate(matrix):
                arr[r, : len(row)] = [np.nan if v is None else scale * v for v in row]
            im = ax.imshow(arr, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
            for r in range(arr.shape[0]):
                for c in range(arr.shape[1]):
                    if np.isnan(arr[r, c]):
                        ax.text(c, r, "x", ha="center", va="center", color="#888888", fontsize=8)
            ax.set(
                xlabel="expert (original index)",
                ylabel="MoE layer",
                yticks=range(len(data["layers"])),
                yticklabels=data["layers"],
                xticks=range(width),
                title=label,
            )
            ax.set_facecolor("#f0f0f0")
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.85)
        fig.suptitle(
            "Sparsity per expert (x: removed)"
            if name == "sparsity_per_expert"
            else "Routing frequency per expert (fraction of routed slots; x: removed)"
        )
    elif name == "expert_distances":
        n = len(data["layers"])
        fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 1, 3.4), squeeze=False, layout="constrained")
        for ax, layer, matrix, keep in zip(axes[0], data["layers"], data["matrices"], data["survivors"]):
            arr = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
            im = ax.imshow(arr, cmap="magma_r", aspect="equal")
            for e in keep:
                ax.add_patch(
                    matplotlib.patches.Rectangle((e - 0.5, -0.5), 1, len(arr), fill=False, edgecolor="#00c853", lw=1.5)
                )
            ax.set(title=f"layer {layer}", xticks=range(len(arr)), yticks=range(len(arr)), xlabel="expert")
            ax.set_xticklabels([f"{e}*" if e in keep else str(e) for e in range(len(arr))], fontsize=7)
            fig.colorbar(im, ax=ax, shrink=0.7)
        fig.suptitle("STUN expert distances (green columns, *: survivors)")
    elif name == "quality":
        names = list(data)
        fig, axes = plt.subplots(
            1, len(names), figsize=(2.8 * len(names) + 0.5, 3.2), squeeze=False, layout="constrained"
        )
        for ax, key in zip(axes[0], names):
            values = [data[key]["before"], data[key]["after"]]
            ax.bar(["before", "after"], values, color=["#bbbbbb", "#1f77b4"])
            for i, v in enumerate(values):
                ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
            ax.set_ylim(0, max(values) * 1.2 or 1)
            ax.set_title(key, fontsize=9)
        fig.suptitle("Quality before / after pruning")
    else:
        raise ValueError(f"unknown figure {name!r}")

    return fig


TITLES = {
    "experts_per_layer": "Experts kept per layer",
    "sparsity_per_layer": "Sparsity per layer",
    "sparsity_per_expert": "Sparsity per expert",
    "routing_frequency": "Routing frequency before / after",
    "expert_distances": "STUN expert distance matrix",
    "quality": "Perplexity / accuracy before and after",
}


def write_report(model_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, dict]:
    """Write ``NAME.png`` per picture and ``report.html`` into ``out_dir`` (default ``model_dir/report``).

    Reads ``model_dir/stun_report.json`` (and ``eval_results.json`` when there); returns
    ``{name: data plotted}``. Files are written to a temporary directory renamed at the end.
    """
    from .serialization import atomic_dir

    model_dir = Path(model_dir)
    report_file = model_dir / "stun_report.json"
    if not report_file.exists():
        raise FileNotFoundError(
            f"{report_file} does not exist; pass a directory written by `stun-lightning prune --out DIR`"
        )
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ValueError(f"matplotlib is not installed ({err}); pip install 'stun-lightning[report]'") from err
    import matplotlib.pyplot as plt

    report = json.loads(report_file.read_text())
    evals = (
        json.loads((model_dir / "eval_results.json").read_text())
        if (model_dir / "eval_results.json").exists()
        else None
    )
    data = figure_data(report, evals)
    with atomic_dir(out_dir or model_dir / "report", overwrite=True) as tmp:
        sections = []
        for name, d in data.items():
            fig = _plot(name, d)
            fig.savefig(tmp / f"{name}.png", dpi=110)
            plt.close(fig)
            png = base64.b64encode((tmp / f"{name}.png").read_bytes()).decode()
            sections.append(
                f'<h2>{html.escape(TITLES[name])}</h2>\n<img alt="{name}" src="data:image/png;base64,{png}">'
            )
        (tmp / "figures.json").write_text(json.dumps(data, indent=1))
        title = html.escape(f"stun-lightning report: {report.get('base_model') or model_dir.name}")
        (tmp / "report.html").write_text(
            f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{title}</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}img{max-width:100%}</style></head>"
            f"<body><h1>{title}</h1>\n" + "\n".join(sections) + "\n</body></html>\n"
        )
    return data
