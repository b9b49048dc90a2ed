"""Shared fixtures: tiny real transformers MoE models of every supported family."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from stun_lightning import moe_layers
from stun_lightning.routing import router_logits_forced_to_minus_inf  # noqa: F401  (used by test modules)
from stun_lightning.tiny import SUPPORTED_TINY_FAMILIES, build_tiny_model

FAMILIES = SUPPORTED_TINY_FAMILIES

# GPU tests: the Triton kernels run their first candidate instead of timing every one on each new
# shape (test_every_autotuner_candidate_is_correct_on_gpu checks them all); benchmarks autotune
os.environ.setdefault("STUN_SPARSE_AUTOTUNE", "0")


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


DUPLICATES = {1: 0, 4: 3}  # expert 1 copies expert 0, expert 4 copies expert 3


def model_with_duplicates(family="mixtral", top_k=1, seed=0, noise=1e-7):
    """A tiny model whose experts 1 and 4 copy experts 0 and 3 (router rows up to ``noise``).

    With top-1 a 6-expert model can reproduce it exactly; with top-2 a token may pick both copies.
    """
    return plant_duplicates(build_tiny_model(family, seed=seed, num_experts_per_tok=top_k), seed, noise)


def plant_duplicates(model, seed=0, noise=1e-7):
    """Make experts 1 and 4 of every MoE layer copies of experts 0 and 3, in place (see DUPLICATES)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in moe_layers(model):
            for copy_, source in DUPLICATES.items():
                for _, p in layer.expert_parameters():
                    p[copy_] = p[source]
                w = layer.router_weight
                w[copy_] = w[source] + noise * torch.randn(w.shape[1], generator=gen)
    return model


def relative_change(a, b):
    return float((a - b).norm() / b.norm())


def assert_refuses_tampered_checkpoint(path, weights_file: str, is_dropped, dropped_match: str, load):
    """Drop the first tensor that ``is_dropped(key)`` picks from ``path / weights_file``, then add
    an unused one: ``load(path)`` must raise IncompleteCheckpointError naming each."""
    from safetensors.torch import load_file, save_file

    from stun_lightning.serialization import IncompleteCheckpointError

    weights = path / weights_file
    state = load_file(weights)
    key = next(k for k in state if is_dropped(k))
    save_file({k: v for k, v in state.items() if k != key}, weights, metadata={"format": "pt"})
    with pytest.raises(IncompleteCheckpointError, match=dropped_match):
        load(path)
    state["model.layers.0.mlp.experts.stray"] = torch.zeros(3)
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(IncompleteCheckpointError, match="stray"):
        load(path)


def successor_blocks(n=16, length=32, vocab=64, seed=0):
    """Token blocks that follow one fixed random successor per token (learnable in a few steps)."""
    gen = torch.Generator().manual_seed(seed)
    successor = torch.randperm(vocab, generator=gen)
    blocks = torch.empty(n, length, dtype=torch.long)
    blocks[:, 0] = torch.randint(0, vocab, (n,), generator=gen)
    for t in range(1, length):
        blocks[:, t] = successor[blocks[:, t - 1]]
    return blocks


@pytest.fixture(scope="module")
def trained():
    """(tiny top-1 model trained on successor_blocks, its blocks): every expert carries what its tokens need."""
    torch.manual_seed(0)
    model = build_tiny_model("mixtral", seed=0, num_experts_per_tok=1, vocab_size=128)
    ids = successor_blocks()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert loss.item() < 0.5  # it learned the successors
    return model, ids
