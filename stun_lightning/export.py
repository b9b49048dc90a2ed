"""``export(model, out, format=...)``: write a pruned model for serving.

* ``"hf"``: a Hugging Face directory (:func:`stun_lightning.save_pruned`): the pruned config and
  dense weights with their zeros. Plain ``transformers`` loads it when every layer kept the same
  number of experts; per-layer counts need :func:`stun_lightning.load_pruned`. No memory saved.
* ``"sparse"``: each expert matrix compressed as :func:`stun_lightning.sparse.sparsify` chooses
  from its mask (2:4: values + 2-bit positions, 0.5625 of the dense bytes; bitmap for any other
  mask that pays; dense otherwise) in safetensors, reloaded by :func:`load_exported` without
  recompressing, run by the ``stun_sparse24`` or ``stun_bitmap`` experts implementation.
* ``"aoti"``: an AOTInductor package (``model.pt2``) of one decode step of the sparse model with a
  static KV cache inside (transformers' ``TorchExportableModuleForDecoderOnlyLM``): call it with
  ``input_ids [batch, 1]`` and ``cache_position [1]``, get logits. Compiled for the device the
  model is on (a CUDA package embeds the Triton kernel); load it where it was compiled.

The model is left as it was given: a dense model is compressed for the export and restored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .serialization import atomic_output, load_pruned, save_pruned
from .sparse.checkpoint import is_sparse_checkpoint, load_sparse, save_sparse
from .sparse.convert import SparsifyConfig, densify, expert_modules, is_sparsified, sparsify
from .sparse.bitmap_experts import is_mixed
from .sparse.experts import is_sparse24

FORMATS = ("hf", "sparse", "aoti")
AOTI_MANIFEST = "stun_aoti.json"
AOTI_PACKAGE = "model.pt2"


def _check_out(out: str | os.PathLike, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"output directory {out} already exists; choose another path or pass overwrite=True (--overwrite)"
        )
    return out


def _any_sparse(model: nn.Module) -> bool:
    return any(is_sparse24(experts) or is_mixed(experts) for _, experts, _ in expert_modules(model))


def export(
    model: nn.Module,
    out: str | os.PathLike,
    format: str = "hf",
    *,
    tokenizer=None,
    overwrite: bool = False,
    max_cache_len: int = 256,
    batch_size: int = 1,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write ``model`` to directory ``out`` in ``format`` (``"hf"``, ``"sparse"`` or ``"aoti"``).

    ``extra_files``: text files written beside (``export_directory`` carries the source's pruning
    report, recipe and eval results, so the export's model card states them).

    ``max_cache_len`` / ``batch_size`` size the static KV cache of the ``"aoti"`` decode step.
    Raises :class:`~stun_lightning.sparse.Not24SparseError` (naming the layer) when ``"aoti"`` meets
    experts that are not 2:4, and FileExistsError for an existing ``out``.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    out = _check_out(out, overwrite)
    if format == "hf":
        if not _any_sparse(model):
            return save_pruned(model, out, tokenizer=tokenizer, overwrite=overwrite, extra_files=extra_files)
        densify(model)
        try:
            return save_pruned(model, out, tokenizer=tokenizer, overwrite=overwrite, extra_files=extra_files)
        finally:
            sparsify(model)
    was_dense = not is_sparsified(model)
    if format == "aoti" and not was_dense and not all(is_sparse24(e) for _, e, _ in expert_modules(model)):
        raise ValueError(
            'format="aoti" packages 2:4 experts only (the bitmap ops run from Python); export format="sparse" instead'
        )
    # checks every layer before converting any; the AOTInductor package holds the 2:4 kernels only
    sparsify(model, SparsifyConfig(formats=("2:4",)) if format == "aoti" else None)
    try:
        if format == "sparse":
            return save_sparse(model, out, tokenizer=tokenizer, overwrite=overwrite, extra_files=extra_files)
        return _export_aoti(
            model,
            out,
            tokenizer=tokenizer,
            overwrite=overwrite,
            max_cache_len=max_cache_len,
            batch_size=batch_size,
            extra_files=extra_files,
        )
    finally:
        if was_dense:
            densify(model)


def _export_aoti(
    model: nn.Module,
    out: Path,
    *,
    tokenizer,
    overwrite: bool,
    max_cache_len: int,
    batch_size: int,
    extra_files: dict[str, str] | None = None,
) -> Path:
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    device = next(model.parameters()).device
    generation = model.generation_config
    previous = generation.cache_implementation
    generation.cache_implementation = "static"  # the exportable wrapper keeps a StaticCache inside
    config = model.config
    missing_head_dim, had_head_dim = getattr(config, "head_dim", None) is None, hasattr(config, "head_dim")
    if missing_head_dim:  # transformers < 5.23 sizes the cache from config.head_dim without a fallback
        config.head_dim = config.hidden_size // config.num_attention_heads
    try:
        wrapper = TorchExportableModuleForDecoderOnlyLM(
            model, batch_size=batch_size, max_cache_len=max_cache_len, device=device
        )
        example = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        from .sparse import cuda_mma
        from .sparse.experts import tracing_for_aoti

        # an AOTInductor package holds Triton kernels but no Python-launched one
        with torch.no_grad(), cuda_mma.disabled(), tracing_for_aoti():
            program = wrapper.export(input_ids=example, cache_position=torch.zeros(1, dtype=torch.long, device=device))
    finally:
        generation.cache_implementation = previous
        if missing_head_dim and had_head_dim:
            config.head_dim = None
        elif missing_head_dim:
            del config.head_dim
    with atomic_output(out, overwrite, tokenizer, extra_files) as tmp:
        torch._inductor.aoti_compile_and_package(program, package_path=str(tmp / AOTI_PACKAGE))
        model.config.save_pretrained(tmp)
        manifest = {
            "format": "stun-aoti",
            "package": AOTI_PACKAGE,
            "step": "decode",
            "inputs": {"input_ids": [batch_size, 1], "cache_position": [1]},
            "max_cache_len": max_cache_len,
            "device": device.type,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "experts": "stun-sparse24",
        }
        (tmp / AOTI_MANIFEST).write_text(json.dumps(manifest, indent=2))
    return Path(out)


class AotiDecoder:
    """A loaded ``"aoti"`` export: ``step(input_ids [B, 1], position) -> logits [B, 1, vocab]``.

    The KV cache lives inside the package, so steps must come in order from position 0.
    """

    def __init__(self, path: Path, device: str | torch.device | None = None):
        self.manifest = json.loads((path / AOTI_MANIFEST).read_text())
        self.device = torch.device(device or self.manifest["device"])
        self.runner = torch._inductor.aoti_load_package(str(path / self.manifest["package"]))

    def step(self, input_ids: torch.Tensor, position: int) -> torch.Tensor:
        position_t = torch.tensor([position], dtype=torch.long, device=self.device)
        return self.runner(input_ids=input_ids.to(self.device), cache_position=position_t)

    @torch.no_grad()
    def greedy(self, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Feed ``prompt`` ``[B, L]`` token by token, then decode greedily; returns all tokens."""
        tokens = prompt.to(self.device)
        logits = None
        for i in range(tokens.shape[1]):
            logits = self.step(tokens[:, i : i + 1], i)
        for _ in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat((tokens, nxt), dim=1)
            logits = self.step(nxt, tokens.shape[1] - 1)
        return tokens


