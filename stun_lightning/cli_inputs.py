"""What the ``stun-lightning`` commands share: the error a bad input raises, the device, and loading
the model and tokenizer a ``--model`` / ``--tokenizer`` names."""

from __future__ import annotations

from pathlib import Path

import torch


class UsageError(Exception):
    """Bad command-line input; reported in one line, nothing written."""


def load_model_and_tokenizer(model_spec: str | None, tokenizer_spec: str | None, dtype: str | None):
    """(model, tokenizer) from a directory, a hub id, or the embedded default when ``model_spec`` is None."""
    from .tiny import load_tokenizer

    torch_dtype = getattr(torch, dtype) if dtype else None
    if model_spec is None:
        from .reference import load_reference_model

        model, tokenizer = load_reference_model(dtype=torch_dtype or torch.float32)
        return (
            model,
            tokenizer,
            "embedded reference MoE (Mixtral-style, 4 layers, 8 experts top-2, trained on prose/math/code)",
        )
    path = Path(model_spec)
    if path.exists():
        from .serialization import load_pruned

        model = load_pruned(path, torch_dtype=torch_dtype)
    elif model_spec.startswith((".", "/", "~")) or model_spec.count("/") > 1:
        raise FileNotFoundError(f"model directory {model_spec} does not exist")
    else:
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(model_spec, dtype=torch_dtype)
        except OSError as err:
            raise FileNotFoundError(
                f"cannot load {model_spec!r} from a local directory or the Hugging Face hub: {err}"
            ) from err
    tokenizer = None
    for candidate in (tokenizer_spec, model_spec):
        if candidate is None:
            continue
        try:
            tokenizer = load_tokenizer(candidate)
            break
        except (OSError, ValueError):
            if candidate == tokenizer_spec:
                raise
    if tokenizer is None:
        raise UsageError(f"no tokenizer found with {model_spec}; pass --tokenizer PATH_OR_HUB_ID")
    return model.eval(), tokenizer, model_spec


def default_device(requested: str | None) -> str:
    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError(f"--device {requested} asked, but this machine has no CUDA device; use --device cpu")
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"
