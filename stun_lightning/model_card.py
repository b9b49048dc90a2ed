"""The model card (``README.md`` in Hugging Face's format) of every directory this library writes.

:func:`write_model_card` is called by ``serialization.atomic_output`` on the temporary directory just
before it is renamed, so prune outputs, exports (hf, sparse, aoti) and the final model of a
Lightning fit all carry one. It reads what the directory holds: ``config.json``, the pruning report
``stun_report.json``, the recipe ``stun_recipe.yaml`` and lm-eval results ``eval_results.json``
(``stun-lightning eval --output DIR/eval_results.json``), so the card always states what is there.
YAML front matter: ``base_model`` (when the source was a hub id), ``library_name``, ``tags``.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

CARD = "README.md"
PROVENANCE = ("stun_report.json", "stun_recipe.yaml", "eval_results.json")  # carried on by exports


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


def model_card(directory: str | Path, name: str | None = None) -> str:
    """The card text for the model directory ``directory`` (read, not written); ``name`` is the
    directory name the load snippet shows (default ``directory``'s own: pass the final name when
    ``directory`` is a temporary one)."""
    d = Path(directory)
    name = name or d.name
    config = _read_json(d / "config.json")
    report = _read_json(d / "stun_report.json")
    evals = _read_json(d / "eval_results.json")
    recipe = report.get("recipe") or (
        yaml.safe_load((d / "stun_recipe.yaml").read_text()) if (d / "stun_recipe.yaml").exists() else {}
    )
    base = report.get("base_model")
    sparse = "stun_sparse" in config or (d / "stun_aoti.json").exists()
    tags = ["stun-lightning", "moe", "pruned", "mixture-of-experts"] + (
        [config["model_type"]] if config.get("model_type") else []
    )
    front = {"library_name": "transformers", "tags": tags} | ({"base_model": base} if _is_hub_id(base) else {})
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", ""]
    title = f"{base} pruned with stun-lightning" if base else "MoE model pruned with stun-lightning"
    lines += [
        f"# {title}",
        "",
        "Mixture-of-Experts model pruned with [stun-lightning](https://github.com/) (STUN: remove experts, then mask weights inside the survivors).",
        "",
    ]
    if base:
        lines += [f"Base model: `{base}`.", ""]
    if recipe:
        lines += ["## Recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).strip(), "```", ""]
    if report:
        lines += ["## Sparsity", "", "| quantity | value |", "|---|---|"]
        for key, label in (
            ("expert_param_sparsity", "sparsity over expert parameters (STUN)"),
            ("within_expert_sparsity", "sparsity inside kept experts"),
            ("model_sparsity", "sparsity over the whole model"),
        ):
            if key in report:
                lines.append(f"| {label} | {report[key]:.2%} |")
        if report.get("experts_after"):
            before, after = report.get("experts_before", {}), report["experts_after"]
            lines.append(f"| experts | {sum(before.values())} -> {sum(after.values())} |")
            lines.append(f"| experts per layer | {' '.join(str(after[k]) for k in sorted(after, key=int))} |")
        lines.append("")
    results = [(f"perplexity {k}", v) for k, v in (report.get("perplexity") or {}).items() if v is not None]
    results += [
        (f"{task} {metric}", v) for task, metrics in (evals.get("tasks") or {}).items() for metric, v in metrics.items()
    ]
    if results:
        lines += (
            ["## Evaluation", "", "| benchmark | value |", "|---|---|"]
            + [f"| {k} | {v:.4f} |" for k, v in results]
            + [""]
        )
    lines += ["## How to load", "", "```python"]
    if (d / "stun_aoti.json").exists():
        lines += [
            "from pathlib import Path",
            "from stun_lightning.export import AotiDecoder",
            f'decoder = AotiDecoder(Path("{name}"))  # AOTInductor decode step',
        ]
    elif sparse:
        lines += [
            "from stun_lightning.sparse import load_sparse",
            f'model = load_sparse("{name}")  # compressed experts (2:4 or bitmap)',
        ]
    elif config.get("stun_num_experts_per_layer"):
        lines += [
            "from stun_lightning import load_pruned",
            f'model = load_pruned("{name}")  # expert counts differ per layer',
        ]
    else:
        lines += [
            "from transformers import AutoModelForCausalLM",
            f'model = AutoModelForCausalLM.from_pretrained("{name}")',
            "# or: stun_lightning.load_pruned(...)",
        ]
    lines += ["```", ""]
    return "\n".join(lines)


def write_model_card(directory: str | Path, name: str | None = None) -> Path:
    """Write ``directory/README.md`` (replacing one there) and return its path; ``name`` as in
    :func:`model_card`."""
    path = Path(directory) / CARD
    path.write_text(model_card(directory, name))
    return path
