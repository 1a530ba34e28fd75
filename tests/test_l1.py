"""The L1 threat model: exact projection onto the L1 ball ∩ [0, 1], L1 PGD/CW, L1 AutoAttack, L1 training."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from attacks import autoattack, clip_exact, pgd, project_l1_box
from core.threat import parse_eps
from errors import UserError


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def l1_size(x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (x_adv - x).abs().flatten(1).sum(1)


def assert_inside_l1(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> None:
    """Exactly in the box and the ball, summed in the tensor's dtype and in float64."""
    assert x_adv.dtype == x.dtype and x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    assert bool((l1_size(x_adv, x) <= eps).all())
    assert l1_size(x_adv.double(), x.double()).max().item() <= eps


def qp_projection(x: np.ndarray, p: np.ndarray, eps: float) -> np.ndarray:
    """A slow general-purpose reference: min ||z - p||^2 over z = x + u - v, u, v >= 0, sum(u + v) <= eps,
    0 <= z <= 1, by SLSQP. Nothing of the fast solver's thresholding argument is used."""
    d = len(x)
    lift = np.concatenate([np.eye(d), -np.eye(d)], axis=1)

    def z(uv: np.ndarray) -> np.ndarray:
        return x + uv[:d] - uv[d:]

    constraints = [{"type": "ineq", "fun": lambda uv: eps - uv.sum(), "jac": lambda uv: -np.ones(2 * d)},
                   {"type": "ineq", "fun": lambda uv: 1 - z(uv), "jac": lambda uv: -lift},
                   {"type": "ineq", "fun": z, "jac": lambda uv: lift}]
    res = minimize(lambda uv: 0.5 * ((z(uv) - p) ** 2).sum(), np.zeros(2 * d),
                   jac=lambda uv: np.concatenate([z(uv) - p, p - z(uv)]), bounds=[(0, None)] * (2 * d),
                   constraints=constraints, method="SLSQP", options={"ftol": 1e-13, "maxiter": 2000})
    return z(res.x)


def _random_case(rng: np.random.Generator, d: int) -> tuple[np.ndarray, np.ndarray, float]:
    x = rng.random(d)
    x[rng.random(d) < 0.25] = rng.integers(0, 2)  # pixels on the faces of the box, as in real images
    p = x + rng.normal(size=d) * rng.choice([0.01, 0.3, 2.0])
    return x, p, float(rng.choice([0.05, 0.5, 3.0]) * rng.random())


def test_l1_projection_is_the_euclidean_projection() -> None:
    """Feasible, and no farther from p than what the general solver finds (so, by strong convexity of the
    squared distance, within sqrt(2 * tol) of the projection), and equal to its answer."""
    rng = np.random.default_rng(0)
    worst, outside = 0.0, 0
    for _ in range(120):
        x, p, eps = _random_case(rng, int(rng.integers(1, 13)))
        ours = project_l1_box(torch.tensor(p)[None], torch.tensor(x)[None], eps)[0].numpy()
        reference = qp_projection(x, p, eps)
        assert np.abs(ours - x).sum() <= eps * (1 + 1e-12) and ours.min() >= 0 and ours.max() <= 1
        assert ((ours - p) ** 2).sum() <= ((reference - p) ** 2).sum() + 1e-12
        worst = max(worst, np.abs(ours - reference).max())
        outside += np.abs(p - x).sum() > eps or p.min() < 0 or p.max() > 1
    assert worst < 1e-6, worst  # SLSQP's accuracy; the two agree to ~1e-13 in practice
    assert outside > 60  # most cases really had to be projected


