"""EEP: gradient-free evolutionary search for expert pruning and merging.

Liu et al., "Efficient Expert Pruning for Sparse Mixture-of-Experts Language Models: Enhancing
Performance and Reducing Inference Costs" (arXiv 2407.00945; imagination-research/EEP @39df572).
Per group of MoE layers a candidate holds two E'xE matrices: M (expert merging: new expert j =
sum_i M[j, i] * expert i, the same coefficients for all of its weight matrices and biases) and T
(router mapping). The search keeps an archive of every evaluated candidate, one child per step:

* inits: ``max_init + 1`` random one-hot starts (M = T = E' distinct rows of the identity);
* prune phase (while the archive holds at most ``prune_evaluations``): a parent drawn from the
  candidates within ``mutate_threshold`` of the best; each group changed with
  ``group_change_prob``; each row of a changed group moved to an unused expert with
  ``discrete_mutate_prob``; M = T;
* merge phase (until ``total_evaluations``): with ``crossover_prob`` a crossover of two parents
  within ``crossover_threshold`` of the best (at least the top ``crossover_rank``; rows from the
  first parent with ``crossover_front_prob``), else a parent as above; then Gaussian mutation of
  M (each entry with ``mutate_prob``, scale ``mutate_scale``); with ``norm_prob`` M's rows are
  renormalised to sum 1. Official defaults throughout (30 / 100 / 400 / 0.25 / 0.15 / 0.3 / 0.6 /
  0.25 / 0.065 / 0.1; thresholds 3.0 / 1.0 accuracy points).
* groups: ``groups`` contiguous depth groups of MoE layers sharing coefficients (4, the paper's
  setting; the released ``search.py`` collapses every layer into one group by a naming bug), or
  ``groups="layer"``.

Fitness is any scalar callable ``fitness(model) -> float``, higher is better (the official code
uses a task metric from greedy generation). Default: minus the mean next-token loss on the
calibration token ids given to ``prune()`` (pass the task's text), on the model's own device: EEP
evaluates whole-model forwards, so the model must fit where it is.

Representability, our choice: **T keeps one-hot rows throughout; only M merges weights.** A
one-hot row j of T gives new expert j the router row of original expert T(j), so every candidate
is exactly a model with E' experts, E' router rows copied from the original router, and merged
expert weights; the saved model equals the evaluated one. The official merge phase also mutates T
with Gaussian noise, making g' = T softmax(logits) a mix of router probabilities that no linear
router reproduces; here T changes in the merge phase by crossover of rows and by the prune phase's
row moves (``discrete_mutate_prob``) instead. Candidates are evaluated as that E'-expert model:
for routers that renormalise the top-k this is EEP's formula exactly (the softmax denominator
cancels); for routers without renormalisation the softmax runs over the E' kept logits.

Other deviations: parents whose fitness ties are ordered by a seeded draw (the official code
shuffles ties); a candidate identical to one already evaluated reuses its fitness (assumes a
deterministic fitness) and costs no forward pass; for the default loss fitness the thresholds are
0.03 / 0.01 nats (ours: the official 3.0 / 1.0 are accuracy points). Init sampling stops early if
no new distinct start can be drawn. Seeded by the recipe's seed; ``state_path`` makes the search
resumable (archive and RNG state saved after every evaluation); ``max_forward_passes`` caps the
model forward calls the fitness may make (counted by a hook on the model, whatever the fitness does).
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters import MoELayer
from .base import SelectionContext, register_expert_method
from .eep_candidates import Candidate, _Groups, slots  # noqa: F401  (slots: part of this module's API)

Fitness = Callable[[nn.Module], float]


@dataclass
class EEPConfig:
    groups: int | str = 4
    max_init: int = 30
    prune_evaluations: int = 100
    total_evaluations: int = 400
    group_change_prob: float = 0.25
    discrete_mutate_prob: float = 0.15
    crossover_prob: float = 0.3
    crossover_threshold: float = 1.0
    crossover_rank: int = 6
    crossover_front_prob: float = 0.6
    mutate_threshold: float = 3.0
    mutate_prob: float = 0.25
    mutate_scale: float = 0.065
    norm_prob: float = 0.1
    max_forward_passes: int | None = None
    state_path: str | None = None
    progress: bool = False

    @classmethod
    def from_options(cls, options: dict[str, Any], loss_fitness: bool) -> "EEPConfig":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in options.items() if k in known}
        if loss_fitness:
            values.setdefault("crossover_threshold", 0.01)
            values.setdefault("mutate_threshold", 0.03)
        config = cls(**values)
        if config.total_evaluations < 1 or config.max_init < 0:
            raise ValueError(
                f"EEP needs total_evaluations >= 1 and max_init >= 0 (a population to start from), got {config.total_evaluations} and {config.max_init}"
            )
        return config


def lm_fitness(input_ids: torch.Tensor, batch_size: int = 8) -> Fitness:
    """Minus the mean next-token cross-entropy of ``input_ids`` ``[N, L]`` (higher is better)."""
    if input_ids is None or input_ids.numel() == 0 or input_ids.shape[-1] < 2:
        raise ValueError("EEP's default fitness needs token ids [N, L] with L >= 2 (the task's text)")

    @torch.no_grad()
    def fitness(model: nn.Module) -> float:
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for batch in input_ids.split(batch_size):
            batch = batch.to(device)
            n = batch.numel() - batch.shape[0]
            total += float(model(input_ids=batch, labels=batch, use_cache=False).loss) * n
            count += n
        return -total / count

    return fitness


@dataclass
class EEPResult:
    best: Candidate
    best_fitness: float
    archive: list[tuple[Candidate, float]]
    forward_passes: int


def _cut(fits: list[float], threshold: float) -> int:
    """The official parent window: index of the first candidate more than ``threshold`` below the best."""
    i = len(fits) - 1
    for j in range(1, len(fits)):
        if fits[0] - fits[j] > threshold and fits[0] - fits[j - 1] <= threshold:
            return j
    return max(i, 0)


class _Search:
    def __init__(self, groups: _Groups, config: EEPConfig, seed: int):
        self.groups, self.config = groups, config
        self.rng = random.Random(seed)
        self.archive: list[tuple[Candidate, float]] = []
        self.inits, self.passes, self.init_done = 0, 0, False
        self.signature = {"groups": groups.signature(), "seed": seed}

    # -- state
    def save(self) -> None:
        path = Path(self.config.state_path)
        tmp = path.with_name(path.name + ".tmp")
        state = {
            "signature": self.signature,
            "archive": [(c.M, c.T, f) for c, f in self.archive],
            "rng": self.rng.getstate(),
            "inits": self.inits,
            "passes": self.passes,
            "init_done": self.init_done,
        }
        torch.save(state, tmp)
        os.replace(tmp, path)

    def load(self) -> None:
        state = torch.load(self.config.state_path, weights_only=False)
        if state["signature"] != self.signature:
            raise ValueError(
                f"EEP state {self.config.state_path} belongs to another search (layers, expert counts, groups or seed differ); delete it or choose another state_path"
            )
        self.archive = [(Candidate(M, T), f) for M, T, f in state["archive"]]
        self.rng.setstate(state["rng"])
        self.inits, self.passes, self.init_done = state["inits"], state["passes"], state["init_done"]

    # -- operators
    def random_init(self) -> Candidate:
        M, T = [], []
        for E, k in self.groups.shapes:
            rows = sorted(self.rng.sample(range(E), k))
            T.append(rows)
            M.append(torch.eye(E, dtype=torch.float64)[rows])
        return Candidate(M, T)

    def population(self) -> list[tuple[Candidate, float]]:
        order = sorted(range(len(self.archive)), key=lambda i: (-self.archive[i][1], self.rng.random()))
        return [self.archive[i] for i in order]

    def child(self) -> Candidate:
        cfg, rng, G = self.config, self.rng, len(self.groups.shapes)
        pop = self.population()
        fits = [f for _, f in pop]
        while True:  # which groups change: M groups first, then T groups
            change = [rng.random() < cfg.group_change_prob for _ in range(2 * G)]
            if any(change):
                break
        merge_phase = len(self.archive) > cfg.prune_evaluations
        cand = None
        if merge_phase and rng.random() < cfg.crossover_prob:
            i = max(_cut(fits, cfg.crossover_threshold), cfg.crossover_rank)
            window = pop[: max(i, 2)]
            a, b = rng.sample(window, 2) if len(window) >= 2 else (window[0], window[0])
            cand = a[0].copy()
            for g in range(G):
                for mats, which in ((cand.M, 0), (cand.T, 1)):
                    src_a, src_b = (a[0].M, b[0].M) if which == 0 else (a[0].T, b[0].T)
                    if change[g + which * G]:
                        rows = [
                            src_a[g][j] if rng.random() < cfg.crossover_front_prob else src_b[g][j]
                            for j in range(len(src_a[g]))
                        ]
                        mats[g] = torch.stack([r.clone() for r in rows]) if which == 0 else [int(r) for r in rows]
                    else:
                        src = src_a if rng.random() < cfg.crossover_front_prob else src_b
                        mats[g] = src[g].clone() if which == 0 else list(src[g])
        if cand is None:
            i = max(_cut(fits, cfg.mutate_threshold), 0)
            cand = pop[min(len(pop) - 1, rng.randint(0, i))][0].copy()
        for g in range(G):
            E = self.groups.shapes[g][0]
            if merge_phase:
                if change[g]:
                    m = cand.M[g]
                    for j in range(m.shape[0]):
                        for e in range(m.shape[1]):
                            if rng.random() < cfg.mutate_prob:
                                m[j, e] += rng.gauss(0, 1) * cfg.mutate_scale
                if change[g + G]:
                    self._move_rows(cand.T[g], E, None)
            elif change[g]:
                self._move_rows(cand.T[g], E, cand.M[g])
        if rng.random() < cfg.norm_prob:
            for m in cand.M:
                sums = m.sum(1, keepdim=True)
                m.copy_(torch.where(sums.abs() > 1e-12, m / sums, m))
        return cand

    def _move_rows(self, T: list[int], E: int, M: torch.Tensor | None) -> None:
        """Move rows, each with discrete_mutate_prob, to an expert no other row uses (M follows T when given)."""
        for j in range(len(T)):
            if self.rng.random() < self.config.discrete_mutate_prob:
                used = {t for i, t in enumerate(T) if i != j}
                T[j] = self.rng.choice([e for e in range(E) if e not in used])
                if M is not None:
                    M[j] = 0.0
                    M[j, T[j]] = 1.0

    def next_candidate(self) -> Candidate:
        if not self.init_done:
            seen = {c.key() for c, _ in self.archive}
            for _ in range(1000):
                if self.inits > self.config.max_init:
                    break
                cand = self.random_init()
                if cand.key() not in seen:
                    self.inits += 1
                    return cand
            self.init_done = True
        return self.child()

    def run(self, model: nn.Module, fitness: Fitness) -> EEPResult:
        cfg = self.config
        if cfg.state_path and Path(cfg.state_path).exists():
            self.load()
        known = {c.key(): f for c, f in self.archive}
        calls = [0]
        hook = model.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
        bar = tqdm(
            total=cfg.total_evaluations,
            initial=min(len(self.archive), cfg.total_evaluations),
            desc="EEP search",
            disable=not cfg.progress,
            unit="candidate",
        )
        last = 0
        try:
            while len(self.archive) < cfg.total_evaluations:
                # the next evaluation is assumed to cost what the last one did (at least one pass)
                if cfg.max_forward_passes is not None and self.passes + max(last, 1) > cfg.max_forward_passes:
                    break
                cand = self.next_candidate()
                if cand.key() in known:
                    value = known[cand.key()]
                else:
                    calls[0] = 0
                    with self.groups.installed(cand):
                        value = float(fitness(model))
                    if not math.isfinite(value):
                        raise ValueError(f"EEP fitness returned {value} for a candidate; it must be a finite number")
                    last = calls[0]
                    self.passes += last
                    known[cand.key()] = value
                self.archive.append((cand, value))
                if cfg.state_path:
                    self.save()
                bar.update(1)
                bar.set_postfix(best=f"{max(f for _, f in self.archive):.4g}", passes=self.passes)
        finally:
            hook.remove()
            bar.close()
        if not self.archive:
            raise ValueError(
                f"EEP evaluated no candidate: max_forward_passes={cfg.max_forward_passes} is below one evaluation"
            )
        best = max(range(len(self.archive)), key=lambda i: (self.archive[i][1], -i))
        return EEPResult(self.archive[best][0], self.archive[best][1], self.archive, self.passes)


def eep_search(
    model: nn.Module, layers: list[MoELayer], keep_per_layer: dict[int, int], fitness: Fitness, seed: int = 0, **options
) -> tuple[EEPResult, _Groups]:
    """Run the search (the model is left unchanged); ``options`` as :class:`EEPConfig`."""
    config = EEPConfig.from_options(options, loss_fitness=False)
    groups = _Groups(layers, keep_per_layer, config.groups)
    return _Search(groups, config, seed).run(model, fitness), groups


def _needs(options: dict[str, Any]) -> str | None:
    return None if options.get("fitness") is not None or options.get("fitness_ids") is not None else "data"


@register_expert_method(
    "eep",
    needs=_needs,
    supports_global=False,
    options=tuple(f.name for f in fields(EEPConfig)) + ("fitness", "fitness_ids", "fitness_batch_size"),
)
def eep(ctx: SelectionContext) -> dict[int, list[int]]:
    """EEP search; applies the best candidate's merged experts to ``ctx.model`` and returns the slots to keep."""
    if ctx.keep_per_layer is None:
        raise ValueError("EEP keeps the same number of experts in every layer of a group: use layer_budget='uniform'")
    opts = ctx.options
    fitness = opts.get("fitness")
    if fitness is None:
        ids = opts.get("fitness_ids")
        if ids is None:
            if ctx.calibration is None:
                raise ValueError(
                    "EEP needs a fitness: method_options['fitness'] (a callable, higher is better), "
                    "method_options['fitness_ids'] (token ids of the task text), or calibration data"
                )
            ids = ctx.calibration
        fitness = lm_fitness(ids, int(opts.get("fitness_batch_size", ctx.batch_size)))
        config = EEPConfig.from_options(opts, loss_fitness=True)
    else:
        config = EEPConfig.from_options(opts, loss_fitness=False)
    groups = _Groups(ctx.layers, ctx.keep_per_layer, config.groups)
    result = _Search(groups, config, ctx.seed).run(ctx.model, fitness)
    return groups.apply(result.best)


__all__ = ["eep", "eep_search", "lm_fitness", "EEPConfig", "EEPResult", "Candidate", "slots"]
