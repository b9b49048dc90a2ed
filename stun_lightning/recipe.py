"""The pruning recipe: every choice of a STUN run in one dataclass that also loads from YAML."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .merging import MERGES
from .patterns import check_sparsity, parse_pattern
from .methods import expert_methods, get_expert_method
from .metrics import METRICS
from .methods.stun import DISTANCES

LAYER_BUDGETS = ("global", "uniform", "error_curve")
ALLOCATIONS = ("uniform", "owl")
ALLOCATION_BASES = ("kept", "layer")
LOW_TOKEN_RULES = ("dense", "magnitude")
#: how ``expert_sparsity="auto"`` ranks splits (``stun_lightning.split``)
SPLIT_CRITERIA = ("model_loss", "block_error")
#: ``expert_sparsity`` value that chooses the split per layer (``stun_lightning.split``)
AUTO = "auto"
#: expert methods that change weights while they choose, which ``auto``'s trial selections cannot undo
WEIGHT_CHANGING_METHODS = ("eep", "uncurl")


def field_choices() -> dict[str, list[str]]:
    """The allowed values of every recipe field that is a choice among names, from the registries
    (``pattern`` is a rule, not a list: ``unstructured`` or ``N:M`` with ``0 < N < M``)."""
    return {
        "expert_method": expert_methods(),
        "layer_budget": list(LAYER_BUDGETS),
        "expert_merge": list(MERGES),
        "distance": list(DISTANCES),
        "metric": list(METRICS),
        "allocation": list(ALLOCATIONS),
        "allocation_base": list(ALLOCATION_BASES),
        "low_token_rule": list(LOW_TOKEN_RULES),
        "split_criterion": list(SPLIT_CRITERIA),
    }


#: ``prune(model)`` and ``stun-lightning prune`` without a recipe: 55% of the expert parameters, the split between removed experts
#: (chosen by routing frequency, the same count per layer) and OWL+Wanda inside the survivors chosen
#: by the pruned model's held-out calibration loss (``expert_sparsity: auto``, ``split_criterion:
#: model_loss``). Why: on the two from-scratch H100 reference models frequency removal beat STUN's
#: router clustering at every total and OWL+Wanda alone was best at 50-70%
#: (benchmarks/results/quality_auto_h100.md); on the upcycled shipped model removal pays
#: (quality_auto_cpu.md). ``auto`` tries both, zero removals included.
DEFAULT_RECIPE = dict(
    expert_sparsity="auto",
    expert_method="frequency",
    total_sparsity=0.55,
    allocation="owl",
    metric="wanda",
    calibration_samples=64,
    calibration_seq_len=256,
)


@dataclass
class StunRecipe:
    """Structured-then-unstructured pruning of a MoE model.

    The field defaults are STUN's official recipe (router clustering of 25% of the experts, global
    threshold); the recommended recipe, what ``prune(model)`` uses without one, is
    :meth:`StunRecipe.default` (:data:`DEFAULT_RECIPE`).

    Structured phase (whole experts):
        expert_sparsity: fraction of routed experts removed over all MoE layers (0 = skip), or
            ``"auto"``: the split between expert removal and masking that meets ``total_sparsity``,
            chosen by ``split_criterion`` (``stun_lightning.split``; needs ``total_sparsity`` and
            ``pattern="unstructured"``, implies ``allocation_base="layer"``; ``layer_budget`` unused).
        split_criterion: how ``auto`` ranks splits: ``model_loss`` (default: one uniform removal
            fraction for every layer, the one whose pruned model has the least next-token loss on
            held-out calibration blocks) or ``block_error`` (each layer its own removal count, the
            one of least relative block-output error). Unused without ``auto``.
        split_held_out: fraction of the calibration blocks (the last ones, at least one) that
            ``model_loss`` scores candidates on; the candidates' statistics use the others.
        split_groups: ``model_loss`` then refines the uniform choice non-uniformly: the MoE layers
            in this many groups of consecutive layers, each group's removal moved one candidate
            step up or down where that lowers the held-out loss (1 = uniform only; default 4; at
            most 5 + 2 * split_groups pruned copies scored).
        split_margin: a uniform candidate that removes more experts, and a group move, is kept only
            if its mean held-out per-block loss gain over the best so far exceeds this many paired
            standard errors (default 2.0; 0 = any gain, the least loss).
        expert_method: ``stun`` (default), ``frequency``, ``random``, ``reap``, ``ean``, ``naee``, ``eep`` or
            ``uncurl`` (see ``stun_lightning/methods/``; the last five keep the same count per layer).
        layer_budget: ``global`` (STUN: one threshold shared by all layers, so counts differ per
            layer), ``uniform`` (the same count in every layer: plain transformers loads it) or
            ``error_curve`` (ours: the same total spread over layers to minimise the summed relative
            block-output error measured at a few removal counts per layer, ``stun_lightning.split``).
        distance / divide_by_norm / mix_weight / merge_max_clusters: STUN options (see methods.stun).
        method_options: further options of the chosen method (e.g. NAEE ``max_subsets``, EEP
            ``total_evaluations``), passed to it unchanged.
        expert_merge: ``none`` (default: removed experts are dropped), ``frequency`` or
            ``router_weighted``: each removed expert is first averaged into its nearest survivor,
            weighted by routed tokens or router weight (HC-SMoE / REAM style; ``stun_lightning.merging``).
        max_removed_per_layer: cap on experts removed from any one layer (None = no cap).
        lower_top_k: allow a layer to keep fewer experts than top-k by lowering its top-k.
    Unstructured phase (weights inside surviving experts):
        sparsity: fraction of weights zeroed inside each surviving expert matrix.
        total_sparsity: alternatively, the target over all original expert parameters, STUN's way:
            ``1 - total = (1 - removed expert params) * (1 - sparsity)``; overrides ``sparsity``.
        metric: ``wanda`` (default), ``moe_pruner`` or ``magnitude``.
        allocation: ``uniform`` or ``owl`` (owl_threshold M, owl_lambda). ``owl_threshold`` defaults to 5,
            the value of STUN's and OWL's published runs (OWL's code defaults to 3); ``owl_lambda`` 0.08 as both.
        allocation_base: what a layer's target is a sparsity of: ``kept`` (the weights of its kept
            experts, the official pipeline's) or ``layer`` (its original expert parameters, removed
            experts counted as pruned; ours, for layers left with unequal expert counts by
            ``layer_budget: global``: see ``stun_lightning.patterns.whole_layer_allocation``). The
            within-expert budget is the same either way; unstructured patterns only.
        pattern: ``unstructured``, ``2:4`` or ``4:8`` (N:M fixes the sparsity at N/M).
        sequential: later layers calibrate on already-pruned earlier layers (Wanda's scheme).
        prune_dense: also mask the dense linears of every decoder layer (attention, shared experts,
            dense MLPs) with the same metric and layer sparsity, as STUN's official runs do
            (MoE-Pruner's gate does not apply there: Wanda is used). Default off: only experts.
        low_token_rule / min_tokens: experts routed fewer than ``min_tokens`` calibration tokens are
            left dense (``dense``, the official STUN behaviour) or pruned by ``magnitude``.
    Calibration: calibration_samples windows of calibration_seq_len tokens, batch_size, seed.
    """

    expert_sparsity: float | str = 0.25
    expert_method: str = "stun"
    layer_budget: str = "global"
    distance: str = "router"
    divide_by_norm: bool = True
    mix_weight: float = 1.0
    merge_max_clusters: int = 0
    expert_merge: str = "none"
    max_removed_per_layer: int | None = None
    lower_top_k: bool = False
    split_criterion: str = "model_loss"
    split_held_out: float = 0.125
    split_groups: int = 4
    split_margin: float = 2.0

    sparsity: float = 0.0
    total_sparsity: float | None = None
    metric: str = "wanda"
    allocation: str = "uniform"
    owl_threshold: float = 5.0
    owl_lambda: float = 0.08
    allocation_base: str = "kept"
    pattern: str = "unstructured"
    sequential: bool = True
    prune_dense: bool = False
    low_token_rule: str = "dense"
    min_tokens: int = 1

    calibration_samples: int = 128
    calibration_seq_len: int = 256
    batch_size: int = 8
    seed: int = 0
    method_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "StunRecipe":
        if isinstance(self.expert_sparsity, str):
            if self.expert_sparsity != AUTO:
                raise ValueError(f"recipe expert_sparsity={self.expert_sparsity!r}: use a fraction in [0, 1) or 'auto'")
            self._check_auto()
        else:
            check_sparsity(self.expert_sparsity, "expert_sparsity")
        check_sparsity(self.sparsity, "sparsity")
        if self.total_sparsity is not None:
            check_sparsity(self.total_sparsity, "total_sparsity")
        if not 0 < self.split_held_out < 1:
            raise ValueError(f"recipe split_held_out={self.split_held_out!r}: use a fraction in (0, 1), e.g. 0.125")
        if isinstance(self.split_groups, bool) or not isinstance(self.split_groups, int) or self.split_groups < 1:
            raise ValueError(
                f"recipe split_groups={self.split_groups!r}: use an integer >= 1 (1 = uniform only), e.g. 4"
            )
        if not self.split_margin >= 0:
            raise ValueError(f"recipe split_margin={self.split_margin!r}: use a number >= 0, e.g. 2.0")
        parse_pattern(self.pattern)
        for name, allowed in field_choices().items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"recipe {name}={value!r} is not one of {allowed}")
        for name in ("calibration_samples", "calibration_seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"recipe {name} must be >= 1, got {getattr(self, name)}")
        get_expert_method(self.expert_method).check_options(self.method_options)
        if self.allocation_base == "layer" and self.pattern != "unstructured":
            raise ValueError(
                f"allocation_base='layer' moves sparsity between layers, which pattern={self.pattern!r} fixes per "
                "group; use pattern='unstructured' or allocation_base='kept'"
            )
        return self

    def _check_auto(self) -> None:
        if self.total_sparsity is None or self.pattern != "unstructured":
            raise ValueError(
                "expert_sparsity='auto' splits a total over expert parameters between expert removal and masking: "
                "set total_sparsity (e.g. 0.5) and pattern='unstructured'"
            )
        if self.expert_method in WEIGHT_CHANGING_METHODS or self.merge_max_clusters > 0:
            raise ValueError(
                f"expert_sparsity='auto' tries several selections, but expert_method={self.expert_method!r} "
                f"(merge_max_clusters={self.merge_max_clusters}) changes weights while choosing; use frequency, reap, ean or stun without merging"
            )

    @property
    def auto_split(self) -> bool:
        """Whether the structured/unstructured split is chosen per layer (``expert_sparsity="auto"``)."""
        return self.expert_sparsity == AUTO

    @property
    def removes_experts(self) -> bool:
        return self.auto_split or self.expert_sparsity > 0

    @property
    def weight_allocation_base(self) -> str:
        """The ``allocation_base`` the unstructured phase uses: ``"layer"`` under ``auto`` (each layer's
        chosen survivor sparsity), else the recipe's."""
        return "layer" if self.auto_split else self.allocation_base

    @property
    def prunes_weights(self) -> bool:
        return self.sparsity > 0 or self.total_sparsity is not None or self.pattern != "unstructured"

    def method_kwargs(self) -> dict[str, Any]:
        return {
            "distance": self.distance,
            "divide_by_norm": self.divide_by_norm,
            "mix_weight": self.mix_weight,
            "merge_max_clusters": self.merge_max_clusters,
            **self.method_options,
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def default(cls) -> "StunRecipe":
        """The recommended recipe (:data:`DEFAULT_RECIPE`): what ``prune(model)`` and the CLI use without one."""
        return cls.from_dict(dict(DEFAULT_RECIPE))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StunRecipe":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown recipe fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "StunRecipe":
        """Load a recipe file; a ``recipe:`` top-level key (LightningCLI-style files) is accepted."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"recipe file {path} does not exist (see configs/ for examples)")
        data = yaml.safe_load(path.read_text()) or {}
        if isinstance(data, dict) and "recipe" in data and isinstance(data["recipe"], dict):
            data = data["recipe"]
        return cls.from_dict(data)

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
