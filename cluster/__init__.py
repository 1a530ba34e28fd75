"""Cluster jobs: train_at.py and eval_autoattack.py as Slurm (or local) jobs through submitit, requeued at
each time limit and resumed exactly; sweeps of config values x seeds (``submit.py``)."""
