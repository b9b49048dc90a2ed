"""stun-lightning: structured-then-unstructured (STUN) pruning of Mixture-of-Experts language models.

from stun_lightning import prune, StunRecipe
report = prune(model, StunRecipe(expert_sparsity=0.25, sparsity=0.5), calibration=token_ids)
"""

from .adapters import (
    MoEAdapter,
    UnsupportedModelError,
    get_adapter,
    moe_layers,
    register_adapter,
    supported_model_types,
)
from .calibration import CalibrationStats, LayerStats, calibrate
from .prune import prune
from .stream import prune_streaming
from .recipe import StunRecipe
from .report import PruneReport
from .serialization import IncompleteCheckpointError, load_pruned, save_pruned
from .surgery import InfeasiblePruningError, keep_experts, remove_experts


def __getattr__(name):
    # sparse inference and export pull in Triton-facing code: import on first use only
    if name == "sparsify":
        from .sparse.convert import sparsify

        return sparsify
    if name == "export":
        from .export import export

        return export
    raise AttributeError(f"module 'stun_lightning' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "CalibrationStats",
    "IncompleteCheckpointError",
    "InfeasiblePruningError",
    "LayerStats",
    "MoEAdapter",
    "PruneReport",
    "StunRecipe",
    "UnsupportedModelError",
    "calibrate",
    "export",
    "get_adapter",
    "keep_experts",
    "load_pruned",
    "moe_layers",
    "prune",
    "prune_streaming",
    "register_adapter",
    "remove_experts",
    "save_pruned",
    "sparsify",
    "supported_model_types",
]
