"""How ``benchmarks/train_reference.py`` trains one phase (dense or MoE): AdamW, linear warm-up then
cosine to 10% of the peak, gradient clipping, bf16 autocast on CUDA, the per-layer Switch-Transformer
balancing loss, and the step count lowered after ``PROBE`` steps to fit a time budget."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from benchmarks.train_reference import Preset

PROBE = 30  # steps timed before the step count is fitted to --time-budget


def balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-Transformer load balancing E * sum_e f_e * P_e per layer, averaged over layers (balanced = top_k)."""
    losses = []
    for logits in router_logits:
        probs = logits.float().softmax(-1)
        n_tokens, n_experts = probs.shape
        chosen = probs.topk(top_k, dim=-1).indices.reshape(-1)
        frac = (
            torch.zeros(n_experts, device=probs.device).index_add_(
                0, chosen, torch.ones_like(chosen, dtype=torch.float)
            )
            / n_tokens
        )
        losses.append(n_experts * (frac * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@dataclass
class PhaseLog:
    name: str
    steps_planned: int
    steps: int = 0
    seconds: float = 0.0
    tokens: int = 0
    final_loss: float = float("nan")
    final_aux_loss: float = float("nan")
    history: list = field(default_factory=list)


def train_phase(
    model, sampler, preset: Preset, steps: int, name: str, device, deadline: float | None, compile: bool
) -> PhaseLog:
    log = PhaseLog(name, steps)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=preset.lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
    step_fn = torch.compile(model) if compile else model
    n_experts = next(iter(model.model.layers)).mlp.experts.gate_up_proj.shape[0]
    model.train()
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    start = time.perf_counter()
    loss_sum = aux_sum = 0.0
    n_sum, step = 0, 0
    while step < steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, preset.lr, min(preset.warmup, steps))
        batch = sampler().to(device, non_blocking=True)
        with amp:
            out = step_fn(input_ids=batch, labels=batch)
            balanced = model.config.output_router_logits and model.config.num_experts_per_tok < n_experts
            aux = (
                balance_loss(out.router_logits, model.config.num_experts_per_tok)
                if balanced
                else torch.zeros((), device=device)
            )
        (out.loss + preset.aux_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        loss_sum += float(out.loss.detach())
        aux_sum += float(aux.detach())
        n_sum += 1
        if step == PROBE and deadline is not None and steps > PROBE:
            if device.type == "cuda":
                torch.cuda.synchronize()
            per_step = (time.perf_counter() - start) / PROBE
            fit = PROBE + int((deadline - time.perf_counter()) / per_step)
            if fit < steps:
                print(
                    f"{name}: {per_step * 1e3:.0f} ms/step, lowering steps {steps} -> {fit} to fit the time budget",
                    flush=True,
                )
                steps = max(fit, PROBE + 1)
        if step % 100 == 0 or step == steps:
            row = dict(
                step=step,
                loss=loss_sum / n_sum,
                aux_loss=aux_sum / n_sum,
                lr=opt.param_groups[0]["lr"],
                seconds=time.perf_counter() - start,
            )
            log.history.append(row)
            print(
                f"{name} step {step}/{steps} loss {row['loss']:.4f} aux {row['aux_loss']:.4f} lr {row['lr']:.2e} {row['seconds']:.0f}s",
                flush=True,
            )
            log.final_loss, log.final_aux_loss = row["loss"], row["aux_loss"]
            loss_sum = aux_sum = 0.0
            n_sum = 0
    if device.type == "cuda":
        torch.cuda.synchronize()
    log.steps, log.seconds = steps, time.perf_counter() - start
    log.tokens = steps * sampler.batch_size * sampler.seq_len
    model.eval()
    return log
