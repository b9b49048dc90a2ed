"""``stun-lightning fit --config configs/fit_tiny.yaml``: LightningCLI over StunDistillModule + StunDataModule.

The usual LightningCLI surface: ``fit`` / ``validate`` subcommands, ``--print_config``, any
``--trainer.*`` / ``--model.*`` / ``--data.*`` override on the command line. The StunCallback goes in
``trainer.callbacks`` of the config (see ``configs/fit_*.yaml``); the data's tokenizer follows the
model (``--model.student``).

Several GPUs with FSDP2: ``--config configs/fit_tiny_fsdp.yaml --trainer.devices=N`` (or
``--trainer.strategy='{"class_path": "stun_lightning.callbacks.FSDP2Strategy"}'`` on any config). There ``--ckpt_path``
is handed to the trainer before ``fit`` (``trainer.ckpt_path``), so the StunCallback rebuilds the
checkpoint's expert sets at ``setup``, before the model is sharded.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import ModelParallelStrategy

from stun_lightning.sharding import set_nccl_env

from .datamodule import StunDataModule
from .distill_module import StunDistillModule, tokenizer_for


class StunLightningCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.student", "data.tokenizer", compute_fn=tokenizer_for)

    def fit(self, model, ckpt_path=None, **kwargs) -> None:
        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            set_nccl_env()  # before the launcher starts the other processes
            if ckpt_path is not None and Path(str(ckpt_path)).exists():  # known at setup: expert sets rebuilt before sharding
                self.trainer.ckpt_path, ckpt_path = ckpt_path, None
        self.trainer.fit(model, ckpt_path=ckpt_path, **kwargs)


SUBCOMMANDS = ("fit", "validate", "test", "predict")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``stun-lightning fit|validate ...`` (``argv`` without the program name; without
    a subcommand, ``fit`` is meant, so ``main(["--config", path])`` fits)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        argv = ["fit", *argv]
    StunLightningCLI(
        StunDistillModule,
        StunDataModule,
        args=argv,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
    )
    return 0


if __name__ == "__main__":
    main()
