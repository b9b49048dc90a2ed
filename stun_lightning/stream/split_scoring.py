"""``expert_sparsity: auto`` with ``split_criterion: model_loss`` while streaming.

In memory (:func:`stun_lightning.split.choose_split_by_loss`) each uniform candidate removal
fraction is pruned on a trial copy and scored by the held-out calibration loss of the whole pruned
copy, one candidate after the other. Streaming, that would read every layer from disk once per
candidate and pass. Here every candidate runs the same code (:func:`stun_lightning.unstructured.mask_survivors`
on a :func:`~stun_lightning.split.trial_copy` of the skeleton, its experts removed) in a thread of
its own, and the threads take turns layer by layer (:class:`Lockstep`): in its turn each candidate
reads the layer with only the experts it keeps (:func:`~.shards.read_layer`), prunes and runs it on
its own hidden states (statistics blocks and held-out blocks, carried per candidate), and frees it
before the next candidate's turn. The candidates read a layer one right after the other, so the disk
is read once and the later reads come from the page cache, which the OS can reclaim. Only one
candidate runs at any moment, so peak host memory is one candidate's layer (a dense layer held in
the process for all candidates, as before, put the peak at 2.6-2.8 layers plus embeddings,
``tests/test_stream_memory.py``), and the result is the in-memory one operation for operation.
After the last layer the held-out hidden states go through the final norm and head
(:func:`stun_lightning.evaluate.block_nll` with the decoder layers bypassed).

Every candidate is scored (the in-memory search stops once the loss rose twice in a row); the
choice replays that early stop on the losses, so the split is the in-memory one. The experts each
candidate removes are chosen first by the recipe's method on the dense model, one streamed
statistics pass per non-zero candidate (:func:`stun_lightning.split.select_at_counts`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters import decoder_layers, moe_layers
from ..calibration import LAYER_SOURCE, _capture_layer_inputs, _run_layer
from ..recipe import StunRecipe
from ..split import (
    block_losses,
    SplitPlan,
    removals_within_target,
    survivor_sparsities,
    held_out_blocks,
    removes_more_for_less,
    rose_twice,
    select_at_counts,
    trial_copy,
    uniform_candidates,
)
from ..structured import ExpertSelection, apply_expert_sets
from ..unstructured import mask_survivors
from .output import _shape_census
from .shards import ShardReader
from .skeleton import _router_tensors
from .source import free_layer, read_into


class Lockstep:
    """Threads that run one at a time, in turn: a thread runs only between its turn's start and its
    next :meth:`pass_turn` (or :meth:`done`)."""

    def __init__(self, n: int):
        self.cond = threading.Condition()
        self.active = list(range(n))
        self.turn: int | None = 0

    def wait(self, c: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == c)

    def pass_turn(self, c: int) -> None:
        """Hand the turn to the next thread and wait for ``c``'s next one."""
        with self.cond:
            k = self.active.index(c)
            self.turn = self.active[(k + 1) % len(self.active)]
            self.cond.notify_all()
        self.wait(c)

    def is_last(self, c: int) -> bool:
        """Whether ``c`` is the last of the running threads to take its turn at each step."""
        with self.cond:
            return self.active[-1] == c

    def done(self, c: int) -> None:
        with self.cond:
            k = self.active.index(c)
            self.active.remove(c)
            self.turn = self.active[k % len(self.active)] if self.active else None
            self.cond.notify_all()


@dataclass
class CandidateSource:
    """The layer source of one candidate's thread: its layers read with the experts it keeps, its held-out
    hidden states carried through each layer as the pass leaves it (the last pass's are the pruned model's)."""

    index: int
    model: nn.Module
    keep: dict[int, list[int]]
    reader: ShardReader
    lockstep: Lockstep
    bar: tqdm
    held_start: list[torch.Tensor] = field(default_factory=list)
    held_kwargs: list[list[dict]] = field(default_factory=list)
    held: list[torch.Tensor] = field(default_factory=list)

    def begin_pass(self, desc: str):
        return None

    def layer_done(self, i: int, outputs: list[torch.Tensor]) -> None:
        pass

    def enter(self, i: int, layer: nn.Module, device) -> None:
        self.lockstep.pass_turn(self.index)
        if self.lockstep.is_last(self.index):
            self.bar.update()
        if i == 0:
            self.held = self.held_start
        read_into(self.reader, self.model, i, layer, self.keep.get(i), device)

    def leave(self, i: int, layer: nn.Module) -> None:
        self.held = _run_layer(layer, self.held, self.held_kwargs[i])
        free_layer(layer, _router_tensors(layer, self.model, i))


def final_nll(
    model: nn.Module, final: list[torch.Tensor], blocks: torch.Tensor, batch_size: int, device
) -> tuple[float, torch.Tensor]:
    """(mean held-out NLL, per-block NLL per predicted token) (:func:`stun_lightning.split.block_losses`,
    as the in-memory candidates are scored) of ``blocks`` whose last decoder layer's outputs are ``final`` (one per batch): the layers
    are bypassed, the final norm and head run as the model runs them."""
    layers = decoder_layers(model)
    outs = iter(final)
    layers[0].forward = lambda hidden_states, *args, **kwargs: next(outs)
    for layer in layers[1:]:
        layer.forward = lambda hidden_states, *args, **kwargs: hidden_states
    try:
        per_block, loss = block_losses(model, blocks, batch_size, device)
        return loss, per_block / (blocks.shape[1] - 1)
    finally:
        for layer in layers:
            del layer.forward


