"""Perplexity and next-token accuracy over a token stream, with sliding windows.

The recipe is Hugging Face's "Perplexity of fixed-length models"
(https://huggingface.co/docs/transformers/perplexity): windows of ``seq_len``
tokens start every ``stride`` tokens; with ``stride == seq_len`` (the default,
as in the Wanda/SparseGPT WikiText-2 numbers) windows are disjoint and each
window's first token is not scored; with ``stride < seq_len`` each token is
scored once, in the first window where it is new, so every scored token sees
at least ``seq_len - stride`` tokens of context. Deviation from the HF page:
losses are summed per token in float64 rather than averaged per window and
re-weighted, so a short last window weighs exactly its token count.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import TEXT_SUFFIXES, heldout_path, read_texts, token_stream


@dataclass(frozen=True)
class Window:
    """Tokens ``[begin, end)`` are fed; predictions of tokens ``[score_from, end)`` are scored."""

    begin: int
    end: int
    score_from: int


def sliding_windows(n_tokens: int, seq_len: int, stride: int | None = None) -> list[Window]:
    """The windows of HF's recipe over a stream of ``n_tokens`` tokens."""
    stride = seq_len if stride is None else stride
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    if n_tokens < 2:
        raise ValueError(f"need at least 2 tokens to score a prediction, got {n_tokens}; pass more text")
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + seq_len, n_tokens)
        # A token at the window's first position has no context inside the window.
        windows.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def perplexity(
    model,
    tokenizer_or_ids,
    text_or_path: str | Path | None = None,
    seq_len: int = 256,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 4,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> float:
    """exp(mean negative log-likelihood per scored token) of ``model`` on a text.

    ``tokenizer_or_ids``: a tokenizer (then ``text_or_path`` is read, default the
    shipped held-out text) or a 1-D / [1, N] tensor of token ids. ``text_or_path``:
    a ``Path``, an existing file/dir, a string ending in .txt/.jsonl (a path, so a
    typo raises instead of scoring the file name), or else raw text.
    ``max_tokens`` keeps the first tokens of the stream only.
    """
    nll, count = 0.0, 0
    for logits, targets, scored in _scored_batches(
        model, tokenizer_or_ids, text_or_path, seq_len, stride, max_tokens, batch_size, device, progress, "perplexity"
    ):
        token_nll = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
        nll += token_nll[scored].double().sum().item()
        count += int(scored.sum())
    return math.exp(nll / count)


def next_token_accuracy(
    model,
    tokenizer_or_ids,
    text_or_path: str | Path | None = None,
    seq_len: int = 256,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 4,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> float:
    """Fraction of scored tokens that are the model's argmax prediction (same windows as ``perplexity``)."""
    correct, count = 0, 0
    for logits, targets, scored in _scored_batches(
        model, tokenizer_or_ids, text_or_path, seq_len, stride, max_tokens, batch_size, device, progress, "accuracy"
    ):
        correct += int((logits.argmax(-1) == targets)[scored].sum())
        count += int(scored.sum())
    return correct / count


@torch.no_grad()
def block_nll(model, blocks: torch.Tensor, batch_size: int = 4, device: torch.device | str | None = None) -> float:
    """Mean next-token negative log-likelihood (nats per predicted token) of ``model`` on token
    blocks ``[N, L]``, each block scored on its own (its first token is not predicted)."""
    device = _input_device(model, device)
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        for batch in blocks.split(batch_size):
            ids = batch.to(device)
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
            nll += F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").double().item()
            count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    return nll / count


def _resolve_ids(tokenizer_or_ids, text_or_path) -> torch.Tensor:
    if isinstance(tokenizer_or_ids, torch.Tensor):
        if text_or_path is not None:
            raise ValueError("got token ids and text_or_path; pass a tokenizer to read text, or ids alone")
        ids = tokenizer_or_ids
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise ValueError(f"token ids must be 1-D or [1, N], got shape {tuple(tokenizer_or_ids.shape)}")
        return ids.long()
    if text_or_path is None:
        texts = read_texts(heldout_path())
    elif _is_path(text_or_path):
        texts = read_texts(text_or_path)
    else:
        texts = [text_or_path]
    return token_stream(tokenizer_or_ids, texts)


def _is_path(text_or_path) -> bool:
    if isinstance(text_or_path, Path):
        return True
    if "\n" in text_or_path or len(text_or_path) > 4096:
        return False
    return text_or_path.endswith(TEXT_SUFFIXES) or Path(text_or_path).exists()


def _input_device(model, device) -> torch.device:
    # The embedding's device, not the first parameter's: right also for models sharded with device_map.
    return torch.device(device) if device is not None else model.get_input_embeddings().weight.device


@torch.no_grad()
def _scored_batches(
    model, tokenizer_or_ids, text_or_path, seq_len, stride, max_tokens, batch_size, device, progress, desc
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (logits [B, T, V], targets [B, T], scored mask [B, T]) per batch of equal-length windows."""
    ids = _resolve_ids(tokenizer_or_ids, text_or_path)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    windows = sliding_windows(len(ids), seq_len, stride)
    device = _input_device(model, device)
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(windows), desc=desc, unit="win", disable=not progress) as bar:
            # Only the last window can be shorter; batching equal lengths avoids padding.
            for group in _equal_length_batches(windows, batch_size):
                inputs = torch.stack([ids[w.begin : w.end] for w in group]).to(device)
                logits = model(input_ids=inputs, use_cache=False).logits[:, :-1]
                targets = inputs[:, 1:]
                positions = torch.arange(1, inputs.shape[1], device=device)
                starts = torch.tensor([w.score_from - w.begin for w in group], device=device)
                scored = positions[None, :] >= starts[:, None]
                yield logits, targets, scored
                bar.update(len(group))
    finally:
        model.train(was_training)


def _equal_length_batches(windows: list[Window], batch_size: int) -> Iterator[list[Window]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch: list[Window] = []
    for w in windows:
        if batch and (len(batch) == batch_size or w.end - w.begin != batch[0].end - batch[0].begin):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch
