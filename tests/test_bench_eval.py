"""bench/eval_throughput.py: never-fooled points get AutoAttack's full budget; the projection's arithmetic."""
from __future__ import annotations

import argparse

import pytest
import torch

from bench import eval_throughput as bench


class Counting(torch.nn.Module):
    """A linear classifier on 32x32x3 images that counts the images it is queried on."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
        self.images = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += len(x)
        return self.net(x)


@pytest.mark.parametrize("component,budget", [("apgd-ce", 100), ("square", 5000)])
def test_never_fooled_points_cost_the_full_budget(component, budget):
    model = Counting()
    bench.component_seconds(model, component, batch=3, device=torch.device("cpu"))
    # every one of the 3 points is queried at least once per iteration / query of the budget
    assert model.images >= 3 * budget
    assert model.images < 3 * budget * 1.2


def test_a_point_the_wrapper_does_not_protect_is_broken():
    """The check that the timing is a robust point's can trip: without the margin APGD-CE breaks points."""
    model = Counting()
    previous, bench.MARGIN = bench.MARGIN, 0.0
    try:
        with pytest.raises(RuntimeError, match="broke a never-fooled point"):
            bench.component_seconds(model, "apgd-ce", batch=8, device=torch.device("cpu"))
    finally:
        bench.MARGIN = previous


def test_projection_counts_clean_points_for_apgd_ce_and_robust_points_for_the_rest():
    rows = [{"C": 100, "variant": "fp32", "batch": b, "component": c, "s_per_point": cost}
            for b in (64, 256) for c, cost in zip(bench.COMPONENTS, (1.0, 2.0, 3.0, 4.0) if b == 64 else
                                                   (0.5, 1.0, 1.5, 2.0))]
    args = argparse.Namespace(points=10_000, suite_batch=256)
    # C=100: clean 0.6576 of 250 = 164 points per chunk -> batch 256 column; robust 80 -> batch 64 column
    projected, how = bench.projection(rows, 100, "fp32", args, chunk_size=250, gpus=1)
    per_chunk = 250 * (0.6576 * 0.5 + 0.3191 * (2.0 + 3.0 + 4.0))
    assert projected == pytest.approx(40 * per_chunk)
    assert how.startswith("164 (as 256) / 80 (as 64)")
    eight, _ = bench.projection(rows, 100, "fp32", args, chunk_size=250, gpus=8)
    assert eight == pytest.approx(5 * per_chunk)  # 40 chunks, 5 per device
    seven, _ = bench.projection(rows, 100, "fp32", args, chunk_size=250, gpus=7)
    assert seven == pytest.approx(6 * per_chunk)  # ceil(40 / 7) on the slowest device
