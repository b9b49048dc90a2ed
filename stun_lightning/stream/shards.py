"""Reading a safetensors checkpoint one tensor at a time, and its layer layout <-> the model's names."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

_MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


class CorruptShardError(ValueError):
    """A safetensors shard cannot be read (truncated download, wrong file)."""


def resolve_model_dir(spec: str | os.PathLike, local_files_only: bool = False) -> Path:
    """A local directory as is; a hub id through ``huggingface_hub.snapshot_download`` (weights stay on disk)."""
    path = Path(spec)
    if path.is_dir():
        return path
    if str(spec).startswith((".", "/", "~")) or str(spec).count("/") > 1:
        raise FileNotFoundError(f"model directory {spec} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(spec), allow_patterns=_MODEL_FILES, local_files_only=local_files_only))
    except Exception as err:  # hub errors come in many classes; one line naming the model
        raise FileNotFoundError(f"cannot find {spec!r} locally or on the Hugging Face hub: {err}") from err


class ShardReader:
    """Tensors of a safetensors checkpoint (one file or an index of shards), read one at a time."""

    def __init__(self, directory: Path):
        self.directory = directory
        index = directory / "model.safetensors.index.json"
        if index.exists():
            self.files = {k: directory / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        elif (directory / "model.safetensors").exists():
            single = directory / "model.safetensors"
            self.files = {k: single for k in self._open(single).keys()}
        else:
            raise FileNotFoundError(
                f"{directory} has no model.safetensors or model.safetensors.index.json: streaming needs safetensors weights"
            )
        self.reads = 0

    @classmethod
    def of_files(cls, directory: Path, files: list[Path]) -> "ShardReader":
        reader = cls.__new__(cls)
        reader.directory, reader.reads, reader.files = directory, 0, {}
        for file in files:
            reader.files.update({k: file for k in reader._open(file).keys()})
        return reader

    def _open(self, file: Path):
        from safetensors import safe_open

        if not file.exists():
            raise CorruptShardError(f"shard {file} listed in the index is missing; download it again")
        try:
            return safe_open(str(file), framework="pt")
        except Exception as err:
            raise CorruptShardError(
                f"cannot read shard {file} ({err}); the file is truncated or corrupt: download it again"
            ) from err

    def keys(self, prefix: str = "") -> list[str]:
        return [k for k in self.files if k.startswith(prefix)]

    def get(self, key: str) -> torch.Tensor:
        file = self.files[key]
        try:
            tensor = self._open(file).get_tensor(key)
        except CorruptShardError:
            raise
        except Exception as err:
            raise CorruptShardError(
                f"cannot read {key} from shard {file} ({err}); the file is truncated or corrupt: download it again"
            ) from err
        self.reads += 1
        return tensor


# ------------------------------------------------------------------ checkpoint layout <-> model names

_PER_EXPERT = re.compile(r"^(.*experts)\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
_MIXTRAL_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


@dataclass
class _Layout:
    """How a checkpoint spells a decoder layer: per-expert matrices or fused, Mixtral's names or not."""

    mixtral: bool = False  # block_sparse_moe.experts.{e}.w1/w3/w2
    per_expert: bool = False


def read_layer(
    reader: ShardReader, prefix: str, keep: list[int] | None = None
) -> tuple[dict[str, torch.Tensor], _Layout]:
    """Layer tensors under ``prefix`` with the model's names (per-expert matrices fused as transformers loads them).

    ``keep``: the experts to read, in this order (None: all); the others' per-expert matrices are never
    read. Tensors the checkpoint stores fused are read whole (:func:`~.source.load_layer` selects)."""
    layout, plain, experts = _Layout(), {}, {}
    for key in reader.keys(prefix):
        local = key[len(prefix) :]
        if local.startswith("block_sparse_moe."):
            layout.mixtral = True
            local = "mlp." + local[len("block_sparse_moe.") :]
        m = _PER_EXPERT.match(local)
        if m:
            layout.per_expert = True
            experts.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[
                _MIXTRAL_NAMES.get(m.group(3), m.group(3))
            ] = key
        else:
            plain[local] = reader.get(key)
    for base, per in experts.items():
        order = sorted(per) if keep is None else keep
        if missing := [e for e in order if e not in per]:
            raise CorruptShardError(
                f"the checkpoint has no experts {missing} of {prefix}{base}; it does not match its config"
            )
        plain[f"{base}.gate_up_proj"] = _fused(reader, [(per[e]["gate_proj"], per[e]["up_proj"]) for e in order])
        plain[f"{base}.down_proj"] = _fused(reader, [(per[e]["down_proj"],) for e in order])
    return plain, layout


def _fused(reader: ShardReader, keys: list[tuple[str, ...]]) -> torch.Tensor:
    """``[E, sum of rows, in]`` from per-expert matrices, filled one matrix at a time (``torch.stack``
    of the read list would hold the layer's experts twice)."""
    out = None
    for e, parts in enumerate(keys):
        mats = [reader.get(key) for key in parts]  # one expert's matrices
        if out is None:
            out = torch.empty((len(keys), sum(m.shape[0] for m in mats), *mats[0].shape[1:]), dtype=mats[0].dtype)
        if sum(m.shape[0] for m in mats) != out.shape[1] or any(m.shape[1:] != out.shape[2:] for m in mats):
            raise CorruptShardError(
                f"{', '.join(parts)}: shapes {[tuple(m.shape) for m in mats]} differ from the first expert's "
                f"(rows {out.shape[1]}, {tuple(out.shape[2:])} inputs); the checkpoint is inconsistent"
            )
        torch.cat(mats, out=out[e])
    return out


def layer_to_checkpoint(tensors: dict[str, torch.Tensor], prefix: str, layout: _Layout) -> dict[str, torch.Tensor]:
    """Inverse of :func:`read_layer`: model names back to the checkpoint's spelling."""
    out = {}
    for local, t in tensors.items():
        if layout.per_expert and local.endswith("experts.gate_up_proj"):
            base, half = local[: -len(".gate_up_proj")], t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{base}.{e}.gate_proj.weight"] = t[e, :half].clone()
                out[f"{base}.{e}.up_proj.weight"] = t[e, half:].clone()
            continue
        if layout.per_expert and local.endswith("experts.down_proj"):
            base = local[: -len(".down_proj")]
            for e in range(t.shape[0]):
                out[f"{base}.{e}.down_proj.weight"] = t[e].clone()
            continue
        out[local] = t.contiguous()
    if layout.mixtral:
        renamed = {}
        for local, t in out.items():
            if local.startswith("mlp."):
                local = "block_sparse_moe." + local[4:]
                m = _PER_EXPERT.match(local)
                if m:
                    back = {v: k for k, v in _MIXTRAL_NAMES.items()}
                    local = f"{m.group(1)}.{m.group(2)}.{back[m.group(3)]}.weight"
            renamed[local] = t
        out = renamed
    return {prefix + k: v for k, v in out.items()}


class _Only:
    """A view of a reader restricted to one key (mixtral's router lives under block_sparse_moe)."""

    def __init__(self, reader: ShardReader, key: str, prefix: str):
        self.reader, self.key, self.prefix = reader, key, prefix

    def keys(self, prefix: str = "") -> list[str]:
        local = self.key[len(self.prefix) :]
        alt = self.prefix + "block_sparse_moe." + local[4:] if local.startswith("mlp.") else None
        return [k for k in (self.key, alt) if k is not None and k in self.reader.files]

    def get(self, key: str) -> torch.Tensor:
        return self.reader.get(key)
