"""Shared fixtures: tiny real transformers MoE models of every supported family."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

from stun_lightning import moe_layers
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


@contextlib.contextmanager
def router_logits_forced_to_minus_inf(model, drop: dict[int, list[int]]):
    """Force some experts' router logits to -inf, without touching any weight.

    Every supported router computes its logits with ``torch.nn.functional.linear`` on its own
    ``weight``; the patch recognises the router by that weight and masks the dropped columns.
    """
    by_weight = {id(layer.router_weight): drop[layer.index] for layer in moe_layers(model) if layer.index in drop}
    original = F.linear

    def linear(input, weight, bias=None):
        out = original(input, weight, bias)
        cols = by_weight.get(id(weight))
        if cols:
            out = out.clone()
            out[..., cols] = float("-inf")
        return out

    torch.nn.functional.linear = linear
    try:
        yield
    finally:
        torch.nn.functional.linear = original


@pytest.fixture
def tiny():
    return build_tiny_model
