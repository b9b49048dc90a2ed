"""Calibration engine: one streamed, layer-by-layer pass that collects what every method needs.

The model stays where it is (typically CPU); one decoder layer at a time is moved to ``device``,
every calibration batch goes through it, and its outputs become the next layer's inputs. Peak
accelerator memory is one decoder layer plus the calibration activations, whatever the model size.

Per MoE layer, read from the model's *own* routing (a hook on the fused experts module sees the
``top_k_index`` / ``top_k_weights`` the router chose, so biased and group-limited routers are
respected):

* routed tokens per expert, router-weighted frequency (sum of gate values), co-activation counts
  (tokens whose top-k contains both i and j; with top-2 this is STUN's "top-2 is exactly {i, j}"),
  sum of router logits per expert;
* per-expert input-channel sums of squares, plain and gate-weighted, for both expert matrices
  (``gate_up_proj`` sees the block input, ``down_proj`` sees the expert's activation): Wanda and
  MoE-Pruner scores;
* optionally (``"saliency"``) per expert the sum over its routed tokens of gate x ``||expert output||_2``
  (REAP's saliency, :meth:`LayerStats.saliency`);
* optionally the MoE block's inputs and outputs (for layer-output reconstruction methods);
* optionally (``"linear"``) input-channel sums of squares of every dense ``nn.Linear`` of each
  decoder layer (attention, shared experts, dense MLPs), for Wanda on the dense part.

Experts that receive fewer than ``min_tokens`` tokens are listed in ``LayerStats.low_token_experts``;
metric code decides what to do with them (see ``stun_lightning.patterns``), norms are never NaN.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from typing import Callable, Iterable, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import MoELayer, decoder_layers, moe_layers
from .collectors import LinearCollector, MoECollector
from .layer_stats import LINEAR, NORMS, ROUTING, SALIENCY, CalibrationStats, LayerStats

__all__ = [
    "LINEAR",
    "NORMS",
    "ROUTING",
    "SALIENCY",
    "LAYER_SOURCE",
    "CalibrationPartition",
    "CalibrationStats",
    "LayerCallback",
    "LayerStats",
    "calibrate",
    "enter_layer",
    "leave_layer",
]

#: where decoder layers' tensors come from while a pass visits them (None: they live in the model;
#: ``stun_lightning.stream`` sets one that reads each layer from disk and writes it back out)
LAYER_SOURCE: ContextVar = ContextVar("stun_layer_source", default=None)


def enter_layer(i: int, layer: nn.Module, device: torch.device | None) -> None:
    """Make decoder layer ``i`` ready to run on ``device`` (moved there, or read from disk)."""
    source = LAYER_SOURCE.get()
    if source is not None:
        source.enter(i, layer, device)
    elif device is not None:
        layer.to(device)


def leave_layer(i: int, layer: nn.Module, home: torch.device | None) -> None:
    """Undo :func:`enter_layer` (move back home, or write out and free)."""
    source = LAYER_SOURCE.get()
    if source is not None:
        source.leave(i, layer)
    elif home is not None:
        layer.to(home)


class _Stop(Exception):
    pass


def _capture_layer_inputs(model: nn.Module, batches: list[torch.Tensor], device: torch.device):
    """Run the embeddings only and record, per batch, layer 0's input and every layer's kwargs.

    Each decoder layer's forward is swapped for a recorder that returns its input unchanged, so
    the masks and position embeddings each layer receives (sliding / full attention differ per
    layer in GPT-OSS) are captured without computing any layer.
    """
    base = getattr(model, "model", model)
    layers = decoder_layers(model)
    moved = [m for m in (getattr(base, "embed_tokens", None), getattr(base, "rotary_emb", None)) if m is not None]
    homes = [next(iter(m.parameters()), next(iter(m.buffers()), None)) for m in moved]
    homes = [t.device if t is not None else device for t in homes]
    for m in moved:
        m.to(device)
    inputs, kwargs_per_layer = [], [[] for _ in layers]

    def recorder(i):
        def forward(hidden_states, *args, **kwargs):
            if i == 0:
                inputs.append(hidden_states)
            kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache")}
            kwargs_per_layer[i].append(kwargs)
            if i == len(layers) - 1:
                raise _Stop
            return hidden_states

        return forward

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    try:
        with torch.no_grad():
            for ids in batches:
                try:
                    base(input_ids=ids.to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        for layer in layers:
            del layer.forward
        for m, home in zip(moved, homes):
            m.to(home)
    return inputs, kwargs_per_layer


LayerCallback = Callable[[int, "MoELayer | None", "LayerStats | None"], bool | None]


class CalibrationPartition(Protocol):
    """How one process of several takes part in a calibration pass (``stun_lightning.distributed``):
    ``local`` picks this process's rows of the token ids, ``reduce`` turns a layer's local
    statistics into the statistics of all rows (it must be called on every process, layer by layer)."""

    def local(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def reduce(self, stats: LayerStats, keep_block_io: int = 0) -> LayerStats: ...


# Set by ``stun_lightning.distributed.calibration_across_ranks`` so that calls made deep inside
# expert methods (``SelectionContext.calibrate``) are split across ranks without new arguments.
_PARTITION: ContextVar[CalibrationPartition | None] = ContextVar("stun_calibration_partition", default=None)


def calibrate(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    collect: Iterable[str] = (ROUTING, NORMS),
    batch_size: int = 8,
    device: str | torch.device | None = None,
    on_layer: LayerCallback | None = None,
    keep_block_io: int = 0,
    progress: bool = True,
    desc: str = "calibrating",
    partition: CalibrationPartition | None = None,
) -> CalibrationStats:
    """Stream ``input_ids`` ``[N, L]`` through ``model`` one decoder layer at a time.

    Args:
        collect: any of ``"routing"`` (always on), ``"norms"`` (per-expert input norms), ``"saliency"``
            (REAP's gate x expert-output-norm sums), ``"linear"``
            (input norms of the dense linears; a dense decoder layer then gets a LayerStats with
            ``num_experts=0`` in ``on_layer``, not kept in the result).
        device: where each layer runs (default: where the model's parameters are).
        on_layer: called as ``on_layer(decoder_index, moe_layer_or_None, stats_or_None)`` after a
            layer's statistics are complete. If it returns True (it changed the layer, e.g. pruned
            it) the layer's outputs are recomputed, so later layers see the pruned model's
            activations (the sequential scheme of Wanda / SparseGPT).
        keep_block_io: keep up to this many MoE-block input/output rows per layer (CPU).
        partition: run over several processes (default: the one set by
            ``stun_lightning.distributed.calibration_across_ranks``, else none): this process streams
            only ``partition.local(input_ids)`` and every layer's statistics are ``partition.reduce``d
            before ``on_layer`` sees them. ``layer_passes`` and ``seconds`` stay this process's own.
    """
    if input_ids.numel() == 0:
        raise ValueError(
            f"calibration token ids are empty (shape {tuple(input_ids.shape)}); pass a non-empty [N, L] tensor of the task's text"
        )
    start = time.perf_counter()
    partition = partition if partition is not None else _PARTITION.get()
    total_tokens = int(input_ids.numel())
    if partition is not None:
        input_ids = partition.local(input_ids)
    collect = set(collect) | {ROUTING}
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    batches = [b for b in input_ids.split(batch_size) if b.numel()]  # a rank's slice may be empty
    was_training = model.training
    model.eval()
    hidden, kwargs_per_layer = _capture_layer_inputs(model, batches, device)
    source = LAYER_SOURCE.get()
    first = 0
    if source is not None and (resumed := source.begin_pass(desc)) is not None:
        first, saved = resumed  # a restarted streaming run: layers before `first` are already done
        hidden = [h.to(device) for h in saved]
    moe_by_index = {layer.index: layer for layer in moe_layers(model)}
    stats: dict[int, LayerStats] = {}
    passes = 0
    layers = decoder_layers(model)
    bar = tqdm(range(len(layers)), desc=desc, disable=not progress, unit="layer")
    try:
        for i in bar:
            if i < first:
                continue
            layer = layers[i]
            enter_layer(i, layer, device)
            moe = moe_by_index.get(i)
            collector = MoECollector(moe, collect, keep_block_io) if moe is not None else None
            linear = LinearCollector(layer) if LINEAR in collect else None
            try:
                outputs = _run_layer(layer, hidden, kwargs_per_layer[i])
            finally:
                layer_stats = collector.close() if collector is not None else None
                linear_sq = linear.close() if linear is not None else {}
            passes += 1
            if layer_stats is not None:
                stats[i] = layer_stats
            elif linear_sq:  # a dense decoder layer: its statistics go to on_layer only
                layer_stats = LayerStats(i, 0, 0)
            if layer_stats is not None:
                layer_stats.linear_sq = linear_sq
                if partition is not None:
                    layer_stats = partition.reduce(layer_stats, keep_block_io)
                    if i in stats:
                        stats[i] = layer_stats
            if on_layer is not None and on_layer(i, moe, layer_stats):
                outputs = _run_layer(layer, hidden, kwargs_per_layer[i])
                passes += 1
            leave_layer(i, layer, home)
            if source is not None:
                source.layer_done(i, outputs)
            hidden = outputs
    finally:
        model.train(was_training)
    return CalibrationStats(stats, total_tokens, time.perf_counter() - start, passes)


@torch.no_grad()
def _run_layer(layer: nn.Module, inputs: list[torch.Tensor], kwargs_list: list[dict]) -> list[torch.Tensor]:
    outputs = []
    for h, kwargs in zip(inputs, kwargs_list):
        out = layer(h, **kwargs)
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return outputs
