"""The rows of ``benchmarks/quality.py``: which pruned models it measures (recipes, seeds, calibration,
distillation) and the result of one row. The module docstring of ``quality.py`` says why each family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

TOTALS = (0.4, 0.5, 0.6, 0.7, 0.8)
EXPERT_FRACTIONS = (0.125, 0.25, 0.5)
RANDOM_SEEDS = (0, 1, 2)
EXPERT_METHODS = ("stun", "frequency", "random", "reap", "ean", "naee", "eep", "uncurl")
METHOD_FRACTIONS = (0.25, 0.5)
METHODS_TOTAL = 0.7  # the fixed total of the "+ owl+wanda" method rows
TASK_METHODS = ("stun", "reap", "uncurl", "frequency")
TASK_FRACTION = 0.5
NAEE_TOKENS = 4096
EEP_EVALUATIONS, EEP_INIT, EEP_PRUNE_EVALUATIONS, EEP_FITNESS_WINDOWS = 40, 10, 20, 8
DISTILL_TOTALS = (0.5, 0.7)
FAMILIES = ("base", "methods", "task", "distill", "auto")
AUTO_TOTALS = (0.5, 0.7, 0.8)
AUTO_EXPERTS = 0.25  # the expert fraction of the fixed-split rows beside auto
AUTO_SPLIT_GROUPS = (4, 1)  # model_loss auto: the default non-uniform refinement, and uniform only
UNSTRUCTURED = {  # label -> recipe fields of the unstructured phase
    "magnitude": dict(metric="magnitude"),
    "wanda": dict(metric="wanda"),
    "owl+wanda": dict(metric="wanda", allocation="owl"),
    "moe_pruner": dict(metric="moe_pruner"),
}


@dataclass
class Row:
    group: str
    method: str
    recipe: dict | None  # StunRecipe fields; None = the dense model
    seeds: tuple[int, ...] = (0,)
    calibration: str = "mixed"  # "mixed" (the shipped calibration text) or "math" (GSM8K train only)
    distill: str | None = None  # None, "kd" (expert-wise KD from the dense model) or "ce" (CE-only control)


@dataclass
class Result:
    row: Row
    ppl: dict[str, float]
    accuracy: float
    experts_removed: float
    total_sparsity: float
    within_sparsity: float
    experts_after: str
    seconds: float
    extra: dict = field(default_factory=dict)

    @property
    def mean_ppl(self) -> float:
        return math.exp(sum(math.log(p) for p in self.ppl.values()) / len(self.ppl))


def method_options(method: str) -> dict:
    """Options that keep a method CPU-sized here; the calibration-dependent EEP fitness ids are added in run_row."""
    if method == "naee":
        return {"max_tokens": NAEE_TOKENS}
    if method == "eep":
        return {"total_evaluations": EEP_EVALUATIONS, "max_init": EEP_INIT, "prune_evaluations": EEP_PRUNE_EVALUATIONS}
    return {}


def method_rows() -> list[Row]:
    """Issue 11: every expert method, uniform budget, 25/50% of the experts, alone and + OWL+Wanda to METHODS_TOTAL."""
    rows = []
    for second in (False, True):
        for frac in METHOD_FRACTIONS:
            group = f"methods {frac:.0%} experts" + (f" + owl+wanda to {METHODS_TOTAL:.0%}" if second else "")
            for method in EXPERT_METHODS:
                seeds = RANDOM_SEEDS if method == "random" else (0,)
                label = f"{method} (mean of {len(seeds)} seeds)" if len(seeds) > 1 else method
                recipe = dict(
                    expert_sparsity=frac,
                    expert_method=method,
                    layer_budget="uniform",
                    method_options=method_options(method),
                )
                if second:
                    recipe.update(total_sparsity=METHODS_TOTAL, **UNSTRUCTURED["owl+wanda"])
                rows.append(Row(group, label, recipe, seeds))
    return rows


def task_rows() -> list[Row]:
    """Issue 11's task-specific row: prune for math (GSM8K train calibration), perplexity on every domain."""
    return [
        Row(
            f"math-calibrated {TASK_FRACTION:.0%} experts",
            f"{method} (math calibration)",
            dict(
                expert_sparsity=TASK_FRACTION,
                expert_method=method,
                layer_budget="uniform",
                method_options=method_options(method),
            ),
            calibration="math",
        )
        for method in TASK_METHODS
    ]


def distill_rows(stun_experts: float) -> list[Row]:
    """Issue 10: the STUN rows at 50% and 70% total, after expert-wise KD (and a CE-only control)."""
    rows = []
    for total in DISTILL_TOTALS:
        recipe = dict(expert_sparsity=stun_experts, total_sparsity=total, **UNSTRUCTURED["owl+wanda"])
        for kind, label in (("kd", "expert-wise KD"), ("ce", "CE-only fine-tune (control)")):
            rows.append(
                Row(
                    f"distilled {total:.0%}",
                    f"STUN {stun_experts:.0%} experts + owl+wanda, {label}",
                    recipe,
                    distill=kind,
                )
            )
    return rows