def test_l1_projection_is_optimal_against_feasible_points() -> None:
    """Projection characterisation: <p - z, c - z> <= 0 for every feasible c (here: random ones)."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(64, 3, 8, 8, generator=g, dtype=torch.float64)
    p = x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    z = project_l1_box(p, x, 2.0)
    for _ in range(20):
        c = project_l1_box(x + torch.randn(x.shape, generator=g, dtype=torch.float64), x, 2.0)  # feasible
        assert ((p - z) * (c - z)).flatten(1).sum(1).max().item() <= 1e-10


@pytest.mark.parametrize("eps", [0.5, 12.0, 40.0])
def test_clip_exact_l1_holds_in_float32_and_float64(eps: float) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(128, 3, 32, 32, generator=g)
    x[:, 0] = (x[:, 0] > 0.5).float()  # a channel on the box's faces
    p = x + torch.randn(x.shape, generator=g) * 0.2
    out = clip_exact(p, x, eps=eps, norm="L1")
    assert_inside_l1(out, x, eps)
    exact = project_l1_box(p.double(), x.double(), eps)
    assert (out.double() - exact).abs().max().item() < 1e-5  # still the projection, up to a few ulps


def test_l1_pgd_breaks_a_standard_digits_model(digits_model, digits_test) -> None:
    x, y = digits_test[0][:120], digits_test[1][:120]
    clean = accuracy(digits_model, x, y)
    for attack in ("ce", "cw"):
        x_adv = pgd(digits_model, x, y, eps=12.0, step=3.0, steps=20, norm="L1", objective=attack,
                    generator=torch.Generator().manual_seed(0))
        assert_inside_l1(x_adv, x, 12.0)
        assert accuracy(digits_model, x_adv, y) < 0.6 * clean, attack  # measured: 0.99 -> ~0.1 (CE)
    weak = pgd(digits_model, x, y, eps=0.5, step=0.125, steps=20, norm="L1", generator=torch.Generator().manual_seed(0))
    assert accuracy(digits_model, weak, y) > accuracy(digits_model, pgd(digits_model, x, y, eps=12.0, step=3.0,
                                                                        steps=20, norm="L1"), y)


def test_l1_autoattack_runs_on_a_few_points(digits_model, digits_test) -> None:
    # A custom list (APGD-CE, APGD-T, the library's default settings): the standard version adds FAB-T
    # and Square, ~30 s here on the point that survives.
    x, y = digits_test[0][:8].contiguous(), digits_test[1][:8]
    x_adv, robust = autoattack(digits_model, x, y, eps=12.0, norm="L1", version="custom",
                               attacks=["apgd-ce", "apgd-t"], batch_size=8)
    assert_inside_l1(x_adv, x, 12.0)
    with torch.no_grad():
        assert torch.equal(digits_model(x_adv).argmax(1) == y, robust)
    assert robust.float().mean().item() < accuracy(digits_model, x, y)  # APGD-L1 breaks this model easily


def test_l1_radii_are_read_as_written() -> None:
    assert parse_eps("12", "L1") == 12.0 and parse_eps("0.5", "L2") == 0.5 and parse_eps("12/255", "L1") == 12 / 255
    assert parse_eps("12", "Linf") == pytest.approx(12 / 255)
    with pytest.raises(UserError, match="outside"):
        parse_eps("4000", "L1")  # above 3072, the L1 diameter of 32x32 RGB images
    with pytest.raises(UserError, match="not one of"):
        parse_eps("1", "L3")


def test_training_with_l1_attacks_inside_the_l1_ball(tmp_path, monkeypatch) -> None:
    import training.engine as engine
    from training.config import TrainConfig, load_yaml, save_config
    from training.trainer import Trainer

    cfg = TrainConfig.from_dict(dict(dataset="digits", arch="small-cnn", norm="L1", eps="6", epochs=2, batch_size=8,
                                     val_size=100, eval_subset=8, eval_pgd_steps=1, device="cpu", amp="off",
                                     awp_gamma=0.0, averaging="none")).validate()
    assert cfg.eps == 6.0  # as written, not 6/255
    save_config(cfg, tmp_path / "config.yaml")
    assert TrainConfig.from_dict(load_yaml(tmp_path / "config.yaml")).eps == 6.0  # the run folder reads back
    seen = []
    real_pgd = engine.pgd

    def recording(model, x, y, **kw):
        out = real_pgd(model, x, y, **kw)
        seen.append((kw["norm"], kw["eps"], l1_size(out, x).max().item()))
        return out

    monkeypatch.setattr(engine, "pgd", recording)
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    sums = trainer.training_step(torch.rand(8, 3, 32, 32), torch.arange(8), epoch=2, lr=0.05)
    assert torch.isfinite(sums).all()
    assert seen and all(norm == "L1" and 0 < size <= eps <= 6.0 for norm, eps, size in seen), seen


def test_an_l1_run_is_evaluated_at_its_own_radii_above_255(tmp_path, digits_model) -> None:
    # Without --norm the run's training norm decides how --eps reads: 300 is an L1 radius here, not a
    # Linf one outside [0, 1] (which the check before loading took it for).
    import json

    import eval_autoattack
    from checkpoints.io import save_checkpoint
    from training.config import TrainConfig, save_config

    cfg = TrainConfig.from_dict(dict(dataset="digits", arch="small-cnn", norm="L1", eps="12")).validate()
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    save_checkpoint({"format": "gkl-at/1", "model": digits_model.state_dict(), "avg_model": None, "arch": "small-cnn",
                     "num_classes": 10, "dataset": "digits", "config": cfg.to_dict(), "epoch": 1, "global_step": 1},
                    run / "checkpoints" / "last.pt")
    assert eval_autoattack.main([str(run), "--eps", "300", "--attacks", "clean", "--n-ex", "8", "--quiet"]) == 0
    settings = json.loads((run / "eval" / "report.json").read_text())["settings"]
    assert settings["norm"] == "L1" and settings["eps"] == [300.0]
