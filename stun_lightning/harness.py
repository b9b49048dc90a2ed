"""Benchmarks the way papers report them: lm-evaluation-harness on a model as this library loads it.

``evaluate_tasks(model, tokenizer, ["stun_gsm8k", "stun_cloze"])`` runs ``lm_eval.simple_evaluate``
on ``HFLM(pretrained=model, tokenizer=tokenizer)``, so dense models, pruned ones with per-layer
expert counts (``load_pruned``) and sparsified ones are scored alike. lm-eval is the optional extra
``pip install stun-lightning[eval]``, imported only here.

Task names resolve in this order: the tasks shipped in ``stun_lightning/assets/tasks/`` (offline:
``stun_gsm8k``, ``stun_wikitext2``, ``stun_cloze``; see assets/SOURCES.md), the YAML tasks of
``include_path``, then lm-eval's own catalogue (``gsm8k``, ``arc_easy``, ``wikitext``...), whose data
come from the Hugging Face hub when it is reachable. The shipped YAMLs name their data with
``dataset_path: json`` and a ``data_files`` path relative to the YAML; it is made absolute (the
installed package's path) in a temporary copy, as lm-eval reads relative paths from the working
directory.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import yaml

from .data import ASSETS_DIR

#: entries of lm-eval's results that are not metrics (standard errors are dropped too)
_HIDDEN = ("alias", "sample_len")


def shipped_tasks_dir() -> Path:
    return ASSETS_DIR / "tasks"


def shipped_task_names() -> list[str]:
    return sorted(yaml.safe_load(p.read_text())["task"] for p in shipped_tasks_dir().glob("*.yaml"))


def _resolved_shipped_tasks(into: Path) -> Path:
    """Copies of the shipped YAMLs whose data_files are absolute paths into the installed package."""
    for src in shipped_tasks_dir().glob("*.yaml"):
        config = yaml.safe_load(src.read_text())
        files = config.get("dataset_kwargs", {}).get("data_files", {})
        for split, name in files.items():
            files[split] = str((src.parent / name).resolve())
        (into / src.name).write_text(yaml.safe_dump(config, sort_keys=False))
    return into


def _task_manager(tasks: list[str], include_path: str | None, local_dir: Path):
    from lm_eval.tasks import TaskManager

    paths = [str(local_dir)] + ([str(include_path)] if include_path else [])
    manager = TaskManager(include_path=paths, include_defaults=False)
    if all(t in manager.all_tasks for t in tasks):
        return manager  # no need to index lm-eval's catalogue (seconds)
    manager = TaskManager(include_path=paths, include_defaults=True)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        hint = (
            f" or in --include-path {include_path}"
            if include_path
            else "; pass --include-path DIR for your own task YAMLs"
        )
        raise ValueError(
            f"unknown lm-eval task(s) {', '.join(unknown)}: not shipped ({', '.join(shipped_task_names())}), not in lm-eval's catalogue{hint}"
        )
    return manager


def evaluate_tasks(
    model,
    tokenizer,
    tasks: list[str],
    *,
    include_path: str | Path | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 1,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from ``lm_eval.simple_evaluate`` (metric names as lm-eval's,
    e.g. ``"acc,none"``, ``"exact_match,strict-match"``, ``"word_perplexity,none"``).

    ``limit``: documents per task (an int) or a fraction of them (a float < 1), as lm-eval's.
    """
    if not tasks:
        raise ValueError("no task given; pass --tasks T1,T2 (shipped: " + ", ".join(shipped_task_names()) + ")")
    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"--include-path {include_path} is not a directory of lm-eval task YAMLs")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise ValueError(f"lm-evaluation-harness is not installed ({err}); pip install 'stun-lightning[eval]'") from err
    import logging

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # lm-eval logs every task build at WARNING
    with tempfile.TemporaryDirectory(prefix="stun-tasks-") as tmp:
        manager = _task_manager(list(tasks), include_path, _resolved_shipped_tasks(Path(tmp)))
        device = str(model.get_input_embeddings().weight.device)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            task_manager=manager,
            limit=limit,
            num_fewshot=num_fewshot,
            log_samples=False,
            bootstrap_iters=0,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            verbosity="ERROR",
        )
    return {
        task: {
            k: float(v)
            for k, v in metrics.items()
            if k not in _HIDDEN
            and isinstance(v, (int, float))
            and not k.endswith("_stderr,none")
            and "_stderr," not in k
        }
        for task, metrics in out["results"].items()
    }


def results_table(results: dict[str, dict[str, float]], baseline: dict[str, dict[str, float]] | None = None) -> str:
    """Markdown table of task metrics, with the baseline's column beside when given."""
    head = "| task | metric | value |" if baseline is None else "| task | metric | baseline | model |"
    lines = [head, "|---|---|---|---|" if baseline is not None else "|---|---|---|"]
    for task in sorted(results):
        for metric, value in sorted(results[task].items()):
            cells = (
                [task, metric]
                + ([_fmt(baseline.get(task, {}).get(metric))] if baseline is not None else [])
                + [_fmt(value)]
            )
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}"
