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
* ``expert_sparsity: auto`` with ``split_criterion: model_loss``: a statistics pass per non-zero
  candidate, then a scoring pass (two with OWL) that reads each layer once for all candidates
  (:mod:`stun_lightning.stream.split_scoring`); ``block_error`` and ``layer_budget: error_curve``
  decide each layer on the dense inputs of that layer, in one error-curve pass, as in memory;
* the pruning pass (sequential: later layers see pruned earlier ones), which writes each finished
  layer to the output. Without weight pruning a last pass only removes experts and writes.

Methods that change expert weights while choosing (``eep``, ``uncurl``, STUN with
``merge_max_clusters``) are refused: their merges would need every layer in memory.

The output directory matches :func:`stun_lightning.save_pruned`'s (config with per-layer counts where
they differ, sharded safetensors with an index, tokenizer, ``stun_recipe.yaml``,
``stun_report.json``). Work happens in ``.<name>.stream`` beside it, renamed at the end; with
``resume=True`` a killed run starts again from the layers that directory already holds.
"""

from .output import STATE_FILE, saved_state
from .pipeline import prune_streaming
from .shards import CorruptShardError, ShardReader, _Layout, layer_to_checkpoint, read_layer, resolve_model_dir
from .skeleton import build_skeleton
from .source import StreamSource

__all__ = [
    "STATE_FILE",
    "_Layout",
    "CorruptShardError",
    "ShardReader",
    "StreamSource",
    "build_skeleton",
    "layer_to_checkpoint",
    "prune_streaming",
    "read_layer",
    "resolve_model_dir",
    "saved_state",
]
