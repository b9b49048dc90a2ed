"""Save and load the compact 2:4 checkpoint: compressed experts in safetensors, reloaded as they are.

Directory layout::

    config.json                 # the pruned config + "stun_sparse": {"format": "stun-sparse24", ...}
    stun_sparse24.safetensors   # every tensor of the model; experts as <name>_values / <name>_meta
                                # (2:4), <name>_bitmap / _values / _offsets (bitmap) or <name> (dense)
    generation_config.json, tokenizer files (when given)

The weights file is deliberately not ``model.safetensors``: plain ``from_pretrained`` stops with
"no file named model.safetensors" instead of re-initialising the experts it cannot read.
:func:`load_sparse` builds the model on the meta device, gives each experts module compressed
buffers of the saved shapes and assigns the saved tensors: nothing is decompressed or recompressed,
and a missing or unused tensor is an error. A model with per-matrix formats (``stun_bitmap``)
records them in ``config.json`` (``"pattern": "mixed"``, ``"matrices": {layer: {matrix: format}}``,
format version 2); a pure 2:4 export stays version 1.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..serialization import IncompleteCheckpointError, atomic_output
from ..surgery import apply_top_k, recorded_expert_counts, recorded_top_k, set_expert_counts_shape
from . import bitmap_experts
from .bitmap_experts import is_mixed
from .convert import (
    _set_implementation,
    empty_mixed_experts_,
    empty_sparse_experts_,
    expert_modules,
    is_sparsified,
    own_buffers_,
    sparse_formats,
)
from .experts import IMPLEMENTATION
from .format import FORMAT_NAME

#: newest layout version this library reads (1: all 2:4; 2: per-matrix formats)
FORMAT_VERSION = 2

WEIGHTS_NAME = "stun_sparse24.safetensors"
#: config.json field marking a compressed checkpoint
CONFIG_FIELD = "stun_sparse"


def is_sparse_checkpoint(path: str | os.PathLike) -> bool:
    config = Path(path) / "config.json"
    if not config.exists():
        return False
    return (json.loads(config.read_text()).get(CONFIG_FIELD) or {}).get("format") == FORMAT_NAME


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with tensors that share storage (tied weights) stored once, and the aliases."""
    state, aliases, seen = {}, {}, {}
    for key, tensor in model.state_dict().items():
        ident = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
        )
        if tensor.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        state[key] = tensor.detach().contiguous().cpu()
    return state, aliases


