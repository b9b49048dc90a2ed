"""Build the lm-eval task data shipped in stun_lightning/assets/tasks/ from /work/shared/data.

    python scripts/build_eval_tasks.py [SHARED_DATA_DIR]

* stun_gsm8k.jsonl: the first 100 problems of GSM8K test, unchanged.
* stun_wikitext2.jsonl: the articles under 16,000 characters among the first 12 of WikiText-2
  test (tokenised form), one {"page": ...} each.
* stun_cloze.jsonl: 100 four-way cloze items from WikiText-2 test sentences (of the articles after
  those above): the first 10 words are the context, the true next 6 words are the answer, the
  distractors are the 6 words after the 10th of three other sentences (seeded choice).
"""

import json
import random
import re
import sys
from pathlib import Path

SHARED = Path(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data")
OUT = Path(__file__).resolve().parents[1] / "stun_lightning" / "assets" / "tasks"


def articles(text: str) -> list[str]:
    """WikiText articles: split at top-level ' = Title = ' headings, as EleutherAI/wikitext_document_level does."""
    docs: list[list[str]] = []
    for line in text.splitlines(keepends=True):
        if re.fullmatch(r" = [^=].* = \n", line) or not docs:
            docs.append([])
        docs[-1].append(line)
    return ["".join(d).strip("\n") + "\n" for d in docs if "".join(d).strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    gsm = (SHARED / "gsm8k" / "test.jsonl").read_text().splitlines()[:100]
    (OUT / "stun_gsm8k.jsonl").write_text("\n".join(gsm) + "\n")

    docs = articles((SHARED / "wikitext2" / "test.txt").read_text())
    write_jsonl(OUT / "stun_wikitext2.jsonl", [{"page": d} for d in docs[:12] if len(d) < 16000])

    sentences = []
    for doc in docs[12:]:
        for line in doc.splitlines():
            if line.strip().startswith("="):
                continue
            for s in re.split(r"(?<= \.) ", line.strip()):
                words = s.split()
                if len(words) >= 16 and "<unk>" not in words[:16]:
                    sentences.append(words)
    rng = random.Random(0)
    rng.shuffle(sentences)
    items = []
    pool = sentences[100:]
    for i, words in enumerate(sentences[:100]):
        wrong = [" ".join(w[10:16]) for w in rng.sample(pool, 3)]
        choices = wrong + [" ".join(words[10:16])]
        rng.shuffle(choices)
        items.append(
            {"context": " ".join(words[:10]), "choices": choices, "label": choices.index(" ".join(words[10:16]))}
        )
    write_jsonl(OUT / "stun_cloze.jsonl", items)
    for f in sorted(OUT.glob("*.jsonl")):
        print(f.name, f.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
