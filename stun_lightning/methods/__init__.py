"""Expert-pruning methods (the structured phase), registered by name."""

from . import baselines, ean, eep, naee, reap, stun, uncurl  # noqa: F401  (registration)
from .base import ExpertMethod, SelectionContext, expert_methods, get_expert_method, register_expert_method

__all__ = ["ExpertMethod", "SelectionContext", "expert_methods", "get_expert_method", "register_expert_method"]
