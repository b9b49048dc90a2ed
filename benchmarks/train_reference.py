"""Train the reference MoE language models from scratch on real text.

Why: pruning quality can only be judged on trained weights, and no pretrained MoE can be
downloaded here. These models use transformers' own MoE classes (Mixtral, Qwen3-MoE), the
tokenizer shipped in ``stun_lightning/assets/tokenizer`` (byte-level BPE, 8192 entries, trained on
the same train mix by ``benchmarks/build_assets.py``), and the train mix of the shared data folder
(SOURCES.md): prose (Tiny Shakespeare + WikiText-2 valid), math (GSM8K train), code (Python stdlib
train). Held out, for every figure: WikiText-2 test, GSM8K test, Python stdlib test.

Presets (``--model``):
* ``mixtral_8x2``: Mixtral-style, 8 experts top-2, 4 layers, hidden 128, 4.4 M parameters.
* ``qwen3_moe_32x4``: fine-grained Qwen3-MoE-style, 32 experts top-4, 6 layers, hidden 192, 12.8 M.
* ``mixtral_8x2_upcycled`` (12.8 M, 6 layers, hidden 192) and ``mixtral_8x2_upcycled_small`` (the
  shape of ``mixtral_8x2``; the shipped model): a dense model (Mixtral with one expert, top-1)
  trained first, its FFN copied into 8 experts plus small noise, a fresh router, then trained on as
  an MoE (sparse upcycling, Komatsuzaki et al. 2023).

Training: plain PyTorch loop, AdamW (0.9, 0.95), weight decay 0.1, linear warm-up then cosine to
10% of the peak, gradient clipping 1.0, bf16 autocast on CUDA, fp32 master weights, and the
Switch-Transformer load-balancing loss (``router_aux_loss_coef`` x the loss) so all experts are used.
Deviation from transformers' own ``load_balancing_loss_func``: we compute it per layer and average
over layers. transformers sums expert counts and router probabilities over all layers before
multiplying, which only balances each expert index summed over layers: our first models trained
with it had dead experts (two of eight in one Mixtral layer never routed to; an upcycled model
sent every token of layer 0 to the same two experts), cancelled by other layers' imbalance.
Windows of ``seq_len`` tokens are drawn uniformly from the concatenated train streams (so each
domain appears in proportion to its size). ``--time-budget`` makes a run fit a time limit: after
the first ``PROBE`` steps (inside the warm-up, where the schedule does not yet depend on the step
count) the step count is lowered if needed and recorded, so ``--steps <recorded>`` repeats the run.

Output (``--out DIR``): ``model/`` (save_pretrained, bf16 safetensors, with the shipped tokenizer) and ``figures.json``: the
config, steps, seconds, held-out perplexity and next-token accuracy per domain (of the saved bf16
weights, reloaded in fp32), routing frequencies per domain and layer, and total-variation distances
between the domains' routing distributions (with the same distance between two halves of one
domain as the noise floor).

    python -m benchmarks.train_reference --prepare --data DIR --cache out/data/tokens.pt   # tokenize once (CPU)
    python -m benchmarks.train_reference --model mixtral_8x2_upcycled_small --cache out/data/tokens.pt \
        --out out/reference/mixtral_8x2_upcycled_small --time-budget 240       # the shipped model (GPU)

Figures and commands of the trained models: ``benchmarks/REFERENCE.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

from benchmarks.data_folder import add_data_argument, require_data
from benchmarks.reference_figures import quality_figures, reload_fp32, routing_figures
from benchmarks.reference_training import train_phase
from stun_lightning.data import read_texts, token_stream
from stun_lightning.tiny import load_tokenizer, tiny_config

# domain -> (train files, held-out file), paths inside the shared data folder
DOMAINS = {
    "prose": (["tinyshakespeare/input.txt", "wikitext2/valid.txt"], "wikitext2/test.txt"),
    "math": (["gsm8k/train.jsonl"], "gsm8k/test.jsonl"),
    "code": (["python_stdlib/train.txt"], "python_stdlib/test.txt"),
}


@dataclass
class Preset:
    family: str
    config: dict
    steps: int
    lr: float
    batch_size: int = 32
    seq_len: int = 512
    warmup: int = 200
    aux_coef: float = 0.01
    dense_steps: int = 0  # > 0: upcycle from a dense model trained this many steps
    upcycle_noise: float = 0.01  # expert copy = dense weight + noise * std(dense weight) * N(0, 1)


_SMALL = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
_MEDIUM = dict(hidden_size=192, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2, head_dim=32)
PRESETS = {
    "mixtral_8x2": Preset(
        "mixtral", dict(_SMALL, num_local_experts=8, num_experts_per_tok=2, intermediate_size=256), steps=2500, lr=3e-3
    ),
    "qwen3_moe_32x4": Preset(
        "qwen3_moe",
        dict(
            _MEDIUM,
            num_experts=32,
            num_experts_per_tok=4,
            moe_intermediate_size=96,
            intermediate_size=384,
            norm_topk_prob=True,
        ),
        steps=2500,
        lr=2e-3,
    ),
    "mixtral_8x2_large": Preset(  # Mixtral-like (8 experts top-2) at ~37 M parameters, from scratch
        "mixtral",
        dict(
            hidden_size=384,
            num_hidden_layers=6,
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=64,
            num_local_experts=8,
            num_experts_per_tok=2,
            intermediate_size=512,
        ),
        steps=2500,
        lr=2e-3,
    ),
    "qwen3_moe_64x8": Preset(  # fine-grained, from scratch (Qwen3-30B-A3B / OLMoE-like routing: 64 experts, top-8)
        "qwen3_moe",
        dict(
            hidden_size=256,
            num_hidden_layers=6,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=32,
            num_experts=64,
            num_experts_per_tok=8,
            moe_intermediate_size=128,
            intermediate_size=512,
            norm_topk_prob=True,
        ),
        steps=2500,
        lr=2e-3,
    ),
    "mixtral_8x2_upcycled_small": Preset(
        "mixtral",
        dict(_SMALL, num_local_experts=8, num_experts_per_tok=2, intermediate_size=256),
        steps=1500,
        lr=3e-3,
        dense_steps=1000,
    ),
    "mixtral_8x2_upcycled": Preset(
        "mixtral",
        dict(_MEDIUM, num_local_experts=8, num_experts_per_tok=2, intermediate_size=384),
        steps=1500,
        lr=2e-3,
        dense_steps=1000,
    ),
}


# ---------------------------------------------------------------- data


def prepare_tokens(data: Path) -> dict:
    """Token streams per domain and split, tokenized with the shipped tokenizer (int16: vocab 8192)."""
    if not (data / "SOURCES.md").exists():
        raise FileNotFoundError(f"{data} is not the shared data folder (no SOURCES.md); pass --data")
    tokenizer = load_tokenizer()
    out = {"train": {}, "test": {}}
    for domain, (train_files, test_file) in DOMAINS.items():
        out["train"][domain] = token_stream(tokenizer, [t for f in train_files for t in read_texts(data / f)]).to(
            torch.int16
        )
        out["test"][domain] = token_stream(tokenizer, read_texts(data / test_file)).to(torch.int16)
    return out


def load_tokens(cache: Path | None, data: Path) -> dict:
    if cache is not None and cache.exists():
        return torch.load(cache)
    tokens = prepare_tokens(data)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(tokens, cache)
    return tokens


class WindowSampler:
    """Uniform random windows of the concatenated train streams (seeded, independent of torch's RNG)."""

    def __init__(self, streams: dict[str, torch.Tensor], seq_len: int, batch_size: int, seed: int):
        self.ids = torch.cat([s.long() for s in streams.values()])
        self.seq_len, self.batch_size = seq_len, batch_size
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self) -> torch.Tensor:
        starts = torch.randint(0, len(self.ids) - self.seq_len, (self.batch_size,), generator=self.gen)
        return torch.stack([self.ids[s : s + self.seq_len] for s in starts.tolist()])


