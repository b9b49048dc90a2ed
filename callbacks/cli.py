"""``stun-lightning fit --config configs/fit_tiny.yaml``: LightningCLI over StunDistillModule + StunDataModule.

The usual LightningCLI surface: ``fit`` / ``validate`` subcommands, ``--print_config``, any
``--trainer.*`` / ``--model.*`` / ``--data.*`` override on the command line. The StunCallback goes in
``trainer.callbacks`` of the config (see ``configs/fit_*.yaml``); the data's tokenizer follows the
model (``--model.student``).
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

from .datamodule import StunDataModule
from .distill_module import StunDistillModule, tokenizer_for


class StunLightningCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.student", "data.tokenizer", compute_fn=tokenizer_for)


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
