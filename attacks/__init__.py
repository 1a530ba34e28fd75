"""Adversarial attacks: PGD/CW (L-inf, L2, L1, any objective) and an AutoAttack adapter.

Importing this package never imports robustbench; ``attacks.rb_bridge.install()`` does that bridging.
Note: ``attacks.pgd`` and ``attacks.autoattack`` as attributes are the functions; reach the modules
with ``from attacks.pgd import ...`` or ``importlib.import_module("attacks.autoattack")``.
"""
from .autoattack import AA_ATTACKS, AA_NORMS, AA_VERSIONS, autoattack
from .context import attack_mode
from .geometry import project_l1_box
from .pgd import (
                  NORMS,
                  RANDOM_STARTS,
                  Objective,
                  ce_objective,
                  clip_exact,
                  cw,
                  cw_objective,
                  indexed_random_start,
                  kl_objective,
                  pgd,
                  project,
)

__all__ = [
    "AA_ATTACKS", "AA_NORMS", "AA_VERSIONS", "NORMS", "RANDOM_STARTS", "Objective", "attack_mode", "autoattack",
    "ce_objective", "clip_exact", "cw", "cw_objective", "indexed_random_start", "kl_objective", "pgd", "project",
    "project_l1_box",
]
