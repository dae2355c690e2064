"""`torchrun --nproc-per-node N -m lmoec.train SPEC --sp 2 --ep 2 ...`: distributed `lmoec train`.

The same flags as `lmoec train` (plus --dp / --sp / --ep); each rank runs this module and
lmoec.trainer.distributed lays the ranks out as a (dp, sp, ep) mesh. Run without torchrun it
trains on one process, exactly as `lmoec train`.
"""
from __future__ import annotations

import sys
from typing import Optional

from .cli import Parser
from .cli import train as train_cli
from .trainer.distributed import shutdown_process_group


def main(argv: Optional[list[str]] = None) -> int:
    parser = Parser(prog="python -m lmoec.train", description="lmoec train, launchable by torchrun")
    train_cli.add_arguments(parser)
    try:
        return train_cli.run(parser.parse_args(argv))
    finally:
        shutdown_process_group()


if __name__ == "__main__":
    sys.exit(main())
