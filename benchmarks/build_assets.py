"""Build the data and tokenizer shipped in ``stun_lightning/assets/``.

Why a script: the shipped files are derived from the real public text in
the data folder (``--data`` or ``$STUN_DATA``; see its SOURCES.md), and anyone must be able to check
and rebuild them byte for byte.  Everything here is deterministic: fixed seeds,
sorted inputs, no network.

    python -m benchmarks.build_assets --data DIR [--out stun_lightning/assets]

Writes
- ``calibration.txt``: ~200 KB slice of the TRAIN mix (prose, GSM8K train,
  Python stdlib train), interleaved in ~1.5 KB chunks so that any prefix of a
  few KB already holds all three domains (calibration that reads only the
  first N tokens must not see only one domain).
- ``heldout.txt``: ~60 KB slice of the HELD-OUT splits (WikiText-2 test,
  GSM8K test, Python stdlib test), same interleaving, for perplexity.
- ``tokenizer/``: byte-level BPE (8192 entries, ``<|endoftext|>`` as
  bos/eos/pad) trained on a subsample of the train mix, saved with
  ``PreTrainedTokenizerFast.save_pretrained``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.data_folder import add_data_argument, require_data

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "stun_lightning" / "assets"

EOT = "<|endoftext|>"
VOCAB_SIZE = 8192
CHUNK_BYTES = 1500  # one interleaving chunk; a few hundred tokens
CHUNK_SEPARATOR = "\n\n"
SEED = 0


# ---------------------------------------------------------------- units
# Each source is cut into natural units (a speech, a paragraph, a problem, a
# block of code between blank lines) so chunks never start or end mid-sentence.


def shakespeare_units(path: Path) -> list[str]:
    return [u.strip("\n") for u in path.read_text(encoding="utf-8").split("\n\n") if u.strip()]


def wikitext_units(path: Path) -> list[str]:
    # One paragraph or heading per line; lines are " text \n" in the tokenised form.
    return [line.strip() for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def gsm8k_units(path: Path) -> list[str]:
    units = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            units.append(f"Question: {row['question']}\nAnswer: {row['answer']}")
    return units


def python_units(path: Path) -> list[str]:
    return [u.strip("\n") for u in path.read_text(encoding="utf-8").split("\n\n") if u.strip()]


# ---------------------------------------------------------------- chunks


def sample_chunks(units: list[str], n_chunks: int, rng: random.Random, joiner: str) -> list[str]:
    """``n_chunks`` non-overlapping runs of consecutive units, each >= CHUNK_BYTES.

    One run per equal stratum of the source, starting at a seeded offset in the
    stratum's first half, so the slice covers the whole source (not just its
    first pages) and runs cannot overlap.
    """
    stratum = len(units) // n_chunks
    chunks = []
    for k in range(n_chunks):
        i = k * stratum + rng.randrange(max(1, stratum // 2))
        end = (k + 1) * stratum
        parts, size = [], 0
        while size < CHUNK_BYTES and i < end:
            parts.append(units[i])
            size += len(units[i].encode("utf-8")) + len(joiner)
            i += 1
        chunk = joiner.join(parts)
        # A single huge unit (a long docstring, a long paragraph) is cut at a line end.
        if len(chunk.encode("utf-8")) > 2 * CHUNK_BYTES:
            cut = chunk.rfind("\n", 0, 2 * CHUNK_BYTES)
            chunk = chunk[: cut if cut > 0 else 2 * CHUNK_BYTES]
        chunks.append(chunk)
    return chunks


@dataclass
class Domain:
    name: str
    chunks: list[str]


def interleave(domains: list[Domain]) -> str:
    """Round-robin over domains: chunk 0 of each, then chunk 1 of each, ..."""
    n = max(len(d.chunks) for d in domains)
    out = []
    for i in range(n):
        for d in domains:
            if i < len(d.chunks):
                out.append(d.chunks[i])
    return CHUNK_SEPARATOR.join(out) + "\n"


def build_calibration(data: Path, rounds: int = 38) -> str:
    rng = random.Random(SEED)
    # Prose alternates Shakespeare and WikiText so each round has one prose chunk.
    shakespeare = sample_chunks(shakespeare_units(data / "tinyshakespeare/input.txt"), rounds // 2, rng, "\n\n")
    wiki = sample_chunks(wikitext_units(data / "wikitext2/valid.txt"), rounds - rounds // 2, rng, "\n")
    prose = [c for pair in zip(wiki, shakespeare) for c in pair] + wiki[len(shakespeare) :]
    math = sample_chunks(gsm8k_units(data / "gsm8k/train.jsonl"), rounds, rng, "\n\n")
    code = sample_chunks(python_units(data / "python_stdlib/train.txt"), rounds, rng, "\n\n")
    return interleave([Domain("prose", prose), Domain("math", math), Domain("code", code)])


def build_heldout(data: Path, rounds: int = 11) -> str:
    rng = random.Random(SEED + 1)
    prose = sample_chunks(wikitext_units(data / "wikitext2/test.txt"), rounds, rng, "\n")
    math = sample_chunks(gsm8k_units(data / "gsm8k/test.jsonl"), rounds, rng, "\n\n")
    code = sample_chunks(python_units(data / "python_stdlib/test.txt"), rounds, rng, "\n\n")
    return interleave([Domain("prose", prose), Domain("math", math), Domain("code", code)])


# ---------------------------------------------------------------- tokenizer


def tokenizer_corpus(data: Path, code_bytes: int = 3_000_000, math_bytes: int = 2_000_000) -> list[str]:
    """Train texts for BPE: all of the prose, a subsample of math and code.

    Subsampled so training takes seconds and no domain dominates the merges:
    ~1.1 MB Shakespeare, ~1.1 MB WikiText valid, ~2 MB GSM8K train, ~3 MB code.
    """
    texts = shakespeare_units(data / "tinyshakespeare/input.txt")
    texts += wikitext_units(data / "wikitext2/valid.txt")
    math = gsm8k_units(data / "gsm8k/train.jsonl")
    texts += take_bytes(math, math_bytes)
    code = python_units(data / "python_stdlib/train.txt")
    # Every other block, so the whole stdlib is represented rather than its first modules.
    texts += take_bytes(code[::2], code_bytes)
    return texts


def take_bytes(units: list[str], budget: int) -> list[str]:
    out, size = [], 0
    for u in units:
        if size >= budget:
            break
        out.append(u)
        size += len(u.encode("utf-8"))
    return out


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Byte-level: every byte is in the base alphabet, so no text ever maps to unk.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        pad_token=EOT,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,  # decode must give back the exact text
    )


# ---------------------------------------------------------------- main


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_argument(parser, "every output")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--skip-tokenizer", action="store_true")
    args = parser.parse_args(argv)
    require_data(args.data, "building the assets")

    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in (("calibration.txt", build_calibration(args.data)), ("heldout.txt", build_heldout(args.data))):
        path = args.out / name
        path.write_text(text, encoding="utf-8")
        print(f"{path}: {path.stat().st_size} bytes, sha256 {sha256(path)[:16]}")

    if not args.skip_tokenizer:
        t0 = time.perf_counter()
        tokenizer = train_tokenizer(tokenizer_corpus(args.data))
        out = args.out / "tokenizer"
        tokenizer.save_pretrained(out)
        size = sum(p.stat().st_size for p in out.iterdir())
        print(f"{out}: vocab {len(tokenizer)}, {size} bytes, trained in {time.perf_counter() - t0:.1f}s")
        for p in sorted(out.iterdir()):
            print(f"  {p.name}: sha256 {sha256(p)[:16]}")


if __name__ == "__main__":
    main()
