"""torch's own launcher (``python -m torch.distributed.run``, torchrun) as the runner starts a stage on
several processes: the same arguments, the same agent, the same rendezvous; one difference.

Stopped by Ctrl-C or SIGTERM, torchrun passes the signal to its ranks (which save and exit, as a
lone script does), waits for them, and then ends with its own traceback. Here it ends with one
line and the signal's exit status (130 for SIGINT, 143 for SIGTERM), as the entry scripts do.
A rank that fails is still reported by torchrun itself (which rank, its exit code, its error).

    python -m protocol.torchrun --standalone --nproc_per_node 2 train_bao.py --weights transcam.pth ...
"""
from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.run import main as torchrun_main


def main(argv: list[str]) -> None:
    """Run torchrun with ``argv`` (its own arguments and the script's); a stop exits quietly."""
    try:
        torchrun_main(argv)
    except SignalException as stop:
        print(f"stopped by {stop.sigval.name}: the ranks were passed the signal and have ended", file=sys.stderr)
        sys.exit(128 + int(stop.sigval))


if __name__ == "__main__":
    main(sys.argv[1:])
