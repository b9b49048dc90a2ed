"""Shared fixtures: tiny real transformers MoE models of every supported family."""

from __future__ import annotations

import copy

import pytest
import torch

from stun_lightning.routing import router_logits_forced_to_minus_inf  # noqa: F401  (used by test modules)
from stun_lightning.tiny import SUPPORTED_TINY_FAMILIES, build_tiny_model

FAMILIES = SUPPORTED_TINY_FAMILIES


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def random_ids(model, n=4, length=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (n, length), generator=gen)


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def clone(model):
    return copy.deepcopy(model)


@pytest.fixture
def tiny():
    return build_tiny_model