# ---------------------------------------------------------------- model


def build_config(preset: Preset, experts_impl: str, **overrides):
    # router_aux_loss_coef=0: the model's own (all-layers) balancing loss stays out of out.loss; ours
    # is added per layer in train_phase, and the coefficient is written into the saved config.
    fields = dict(preset.config, tie_word_embeddings=True, router_aux_loss_coef=0.0, output_router_logits=True)
    fields.update(overrides)
    config = tiny_config(preset.family, **fields)
    config._attn_implementation = "sdpa"
    config._experts_implementation = experts_impl
    return config


def pick_experts_impl(preset: Preset, sampler: WindowSampler, device: torch.device) -> str:
    """``grouped_mm`` where it runs and agrees with ``eager`` on a training step, else ``eager``."""
    if device.type != "cuda":
        return "eager"
    losses = {}
    batch = sampler().to(device)
    for impl in ("eager", "grouped_mm"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(build_config(preset, impl)).to(device)
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            losses[impl] = float(loss)
        except Exception as exc:  # an unsupported kernel: report it and train with eager
            print(f"experts implementation {impl} failed: {type(exc).__name__}: {exc}", flush=True)
        del model
    ok = "grouped_mm" in losses and abs(losses["grouped_mm"] - losses["eager"]) < 2e-2 * abs(losses["eager"])
    print(f"probe losses {losses}: training with {'grouped_mm' if ok else 'eager'}", flush=True)
    return "grouped_mm" if ok else "eager"


@torch.no_grad()
def upcycle(dense, config, seed: int, noise_scale: float):
    """An MoE whose every expert is the dense model's FFN plus small noise; a fresh router."""
    torch.manual_seed(seed)
    moe = AutoModelForCausalLM.from_config(config).to(next(dense.parameters()).device)
    state = dense.state_dict()
    own = moe.state_dict()
    for name, tensor in own.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            w = state[name][0]
            noise = torch.randn((tensor.shape[0], *w.shape), device=w.device) * w.std() * noise_scale
            tensor.copy_(w.expand_as(tensor) + noise)
        elif not name.endswith("mlp.gate.weight"):
            tensor.copy_(state[name])
    return moe


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(PRESETS), default="mixtral_8x2")
    add_data_argument(parser, "tokenizing, unless --cache names an existing token cache")
    parser.add_argument("--cache", type=Path, default=None, help="token cache (.pt); written if missing")
    parser.add_argument("--prepare", action="store_true", help="only tokenize the data into --cache")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=None, help="MoE steps (default: the preset's)")
    parser.add_argument("--dense-steps", type=int, default=None, help="dense steps before upcycling (upcycled preset)")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds for all training; lowers steps to fit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None, help="windows per step (default: the preset's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens per domain (default: all)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    args = parser.parse_args(argv)

    if args.cache is None or not args.cache.exists():
        require_data(args.data, "tokenizing the train mix (no existing --cache)")
    tokens = load_tokens(args.cache, args.data)
    if args.prepare:
        print({s: {d: len(t) for d, t in v.items()} for s, v in tokens.items()})
        return
    if args.out is None:
        parser.error("--out is required to train")
    preset = PRESETS[args.model]
    if args.batch_size is not None:
        preset = Preset(**{**asdict(preset), "batch_size": args.batch_size})
    steps = preset.steps if args.steps is None else args.steps
    dense_steps = preset.dense_steps if args.dense_steps is None else args.dense_steps
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    start = time.perf_counter()
    deadline = None if args.time_budget is None else start + args.time_budget
    sampler = WindowSampler(tokens["train"], preset.seq_len, preset.batch_size, args.seed)
    impl = pick_experts_impl(preset, sampler, device)
    args.out.mkdir(parents=True, exist_ok=True)
    figures: dict = {
        "preset": args.model,
        "command": " ".join(["python", "-m", "benchmarks.train_reference", *(argv or sys.argv[1:])]),
    }
    phases = []

    torch.manual_seed(args.seed)
    if dense_steps:
        dense_fields = {"num_local_experts": 1, "num_experts_per_tok": 1, "output_router_logits": False}
        dense = AutoModelForCausalLM.from_config(build_config(preset, impl, **dense_fields)).to(device)
        # The dense phase gets its share of the budget in proportion to its planned steps (MoE steps cost ~1.5x).
        dense_deadline = (
            None if deadline is None else start + args.time_budget * dense_steps / (dense_steps + 1.5 * steps)
        )
        phases.append(train_phase(dense, sampler, preset, dense_steps, "dense", device, dense_deadline, args.compile))
        figures["dense_quality"] = quality_figures(dense, tokens["test"], device, args.eval_tokens)
        model = upcycle(dense, build_config(preset, impl), args.seed + 1, preset.upcycle_noise)
        del dense
    else:
        model = AutoModelForCausalLM.from_config(build_config(preset, impl)).to(device)
    phases.append(train_phase(model, sampler, preset, steps, "moe", device, deadline, args.compile))

    model.config.output_router_logits = False  # inference default for whoever loads it
    model.config.router_aux_loss_coef = preset.aux_coef  # what was used (per layer, see balance_loss)
    model.config._experts_implementation = None
    model = reload_fp32(model, args.out / "model", device)
    load_tokenizer().save_pretrained(args.out / "model")  # the directory loads anywhere a model id does
    figures.update(
        family=preset.family,
        seed=args.seed,
        preset_fields={k: v for k, v in asdict(preset).items() if k != "config"},
        config=json.loads(model.config.to_json_string()),
        parameters=sum(p.numel() for p in model.parameters()),
        expert_parameters=sum(p.numel() for n, p in model.named_parameters() if ".experts." in n),
        experts_implementation=impl,
        phases=[asdict(p) for p in phases],
        train_seconds=round(sum(p.seconds for p in phases), 1),
        train_tokens={d: len(t) for d, t in tokens["train"].items()},
        quality=quality_figures(model, tokens["test"], device, args.eval_tokens),
        routing=routing_figures(model, tokens["test"], device),
        wall_seconds=round(time.perf_counter() - start, 1),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        versions={"torch": torch.__version__, "transformers": transformers.__version__},
    )
    (args.out / "figures.json").write_text(json.dumps(figures, indent=1))
    print(json.dumps({k: figures[k] for k in ("preset", "parameters", "train_seconds", "quality")}, indent=1))
    print(
        json.dumps(figures["routing"]["tv_between_domains_mean"]),
        json.dumps(figures["routing"]["tv_within_domain_halves_mean"]),
    )


if __name__ == "__main__":
    main()