def load_exported(
    path: str | os.PathLike, device: str | torch.device | None = None, torch_dtype: torch.dtype | None = None
):
    """Load any export: a sparse model, an :class:`AotiDecoder`, or a (dense) pruned model."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not an exported model directory")
    if (path / AOTI_MANIFEST).exists():
        return AotiDecoder(path, device)
    if is_sparse_checkpoint(path):
        return load_sparse(path, device=device or "cpu", torch_dtype=torch_dtype)
    return load_pruned(path, torch_dtype=torch_dtype, device=device or "cpu")


def export_directory(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    format: str,
    *,
    overwrite: bool = False,
    device: str | None = None,
    torch_dtype: torch.dtype | None = None,
    max_cache_len: int = 256,
) -> Path:
    """Load a saved (pruned or sparse) model directory and :func:`export` it; every check comes first."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"model directory {model_dir} does not exist or has no config.json")
    if (model_dir / AOTI_MANIFEST).exists():
        raise ValueError(
            f"{model_dir} is already an AOTInductor package; export from the pruned or sparse directory it was made from"
        )
    _check_out(out, overwrite)
    model = load_exported(model_dir, torch_dtype=torch_dtype)
    tokenizer = None
    if (model_dir / "tokenizer_config.json").exists() or (model_dir / "tokenizer.json").exists():
        from .tiny import load_tokenizer

        tokenizer = load_tokenizer(str(model_dir))
    if device is not None:
        model.to(device)
    from .model_card import PROVENANCE

    carried = {name: (model_dir / name).read_text() for name in PROVENANCE if (model_dir / name).exists()}
    return export(
        model, out, format, tokenizer=tokenizer, overwrite=overwrite, max_cache_len=max_cache_len, extra_files=carried
    )
