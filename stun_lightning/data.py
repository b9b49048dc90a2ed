"""Calibration and evaluation text: read files, tokenize, cut into blocks.

Why its own module: every pruning method (Wanda, SparseGPT, expert pruning
by reconstruction loss) needs the same thing, a [n_samples, seq_len] tensor of
real token windows, and evaluation needs the same token stream. Sources are
local files (the shipped ``assets/calibration.txt`` by default, so nothing
needs a network) or a Hugging Face hub dataset through ``load_hub_dataset``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
TEXT_SUFFIXES = (".txt", ".jsonl")
_FORMATS = "a .txt file (whole text), a .jsonl file (a 'text' field, or all string fields of a row joined), or a directory of those"


def calibration_path() -> Path:
    """The shipped calibration text: a mix of prose, GSM8K train and Python code (train splits)."""
    return ASSETS_DIR / "calibration.txt"


def heldout_path() -> Path:
    """The shipped held-out text for perplexity (WikiText-2 test, GSM8K test, Python stdlib test)."""
    return ASSETS_DIR / "heldout.txt"


def read_texts(path: str | Path | None = None) -> list[str]:
    """Documents of a .txt / .jsonl file or a directory of them (sorted, recursive).

    A .txt file is one document. A .jsonl row is one document: its "text" field
    if it has one, else all its string fields joined by newlines in file order
    (GSM8K: question, then answer). ``path=None`` reads the shipped calibration text.
    """
    path = calibration_path() if path is None else Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no calibration/eval text at {path}; pass {_FORMATS}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"directory {path} holds no {'/'.join(TEXT_SUFFIXES)} files; pass {_FORMATS}")
        return [doc for f in files for doc in read_texts(f)]
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    raise ValueError(f"unsupported text file {path} (suffix {path.suffix!r}); pass {_FORMATS}")


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno} is not a JSON object; each .jsonl line must be one")
            if isinstance(row.get("text"), str):
                docs.append(row["text"])
                continue
            fields = [v for v in row.values() if isinstance(v, str)]
            if not fields:
                raise ValueError(f"{path}:{lineno} has no string field; give each row a 'text' field")
            docs.append("\n".join(fields))
    return docs


def load_hub_dataset(
    name: str,
    split: str = "train",
    text_field: str | Sequence[str] = "text",
    n_docs: int | None = None,
    subset: str | None = None,
    **load_kwargs,
) -> list[str]:
    """Documents of a ``datasets.load_dataset`` dataset (hub name, or "json"/"text" with data_files).

    ``text_field`` may be several fields, joined by newlines per row (e.g.
    ``("question", "answer")`` for gsm8k). ``n_docs`` keeps the first rows only;
    with ``streaming=True`` only those rows are downloaded. ``subset`` is
    load_dataset's ``name`` (e.g. "main" for gsm8k, "en" for allenai/c4);
    other keyword arguments (data_files, streaming, revision...) go to it unchanged.
    """
    import datasets  # heavy import, only for hub data

    ds = datasets.load_dataset(name, subset, split=split, **load_kwargs)
    fields = [text_field] if isinstance(text_field, str) else list(text_field)
    columns = ds.column_names if ds.column_names is not None else list(next(iter(ds)).keys())
    missing = [f for f in fields if f not in columns]
    if missing:
        raise KeyError(
            f"dataset {name!r} split {split!r} has no field(s) {missing}; its fields are {columns}: pass text_field="
        )
    docs = []
    for row in ds:
        if n_docs is not None and len(docs) >= n_docs:
            break
        docs.append("\n".join(str(row[f]) for f in fields))
    return docs


def token_stream(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """All documents tokenized and concatenated with eos between them, as a 1-D LongTensor.

    eos marks the document boundary so windows that straddle two documents
    still look like pretraining data.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token to separate documents; set tokenizer.eos_token first")
    # verbose=False: the stream is longer than model_max_length on purpose; it is cut into windows later.
    encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    ids: list[int] = []
    for i, doc in enumerate(encoded):
        if i:
            ids.append(tokenizer.eos_token_id)
        ids.extend(doc)
    return torch.tensor(ids, dtype=torch.long)


def calibration_blocks(
    tokenizer,
    path: str | Path | None = None,
    n_samples: int = 128,
    seq_len: int = 256,
    seed: int = 0,
    texts: Sequence[str] | None = None,
) -> torch.Tensor:
    """``n_samples`` random windows of ``seq_len`` tokens, as a [n_samples, seq_len] LongTensor.

    As Wanda/SparseGPT sample C4: uniform random start positions in the token
    stream (seeded, independent of the global RNG); windows may overlap when
    the text is short. ``texts`` (e.g. from ``load_hub_dataset``) replaces ``path``.
    """
    if texts is not None and path is not None:
        raise ValueError("pass either path= or texts=, not both")
    if n_samples < 1 or seq_len < 1:
        raise ValueError(f"n_samples and seq_len must be >= 1, got {n_samples} and {seq_len}")
    source = "texts" if texts is not None else str(calibration_path() if path is None else path)
    ids = token_stream(tokenizer, read_texts(path) if texts is None else texts)
    if len(ids) < seq_len:
        raise ValueError(
            f"{source} has {len(ids)} tokens, fewer than seq_len={seq_len}; "
            f"lower seq_len to at most {len(ids)} or pass more text"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len + 1, (n_samples,), generator=generator)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
