#!/usr/bin/env python
"""Run train_at.py and eval_autoattack.py as Slurm (or local) jobs that requeue to completion; sweeps.

    python submit.py train --partition gpu --gpus-per-node 4 --time 1440 -- --preset cifar100-gkl --out runs/c100
    python submit.py eval --partition gpu --gpus-per-node 8 --time 720 -- runs/c100 --attacks aa
    python submit.py sweep --grid alpha=10,20 --grid beta=3,4 --seeds 0 1 --out runs/abl \\
        --eval-args "--attacks aa" --partition gpu --gpus-per-node 1 --time 1440 -- --preset cifar100-gkl

See ``python submit.py {train,eval,sweep} --help`` and docs/CLUSTER.md.
"""
from __future__ import annotations

import sys

from cluster.cli import main

if __name__ == "__main__":
    sys.exit(main())