def save_sparse(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer=None,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write a model converted by :func:`~stun_lightning.sparse.sparsify` as a compressed checkpoint."""
    if not is_sparsified(model):
        raise ValueError(
            "save_sparse needs compressed experts: call stun_lightning.sparse.sparsify(model) first, or "
            "stun_lightning.export(model, out, format='sparse') which does both (if sparsify left every matrix dense, "
            "its masks are too dense to pay: export format='hf')"
        )
    with atomic_output(out_dir, overwrite, tokenizer, extra_files) as tmp:
        config = copy.deepcopy(model.config)
        blocks = list(expert_modules(model))
        mixed = is_mixed(blocks[0][1])
        values_dtype = blocks[0][1]._stun_dtype if mixed else blocks[0][1].gate_up_proj_values.dtype
        marker = {
            "format": FORMAT_NAME,
            "version": 2 if mixed else 1,
            "pattern": "mixed" if mixed else "2:4",
            "weights": WEIGHTS_NAME,
            "values_dtype": str(values_dtype).removeprefix("torch."),
        }
        if mixed:
            marker["matrices"] = {str(index): formats for index, formats in sparse_formats(model).items()}
        setattr(config, CONFIG_FIELD, marker)
        config.save_pretrained(tmp)
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(tmp)
        state, aliases = _unique_state(model)
        save_file(
            state,
            str(tmp / WEIGHTS_NAME),
            metadata={
                "format": "pt",
                "stun_format": FORMAT_NAME,
                "stun_format_version": str(marker["version"]),
                "aliases": json.dumps(aliases),
            },
        )
    return Path(out_dir)


def _materialize_non_persistent(model: nn.Module, device: torch.device) -> None:
    """Rebuild buffers that checkpoints never hold (rotary frequencies) with transformers' own init."""
    for name, module in model.named_modules():
        left = [
            n
            for n, t in list(module._parameters.items()) + list(module._buffers.items())
            if t is not None and t.is_meta
        ]
        if not left:
            continue
        if "RotaryEmbedding" not in type(module).__name__ or not hasattr(model, "_init_weights"):
            raise IncompleteCheckpointError(
                f"{name}: {left} are neither in the checkpoint nor rebuildable; cannot load this model"
            )
        module.to_empty(device=device, recurse=False)
        model._init_weights(module)


def load_sparse(
    path: str | os.PathLike, device: str | torch.device = "cpu", torch_dtype: torch.dtype | None = None
) -> nn.Module:
    """Load a directory written by :func:`save_sparse`; its experts run from compressed form."""
    from transformers import AutoConfig, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json: not a saved model directory")
    config = AutoConfig.from_pretrained(path)
    marker = getattr(config, CONFIG_FIELD, None) or {}
    if marker.get("format") != FORMAT_NAME:
        raise ValueError(
            f"{path} is not a compressed 2:4 export (config.json has no {CONFIG_FIELD!r} marker); load it with stun_lightning.load_pruned"
        )
    if int(marker.get("version", 0)) > FORMAT_VERSION:
        raise ValueError(
            f"{path} uses sparse format version {marker['version']}; this stun-lightning reads up to {FORMAT_VERSION}: upgrade it"
        )
    weights = path / marker.get("weights", WEIGHTS_NAME)
    if not weights.exists():
        raise IncompleteCheckpointError(f"{path} has no {weights.name}")
    device = torch.device(device)

    with torch.device("meta"):
        model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)
        counts = recorded_expert_counts(config)
        if counts:
            set_expert_counts_shape(model, counts)
        top_k = recorded_top_k(config)
        if top_k:
            apply_top_k(model, top_k)
    with safe_open(str(weights), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
        header = {key: (tuple(f.get_slice(key).get_shape()), f.get_slice(key).get_dtype()) for key in f.keys()}
    state = load_file(str(weights), device=str(device))
    matrices = marker.get("matrices")
    for index, experts, _ in expert_modules(model):
        if matrices is None:
            empty_sparse_experts_(experts)
            continue
        formats = matrices.get(str(index))
        if formats is None:
            raise IncompleteCheckpointError(
                f"{path}: config.json {CONFIG_FIELD}.matrices has no formats for MoE layer {index}"
            )
        prefix = next(name for name, module in model.named_modules() if module is experts) + "."
        shapes = {key[len(prefix) :]: shape for key, (shape, _) in header.items() if key.startswith(prefix)}
        dtypes = {key[len(prefix) :]: state[key].dtype for key in header if key.startswith(prefix)}
        dtypes["dtype"] = getattr(torch, marker.get("values_dtype", "bfloat16"))
        try:
            empty_mixed_experts_(experts, formats, shapes, dtypes)
        except KeyError as missing:
            raise IncompleteCheckpointError(
                f"checkpoint {weights} does not match its config: missing {prefix}{missing.args[0]}"
            ) from None
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = sorted(set(result.missing_keys) - set(aliases))
    if missing or result.unexpected_keys:
        raise IncompleteCheckpointError(
            f"checkpoint {weights} does not match its config: missing {missing[:8]}, unused {sorted(result.unexpected_keys)[:8]}; "
            "refusing to load with re-initialised or dropped tensors"
        )
    for alias, source in aliases.items():
        module_name, _, attr = alias.rpartition(".")
        module = model.get_submodule(module_name)
        tensor = (
            model.get_parameter(source)
            if source in dict(model.named_parameters(remove_duplicate=False))
            else model.get_buffer(source)
        )
        setattr(module, attr, tensor)
    for _, experts, _ in expert_modules(model):
        own_buffers_(experts)  # assigned tensors may be views into the file's storage
    _materialize_non_persistent(model, device)
    if (path / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(path)
    _set_implementation(model, IMPLEMENTATION if matrices is None else bitmap_experts.IMPLEMENTATION)
    model.eval()
    if torch_dtype is not None:
        model.to(torch_dtype)
    return model.to(device)
