"""Prune a model larger than host memory: decoder layers are read from disk when a pass reaches them.

``prune_streaming(model_dir_or_hub_id, out_dir, recipe)`` runs exactly the pipeline of
:func:`stun_lightning.prune` on a model skeleton built on the meta device. Embeddings, final norm,
head and every layer's router (``E x H`` per layer, what STUN's router distance reads) are loaded
once; the rest of decoder layer ``i`` is read from the safetensors shards (``safe_open``, one tensor
at a time) when a calibration pass enters it, and freed when the pass leaves it. Peak host memory is
about one decoder layer plus the resident parts and the calibration activations.

Passes over the layers (the same as the in-memory path, which also visits one layer at a time):

* structured phase, methods reading routing statistics (``stun``, ``frequency``, ``reap``,
  ``naee``): one pass over the dense model collects every layer's statistics, then the method
  decides for all layers at once. This is a first pass of its own because STUN's ``layer_budget:
  global`` shares one threshold over all layers: no layer's experts are known before the last layer
  is measured. ``random`` needs no pass;
* ``allocation: owl``: one pass measures every layer's outlier ratio (OWL's targets are relative to
  the mean over layers), before the pruning pass;
* the pruning pass (sequential: later layers see pruned earlier ones), which writes each finished
  layer to the output. Without weight pruning a last pass only removes experts and writes.

Methods that change expert weights while choosing (``eep``, ``uncurl``, STUN with
``merge_max_clusters``) are refused: their merges would need every layer in memory.

The output directory matches :func:`stun_lightning.save_pruned`'s (config with per-layer counts where
they differ, sharded safetensors with an index, tokenizer, ``stun_recipe.yaml``,
``stun_report.json``). Work happens in ``.<name>.stream`` beside it, renamed at the end; with
``resume=True`` a killed run starts again from the layers that directory already holds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .adapters import decoder_layers, get_adapter, moe_layers
from .calibration import LAYER_SOURCE
from .recipe import StunRecipe
from .report import ModelCensus, ParamCount, PruneReport

STATE_FILE = "stream_state.json"
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


def read_layer(reader: ShardReader, prefix: str) -> tuple[dict[str, torch.Tensor], _Layout]:
    """Layer tensors under ``prefix`` with the model's names (per-expert matrices fused as transformers loads them)."""
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
        order = sorted(per)
        plain[f"{base}.gate_up_proj"] = torch.stack(
            [torch.cat([reader.get(per[e]["gate_proj"]), reader.get(per[e]["up_proj"])]) for e in order]
        )
        plain[f"{base}.down_proj"] = torch.stack([reader.get(per[e]["down_proj"]) for e in order])
    return plain, layout


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


# ------------------------------------------------------------------ the skeleton and its layer source


def _layer_prefix(model: nn.Module, i: int) -> str:
    layers = decoder_layers(model)
    for name, module in model.named_modules():
        if module is layers[i]:
            return name + "."
    raise RuntimeError(f"decoder layer {i} not found")


def _router_tensors(layer: nn.Module, model: nn.Module, i: int) -> dict[str, torch.Tensor]:
    """Names (local to the decoder layer) of the router tensors kept resident."""
    moe = {m.index: m for m in moe_layers(model)}.get(i)
    if moe is None:
        return {}
    prefix = next(n for n, m in layer.named_modules() if m is moe.router)
    return {f"{prefix}.{k}": v for k, v in moe.router.state_dict().items()}


