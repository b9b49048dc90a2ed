"""``prune_streaming``: the passes of ``prune()`` over a skeleton whose layers come from disk."""

from __future__ import annotations

import dataclasses

import os
import shutil
import time
from pathlib import Path

import torch

from ..adapters import decoder_layers
from ..calibration import LAYER_SOURCE
from ..recipe import StunRecipe
from ..report import PruneReport
from .memory import mmap_large_allocations
from .output import STATE_FILE, _after_census, _finish, _shape_census, _write_json, saved_state
from .shards import ShardReader, resolve_model_dir
from .skeleton import _layer_prefix, build_skeleton
from .source import StreamSource
from ..split import held_out_blocks
from .split_scoring import choose_split_streaming


def _refuse_merging(recipe: StunRecipe) -> None:
    if recipe.removes_experts and recipe.expert_merge != "none":
        raise ValueError(
            f"expert_merge={recipe.expert_merge!r} changes survivors' weights before removal; streaming cannot do that yet: prune in memory"
        )
    if recipe.removes_experts and (recipe.expert_method in ("eep", "uncurl") or recipe.merge_max_clusters > 0):
        raise ValueError(
            f"expert_method={recipe.expert_method!r} (merge_max_clusters={recipe.merge_max_clusters}) merges expert weights across "
            "a layer while choosing; streaming cannot do that: prune in memory, or use stun/frequency/reap/naee without merging"
        )


def prune_streaming(
    model: str | os.PathLike,
    out_dir: str | os.PathLike,
    recipe: StunRecipe | None = None,
    calibration: torch.Tensor | None = None,
    *,
    tokenizer=None,
    device: str | torch.device | None = None,
    torch_dtype: torch.dtype | None = None,
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    local_files_only: bool = False,
    extra_files: dict[str, str] | None = None,
) -> PruneReport:
    """Prune the checkpoint at ``model`` (directory or hub id) layer by layer from disk into ``out_dir``.

    Same recipe, calibration and result as ``prune(model, ...)`` + ``save_pruned`` (``auto`` with
    ``split_criterion="model_loss"`` runs with ``split_groups=1``: the uniform choice); host memory holds
    one decoder layer at a time (see the module docstring for the passes). ``resume``: reuse the
    expert choice a killed run left in ``.<out_dir name>.stream``.
    """
    from ..prune import check_recipe, resolve_calibration
    from ..structured import apply_expert_sets, run_selection
    from ..metrics import get_metric
    from ..unstructured import mask_survivors

    recipe = (recipe or StunRecipe()).validate()
    if recipe.auto_split and recipe.split_criterion == "model_loss" and recipe.split_groups > 1:
        # the group refinement is not streamed (see split_scoring): the recipe written says so
        recipe = dataclasses.replace(recipe, split_groups=1)
    _refuse_merging(recipe)
    mmap_large_allocations()
    final = Path(out_dir)
    if final.exists() and not overwrite:
        raise FileExistsError(
            f"output directory {final} already exists; choose another path or pass overwrite=True (--overwrite)"
        )
    work = final.parent / f".{final.name}.stream"
    if work.exists() and not resume:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    directory = resolve_model_dir(model, local_files_only=local_files_only)
    reader = ShardReader(directory)
    skeleton = build_skeleton(directory, reader, torch_dtype)
    keep_total, per_layer, min_keep = check_recipe(skeleton, recipe)
    calibration = resolve_calibration(recipe, calibration, tokenizer)

    metric_reads_data = recipe.prunes_weights and get_metric(recipe.metric).needs_data
    source = StreamSource(skeleton, reader, work, final_pass="pruning weights" if metric_reads_data else "")
    source.resume_from = saved_state(work, resume).get("final_done", -1) if metric_reads_data else -1
    resident = [
        p
        for n, p in skeleton.named_parameters()
        if not p.is_meta
        and not n.startswith(tuple(_layer_prefix(skeleton, i) for i in range(len(decoder_layers(skeleton)))))
    ]
    state_file = work / STATE_FILE
    saved = saved_state(work, resume)
    seconds, passes, removed, split = {}, {}, {}, {}
    token = LAYER_SOURCE.set(source)
    try:
        before = _shape_census(skeleton)
        if recipe.removes_experts:
            start = time.perf_counter()
            if "keep" in saved:  # resume: the expert choice of the killed run
                keep = {int(i): v for i, v in saved["keep"].items()}
                n_passes, split = saved["structured_passes"], saved.get("split") or {}
            else:
                if recipe.auto_split and recipe.split_criterion == "model_loss":
                    selection = choose_split_streaming(
                        skeleton, recipe, calibration, reader, min_keep=min_keep, device=device, progress=progress
                    )
                else:
                    selection = run_selection(
                        skeleton,
                        recipe,
                        calibration,
                        plan=(keep_total, per_layer, min_keep),
                        device=device,
                        progress=progress,
                    )
                keep, n_passes, split = selection.keep, selection.layer_passes, selection.split or {}
                _write_json(state_file, {"keep": keep, "structured_passes": n_passes, "split": split})
            if n_passes:
                passes["structured"] = n_passes
            removed = apply_expert_sets(skeleton, keep, lower_top_k=recipe.lower_top_k)
            source.keep = {i: v for i, v in keep.items()}
            seconds["structured"] = time.perf_counter() - start
        source.write = True
        targets, low_tokens = {}, {}
        if recipe.prunes_weights:
            start = time.perf_counter()
            # auto (model_loss): the masks of the scored candidate, calibrated without the held-out blocks
            mask_blocks = calibration
            if recipe.auto_split and recipe.split_criterion == "model_loss":
                mask_blocks = held_out_blocks(calibration, recipe.split_held_out)[0]
            targets, low_tokens, n_passes = mask_survivors(
                skeleton, recipe, before, mask_blocks, device=device, progress=progress
            )
            passes["unstructured"] = n_passes
            seconds["unstructured"] = time.perf_counter() - start
        else:
            from tqdm.auto import tqdm

            for i in tqdm(
                range(len(decoder_layers(skeleton))), desc="writing layers", disable=not progress, unit="layer"
            ):
                layer = decoder_layers(skeleton)[i]
                source.enter(i, layer, None)
                source.leave(i, layer)
    finally:
        LAYER_SOURCE.reset(token)
    after = _after_census(skeleton, resident, source)
    report = PruneReport.compare(
        before,
        after,
        recipe.to_dict(),
        removed,
        layer_target_sparsity=targets,
        low_token_experts=low_tokens,
        seconds=seconds,
        layer_passes=passes,
        expert_split=split,
    )
    files = {"stun_report.json": report.to_json(), **(extra_files or {})}
    if "stun_recipe.yaml" not in files:
        import yaml

        files["stun_recipe.yaml"] = yaml.safe_dump(recipe.to_dict(), sort_keys=False)
    _finish(skeleton, reader, work, final, tokenizer, files, overwrite)
    return report
