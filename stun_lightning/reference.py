"""The shipped reference model: a small Mixtral-style MoE trained on real text.

Why it ships: pruning quality can only be judged on trained weights, and tests, examples and the
CLI must run with no download. It was trained by ``benchmarks/train_reference.py`` (preset
``mixtral_8x2_upcycled_small``: 4 layers, hidden 128, 8 experts top-2, 4.4 M parameters, tied
embeddings; a dense model upcycled into an MoE) on the train mix of prose, GSM8K math and Python
code, with the shipped tokenizer. Command, seed, steps, held-out figures, and why the upcycled model
rather than one trained as an MoE from scratch: ``benchmarks/REFERENCE.md``. Stored in bf16 (8.8 MB),
loaded in float32 by default.
"""

from __future__ import annotations

from pathlib import Path

import torch

REFERENCE_DIR = Path(__file__).resolve().parent / "assets" / "reference"


def load_reference_model(dtype: torch.dtype = torch.float32, device: str | torch.device | None = None):
    """``(model, tokenizer)``: the shipped trained MoE in eval mode and the shipped tokenizer.

    Raises FileNotFoundError (naming the command that rebuilds it) when the weights are missing.
    """
    from transformers import AutoModelForCausalLM

    from .tiny import load_tokenizer

    missing = [name for name in ("config.json", "model.safetensors") if not (REFERENCE_DIR / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"shipped reference model incomplete: {', '.join(missing)} missing in {REFERENCE_DIR}. Rebuild it with "
            "`python -m benchmarks.train_reference --model mixtral_8x2_upcycled_small --out out/reference/mixtral_8x2_upcycled_small` "
            "(see benchmarks/REFERENCE.md) and copy its model/{config.json,model.safetensors} there."
        )
    tokenizer = load_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(REFERENCE_DIR, dtype=dtype)
    if device is not None:
        model.to(device)
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    return model.eval(), tokenizer


__all__ = ["REFERENCE_DIR", "load_reference_model"]