def _resident_to(model: nn.Module, device) -> None:
    """Move what is not a decoder layer (embeddings, final norm, head, rotary) to ``device``."""
    inside = {id(m) for layer in decoder_layers(model) for m in layer.modules()}
    for m in model.modules():
        if id(m) not in inside:
            m._apply(lambda t: t.to(device), recurse=False)


def score_candidates(
    model: nn.Module,
    recipe: StunRecipe,
    keeps: dict[float, dict[int, list[int]]],
    statistics: torch.Tensor,
    held_out: torch.Tensor,
    reader: ShardReader,
    *,
    device=None,
    progress: bool = False,
) -> tuple[dict[float, tuple[float, torch.Tensor]], int]:
    """((held-out NLL, per-block NLL) per candidate, decoder-layer passes) of ``model`` pruned as ``prune()`` prunes it
    with each candidate's kept experts, the candidates reading each layer one after the other."""
    before = _shape_census(model)
    home = next(model.parameters()).device
    run_on = torch.device(device) if device is not None else home
    lockstep = Lockstep(len(keeps))
    bar = tqdm(desc="split candidates", unit="layer", disable=not progress)
    results: dict[float, tuple[tuple[float, torch.Tensor], int]] = {}
    errors: list[tuple[int, BaseException]] = []

    def run(c: int, f: float, trial: nn.Module, source: CandidateSource) -> None:
        lockstep.wait(c)
        try:
            LAYER_SOURCE.set(source)
            with torch.no_grad():
                batches = list(held_out.split(recipe.batch_size))
                source.held_start, source.held_kwargs = _capture_layer_inputs(trial, batches, run_on)
                passes = mask_survivors(trial, recipe, before, statistics, device=device, progress=False)[2]
                if device is not None:
                    _resident_to(trial, run_on)
                try:
                    loss = final_nll(trial, source.held, held_out, recipe.batch_size, device)
                finally:
                    if device is not None:
                        _resident_to(trial, home)
            results[f] = (loss, passes + len(decoder_layers(trial)))
        except BaseException as err:  # re-raised by the caller's thread
            errors.append((c, err))
        finally:
            lockstep.done(c)

    threads = []
    for c, (f, keep) in enumerate(keeps.items()):
        trial = trial_copy(model, recipe.prune_dense)
        apply_expert_sets(trial, keep, lower_top_k=recipe.lower_top_k)
        source = CandidateSource(c, trial, keep, reader, lockstep, bar)
        threads.append(threading.Thread(target=run, args=(c, f, trial, source), name=f"candidate {f}", daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bar.close()
    if errors:
        raise min(errors, key=lambda e: e[0])[1]
    return {f: results[f][0] for f in keeps}, sum(n for _, n in results.values())


def choose_split_streaming(
    model: nn.Module,
    recipe: StunRecipe,
    calibration: torch.Tensor,
    reader: ShardReader,
    *,
    min_keep: dict[int, int],
    device=None,
    progress: bool = False,
) -> ExpertSelection:
    """``split_criterion="model_loss"`` on a streamed skeleton: the uniform split
    :func:`stun_lightning.split.choose_split_by_loss` chooses with ``split_groups=1``, and its record.
    The group refinement (``split_groups > 1``) is not streamed: it scores moves from the uniform
    choice, which would take one more streamed pass per round; a streamed run keeps the uniform one."""
    target = float(recipe.total_sparsity)
    layers = moe_layers(model)
    statistics, held_out = held_out_blocks(calibration, recipe.split_held_out)
    candidates = uniform_candidates(layers, removals_within_target(model, target, min_keep))
    keeps, passes = {}, 0
    for f, counts in candidates.items():
        if any(counts.values()):
            per_layer = {layer.index: layer.num_experts - counts[layer.index] for layer in layers}
            selection = select_at_counts(
                model, recipe, statistics, per_layer, min_keep, device=device, progress=progress
            )
            keeps[f], passes = selection.keep, passes + selection.layer_passes
        else:
            keeps[f] = {layer.index: list(range(layer.num_experts)) for layer in layers}
    losses, spent = score_candidates(
        model, recipe, keeps, statistics, held_out, reader, device=device, progress=progress
    )
    tried: dict[float, float] = {}
    best = None
    for f in candidates:  # the in-memory search, replayed: its candidates, its margin, its early stop
        tried[f] = losses[f][0]
        if best is None or removes_more_for_less(losses[best][1], losses[f][1], recipe.split_margin):
            best = f
        if rose_twice(list(tried.values())):
            break
    plan = SplitPlan(
        target,
        keeps[best],
        dict(candidates[best]),
        survivor_sparsities(target, layers, keeps[best]),
        layer_passes=passes + spent,
        criterion="model_loss",
        losses=tried,
        tried={f: candidates[f] for f in tried},
        held_out_blocks=held_out.shape[0],
        uniform=best,
    )
    return ExpertSelection(plan.keep, plan.layer_passes, plan.to_dict())
