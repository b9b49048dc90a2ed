"""``stun-lightning fit --config configs/fit_tiny.yaml``: LightningCLI over StunDistillModule + StunDataModule.

The usual LightningCLI surface: ``fit`` / ``validate`` subcommands, ``--print_config``, any
``--trainer.*`` / ``--model.*`` / ``--data.*`` override on the command line. The StunCallback goes in
``trainer.callbacks`` of the config (see ``configs/fit_*.yaml``); the data's tokenizer follows the
model (``--model.student``).

Several GPUs with FSDP2: ``--config configs/fit_tiny_fsdp.yaml --trainer.devices=N`` (or
``--trainer.strategy='{"class_path": "stun_lightning.callbacks.FSDP2Strategy"}'`` on any config). There ``--ckpt_path``
is handed to the trainer before ``fit`` (``trainer.ckpt_path``), so the StunCallback rebuilds the
checkpoint's expert sets at ``setup``, before the model is sharded.

A refusal of the library's own (a bad recipe or schedule, a callback argument that cannot work)
is reported in one line on stderr with exit status 2, as ``stun-lightning prune`` does; any other
exception keeps its traceback.

Lightning's two "💡 Tip" adverts (litlogger, litmodels) and torch 2.13's ``LeafSpec`` deprecation,
which Lightning's own pytree code triggers on every fit, are filtered while the command runs; every
other warning and log line, the progress bar and the metrics print as usual.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import ModelParallelStrategy

import stun_lightning
from stun_lightning.sharding import set_nccl_env

from .datamodule import StunDataModule
from .distill_module import StunDistillModule
from .model_spec import tokenizer_for

#: what the library raises for input it refuses (as ``stun-lightning prune`` reports them)
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)
_LIBRARY_DIRS = (Path(stun_lightning.__file__).resolve().parent, Path(__file__).resolve().parent)


def library_error(err: BaseException) -> BaseException | None:
    """The library's own refusal behind ``err`` or None (a bug, or another package's error).

    jsonargparse wraps what a class raises while it instantiates the config (``raise ... from``), so
    the chain of causes is followed; a refusal is a :data:`USER_ERRORS` raised from a frame of
    ``stun_lightning`` (core or callbacks)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, USER_ERRORS) and _raised_in_library(err):
            return err
        err = err.__cause__
    return None


def _raised_in_library(err: BaseException) -> bool:
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    where = Path(tb.tb_frame.f_code.co_filename).resolve()
    return any(where.is_relative_to(root) for root in _LIBRARY_DIRS)


#: the start of each advert Lightning logs at every fit (through ``rank_zero_info``)
LIGHTNING_TIPS = (
    "💡 Tip: For seamless cloud logging and experiment tracking",
    "💡 Tip: For seamless cloud uploads and versioning",
)
#: torch's deprecation of ``LeafSpec``, which Lightning's ``utilities/_pytree.py`` still instantiates
LEAFSPEC_DEPRECATION = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


def _not_a_tip(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(LIGHTNING_TIPS)


@contextmanager
def lightning_noise_filtered() -> Iterator[None]:
    """Drop Lightning's tips and the ``LeafSpec`` deprecation inside the block, nothing else.

    The tips are records of the ``lightning.pytorch.utilities.rank_zero`` logger (its handler is bound
    at import, so the filter goes on the logger itself, where the record is made)."""
    tips = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    tips.addFilter(_not_a_tip)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=LEAFSPEC_DEPRECATION, category=FutureWarning)
            yield
    finally:
        tips.removeFilter(_not_a_tip)


class StunLightningCLI(LightningCLI):
    def parse_arguments(self, parser, args) -> None:
        # main() always passes argv on (with ``fit`` filled in), so Lightning's warning about
        # ``args`` given beside sys.argv would fire on every command-line run
        self.config = parser.parse_args(args)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.student", "data.tokenizer", compute_fn=tokenizer_for)

    def fit(self, model, ckpt_path=None, **kwargs) -> None:
        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            set_nccl_env()  # before the launcher starts the other processes
            if (
                ckpt_path is not None and Path(str(ckpt_path)).exists()
            ):  # known at setup: expert sets rebuilt before sharding
                self.trainer.ckpt_path, ckpt_path = ckpt_path, None
        self.trainer.fit(model, ckpt_path=ckpt_path, **kwargs)


SUBCOMMANDS = ("fit", "validate", "test", "predict")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``stun-lightning fit|validate ...`` (``argv`` without the program name; without
    a subcommand, ``fit`` is meant, so ``main(["--config", path])`` fits)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        argv = ["fit", *argv]
    try:
        with lightning_noise_filtered():
            StunLightningCLI(
                StunDistillModule,
                StunDataModule,
                args=argv,
                save_config_kwargs={"overwrite": True},
                seed_everything_default=0,
            )
    except USER_ERRORS as err:
        refusal = library_error(err)
        if refusal is None:
            raise
        message = " ".join(str(refusal).split())
        print(f"stun-lightning {argv[0]}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
