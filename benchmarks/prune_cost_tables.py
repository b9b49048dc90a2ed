"""The rows of ``benchmarks/prune_cost.py`` and how they print: markdown tables and CSV fields."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

CSV_FIELDS = [
    "table",
    "shape",
    "experts",
    "top_k",
    "layers",
    "phase",
    "method",
    "layer_passes",
    "model_passes",
    "phase_s",
    "call_s",
    "gpu_peak_mib",
    "rss_growth_mib",
    "layer_mib",
    "peak_over_layer",
    "naee_subsets_s25",
    "naee_subsets_s50",
    "error",
    "router_passes",
    "note",
]


@dataclass
class Row:
    table: str
    shape: str
    experts: int
    top_k: int
    layers: int
    phase: str
    method: str
    layer_passes: int | None  # None: the row failed
    phase_s: float | None  # the phase's own time, as PruneReport / CalibrationStats report it
    call_s: float  # the whole call, synchronized (prune also counts parameters before and after)
    gpu_peak: int | None = None
    rss_growth: int | None = None
    layer_bytes: int | None = None
    naee: dict = field(default_factory=dict)
    error: str | None = None  # the exception that stopped this row; the other rows still run

    @property
    def model_passes(self) -> float | None:
        return None if self.layer_passes is None else self.layer_passes / self.layers

    def cells(self) -> dict[str, str]:
        """Formatted values; failed measurements read 'failed', missing ones 'n/a'."""
        failed = "failed" if self.error else "n/a"
        fmt = lambda v, f: failed if v is None else format(v, f)  # noqa: E731
        mib = lambda b: "n/a" if b is None else f"{b / 2**20:,.1f}"  # noqa: E731
        # the device's peak: GPU memory on CUDA, host RSS growth on the CPU
        peak = self.gpu_peak if self.gpu_peak is not None else self.rss_growth
        ratio = "n/a" if peak is None or not self.layer_bytes else f"{peak / self.layer_bytes:.2f}"
        return dict(
            layer_passes=fmt(self.layer_passes, "d"),
            model_passes=fmt(self.model_passes, "g"),
            phase_s=fmt(self.phase_s, ".3f"),
            call_s=f"{self.call_s:.3f}",
            gpu_peak_mib=mib(self.gpu_peak),
            rss_growth_mib=mib(self.rss_growth),
            layer_mib=mib(self.layer_bytes),
            peak_over_layer=ratio,
        )

    def csv(self) -> dict:
        c = self.cells()
        return dict(
            c,
            table=self.table,
            shape=self.shape,
            experts=self.experts,
            top_k=self.top_k,
            layers=self.layers,
            phase=self.phase,
            method=self.method,
            phase_s="" if self.phase_s is None else f"{self.phase_s:.4f}",
            naee_subsets_s25=self.naee.get(0.25, ""),
            naee_subsets_s50=self.naee.get(0.5, ""),
            error=self.error or "",
        )


@dataclass
class MethodRow(Row):
    router_passes: float | None = None  # router calls over the calibration set, summed over layers
    note: str = ""

    def csv(self) -> dict:
        return dict(
            super().csv(), router_passes="" if self.router_passes is None else f"{self.router_passes:g}", note=self.note
        )


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A markdown table: the header's cells, then one line of cells per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, cells)) + " |" for cells in rows]
    return "\n".join(lines)


def phase_table(rows: list[Row], device: torch.device) -> str:
    ratio = "GPU peak / layer" if device.type == "cuda" else "RSS growth / layer"
    header = [
        "shape",
        "experts (top-k)",
        "phase",
        "method",
        "decoder-layer passes",
        "phase s",
        "call s",
        "peak GPU MiB",
        "host RSS growth MiB",
        "one layer MiB",
        ratio,
    ]
    cells = [r.cells() for r in rows]
    return markdown_table(
        header,
        [
            [
                r.shape,
                f"{r.experts} ({r.top_k})",
                r.phase,
                r.method,
                c["layer_passes"],
                c["phase_s"],
                c["call_s"],
                c["gpu_peak_mib"],
                c["rss_growth_mib"],
                c["layer_mib"],
                c["peak_over_layer"],
            ]
            for r, c in zip(rows, cells)
        ],
    )


def scaling_table(rows: list[Row], expert_sparsity: float) -> str:
    header = [
        "experts",
        "top-k",
        "method",
        "decoder-layer passes",
        "passes over the model",
        f"structured s (at {expert_sparsity:.0%})",
        "NAEE subsets per layer, 25%",
        "NAEE subsets per layer, 50%",
    ]
    cells = [r.cells() for r in rows]
    return markdown_table(
        header,
        [
            [
                r.experts,
                r.top_k,
                r.method,
                c["layer_passes"],
                c["model_passes"],
                c["phase_s"],
                r.naee[0.25],
                r.naee[0.5],
            ]
            for r, c in zip(rows, cells)
        ],
    )


def error_notes(rows: list[Row]) -> str:
    seen: dict[str, list[str]] = {}
    for r in rows:
        if r.error:
            seen.setdefault(r.error, []).append(f"{r.shape}/{r.experts} experts/{r.method}")
    return "\n".join(f"- failed ({len(where)} rows, e.g. {where[0]}): {err}" for err, where in seen.items())


def method_table(rows: list[MethodRow], expert_sparsity: float) -> str:
    header = [
        "experts",
        "top-k",
        f"method (uniform budget, {expert_sparsity:.0%} of experts removed)",
        "MoE-block passes",
        "router passes",
        "structured s",
        "call s",
        "note",
    ]
    cells = [r.cells() for r in rows]
    return markdown_table(
        header,
        [
            [
                r.experts,
                r.top_k,
                r.method,
                "refused" if r.note.startswith("refused") else c["layer_passes"],
                "n/a" if r.router_passes is None else f"{r.router_passes:,.0f}",
                c["phase_s"],
                c["call_s"],
                r.note,
            ]
            for r, c in zip(rows, cells)
        ],
    )
