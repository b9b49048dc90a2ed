"""The figures ``benchmarks/train_reference.py`` records of a trained reference model: held-out
perplexity and next-token accuracy per domain, routing frequencies per domain and layer, and
total-variation distances between the domains' routing (two halves of one domain: the noise floor).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from stun_lightning.calibration import calibrate
from stun_lightning.evaluate import next_token_accuracy, perplexity

EVAL_SEQ_LEN = 256  # as the quality benchmark
ROUTING_WINDOWS = 64  # held-out windows per domain for routing frequencies


def tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


def routing_figures(model, tests: dict[str, torch.Tensor], device) -> dict:
    """Routing frequency per domain and layer on held-out windows; domain-vs-domain TV distances."""
    freqs, halves = {}, {}
    for domain, ids in tests.items():
        n = min(ROUTING_WINDOWS, len(ids) // EVAL_SEQ_LEN)
        blocks = ids[: n * EVAL_SEQ_LEN].long().view(n, EVAL_SEQ_LEN)
        per_half = []
        for part in (blocks[: n // 2], blocks[n // 2 :], blocks):
            stats = calibrate(model, part, collect=("routing",), batch_size=16, device=device, progress=False)
            per_half.append({i: s.expert_tokens.double() / s.expert_tokens.sum() for i, s in stats.layers.items()})
        halves[domain] = {i: tv(per_half[0][i], per_half[1][i]) for i in per_half[2]}
        freqs[domain] = per_half[2]
    layers = sorted(next(iter(freqs.values())))
    names = list(tests)
    pairs = {
        f"{a}-{b}": {i: tv(freqs[a][i], freqs[b][i]) for i in layers}
        for k, a in enumerate(names)
        for b in names[k + 1 :]
    }
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    return {
        "frequency": {d: {str(i): [round(float(x), 5) for x in f[i]] for i in layers} for d, f in freqs.items()},
        "tv_between_domains": {k: {str(i): round(v[i], 4) for i in layers} for k, v in pairs.items()},
        "tv_between_domains_mean": {k: round(mean(v), 4) for k, v in pairs.items()},
        "tv_within_domain_halves_mean": {d: round(mean(v), 4) for d, v in halves.items()},
        "max_expert_share_mean": {d: round(mean({i: float(f[i].max()) for i in layers}), 4) for d, f in freqs.items()},
    }


def quality_figures(model, tests: dict[str, torch.Tensor], device, max_tokens: int | None = None) -> dict:
    out = {}
    for domain, ids in tests.items():
        ids = ids[:max_tokens].long()
        kw = dict(seq_len=EVAL_SEQ_LEN, batch_size=32, device=device, progress=False)
        out[domain] = {
            "perplexity": round(perplexity(model, ids, **kw), 4),
            "accuracy": round(next_token_accuracy(model, ids, **kw), 4),
            "tokens": len(ids),
        }
    return out


def reload_fp32(model, path: Path, device):
    """Save in bf16 (the shipped format) and reload in fp32: figures are of exactly what is saved."""
    model.to(torch.bfloat16).save_pretrained(path)
    reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    return reloaded
