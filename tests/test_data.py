import json

import pytest
import torch

from stun_lightning.data import (
    calibration_blocks,
    calibration_path,
    heldout_path,
    load_hub_dataset,
    read_texts,
    token_stream,
)
from stun_lightning.tiny import load_tokenizer

GSM = [
    {"question": "Ann has 3 cats. She gets 2 more. How many cats?", "answer": "3+2=<<3+2=5>>5\n#### 5"},
    {"question": "A box holds 4 pens. How many pens in 3 boxes?", "answer": "4*3=<<4*3=12>>12\n#### 12"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_read_txt_is_one_document(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("line one\n\nline two\n", encoding="utf-8")
    assert read_texts(f) == ["line one\n\nline two\n"]
    assert read_texts(str(f)) == ["line one\n\nline two\n"]


def test_read_jsonl_joins_gsm8k_fields_and_prefers_text(tmp_path):
    gsm = write_jsonl(tmp_path / "gsm.jsonl", GSM)
    assert read_texts(gsm) == [f"{r['question']}\n{r['answer']}" for r in GSM]
    texts = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello", "meta": "ignored", "n": 3}, {"id": 1, "text": "bye"}])
    assert read_texts(texts) == ["hello", "bye"]


def test_read_jsonl_rejects_rows_without_text(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"n": 1}])
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_texts(bad)


def test_read_directory_sorted_recursive_and_filtered(tmp_path):
    (tmp_path / "b.txt").write_text("B", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("C", encoding="utf-8")
    write_jsonl(tmp_path / "a.jsonl", [{"text": "A1"}, {"text": "A2"}])
    (tmp_path / "notes.md").write_text("skip me", encoding="utf-8")
    assert read_texts(tmp_path) == ["A1", "A2", "B", "C"]


def test_missing_path_names_path_and_formats(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError) as err:
        read_texts(missing)
    assert str(missing) in str(err.value) and ".jsonl" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .txt/.jsonl files"):
        read_texts(tmp_path / "empty")
    (tmp_path / "x.csv").write_text("a,b", encoding="utf-8")
    with pytest.raises(ValueError, match=r"\.txt"):
        read_texts(tmp_path / "x.csv")


def test_shipped_texts_mix_three_domains_from_the_first_kilobytes():
    calib = read_texts()
    assert calib == read_texts(calibration_path())
    text = calib[0]
    assert 150_000 <= len(text.encode()) <= 250_000
    head = text[:6000]
    assert "####" in head  # GSM8K answer
    assert "def " in head or "import " in head or "self." in head  # Python
    assert " the " in head  # English prose
    held = read_texts(heldout_path())[0]
    assert 40_000 <= len(held.encode()) <= 80_000
    assert "####" in held[:6000]
    # Held-out is disjoint from calibration: no held-out paragraph appears in the calibration text.
    paragraphs = [p for p in held.split("\n") if len(p) > 200]
    assert paragraphs and not any(p in text for p in paragraphs)


def test_token_stream_puts_eos_between_documents(tokenizer):
    a, b = (
        tokenizer("one two", add_special_tokens=False)["input_ids"],
        tokenizer("three", add_special_tokens=False)["input_ids"],
    )
    assert token_stream(tokenizer, ["one two", "three"]).tolist() == a + [tokenizer.eos_token_id] + b


def test_blocks_shape_seed_and_contiguity(tokenizer, tmp_path):
    blocks = calibration_blocks(tokenizer, n_samples=16, seq_len=64, seed=0)
    assert blocks.shape == (16, 64) and blocks.dtype == torch.long
    assert torch.equal(blocks, calibration_blocks(tokenizer, n_samples=16, seq_len=64, seed=0))
    assert not torch.equal(blocks, calibration_blocks(tokenizer, n_samples=16, seq_len=64, seed=1))
    # Windows are real contiguous slices of the token stream (not shuffled tokens).
    stream = token_stream(tokenizer, read_texts())
    windows = stream.unfold(0, 64, 1)
    for row in blocks[:4]:
        assert (windows == row).all(dim=1).any()
    # Global RNG is not the source of randomness.
    torch.manual_seed(0)
    x = calibration_blocks(tokenizer, n_samples=4, seq_len=32, seed=3)
    torch.manual_seed(99)
    assert torch.equal(x, calibration_blocks(tokenizer, n_samples=4, seq_len=32, seed=3))


def test_blocks_from_jsonl_and_texts(tokenizer, tmp_path):
    gsm = write_jsonl(tmp_path / "gsm.jsonl", GSM * 20)
    blocks = calibration_blocks(tokenizer, gsm, n_samples=3, seq_len=32)
    assert blocks.shape == (3, 32)
    texts = read_texts(gsm)
    assert torch.equal(blocks, calibration_blocks(tokenizer, texts=texts, n_samples=3, seq_len=32))
    with pytest.raises(ValueError, match="either path= or texts="):
        calibration_blocks(tokenizer, gsm, texts=texts)


def test_too_short_text_says_how_many_tokens_and_what_to_lower(tokenizer, tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("only a few words here", encoding="utf-8")
    n = len(tokenizer("only a few words here")["input_ids"])
    with pytest.raises(ValueError, match=rf"has {n} tokens.*lower seq_len"):
        calibration_blocks(tokenizer, f, n_samples=2, seq_len=64)
    assert calibration_blocks(tokenizer, f, n_samples=2, seq_len=n).shape == (2, n)


def test_load_hub_dataset_through_local_json_and_text_builders(tmp_path):
    gsm = write_jsonl(tmp_path / "gsm.jsonl", GSM)
    cache = str(tmp_path / "cache")
    docs = load_hub_dataset("json", text_field=("question", "answer"), data_files=str(gsm), cache_dir=cache)
    assert docs == read_texts(gsm)
    assert load_hub_dataset("json", text_field="question", n_docs=1, data_files=str(gsm), cache_dir=cache) == [
        GSM[0]["question"]
    ]
    with pytest.raises(KeyError, match="question"):
        load_hub_dataset("json", text_field="text", data_files=str(gsm), cache_dir=cache)
    txt = tmp_path / "lines.txt"
    txt.write_text("first line\nsecond line\n", encoding="utf-8")
    assert load_hub_dataset("text", data_files=str(txt), cache_dir=cache) == ["first line", "second line"]
