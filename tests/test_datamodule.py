"""StunDataModule: local files and ``datasets.load_dataset`` offline, packed into disjoint
calibration, training and validation blocks with the shipped tokenizer."""

import json

import pytest
import torch

from stun_lightning.callbacks import StunDataModule
from stun_lightning.data import read_texts, token_stream
from stun_lightning.tiny import load_tokenizer


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


PROSE = [
    f"Document {i}: the router sends each token to two of eight experts, and pruning removes some." for i in range(40)
]


def test_datamodule_splits_local_files_into_disjoint_packed_blocks(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in PROSE])
    dm = StunDataModule(
        train=str(train), seq_len=16, batch_size=4, val_fraction=0.2, calibration_fraction=0.1, calibration_samples=3
    )
    dm.setup()
    stream = token_stream(load_tokenizer(), PROSE)
    n = stream.numel()
    cal_end, val_start = int(n * 0.1), n - int(n * 0.2)
    assert torch.equal(dm.calibration_stream, stream[:cal_end])
    assert torch.equal(dm.train_blocks.flatten(), stream[cal_end : cal_end + dm.train_blocks.numel()])
    assert torch.equal(dm.val_blocks.flatten(), stream[val_start : val_start + dm.val_blocks.numel()])
    cal = dm.calibration_ids()
    assert cal.shape == (3, 16) and torch.equal(cal, dm.calibration_ids())  # seeded
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 16)
    # separate validation file: the whole training stream (less calibration) trains
    val = tmp_path / "val.txt"
    val.write_text(PROSE[0] * 4, encoding="utf-8")
    dm2 = StunDataModule(train=str(train), val=str(val), seq_len=16, calibration_fraction=0.0)
    dm2.setup()
    assert dm2.train_blocks.numel() == (n // 16) * 16
    assert torch.equal(dm2.val_blocks.flatten()[:8], token_stream(load_tokenizer(), read_texts(val))[:8])


def test_datamodule_reads_a_list_of_training_files_in_order(tmp_path):
    """A train mix of several files (a .jsonl and a .txt): their documents in the order given."""
    code = tmp_path / "code.txt"
    code.write_text("def route(tokens):\n    return sorted(tokens)\n" * 8, encoding="utf-8")
    prose = write_jsonl(tmp_path / "prose.jsonl", [{"text": t} for t in PROSE[:10]])
    dm = StunDataModule(train=[str(code), str(prose)], seq_len=8, val_fraction=0.0, calibration_fraction=0.0)
    dm.setup()
    stream = token_stream(load_tokenizer(), read_texts(code) + PROSE[:10])
    assert torch.equal(dm.train_blocks.flatten(), stream[: dm.train_blocks.numel()])
    assert dm.train_blocks.numel() == stream.numel() // 8 * 8


@pytest.mark.parametrize("loader", ["json", "text"])
def test_datamodule_through_load_dataset_offline(tmp_path, loader):
    if loader == "json":
        files = {
            "train": str(write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in PROSE[:30]])),
            "validation": str(write_jsonl(tmp_path / "v.jsonl", [{"text": t} for t in PROSE[30:]])),
        }
    else:
        (tmp_path / "t.txt").write_text("\n".join(PROSE[:30]), encoding="utf-8")
        (tmp_path / "v.txt").write_text("\n".join(PROSE[30:]), encoding="utf-8")
        files = {"train": str(tmp_path / "t.txt"), "validation": str(tmp_path / "v.txt")}
    dm = StunDataModule(
        dataset=loader,
        data_files=files,
        val_split="validation",
        seq_len=16,
        calibration_fraction=0.0,
        load_kwargs={"cache_dir": str(tmp_path / "cache")},
    )
    dm.setup()
    # one row per line / per JSON object, each row one document
    expected_train = token_stream(load_tokenizer(), PROSE[:30])
    expected_val = token_stream(load_tokenizer(), PROSE[30:])
    assert torch.equal(dm.train_blocks.flatten(), expected_train[: dm.train_blocks.numel()])
    assert torch.equal(dm.val_blocks.flatten(), expected_val[: dm.val_blocks.numel()])
