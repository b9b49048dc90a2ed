"""The third table of ``benchmarks/prune_cost.py``: forward passes and time of the field's
expert-pruning methods (REAP, UNCURL, NAEE, EEP; STUN router as the baseline) versus the expert count.

NAEE, EEP, UNCURL and REAP run their own passes inside the method (PruneReport counts only the
routing pass prune() makes for them), so this table counts forward calls with hooks: every call
of a MoE block and of a router, divided by the number of calibration batches, summed over layers
(one pass of every layer = the layer count, as "decoder-layer passes" of the other tables).
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager

import torch

from benchmarks.cost_measurement import timed
from benchmarks.prune_cost_models import sweep_model
from benchmarks.prune_cost_tables import MethodRow
from stun_lightning import StunRecipe, moe_layers, prune

FIELD_METHODS = {  # label -> (expert_method, method_options); STUN router is the same run's baseline
    "STUN router": ("stun", {}),
    "REAP": ("reap", {}),
    "UNCURL": ("uncurl", {}),
    "NAEE": ("naee", {}),
    "EEP, 8 of 400 evaluations": ("eep", dict(max_init=3, prune_evaluations=4, total_evaluations=8)),
}


@contextmanager
def counted_calls(model, batches: int):
    """Count MoE-block and router forward calls while the block runs (per calibration batch)."""
    counts = {"block": 0, "router": 0}
    handles = []
    for layer in moe_layers(model):
        handles.append(
            layer.block.register_forward_pre_hook(lambda *a: counts.__setitem__("block", counts["block"] + 1))
        )
        handles.append(
            layer.router.register_forward_pre_hook(lambda *a: counts.__setitem__("router", counts["router"] + 1))
        )
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()
        counts["block"] /= batches
        counts["router"] /= batches


def method_scaling(args, device: torch.device, dtype: torch.dtype) -> list[MethodRow]:
    """Forward passes and time of every expert-pruning method (uniform budget) versus E."""
    from stun_lightning.methods.naee import DEFAULT_MAX_SUBSETS, naee_subsets as naee_count

    batches = math.ceil(args.samples / args.batch_size)
    rows = []
    for E in args.method_experts:
        model, k, ids = sweep_model(args, E, device, dtype)
        keep = E - int(round(E * args.expert_sparsity))
        for label, (method, options) in FIELD_METHODS.items():
            work = copy.deepcopy(model)
            if method == "eep":
                work.to(device)  # EEP scores whole-model forwards: the model lives on the device
            recipe = StunRecipe(
                expert_sparsity=args.expert_sparsity,
                sparsity=0.0,
                batch_size=args.batch_size,
                layer_budget="uniform",
                expert_method=method,
                method_options=options,
            )
            with counted_calls(work, batches) as counts:
                m, error = timed(device, prune, work, recipe, calibration=ids, device=device, progress=False)
            note = ""
            if method == "naee":
                subsets = naee_count(E, keep) * args.layers
                note = f"C({E},{keep}) = {naee_count(E, keep):.3g} subsets/layer: {subsets:.3g} block evaluations"
                if error and error.startswith("EnumerationTooLargeError"):
                    error, note = None, f"refused (limit {DEFAULT_MAX_SUBSETS:.0e}): would need {note}"
            if method == "eep":
                model_passes = (counts["block"] - args.layers) / args.layers  # minus prune()'s routing pass
                note = f"{model_passes:g} model passes; the official 400 evaluations: ~{model_passes * 50:,.0f}"
            refused = note.startswith("refused")
            passes = None if error or refused else int(round(counts["block"]))
            phase_s = None if error or refused else m.result.seconds["structured"]
            rows.append(
                MethodRow(
                    "method_scaling",
                    args.sweep_dims,
                    E,
                    k,
                    args.layers,
                    "structured",
                    label,
                    passes,
                    phase_s,
                    m.seconds,
                    error=error,
                    router_passes=None if error or refused else counts["router"],
                    note=note,
                )
            )
            del work, m
        failed = [r.method for r in rows[-len(FIELD_METHODS) :] if r.error]
        print(f"  methods, {E} experts done{'  FAILED: ' + ', '.join(failed) if failed else ''}", flush=True)
        del model
    return rows