def auto_rows() -> list[Row]:
    """Issue 22: the split chosen per layer (``expert_sparsity="auto"``, ``auto (...)`` rows by block
    error, ``auto (model_loss, split_groups=G)`` by the held-out loss of the pruned model, refined over
    G groups of layers or uniform with G=1), error-curve budgets and
    expert merging, beside unstructured-only and STUN's recipe, at each of AUTO_TOTALS."""
    owl = UNSTRUCTURED["owl+wanda"]
    fixed = dict(expert_sparsity=AUTO_EXPERTS, expert_method="frequency")
    block_error = dict(expert_sparsity="auto", split_criterion="block_error")
    variants = {
        "wanda only": dict(expert_sparsity=0.0, **UNSTRUCTURED["wanda"]),
        "owl+wanda only": dict(expert_sparsity=0.0, **owl),
        f"STUN {AUTO_EXPERTS:.0%} experts + owl+wanda": dict(expert_sparsity=AUTO_EXPERTS, **owl),
        f"frequency {AUTO_EXPERTS:.0%} uniform + owl+wanda": dict(**fixed, layer_budget="uniform", **owl),
        f"frequency {AUTO_EXPERTS:.0%} error_curve + owl+wanda": dict(**fixed, layer_budget="error_curve", **owl),
        f"frequency {AUTO_EXPERTS:.0%} uniform + router_weighted merge + owl+wanda": dict(
            **fixed, layer_budget="uniform", expert_merge="router_weighted", **owl
        ),
        "auto (frequency) + wanda": dict(**block_error, expert_method="frequency", **UNSTRUCTURED["wanda"]),
        "auto (frequency) + owl+wanda": dict(**block_error, expert_method="frequency", **owl),
        "auto (reap) + owl+wanda": dict(**block_error, expert_method="reap", **owl),
        **{
            f"auto (model_loss, split_groups={groups}) + owl+wanda": dict(
                expert_sparsity="auto",
                split_criterion="model_loss",
                split_groups=groups,
                expert_method="frequency",
                **owl,
            )
            for groups in AUTO_SPLIT_GROUPS
        },
    }
    return [
        Row(f"auto {total:.0%}", label, dict(total_sparsity=total, **fields))
        for total in AUTO_TOTALS
        for label, fields in variants.items()
    ]


def build_rows(stun_experts: float, investigate: bool, families: tuple[str, ...] = FAMILIES) -> list[Row]:
    rows = [Row("dense", "dense", None)]
    if "base" in families:
        rows += base_rows(stun_experts, investigate)
    if "methods" in families:
        rows += method_rows()
    if "task" in families:
        rows += task_rows()
    if "distill" in families:
        rows += distill_rows(stun_experts)
    if "auto" in families:
        rows += auto_rows()
    return rows


def base_rows(stun_experts: float, investigate: bool) -> list[Row]:
    """Issue 10's first rows: unstructured only, experts only, STUN's claim, 2:4, ``--investigate``."""
    rows = []
    for name, fields in UNSTRUCTURED.items():
        rows.append(Row("unstructured 50%", name, dict(expert_sparsity=0.0, sparsity=0.5, **fields)))
    for name in ("magnitude", "wanda", "moe_pruner"):
        rows.append(Row("unstructured 2:4", name, dict(expert_sparsity=0.0, pattern="2:4", **UNSTRUCTURED[name])))
    for frac in EXPERT_FRACTIONS:
        for method in ("stun", "frequency", "random"):
            seeds = RANDOM_SEEDS if method == "random" else (0,)
            label = f"{method} (mean of {len(seeds)} seeds)" if len(seeds) > 1 else method
            rows.append(Row(f"experts only {frac:.1%}", label, dict(expert_sparsity=frac, expert_method=method), seeds))
    for total in TOTALS:
        for name in ("owl+wanda", "moe_pruner"):
            rows.append(
                Row(
                    f"total {total:.0%}",
                    f"{name} only",
                    dict(expert_sparsity=0.0, total_sparsity=total, **UNSTRUCTURED[name]),
                )
            )
            if total > stun_experts:
                rows.append(
                    Row(
                        f"total {total:.0%}",
                        f"STUN {stun_experts:.0%} experts + {name}",
                        dict(expert_sparsity=stun_experts, total_sparsity=total, **UNSTRUCTURED[name]),
                    )
                )
    for name in ("wanda", "moe_pruner"):
        rows.append(
            Row(
                "STUN then 2:4",
                f"STUN {stun_experts:.0%} experts + {name} 2:4",
                dict(expert_sparsity=stun_experts, pattern="2:4", **UNSTRUCTURED[name]),
            )
        )
    if investigate:
        owl = UNSTRUCTURED["owl+wanda"]
        for total in (0.6, 0.7, 0.8):
            group = f"investigate {total:.0%}"
            variants = {
                f"STUN {stun_experts:.0%} uniform per layer + owl+wanda": dict(
                    expert_sparsity=stun_experts, layer_budget="uniform"
                ),
                f"STUN {stun_experts:.0%} co-activation + owl+wanda": dict(
                    expert_sparsity=stun_experts, distance="coactivation"
                ),
                f"frequency {stun_experts:.0%} experts + owl+wanda": dict(
                    expert_sparsity=stun_experts, expert_method="frequency"
                ),
                "STUN 12.5% experts + owl+wanda": dict(expert_sparsity=0.125),
                "STUN 50% experts + owl+wanda": dict(expert_sparsity=0.5),
            }
            for label, fields in variants.items():
                rows.append(Row(group, label, dict(total_sparsity=total, **owl, **fields)))
    return rows
