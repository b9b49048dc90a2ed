"""The layer source a calibration pass reads decoder layers through while streaming."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..adapters import decoder_layers, moe_layers
from ..report import ParamCount
from .output import STATE_FILE, _write_json
from .shards import CorruptShardError, ShardReader, _Layout, layer_to_checkpoint, read_layer
from .skeleton import _layer_prefix, _router_tensors


def load_layer(
    model: nn.Module,
    i: int,
    layer: nn.Module,
    tensors: dict[str, torch.Tensor],
    keep: list[int] | None,
    device,
    where: Path,
) -> int:
    """Give decoder layer ``i`` of ``model`` the checkpoint's ``tensors``, consumed (experts not in
    ``keep`` dropped where the layer has fewer); returns the bytes materialised. Routers stay as they
    are (resident)."""
    prefix = _layer_prefix(model, i)
    resident = _router_tensors(layer, model, i)
    state = {}
    for name, target in layer.state_dict(keep_vars=True).items():
        if name in resident:
            state[name] = target
            continue
        if name not in tensors:
            raise CorruptShardError(f"checkpoint {where} has no tensor for {prefix}{name}")
        t = tensors.pop(name)
        if t.shape != target.shape and keep is not None and t.shape[1:] == target.shape[1:]:
            t = t.index_select(0, torch.tensor(keep))  # stored fused: read_layer read every expert
        if t.shape != target.shape:
            raise CorruptShardError(
                f"{prefix}{name} has shape {tuple(t.shape)} in {where}, the model expects {tuple(target.shape)}"
            )
        state[name] = t.to(device=device, dtype=target.dtype) if device is not None else t.to(target.dtype)
    layer.load_state_dict(state, strict=True, assign=True)
    if device is not None:
        layer.to(device)
    return sum(t.numel() * t.element_size() for n, t in state.items() if n not in resident)


def free_layer(layer: nn.Module, resident: dict[str, torch.Tensor]) -> None:
    """Back to the meta device, except the ``resident`` router tensors (to the CPU)."""
    router_modules = {
        id(m)
        for n, m in layer.named_modules()
        if any(k.startswith(n + ".") and k.count(".") == n.count(".") + 1 for k in resident) and n
    }
    for m in layer.modules():
        if id(m) in router_modules:
            m.to("cpu")
        else:
            m._apply(lambda t: t.to("meta"), recurse=False)


def read_into(reader: ShardReader, model: nn.Module, i: int, layer: nn.Module, keep: list[int] | None, device):
    """Read decoder layer ``i`` from the checkpoint with only the experts in ``keep`` (None: all) and
    give it to ``layer`` (:func:`load_layer`); returns (bytes materialised, the checkpoint's layout)."""
    tensors, layout = read_layer(reader, _layer_prefix(model, i), keep)
    return load_layer(model, i, layer, tensors, keep, device, reader.directory), layout


@dataclass
class StreamSource:
    """Reads decoder layers from ``reader`` on entry and (once ``write`` is on) writes them to ``work_dir`` on exit."""

    model: nn.Module
    reader: ShardReader
    work_dir: Path
    keep: dict[int, list[int]] = field(default_factory=dict)
    write: bool = False
    layouts: dict[int, _Layout] = field(default_factory=dict)
    after: dict[int, tuple[ParamCount, ParamCount, int]] = field(default_factory=dict)
    live: dict[int, int] = field(default_factory=dict)  # layer -> bytes of its tensors read from disk
    final_pass: str = "pruning weights"  # the calibration pass that writes the finished layers
    resume_from: int = -1  # last layer the killed run finished in its final pass
    in_final: bool = False
    max_live_layers: int = 0  # decoder layers materialised at once (the memory bound tests check)
    peak_live_bytes: int = 0

    def enter(self, i: int, layer: nn.Module, device) -> None:
        self.live[i], self.layouts[i] = read_into(self.reader, self.model, i, layer, self.keep.get(i), device)
        self.max_live_layers = max(self.max_live_layers, len(self.live))
        self.peak_live_bytes = max(self.peak_live_bytes, sum(self.live.values()))

    def begin_pass(self, desc: str):
        """Called by each calibration pass: the final one of a resumed run starts after its last finished layer."""
        self.in_final = desc == self.final_pass
        if not self.in_final or self.resume_from < 0:
            return None
        for i in range(self.resume_from + 1):
            self._count_written(i)
        return self.resume_from + 1, torch.load(self.work_dir / "hidden.pt", weights_only=True)

    def layer_done(self, i: int, outputs: list[torch.Tensor]) -> None:
        """After a final-pass layer is written: checkpoint the activations the next layer needs."""
        if not self.in_final:
            return
        torch.save([o.cpu() for o in outputs], self.work_dir / "hidden.pt.part")
        os.replace(self.work_dir / "hidden.pt.part", self.work_dir / "hidden.pt")
        state = json.loads((self.work_dir / STATE_FILE).read_text()) if (self.work_dir / STATE_FILE).exists() else {}
        state["final_done"] = i
        _write_json(self.work_dir / STATE_FILE, state)

    def _count_written(self, i: int) -> None:
        """Census of a layer the killed run already wrote (read back from its file)."""
        layer = decoder_layers(self.model)[i]
        prefix = _layer_prefix(self.model, i)
        file = self.work_dir / f"layer-{i:05d}.safetensors"
        tensors, self.layouts[i] = read_layer(ShardReader.of_files(self.work_dir, [file]), prefix)
        moe = {m.index: m for m in moe_layers(self.model)}.get(i)
        expert_ids = {id(p) for _, p in moe.expert_parameters()} if moe is not None else set()
        whole, experts = ParamCount(), ParamCount()
        for name, p in layer.named_parameters():
            whole.add(tensors[name])
            if id(p) in expert_ids:
                experts.add(tensors[name])
        self.after[i] = (whole, experts, moe.num_experts if moe is not None else 0)

    def leave(self, i: int, layer: nn.Module) -> None:
        prefix = _layer_prefix(self.model, i)
        resident = _router_tensors(layer, self.model, i)
        if self.write and (self.in_final or not self.final_pass):  # statistics passes write nothing
            from safetensors.torch import save_file

            moe = {m.index: m for m in moe_layers(self.model)}.get(i)
            whole, experts = ParamCount(), ParamCount()
            for _, p in layer.named_parameters():
                whole.add(p)
            for _, p in moe.expert_parameters() if moe is not None else ():
                experts.add(p)
            self.after[i] = (whole, experts, moe.num_experts if moe is not None else 0)
            tensors = {k: v.detach().cpu() for k, v in layer.state_dict().items()}
            part = self.work_dir / f"layer-{i:05d}.safetensors.part"
            save_file(layer_to_checkpoint(tensors, prefix, self.layouts[i]), str(part), metadata={"format": "pt"})
            os.replace(part, self.work_dir / f"layer-{i:05d}.safetensors")
        free_layer(layer, resident)
        self.live.pop(i, None)
