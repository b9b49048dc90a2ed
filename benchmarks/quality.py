"""What each pruning method costs: held-out perplexity per domain of pruned reference models.

One table per model (markdown + CSV), the dense model in the same run. Rows:

* dense;
* unstructured only, 50% inside every expert: magnitude, Wanda, OWL+Wanda, MoE-Pruner; and 2:4;
* expert pruning only, 12.5 / 25 / 50% of the experts: STUN (router distances, one global
  threshold), router-weighted frequency, random (mean of 3 seeds);
* STUN's claim: at total expert-parameter sparsity 40-80%, expert pruning (STUN, ``--stun-experts``
  of the experts, 25% by default as the paper's ~20% for 40% total) then OWL+Wanda or the MoE-Pruner
  metric inside the survivors (``total_sparsity=``), against the same unstructured method alone at
  the same total; STUN then 2:4;
* ``--investigate``: at 60-80% total, STUN with a per-layer budget, co-activation distances, other
  expert fractions, and frequency-based expert pruning in STUN's place.

Perplexity is measured on disjoint windows of 256 tokens (as ``stun_lightning.evaluate``) of the
held-out splits: prose = WikiText-2 test, math = GSM8K test, code = Python stdlib test (or the
shipped mixed held-out text with ``--heldout shipped``). "mean" is the geometric mean over domains.
Calibration: windows of the shipped calibration text (a slice of the train mix). Experts that get no
calibration token are pruned by magnitude (``low_token_rule="magnitude"``) so that every row reaches
its nominal sparsity; the official STUN code leaves them dense, which would flatter whichever row
keeps more of them (our first, unbalanced models had dead experts: unstructured-only rows then
stayed ~3 points under their target).

    python benchmarks/quality.py --quick                  # shipped model, CPU, a few minutes
    python benchmarks/quality.py --model out/reference/qwen3_moe_32x4/model --device cuda --investigate
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package, also when not pip-installed
from stun_lightning import StunRecipe, prune  # noqa: E402
from stun_lightning.data import calibration_blocks, heldout_path, read_texts, token_stream  # noqa: E402
from stun_lightning.evaluate import sliding_windows  # noqa: E402
from stun_lightning.reference import load_reference_model  # noqa: E402
from stun_lightning.tiny import load_tokenizer  # noqa: E402

DEFAULT_DATA = Path("/work/shared/data")
HELDOUT = {"prose": "wikitext2/test.txt", "math": "gsm8k/test.jsonl", "code": "python_stdlib/test.txt"}
TOTALS = (0.4, 0.5, 0.6, 0.7, 0.8)
EXPERT_FRACTIONS = (0.125, 0.25, 0.5)
RANDOM_SEEDS = (0, 1, 2)
UNSTRUCTURED = {  # label -> recipe fields of the unstructured phase
    "magnitude": dict(metric="magnitude"),
    "wanda": dict(metric="wanda"),
    "owl+wanda": dict(metric="wanda", allocation="owl"),
    "moe_pruner": dict(metric="moe_pruner"),
}


@dataclass
class Row:
    group: str
    method: str
    recipe: dict | None  # StunRecipe fields; None = the dense model
    seeds: tuple[int, ...] = (0,)


@dataclass
class Result:
    row: Row
    ppl: dict[str, float]
    accuracy: float
    experts_removed: float
    total_sparsity: float
    within_sparsity: float
    experts_after: str
    seconds: float
    extra: dict = field(default_factory=dict)

    @property
    def mean_ppl(self) -> float:
        return math.exp(sum(math.log(p) for p in self.ppl.values()) / len(self.ppl))


def build_rows(stun_experts: float, investigate: bool) -> list[Row]:
    rows = [Row("dense", "dense", None)]
    for name, fields in UNSTRUCTURED.items():
        rows.append(Row("unstructured 50%", name, dict(expert_sparsity=0.0, sparsity=0.5, **fields)))
    for name in ("magnitude", "wanda", "moe_pruner"):
        rows.append(Row("unstructured 2:4", name, dict(expert_sparsity=0.0, pattern="2:4", **UNSTRUCTURED[name])))
    for frac in EXPERT_FRACTIONS:
        for method in ("stun", "frequency", "random"):
            seeds = RANDOM_SEEDS if method == "random" else (0,)
            label = f"{method} (mean of {len(seeds)} seeds)" if len(seeds) > 1 else method
            rows.append(Row(f"experts only {frac:.1%}", label, dict(expert_sparsity=frac, expert_method=method), seeds))
    for total in TOTALS:
        for name in ("owl+wanda", "moe_pruner"):
            rows.append(Row(f"total {total:.0%}", f"{name} only", dict(expert_sparsity=0.0, total_sparsity=total, **UNSTRUCTURED[name])))
            if total > stun_experts:
                rows.append(Row(f"total {total:.0%}", f"STUN {stun_experts:.0%} experts + {name}", dict(expert_sparsity=stun_experts, total_sparsity=total, **UNSTRUCTURED[name])))
    for name in ("wanda", "moe_pruner"):
        rows.append(Row("STUN then 2:4", f"STUN {stun_experts:.0%} experts + {name} 2:4", dict(expert_sparsity=stun_experts, pattern="2:4", **UNSTRUCTURED[name])))
    if investigate:
        owl = UNSTRUCTURED["owl+wanda"]
        for total in (0.6, 0.7, 0.8):
            group = f"investigate {total:.0%}"
            variants = {
                f"STUN {stun_experts:.0%} uniform per layer + owl+wanda": dict(expert_sparsity=stun_experts, layer_budget="uniform"),
                f"STUN {stun_experts:.0%} co-activation + owl+wanda": dict(expert_sparsity=stun_experts, distance="coactivation"),
                f"frequency {stun_experts:.0%} experts + owl+wanda": dict(expert_sparsity=stun_experts, expert_method="frequency"),
                "STUN 12.5% experts + owl+wanda": dict(expert_sparsity=0.125),
                "STUN 50% experts + owl+wanda": dict(expert_sparsity=0.5),
            }
            for label, fields in variants.items():
                rows.append(Row(group, label, dict(total_sparsity=total, **owl, **fields)))
    return rows


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def score(model, ids: torch.Tensor, seq_len: int, batch_size: int, device) -> tuple[float, float, int]:
    """(nll sum, correct predictions, scored tokens) over disjoint windows, one forward pass per window.

    The windows and scored positions are ``stun_lightning.evaluate``'s (stride = seq_len), so the
    perplexity equals ``evaluate.perplexity``; accuracy comes from the same pass.
    """
    nll, correct, count = 0.0, 0, 0
    windows = sliding_windows(len(ids), seq_len)
    full = [w for w in windows if w.end - w.begin == seq_len]
    rest = [w for w in windows if w.end - w.begin != seq_len]
    groups = [full[i : i + batch_size] for i in range(0, len(full), batch_size)] + [[w] for w in rest]
    for group in groups:
        inputs = torch.stack([ids[w.begin : w.end] for w in group]).to(device)
        logits = model(input_ids=inputs, use_cache=False).logits[:, :-1].float()
        targets = inputs[:, 1:]
        start = torch.tensor([w.score_from - w.begin for w in group], device=device)
        scored = torch.arange(1, inputs.shape[1], device=device)[None, :] >= start[:, None]
        token_nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        nll += float(token_nll[scored].double().sum())
        correct += int((logits.argmax(-1) == targets)[scored].sum())
        count += int(scored.sum())
    return nll, correct, count


def evaluate(model, heldout: dict[str, torch.Tensor], seq_len: int, batch_size: int, device) -> tuple[dict[str, float], float]:
    ppl, correct, count = {}, 0, 0
    for domain, ids in heldout.items():
        nll, c, n = score(model, ids, seq_len, batch_size, device)
        ppl[domain] = math.exp(nll / n)
        correct += c
        count += n
    return ppl, correct / count


def heldout_ids(tokenizer, source: str, data: Path, max_tokens: int | None, cache: Path | None = None) -> dict[str, torch.Tensor]:
    if cache is not None:  # train_reference.py's token cache: the same held-out splits, tokenized
        return {d: t.long()[:max_tokens] for d, t in torch.load(cache)["test"].items()}
    if source == "shipped":
        return {"mixed": token_stream(tokenizer, read_texts(heldout_path()))[:max_tokens]}
    missing = [str(data / f) for f in HELDOUT.values() if not (data / f).exists()]
    if missing:
        raise FileNotFoundError(f"held-out files missing: {missing}; pass --data DIR (the shared data folder) or --heldout shipped")
    return {d: token_stream(tokenizer, read_texts(data / f))[:max_tokens] for d, f in HELDOUT.items()}


# ---------------------------------------------------------------- runs


def run_row(dense, row: Row, calibration, heldout, args) -> Result:
    start = time.perf_counter()
    if row.recipe is None:
        ppl, acc = evaluate(dense, heldout, args.seq_len, args.batch_size, args.device)
        return Result(row, ppl, acc, 0.0, 0.0, 0.0, "-", time.perf_counter() - start)
    ppls, accs, reports = [], [], []
    for seed in row.seeds:
        model = copy.deepcopy(dense)
        recipe = StunRecipe(**row.recipe, seed=seed, low_token_rule="magnitude", calibration_samples=len(calibration), calibration_seq_len=calibration.shape[1], batch_size=args.calib_batch)
        reports.append(prune(model, recipe, calibration=calibration, device=args.device, progress=False))
        p, a = evaluate(model, heldout, args.seq_len, args.batch_size, args.device)
        ppls.append(p)
        accs.append(a)
        del model
    ppl = {d: sum(p[d] for p in ppls) / len(ppls) for d in ppls[0]}
    r = reports[0]
    removed = 1 - sum(r.experts_after.values()) / sum(r.experts_before.values())
    counts = sorted({tuple(rep.experts_after.values()) for rep in reports})
    after = " / ".join(" ".join(map(str, c)) for c in counts) if removed else "all"
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return Result(
        row, ppl, mean(accs), removed, mean([rep.expert_sparsity for rep in reports]), mean([rep.within_expert_sparsity for rep in reports]),
        after, time.perf_counter() - start,
    )


def markdown(results: list[Result], title: str) -> str:
    dense = results[0]
    domains = list(dense.ppl)
    head = ["group", "method", "experts removed", "total sparsity", "inside kept", "experts per layer", *[f"ppl {d}" for d in domains]]
    head += ["ppl mean", "vs dense", "next-token acc"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r.row.group, r.row.method, f"{r.experts_removed:.1%}", f"{r.total_sparsity:.1%}", f"{r.within_sparsity:.1%}", r.experts_after]
        cells += [f"{r.ppl[d]:.2f}" for d in domains]
        cells += [f"{r.mean_ppl:.2f}", f"{r.mean_ppl / dense.mean_ppl - 1:+.1%}", f"{r.accuracy:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def claim_table(results: list[Result], stun_experts: float) -> str:
    """At each total: unstructured-only vs STUN then the same method (mean ppl), and the gap."""
    by = {(r.row.group, r.row.method): r for r in results}
    dense = results[0].mean_ppl
    lines = ["| total | second phase | unstructured only | STUN then same | STUN closer to dense? | ppl increase ratio (STUN / only) |", "|---|---|---|---|---|---|"]
    for total in TOTALS:
        for name in ("owl+wanda", "moe_pruner"):
            only = by.get((f"total {total:.0%}", f"{name} only"))
            stun = by.get((f"total {total:.0%}", f"STUN {stun_experts:.0%} experts + {name}"))
            if only is None or stun is None:
                continue
            ratio = (stun.mean_ppl - dense) / max(1e-9, only.mean_ppl - dense)
            lines.append(f"| {total:.0%} | {name} | {only.mean_ppl:.2f} | {stun.mean_ppl:.2f} | {'yes' if stun.mean_ppl < only.mean_ppl else 'no'} | {ratio:.2f} |")
    return "\n".join(lines)


def write_csv(results: list[Result], path: Path, model_name: str) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        domains = list(results[0].ppl)
        w.writerow(["model", "group", "method", "seeds", "experts_removed", "total_sparsity", "within_sparsity", "experts_per_layer", *[f"ppl_{d}" for d in domains], "ppl_mean", "accuracy", "seconds"])
        for r in results:
            w.writerow([model_name, r.row.group, r.row.method, len(r.row.seeds), f"{r.experts_removed:.4f}", f"{r.total_sparsity:.4f}", f"{r.within_sparsity:.4f}", r.experts_after,
                        *[f"{r.ppl[d]:.4f}" for d in domains], f"{r.mean_ppl:.4f}", f"{r.accuracy:.4f}", f"{r.seconds:.2f}"])


def load_model(spec: str, device):
    if spec == "shipped":
        model, _ = load_reference_model(device=device)
        return model
    return AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32).to(device).eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", help="model folder (save_pretrained) or 'shipped'; repeatable (default: shipped)")
    parser.add_argument("--quick", action="store_true", help="CPU-sized: 64 calibration windows, 8192 held-out tokens per domain")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder (held-out splits)")
    parser.add_argument("--cache", type=Path, default=None, help="train_reference.py's token cache, instead of --data")
    parser.add_argument("--heldout", choices=("domains", "shipped"), default="domains")
    parser.add_argument("--max-tokens", type=int, default=None, help="held-out tokens per domain (default: all; --quick: 8192)")
    parser.add_argument("--calib-samples", type=int, default=None, help="calibration windows (default 128; --quick: 64)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=None, help="evaluation windows per forward (default 64 on GPU, 8 on CPU)")
    parser.add_argument("--calib-batch", type=int, default=16)
    parser.add_argument("--stun-experts", type=float, default=0.25, help="fraction of experts STUN removes before the unstructured phase")
    parser.add_argument("--investigate", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("out/quality"))
    args = parser.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.batch_size = args.batch_size or (64 if args.device.type == "cuda" else 8)
    max_tokens = args.max_tokens if args.max_tokens is not None else (8192 if args.quick else None)
    n_calib = args.calib_samples or (64 if args.quick else 128)
    torch.set_grad_enabled(False)

    tokenizer = load_tokenizer()
    heldout = heldout_ids(tokenizer, args.heldout, args.data, max_tokens, args.cache)
    calibration = calibration_blocks(tokenizer, None, n_calib, args.seq_len, seed=0)
    rows = build_rows(args.stun_experts, args.investigate)
    args.out.mkdir(parents=True, exist_ok=True)
    for spec in args.model or ["shipped"]:
        name = "shipped" if spec == "shipped" else Path(spec).resolve().name if Path(spec).name != "model" else Path(spec).resolve().parent.name
        dense = load_model(spec, args.device)
        title = (f"{name}: {sum(p.numel() for p in dense.parameters()) / 1e6:.1f} M parameters, held-out {args.heldout} "
                 f"({', '.join(f'{d} {len(t)}' for d, t in heldout.items())} tokens), {n_calib} x {args.seq_len} calibration tokens, {args.device.type}")
        results, start = [], time.perf_counter()
        for row in rows:
            results.append(run_row(dense, row, calibration, heldout, args))
            r = results[-1]
            print(f"[{name} {time.perf_counter() - start:5.0f}s] {row.group:<18} {row.method:<42} total {r.total_sparsity:6.1%} ppl "
                  + " ".join(f"{d} {p:8.2f}" for d, p in r.ppl.items()) + f"  acc {r.accuracy:.3f}", flush=True)
            # Written after every row, so a run stopped at a time limit keeps what it measured.
            text = markdown(results, title) + "\n\nSTUN's claim (mean perplexity over domains; dense " + f"{results[0].mean_ppl:.2f}):\n\n" + claim_table(results, args.stun_experts) + "\n"
            (args.out / f"quality_{name}.md").write_text(text)
            write_csv(results, args.out / f"quality_{name}.csv", name)
        print("\n" + text, flush=True)
        print(f"{name}: {len(rows)} rows in {time.perf_counter() - start:.0f}s; wrote {args.out}/quality_{name}.md and .csv", flush=True)


if __name__ == "__main__":
    main()
