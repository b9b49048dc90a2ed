"""``StunDataModule``: text for pruning during training, tokenized with the model's tokenizer and packed
into fixed-length blocks, with separate calibration, training and validation splits.

Sources (reusing ``stun_lightning.data``): local ``.txt`` / ``.jsonl`` files or directories, or a
``datasets.load_dataset`` dataset (a hub name, or ``"text"`` / ``"json"`` with ``data_files``).
Documents are joined with eos into one token stream and cut into consecutive ``seq_len`` blocks
(the tail shorter than a block is dropped). Splits:

* validation: ``val`` files or ``val_split`` of the dataset; otherwise the last ``val_fraction`` of
  the training stream, never seen in training;
* calibration (for expert methods that need a routing pass): ``calibration`` files; otherwise the
  first ``calibration_fraction`` of the training stream, also held out from training;
  ``calibration_ids()`` draws ``calibration_samples`` seeded random windows from it, as the one-shot
  pipeline samples its calibration text;
* training: the rest, reshuffled every epoch from ``seed + epoch``, so a resumed fit sees the
  same order as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from stun_lightning.data import calibration_path, load_hub_dataset, read_texts, token_stream


class BlockDataset(Dataset):
    """Rows of a ``[N, L]`` token tensor as ``{"input_ids": [L]}`` (labels are the inputs, shifted by the model)."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i]}


class EpochSeededSampler(Sampler[int]):
    """A permutation drawn from ``seed + epoch``: Lightning calls ``set_epoch`` every epoch."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=gen).tolist())

    def __len__(self) -> int:
        return self.n


def pack_blocks(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    n = ids.numel() // seq_len
    return ids[: n * seq_len].reshape(n, seq_len)


class StunDataModule(LightningDataModule):
    """Packed language-modelling blocks for fine-tuning a pruned MoE model.

    Args:
        train: training text (.txt / .jsonl / directory, or a list of them, read in order); default the
            package's shipped calibration text. Ignored when ``dataset`` is set.
        val / calibration: their own files (see the module docstring for the defaults).
        dataset: ``datasets.load_dataset`` path or name (``"text"``, ``"json"``, ``"allenai/c4"``...);
            ``data_files``, ``subset`` (load_dataset's ``name``), ``text_field`` (one field or several
            joined), ``train_split`` / ``val_split``, ``max_docs`` and ``load_kwargs`` go to it.
        tokenizer: ``from_pretrained`` path of the model's tokenizer; None = the shipped tokenizer
            of the tiny models.
        seq_len / batch_size / num_workers: blocks and loaders.
        max_train_blocks / max_val_blocks: keep only the first blocks of a split (quick runs).
    """

    def __init__(
        self,
        train: str | list[str] | None = None,
        val: str | None = None,
        calibration: str | None = None,
        dataset: str | None = None,
        data_files: Any = None,
        subset: str | None = None,
        text_field: str | list[str] = "text",
        train_split: str = "train",
        val_split: str | None = None,
        max_docs: int | None = None,
        load_kwargs: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        seq_len: int = 256,
        batch_size: int = 8,
        val_fraction: float = 0.1,
        calibration_fraction: float = 0.1,
        calibration_samples: int = 128,
        max_train_blocks: int | None = None,
        max_val_blocks: int | None = None,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("val_fraction", val_fraction), ("calibration_fraction", calibration_fraction)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if seq_len < 2 or batch_size < 1:
            raise ValueError(f"seq_len must be >= 2 and batch_size >= 1, got {seq_len} and {batch_size}")
        self.save_hyperparameters()
        self.train_path, self.val_path, self.calibration_path = train, val, calibration
        self.dataset, self.data_files, self.subset, self.text_field = dataset, data_files, subset, text_field
        self.train_split, self.val_split, self.max_docs = train_split, val_split, max_docs
        self.load_kwargs = dict(load_kwargs or {})
        self.tokenizer_path = tokenizer
        self.seq_len, self.batch_size, self.num_workers = seq_len, batch_size, num_workers
        self.val_fraction, self.calibration_fraction = val_fraction, calibration_fraction
        self.calibration_samples = calibration_samples
        self.max_train_blocks, self.max_val_blocks = max_train_blocks, max_val_blocks
        self.shuffle, self.seed = shuffle, seed
        self._tokenizer = None
        self.train_blocks: torch.Tensor | None = None
        self.val_blocks: torch.Tensor | None = None
        self.calibration_stream: torch.Tensor | None = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from stun_lightning.tiny import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    def _docs(self, split: str | None, path: str | list[str] | None) -> list[str]:
        if self.dataset is not None:
            kwargs = dict(self.load_kwargs)
            if self.data_files is not None:
                kwargs["data_files"] = self.data_files
            return load_hub_dataset(
                self.dataset,
                split=split,
                text_field=self.text_field,
                n_docs=self.max_docs,
                subset=self.subset,
                **kwargs,
            )
        if isinstance(path, (list, tuple)):
            return [doc for one in path for doc in read_texts(one)]
        return read_texts(path if path is not None else calibration_path())

    def setup(self, stage: str | None = None) -> None:
        if self.train_blocks is not None:
            return
        stream = token_stream(self.tokenizer, self._docs(self.train_split, self.train_path))
        n = stream.numel()
        cal_end = int(n * self.calibration_fraction) if self.calibration_path is None else 0
        own_val = self.val_path is not None or (self.dataset is not None and self.val_split is not None)
        val_start = n - int(n * self.val_fraction) if not own_val else n
        if self.calibration_path is not None:
            self.calibration_stream = token_stream(self.tokenizer, read_texts(self.calibration_path))
        else:
            self.calibration_stream = stream[:cal_end]
        if own_val:
            val_docs = read_texts(self.val_path) if self.val_path is not None else self._docs(self.val_split, None)
            val_stream = token_stream(self.tokenizer, val_docs)
        else:
            val_stream = stream[val_start:]
        self.train_blocks = pack_blocks(stream[cal_end:val_start], self.seq_len)[: self.max_train_blocks]
        self.val_blocks = pack_blocks(val_stream, self.seq_len)[: self.max_val_blocks]
        if len(self.train_blocks) == 0:
            raise ValueError(
                f"the training split has {val_start - cal_end} tokens, fewer than one block of seq_len={self.seq_len}; "
                "lower seq_len or pass more text"
            )

    def calibration_ids(self) -> torch.Tensor:
        """``calibration_samples`` seeded random ``seq_len`` windows of the calibration split ``[N, L]``."""
        self.setup()
        ids = self.calibration_stream
        if ids is None or ids.numel() < self.seq_len:
            have = 0 if ids is None else ids.numel()
            raise ValueError(
                f"the calibration split has {have} tokens, fewer than seq_len={self.seq_len}: pass calibration= files "
                "or raise calibration_fraction"
            )
        gen = torch.Generator().manual_seed(self.seed)
        starts = torch.randint(0, ids.numel() - self.seq_len + 1, (self.calibration_samples,), generator=gen)
        return torch.stack([ids[s : s + self.seq_len] for s in starts.tolist()])

    def train_dataloader(self) -> DataLoader:
        ds = BlockDataset(self.train_blocks)
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=EpochSeededSampler(len(ds), self.seed, self.shuffle),
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        if self.val_blocks is None or len(self.val_blocks) == 0:
            raise ValueError(
                f"the validation split has no block of seq_len={self.seq_len}: pass val= files or raise val_fraction"
            )
        return DataLoader(BlockDataset(self.val_blocks), batch_size=self.batch_size, num_workers=self.num_workers)


__all__ = ["BlockDataset", "EpochSeededSampler", "StunDataModule", "pack_blocks"]
