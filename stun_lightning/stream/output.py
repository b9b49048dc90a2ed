"""The output directory: per-layer shards renamed into an index, config, text files; resume state."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..adapters import decoder_layers, moe_layers
from ..report import ModelCensus, ParamCount
from .shards import ShardReader
from .skeleton import _layer_prefix

if TYPE_CHECKING:
    from .source import StreamSource

STATE_FILE = "stream_state.json"


def _write_json(path: Path, data: dict) -> None:
    path.with_suffix(".part").write_text(json.dumps(data))
    os.replace(path.with_suffix(".part"), path)


def saved_state(work: Path, resume: bool) -> dict:
    """What a killed run recorded in its work directory (nothing unless resuming)."""
    file = work / STATE_FILE
    return json.loads(file.read_text()) if resume and file.exists() else {}


def _shape_census(model: nn.Module) -> ModelCensus:
    """The unpruned skeleton's parameter counts from its (meta) shapes; no tensor is read, so
    ``nonzero`` is the parameter count (the report uses only totals and bytes of the original)."""

    def count(params) -> ParamCount:
        c = ParamCount()
        for p in params:
            c.total += p.numel()
            c.nonzero += p.numel()
            c.bytes += p.numel() * p.element_size()
        return c

    experts = {m.index: count(p for _, p in m.expert_parameters()) for m in moe_layers(model)}
    return ModelCensus(count(model.parameters()), experts, {m.index: m.num_experts for m in moe_layers(model)})


def _after_census(model: nn.Module, resident: list[torch.Tensor], source: StreamSource) -> ModelCensus:
    whole = ParamCount()
    for p in resident:
        whole.add(p)
    experts, counts = {}, {}
    for i, (layer_count, expert_count, n) in source.after.items():
        whole.total += layer_count.total
        whole.nonzero += layer_count.nonzero
        whole.bytes += layer_count.bytes
        if i in {m.index for m in moe_layers(model)}:
            experts[i], counts[i] = expert_count, n
    return ModelCensus(whole, experts, counts)


def _finish(
    model: nn.Module, reader: ShardReader, work: Path, final: Path, tokenizer, files: dict[str, str], overwrite: bool
) -> None:
    """Resident tensors, shard names, index, config, tokenizer, text files; then rename into place."""
    from safetensors.torch import save_file

    from ..surgery import sync_config

    n_layers = len(decoder_layers(model))
    prefixes = tuple(_layer_prefix(model, i) for i in range(n_layers))
    rest = {k: reader.get(k) for k in reader.files if not k.startswith(prefixes)}
    total = n_layers + 1
    weight_map, size = {}, 0
    shards = [(work / f"layer-{i:05d}.safetensors") for i in range(n_layers)]
    names = [f"model-{k + 1:05d}-of-{total:05d}.safetensors" for k in range(total)]
    save_file(rest, str(work / names[-1]), metadata={"format": "pt"})
    for shard, name in zip(shards, names):
        os.replace(shard, work / name)
    from safetensors import safe_open

    for name in names:
        with safe_open(str(work / name), framework="pt") as f:
            for key in f.keys():
                weight_map[key] = name
                sl = f.get_slice(key)
                n = int(torch.tensor(sl.get_shape()).prod()) if sl.get_shape() else 1
                size += n * {"F32": 4, "BF16": 2, "F16": 2, "F64": 8}.get(sl.get_dtype(), 4)
    (work / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
    )
    sync_config(model)
    model.config.architectures = [type(model).__name__]  # as save_pretrained records it
    model.config.save_pretrained(work)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(work)
    if tokenizer is not None:
        tokenizer.save_pretrained(work)
    for name, text in files.items():
        (work / name).write_text(text)
    (work / STATE_FILE).unlink(missing_ok=True)
    (work / "hidden.pt").unlink(missing_ok=True)
    if final.exists():
        shutil.rmtree(final)
    os.replace(work, final)
