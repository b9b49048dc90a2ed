"""Held-out perplexity and next-token accuracy per domain, as ``benchmarks/quality.py`` and
``benchmarks/recovery.py`` measure them: disjoint windows (``stun_lightning.evaluate``'s), one
forward pass per window, batched."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from stun_lightning.data import heldout_path, read_texts, token_stream
from stun_lightning.evaluate import sliding_windows

HELDOUT = {"prose": "wikitext2/test.txt", "math": "gsm8k/test.jsonl", "code": "python_stdlib/test.txt"}


@torch.no_grad()
def score(model, ids: torch.Tensor, seq_len: int, batch_size: int, device) -> tuple[float, float, int]:
    """(nll sum, correct predictions, scored tokens) over disjoint windows, one forward pass per window.

    The windows and scored positions are ``stun_lightning.evaluate``'s (stride = seq_len), so the
    perplexity equals ``evaluate.perplexity``; accuracy comes from the same pass.
    """
    nll, correct, count = 0.0, 0, 0
    windows = sliding_windows(len(ids), seq_len)
    full = [w for w in windows if w.end - w.begin == seq_len]
    rest = [w for w in windows if w.end - w.begin != seq_len]
    groups = [full[i : i + batch_size] for i in range(0, len(full), batch_size)] + [[w] for w in rest]
    for group in groups:
        inputs = torch.stack([ids[w.begin : w.end] for w in group]).to(device)
        logits = model(input_ids=inputs, use_cache=False).logits[:, :-1].float()
        targets = inputs[:, 1:]
        start = torch.tensor([w.score_from - w.begin for w in group], device=device)
        scored = torch.arange(1, inputs.shape[1], device=device)[None, :] >= start[:, None]
        token_nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        nll += float(token_nll[scored].double().sum())
        correct += int((logits.argmax(-1) == targets)[scored].sum())
        count += int(scored.sum())
    return nll, correct, count


def evaluate(
    model, heldout: dict[str, torch.Tensor], seq_len: int, batch_size: int, device
) -> tuple[dict[str, float], float]:
    ppl, correct, count = {}, 0, 0
    for domain, ids in heldout.items():
        nll, c, n = score(model, ids, seq_len, batch_size, device)
        ppl[domain] = math.exp(nll / n)
        correct += c
        count += n
    return ppl, correct / count


def heldout_ids(
    tokenizer, source: str, data: Path, max_tokens: int | None, cache: Path | None = None
) -> dict[str, torch.Tensor]:
    if cache is not None:  # train_reference.py's token cache: the same held-out splits, tokenized
        return {d: t.long()[:max_tokens] for d, t in torch.load(cache)["test"].items()}
    if source == "shipped":
        return {"mixed": token_stream(tokenizer, read_texts(heldout_path()))[:max_tokens]}
    missing = [str(data / f) for f in HELDOUT.values() if not (data / f).exists()]
    if missing:
        raise FileNotFoundError(
            f"held-out files missing: {missing}; pass --data DIR (the data folder) or --heldout shipped"
        )
    return {d: token_stream(tokenizer, read_texts(data / f))[:max_tokens] for d, f in HELDOUT.items()}
