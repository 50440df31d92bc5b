"""Run an entry script's ``main()`` with every training sample it loads recorded, one file per rank
(tests/test_sharding.py). Under torchrun each process runs this module.

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.shard_probe OUT train_bao ARGS...

Writes ``OUT/rank<RANK>.txt``: one line ``<epoch> <name>`` per sample, in the order loaded.
Only training samples are recorded (:class:`data.datasets._AugmentedDataset`, the base of both
training stages' datasets); the validation's images are not. Needs ``--num_workers 0`` (loader
workers would record in other processes).
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from apps.cli import run_cli
from data import datasets


def main() -> None:
    out, script, argv = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    record = out / f"rank{os.environ.get('RANK', '0')}.txt"
    original = datasets._AugmentedDataset.__getitem__

    def recording(self, key):
        item = original(self, key)
        epoch = key[0] if isinstance(key, tuple) else 0
        with open(record, "a") as f:
            f.write(f"{epoch} {item['name']}\n")
        return item

    datasets._AugmentedDataset.__getitem__ = recording
    module = importlib.import_module(script)
    run_cli(module.main, module.get_args_parser().parse_args(argv))


if __name__ == "__main__":
    main()
