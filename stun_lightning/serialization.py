"""Save and load pruned models.

* Uniform expert counts: the config's own field holds the count, so ``save_pruned`` writes a plain
  transformers directory that ``AutoModelForCausalLM.from_pretrained`` loads unchanged.
* Counts that differ between layers are recorded in ``config.stun_num_experts_per_layer``; plain
  transformers refuses such a checkpoint (its tensors do not match the config's shapes), and
  :func:`load_pruned` rebuilds the per-layer shapes before loading. Every tensor in the files must
  fill exactly one model tensor: a missing or unused tensor is an error, never a silent re-init.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .surgery import apply_top_k, recorded_expert_counts, recorded_top_k, set_expert_counts_shape, sync_config


class IncompleteCheckpointError(RuntimeError):
    """A checkpoint's tensors do not match the model they should fill."""


def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> tuple[Path, Path]:
    """Check ``out_dir`` can be written and return ``(final, temporary)`` sibling paths."""
    final = Path(out_dir)
    if final.exists() and not overwrite:
        raise FileExistsError(
            f"output directory {final} already exists; choose another path or pass overwrite=True (--overwrite)"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    return final, tmp


@contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``out_dir`` when the block succeeds; a
    failure removes it, so no half-written directory is ever left at ``out_dir``."""
    final, tmp = atomic_output_dir(out_dir, overwrite)
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_output(
    out_dir: str | os.PathLike, overwrite: bool = False, tokenizer=None, extra_files: dict[str, str] | None = None
) -> Iterator[Path]:
    """:func:`atomic_dir` for a model directory: the tokenizer and extra text files are written last,
    beside what the block wrote, then the model card ``README.md`` (:mod:`stun_lightning.model_card`)
    unless the block or ``extra_files`` wrote one."""
    with atomic_dir(out_dir, overwrite) as tmp:
        yield tmp
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if not (tmp / "README.md").exists():
            from .model_card import write_model_card

            write_model_card(tmp, name=Path(out_dir).name)


def save_pruned(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer=None,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save a (pruned) model as safetensors + config, atomically (temp directory, then rename).

    ``state_dict``: the tensors to write instead of the model's own, e.g. the full tensors of a
    sharded model gathered with ``stun_lightning.sharding.gather_state_dict`` (same names)."""
    with atomic_output(out_dir, overwrite, tokenizer, extra_files) as tmp:
        sync_config(model)
        model.save_pretrained(tmp, state_dict=state_dict)
    return Path(out_dir)


def load_pruned(
    path: str | os.PathLike,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    **config_overrides,
) -> nn.Module:
    """Load a model saved by :func:`save_pruned` (uniform or per-layer expert counts).

    Uniform counts go through ``AutoModelForCausalLM.from_pretrained``. Per-layer counts: the model
    is built with empty weights, each layer shrunk to its recorded count, then every tensor of the
    checkpoint is assigned; any missing or unexpected tensor raises IncompleteCheckpointError.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"{path} has no config.json: not a saved model directory (save one with stun_lightning.save_pruned)"
        )
    config = AutoConfig.from_pretrained(path, **config_overrides)
    model_cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    counts = recorded_expert_counts(config)
    if counts is not None:
        model_cls = _with_per_layer_counts(model_cls, counts)
    # transformers' own loader (checkpoint-format conversion, tied weights, sharding), with every
    # re-initialised or dropped tensor turned into an error
    try:
        model, info = model_cls.from_pretrained(path, config=config, dtype=torch_dtype, output_loading_info=True)
    except RuntimeError as err:  # transformers' checkpoint conversion refuses incomplete expert sets
        raise IncompleteCheckpointError(
            f"checkpoint {path} does not match its config (experts missing?): {err}"
        ) from err
    bad = {
        k: sorted(v)[:8] for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v
    }
    if bad:
        raise IncompleteCheckpointError(
            f"checkpoint {path} does not match its config: {bad}; refusing to load with re-initialised or dropped tensors"
        )
    if counts is not None:
        model.__class__ = model_cls.__bases__[0]
    top_k = recorded_top_k(model.config)
    if top_k:
        apply_top_k(model, top_k)
    model.eval()
    return model.to(device)


def _with_per_layer_counts(model_cls: type, counts: dict[int, int]) -> type:
    """A subclass that shrinks each MoE layer to its recorded count right after construction."""

    def __init__(self, config, *args, **kwargs):
        model_cls.__init__(self, config, *args, **kwargs)
        set_expert_counts_shape(self, counts)

    return type(model_cls.__name__, (model_cls,), {"__init__": __init__, "__module__": model_cls.__module__})
