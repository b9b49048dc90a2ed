"""The ``--data`` option of the scripts that read the public text folder (its layout: SOURCES.md).

No default path: the folder is ``--data DIR`` or the ``STUN_DATA`` environment variable, and a
script that needs it and has neither stops with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DATA_ENV = "STUN_DATA"


def add_data_argument(parser: argparse.ArgumentParser, needed_for: str) -> None:
    default = os.environ.get(DATA_ENV)
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(default) if default else None,
        help=f"the data folder (SOURCES.md, wikitext2/, gsm8k/, python_stdlib/, ...; default: ${DATA_ENV}); needed for {needed_for}",
    )


def require_data(data: Path | None, needed_for: str) -> Path:
    """``data`` if it is the data folder (holds SOURCES.md); otherwise one line on stderr and exit 2."""
    if data is None:
        message = f"error: {needed_for} needs the data folder: pass --data DIR or set {DATA_ENV}=DIR"
    elif not (data / "SOURCES.md").exists():
        message = f"error: {data} is not the data folder (no SOURCES.md): pass --data DIR or set {DATA_ENV}=DIR"
    else:
        return data
    print(message, file=sys.stderr)
    raise SystemExit(2)
