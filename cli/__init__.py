"""Command line of lt-distill. Only this package imports typer; the library takes typed arguments."""

from __future__ import annotations

import sys

from ..errors import LtDistillError
from .app import app

# Each ``*_cmds`` module registers its commands on ``app`` / ``store_app`` / ``bench_app`` when imported.


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: user errors become one ``error:`` line and exit code 2."""
    try:
        app(args=argv, prog_name="lt-distill", standalone_mode=True)
    except LtDistillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
from . import store_cmds  # noqa: F401,E402
from . import train_cmds  # noqa: F401,E402
from . import precompute_cmds  # noqa: F401,E402
from . import model_cmds  # noqa: F401,E402
from . import ops_cmds  # noqa: F401,E402
from . import data_cmds  # noqa: F401,E402
from . import shards_cmds  # noqa: F401,E402