@dataclass
class StreamSource:
    """Reads decoder layers from ``reader`` on entry and (once ``write`` is on) writes them to ``work_dir`` on exit."""

    model: nn.Module
    reader: ShardReader
    work_dir: Path
    keep: dict[int, list[int]] = field(default_factory=dict)
    write: bool = False
    layouts: dict[int, _Layout] = field(default_factory=dict)
    after: dict[int, tuple[ParamCount, ParamCount, int]] = field(default_factory=dict)
    live: dict[int, int] = field(default_factory=dict)  # layer -> bytes of its tensors read from disk
    final_pass: str = "pruning weights"  # the calibration pass that writes the finished layers
    resume_from: int = -1  # last layer the killed run finished in its final pass
    in_final: bool = False
    max_live_layers: int = 0  # decoder layers materialised at once (the memory bound tests check)
    peak_live_bytes: int = 0

    def enter(self, i: int, layer: nn.Module, device) -> None:
        prefix = _layer_prefix(self.model, i)
        tensors, self.layouts[i] = read_layer(self.reader, prefix)
        resident = _router_tensors(layer, self.model, i)
        state = {}
        for name, target in layer.state_dict(keep_vars=True).items():
            if name in resident:
                state[name] = target
                continue
            if name not in tensors:
                raise CorruptShardError(f"checkpoint {self.reader.directory} has no tensor for {prefix}{name}")
            t = tensors.pop(name)
            if t.shape != target.shape and i in self.keep and t.shape[1:] == target.shape[1:]:
                t = t.index_select(0, torch.tensor(self.keep[i]))  # experts removed by the structured phase
            if t.shape != target.shape:
                raise CorruptShardError(
                    f"{prefix}{name} has shape {tuple(t.shape)} in {self.reader.directory}, the model expects {tuple(target.shape)}"
                )
            state[name] = t.to(device=device, dtype=target.dtype) if device is not None else t.to(target.dtype)
        layer.load_state_dict(state, strict=True, assign=True)
        if device is not None:
            layer.to(device)
        self.live[i] = sum(t.numel() * t.element_size() for n, t in state.items() if n not in resident)
        self.max_live_layers = max(self.max_live_layers, len(self.live))
        self.peak_live_bytes = max(self.peak_live_bytes, sum(self.live.values()))

    def begin_pass(self, desc: str):
        """Called by each calibration pass: the final one of a resumed run starts after its last finished layer."""
        self.in_final = desc == self.final_pass
        if not self.in_final or self.resume_from < 0:
            return None
        for i in range(self.resume_from + 1):
            self._count_written(i)
        return self.resume_from + 1, torch.load(self.work_dir / "hidden.pt", weights_only=True)

    def layer_done(self, i: int, outputs: list[torch.Tensor]) -> None:
        """After a final-pass layer is written: checkpoint the activations the next layer needs."""
        if not self.in_final:
            return
        torch.save([o.cpu() for o in outputs], self.work_dir / "hidden.pt.part")
        os.replace(self.work_dir / "hidden.pt.part", self.work_dir / "hidden.pt")
        state = json.loads((self.work_dir / STATE_FILE).read_text()) if (self.work_dir / STATE_FILE).exists() else {}
        state["final_done"] = i
        _write_json(self.work_dir / STATE_FILE, state)

    def _count_written(self, i: int) -> None:
        """Census of a layer the killed run already wrote (read back from its file)."""
        layer = decoder_layers(self.model)[i]
        prefix = _layer_prefix(self.model, i)
        file = self.work_dir / f"layer-{i:05d}.safetensors"
        tensors, self.layouts[i] = read_layer(ShardReader.of_files(self.work_dir, [file]), prefix)
        moe = {m.index: m for m in moe_layers(self.model)}.get(i)
        expert_ids = {id(p) for _, p in moe.expert_parameters()} if moe is not None else set()
        whole, experts = ParamCount(), ParamCount()
        for name, p in layer.named_parameters():
            whole.add(tensors[name])
            if id(p) in expert_ids:
                experts.add(tensors[name])
        self.after[i] = (whole, experts, moe.num_experts if moe is not None else 0)

    def leave(self, i: int, layer: nn.Module) -> None:
        prefix = _layer_prefix(self.model, i)
        resident = _router_tensors(layer, self.model, i)
        if self.write and (self.in_final or not self.final_pass):  # statistics passes write nothing
            from safetensors.torch import save_file

            moe = {m.index: m for m in moe_layers(self.model)}.get(i)
            whole, experts = ParamCount(), ParamCount()
            for _, p in layer.named_parameters():
                whole.add(p)
            for _, p in moe.expert_parameters() if moe is not None else ():
                experts.add(p)
            self.after[i] = (whole, experts, moe.num_experts if moe is not None else 0)
            tensors = {k: v.detach().cpu() for k, v in layer.state_dict().items()}
            part = self.work_dir / f"layer-{i:05d}.safetensors.part"
            save_file(layer_to_checkpoint(tensors, prefix, self.layouts[i]), str(part), metadata={"format": "pt"})
            os.replace(part, self.work_dir / f"layer-{i:05d}.safetensors")
        router_modules = {
            id(m)
            for n, m in layer.named_modules()
            if any(k.startswith(n + ".") and k.count(".") == n.count(".") + 1 for k in resident) and n
        }
        for m in layer.modules():
            if id(m) in router_modules:
                m.to("cpu")
            else:
                m._apply(lambda t: t.to("meta"), recurse=False)
        self.live.pop(i, None)


