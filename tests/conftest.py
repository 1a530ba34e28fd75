"""Shared fixtures: deterministic CPU settings and small models trained once per session."""
from __future__ import annotations

import os
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

# The one-node Slurm cluster of the submit.py tests (session fixture ``slurm``).
pytest_plugins = ["slurm_cluster"]

# One thread per test process: on a loaded 2-core machine OpenMP spin-waiting makes 2 threads ~10x slower.
torch.set_num_threads(1)

# The training seed of the session's fixture models. Assertions on their behaviour must hold for any
# seed and CPU: run the suite with GKL_AT_TEST_SEED=1, 2, ... to check (CI keeps the default 0).
SEED_VARIABLE = "GKL_AT_TEST_SEED"


def fixture_seed() -> int:
    """The seed in ``$GKL_AT_TEST_SEED`` (default 0)."""
    text = os.environ.get(SEED_VARIABLE, "0")
    try:
        return int(text)
    except ValueError:
        raise pytest.UsageError(f"{SEED_VARIABLE}={text!r} is not an integer seed") from None


def _digits_tensors(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from data import Digits

    ds = Digits(train=train)
    x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).float().div(255)
    return x, torch.tensor(ds.targets)


@pytest.fixture(scope="session")
def digits_test() -> tuple[torch.Tensor, torch.Tensor]:
    """The 360 digits test images as (N,3,32,32) float in [0,1] and labels."""
    return _digits_tensors(train=False)


def _train(adversarial_eps: float, epochs: int, seed: Optional[int] = None) -> torch.nn.Module:
    """Train a small-cnn on digits; with eps > 0, PGD-AT (a minimal inline L-inf PGD, 3 steps).

    Kept independent of the project's attacks so that attack tests do not grade themselves.
    ``seed`` defaults to :func:`fixture_seed`.
    """
    from models import build_model

    seed = fixture_seed() if seed is None else seed
    torch.manual_seed(seed)
    x, y = _digits_tensors(train=True)
    model = build_model("small-cnn", num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y) - 63, 64):
            xb, yb = x[perm[i:i + 64]], y[perm[i:i + 64]]
            if adversarial_eps > 0:
                model.eval()
                delta = (torch.rand_like(xb) * 2 - 1) * adversarial_eps
                for _ in range(3):
                    delta.requires_grad_(True)
                    loss = F.cross_entropy(model((xb + delta).clamp(0, 1)), yb)
                    (grad,) = torch.autograd.grad(loss, delta)
                    delta = (delta.detach() + adversarial_eps / 2 * grad.sign()).clamp(-adversarial_eps, adversarial_eps)
                xb = (xb + delta).clamp(0, 1).detach()
                model.train()
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model


@pytest.fixture(scope="session")
def digits_model() -> torch.nn.Module:
    """small-cnn trained normally on digits (high clean accuracy, not robust). Eval mode."""
    return _train(adversarial_eps=0.0, epochs=6)


@pytest.fixture(scope="session")
def robust_digits_model() -> torch.nn.Module:
    """small-cnn trained with PGD-AT at eps 16/255 on digits (partly robust). Eval mode."""
    return _train(adversarial_eps=16 / 255, epochs=8)