def build_skeleton(directory: Path, reader: ShardReader, torch_dtype: torch.dtype | None = None) -> nn.Module:
    """The model with every decoder-layer tensor on the meta device except the routers; the rest loaded."""
    from transformers import AutoConfig, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from .serialization import _with_per_layer_counts
    from .surgery import apply_top_k, recorded_expert_counts, recorded_top_k

    config = AutoConfig.from_pretrained(directory)
    model_cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    counts = recorded_expert_counts(config)
    if counts is not None:
        model_cls = _with_per_layer_counts(model_cls, counts)
    get_adapter(config)  # a clear error for a family without an adapter, before any reading
    dtype = torch_dtype or getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with torch.device("meta"):
        model = model_cls(config)
    if counts is not None:
        model.__class__ = model_cls.__bases__[0]
    model.to(dtype)
    model.config.dtype = dtype
    # non-persistent buffers (rotary frequencies) are computed at construction, not stored: rebuild them
    for name, module in list(model.named_modules()):
        if any(b.is_meta for n, b in module.named_buffers(recurse=False) if n in module._non_persistent_buffers_set):
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], type(module)(config=model.config))
    layer_names = [_layer_prefix(model, i) for i in range(len(decoder_layers(model)))]
    state = {}
    for key in model.state_dict():
        if not any(key.startswith(p) for p in layer_names) and key in reader.files:
            state[key] = reader.get(key).to(dtype)
    for i, layer in enumerate(decoder_layers(model)):
        for local in _router_tensors(layer, model, i):
            tensors, _ = read_layer(_Only(reader, layer_names[i] + local, layer_names[i]), layer_names[i])
            state[layer_names[i] + local] = next(iter(tensors.values())).to(dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [k for k, v in model.state_dict().items() if v.is_meta and not any(k.startswith(p) for p in layer_names)]
    if missing:
        raise CorruptShardError(f"checkpoint {directory} has no tensors for {missing[:4]}")
    try:
        model.generation_config = GenerationConfig.from_pretrained(directory)
    except OSError:
        pass
    top_k = recorded_top_k(model.config)
    if top_k:
        apply_top_k(model, top_k)
    return model.eval()


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


def _write_json(path: Path, data: dict) -> None:
    path.with_suffix(".part").write_text(json.dumps(data))
    os.replace(path.with_suffix(".part"), path)


def saved_state(work: Path, resume: bool) -> dict:
    """What a killed run recorded in its work directory (nothing unless resuming)."""
    file = work / STATE_FILE
    return json.loads(file.read_text()) if resume and file.exists() else {}


def _refuse_merging(recipe: StunRecipe) -> None:
    if recipe.removes_experts and recipe.expert_merge != "none":
        raise ValueError(
            f"expert_merge={recipe.expert_merge!r} changes survivors' weights before removal; streaming cannot do that yet: prune in memory"
        )
    if recipe.removes_experts and recipe.layer_budget == "error_curve":
        raise ValueError(
            "layer_budget='error_curve' masks each layer's experts in trial while choosing; streaming cannot do that: prune in memory, or use layer_budget='uniform'"
        )
    if recipe.auto_split:
        raise ValueError(
            "expert_sparsity='auto' masks each layer's experts in trial while choosing; streaming cannot do that: prune in memory, or give expert_sparsity a fraction"
        )
    if recipe.expert_sparsity > 0 and (recipe.expert_method in ("eep", "uncurl") or recipe.merge_max_clusters > 0):
        raise ValueError(
            f"expert_method={recipe.expert_method!r} (merge_max_clusters={recipe.merge_max_clusters}) merges expert weights across "
            "a layer while choosing; streaming cannot do that: prune in memory, or use stun/frequency/reap/naee without merging"
        )


def prune_streaming(
    model: str | os.PathLike,
    out_dir: str | os.PathLike,
    recipe: StunRecipe | None = None,
    calibration: torch.Tensor | None = None,
    *,
    tokenizer=None,
    device: str | torch.device | None = None,
    torch_dtype: torch.dtype | None = None,
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    local_files_only: bool = False,
    extra_files: dict[str, str] | None = None,
) -> PruneReport:
    """Prune the checkpoint at ``model`` (directory or hub id) layer by layer from disk into ``out_dir``.

    Same recipe, calibration and result as ``prune(model, ...)`` + ``save_pruned``; host memory holds
    one decoder layer at a time (see the module docstring for the passes). ``resume``: reuse the
    expert choice a killed run left in ``.<out_dir name>.stream``.
    """
    from .prune import check_recipe
    from .structured import apply_expert_sets, needs_calibration, run_selection
    from .metrics import get_metric
    from .unstructured import mask_survivors

    recipe = (recipe or StunRecipe()).validate()
    _refuse_merging(recipe)
    final = Path(out_dir)
    if final.exists() and not overwrite:
        raise FileExistsError(
            f"output directory {final} already exists; choose another path or pass overwrite=True (--overwrite)"
        )
    work = final.parent / f".{final.name}.stream"
    if work.exists() and not resume:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    directory = resolve_model_dir(model, local_files_only=local_files_only)
    reader = ShardReader(directory)
    skeleton = build_skeleton(directory, reader, torch_dtype)
    keep_total, per_layer, min_keep = check_recipe(skeleton, recipe)
    data_needed = needs_calibration(recipe) or (recipe.prunes_weights and get_metric(recipe.metric).needs_data)
    if data_needed and calibration is None:
        if tokenizer is None:
            raise ValueError("this recipe needs calibration data: pass calibration=token ids [N, L] or tokenizer=...")
        from .data import calibration_blocks

        calibration = calibration_blocks(
            tokenizer, None, recipe.calibration_samples, recipe.calibration_seq_len, recipe.seed
        )

    metric_reads_data = recipe.prunes_weights and get_metric(recipe.metric).needs_data
    source = StreamSource(skeleton, reader, work, final_pass="pruning weights" if metric_reads_data else "")
    source.resume_from = saved_state(work, resume).get("final_done", -1) if metric_reads_data else -1
    resident = [
        p
        for n, p in skeleton.named_parameters()
        if not p.is_meta
        and not n.startswith(tuple(_layer_prefix(skeleton, i) for i in range(len(decoder_layers(skeleton)))))
    ]
    state_file = work / STATE_FILE
    saved = saved_state(work, resume)
    seconds, passes, removed = {}, {}, {}
    token = LAYER_SOURCE.set(source)
    try:
        before = _shape_census(skeleton)
        if recipe.removes_experts:
            start = time.perf_counter()
            if "keep" in saved:  # resume: the expert choice of the killed run
                keep = {int(i): v for i, v in saved["keep"].items()}
                n_passes = saved["structured_passes"]
            else:
                selection = run_selection(
                    skeleton,
                    recipe,
                    calibration,
                    plan=(keep_total, per_layer, min_keep),
                    device=device,
                    progress=progress,
                )
                keep, n_passes = selection.keep, selection.layer_passes
                _write_json(state_file, {"keep": keep, "structured_passes": n_passes})
            if n_passes:
                passes["structured"] = n_passes
            removed = apply_expert_sets(skeleton, keep, lower_top_k=recipe.lower_top_k)
            source.keep = {i: v for i, v in keep.items()}
            seconds["structured"] = time.perf_counter() - start
        source.write = True
        targets, low_tokens = {}, {}
        if recipe.prunes_weights:
            start = time.perf_counter()
            targets, low_tokens, n_passes = mask_survivors(
                skeleton, recipe, before, calibration, device=device, progress=progress
            )
            passes["unstructured"] = n_passes
            seconds["unstructured"] = time.perf_counter() - start
        else:
            from tqdm.auto import tqdm

            for i in tqdm(
                range(len(decoder_layers(skeleton))), desc="writing layers", disable=not progress, unit="layer"
            ):
                layer = decoder_layers(skeleton)[i]
                source.enter(i, layer, None)
                source.leave(i, layer)
    finally:
        LAYER_SOURCE.reset(token)
    after = _after_census(skeleton, resident, source)
    report = PruneReport.compare(
        before,
        after,
        recipe.to_dict(),
        removed,
        layer_target_sparsity=targets,
        low_token_experts=low_tokens,
        seconds=seconds,
        layer_passes=passes,
    )
    files = {"stun_report.json": report.to_json(), **(extra_files or {})}
    if "stun_recipe.yaml" not in files:
        import yaml

        files["stun_recipe.yaml"] = yaml.safe_dump(recipe.to_dict(), sort_keys=False)
    _finish(skeleton, reader, work, final, tokenizer, files, overwrite)
    return report


def _shape_census(model: nn.Module) -> ModelCensus:
    """The unpruned skeleton's parameter counts from its (meta) shapes; no tensor is read, so
    ``nonzero`` is the parameter count (the report uses only totals and bytes of the original)."""

    def count(params) -> ParamCount:
        c = ParamCount()
        for p in params:
            c.total += p.numel()
            c.nonzero += p.numel()
            c.bytes += p.numel() * p.element_size()
        return c

    experts = {m.index: count(p for _, p in m.expert_parameters()) for m in moe_layers(model)}
    return ModelCensus(count(model.parameters()), experts, {m.index: m.num_experts for m in moe_layers(model)})


def _after_census(model: nn.Module, resident: list[torch.Tensor], source: StreamSource) -> ModelCensus:
    whole = ParamCount()
    for p in resident:
        whole.add(p)
    experts, counts = {}, {}
    for i, (layer_count, expert_count, n) in source.after.items():
        whole.total += layer_count.total
        whole.nonzero += layer_count.nonzero
        whole.bytes += layer_count.bytes
        if i in {m.index for m in moe_layers(model)}:
            experts[i], counts[i] = expert_count, n
    return ModelCensus(whole, experts, counts)


def _finish(
    model: nn.Module, reader: ShardReader, work: Path, final: Path, tokenizer, files: dict[str, str], overwrite: bool
) -> None:
    """Resident tensors, shard names, index, config, tokenizer, text files; then rename into place."""
    from safetensors.torch import save_file

    from .surgery import sync_config

    n_layers = len(decoder_layers(model))
    prefixes = tuple(_layer_prefix(model, i) for i in range(n_layers))
    rest = {k: reader.get(k) for k in reader.files if not k.startswith(prefixes)}
    total = n_layers + 1
    weight_map, size = {}, 0
    shards = [(work / f"layer-{i:05d}.safetensors") for i in range(n_layers)]
    names = [f"model-{k + 1:05d}-of-{total:05d}.safetensors" for k in range(total)]
    save_file(rest, str(work / names[-1]), metadata={"format": "pt"})
    for shard, name in zip(shards, names):
        os.replace(shard, work / name)
    from safetensors import safe_open

    for name in names:
        with safe_open(str(work / name), framework="pt") as f:
            for key in f.keys():
                weight_map[key] = name
                sl = f.get_slice(key)
                n = int(torch.tensor(sl.get_shape()).prod()) if sl.get_shape() else 1
                size += n * {"F32": 4, "BF16": 2, "F16": 2, "F64": 8}.get(sl.get_dtype(), 4)
    (work / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
    )
    sync_config(model)
    model.config.save_pretrained(work)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(work)
    if tokenizer is not None:
        tokenizer.save_pretrained(work)
    for name, text in files.items():
        (work / name).write_text(text)
    (work / STATE_FILE).unlink(missing_ok=True)
    (work / "hidden.pt").unlink(missing_ok=True)
    if final.exists():
        shutil.rmtree(final)
    os.replace(work, final)
