"""Schedules (spec section 4.1 and 5) at the epochs the issue names, for E = 200."""
import math

import pytest

from training.config import TrainConfig
from training.schedules import attack_budget, eps_at_epoch, lr_at, schedule_table

E, EPS = 200, 8 / 255
EPOCHS = [1, 50, 51, 100, 150, 200]


def test_linear_eps_values():
    got = [eps_at_epoch(EPS, e, E) * 255 for e in EPOCHS]
    assert got == pytest.approx([0.04, 2.0, 2.04, 4.0, 6.0, 8.0], abs=1e-12)
    assert eps_at_epoch(EPS, 37, E, "constant") == EPS


def test_effective_budget_is_five_steps_half_eps_every_epoch():
    for e in EPOCHS:
        b = attack_budget(EPS, e, E, budget="effective")
        assert (b.steps, b.step_size) == (5, pytest.approx(b.eps / 2))


@pytest.mark.parametrize("epoch,steps,ratio", [(1, 2, 1.0), (50, 2, 1.0), (51, 3, 2 / 3), (100, 3, 2 / 3),
                                               (101, 4, 0.5), (150, 4, 0.5), (151, 5, 0.5), (200, 5, 0.5)])
def test_staged_budget(epoch, steps, ratio):
    b = attack_budget(EPS, epoch, E, budget="staged")
    assert b.steps == steps and b.step_size == pytest.approx(ratio * b.eps)


def test_low_and_fixed_budgets():
    assert attack_budget(EPS, 10, E, budget="low")[1:] == (2, pytest.approx(EPS * 10 / E))
    b = attack_budget(EPS, 10, E, eps_schedule="constant", budget="fixed", steps=10, step_size=2 / 255)
    assert b == (EPS, 10, 2 / 255)


def test_cosine_lr_per_epoch_matches_released_formula():
    for e in EPOCHS:
        assert lr_at(0.2, e, E) == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * e / (E + 1))))
    assert lr_at(0.2, 1, E) < 0.2 and lr_at(0.2, 200, E) > 0  # never exactly 0 at the last epoch


def test_warmup_and_per_step_cosine():
    assert lr_at(0.2, 1, 100, warmup_epochs=5) == pytest.approx(0.2 / 5)
    assert lr_at(0.2, 5, 100, warmup_epochs=5) == pytest.approx(0.2)
    per_step = [lr_at(0.2, 10, 100, schedule="cosine-step", step=s, steps_per_epoch=4) for s in range(4)]
    assert all(a > b for a, b in zip(per_step, per_step[1:]))  # decreases within the epoch
    assert per_step[-1] == pytest.approx(lr_at(0.2, 10, 100))  # ends on the per-epoch value


def test_schedule_table_rows():
    cfg = TrainConfig(epochs=E)
    rows = schedule_table(cfg, EPOCHS)
    assert [r["epoch"] for r in rows] == EPOCHS
    assert [r["awp"] for r in rows] == [False, True, True, True, True, True]
    assert rows[-1]["eps_x255"] == pytest.approx(8.0) and rows[-1]["steps"] == 5


def test_step_lr_decays_at_each_milestone_and_round_trips_through_yaml(tmp_path):
    from training.config import load_yaml, save_config

    cfg = TrainConfig.from_dict(dict(lr=0.1, epochs=100, lr_schedule="step", lr_milestones="75,90")).validate()
    assert cfg.lr_milestones == (75, 90)
    got = [row["lr"] for row in schedule_table(cfg, [1, 74, 75, 89, 90, 100])]
    assert got == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    save_config(cfg, tmp_path / "config.yaml")
    assert TrainConfig.from_dict(load_yaml(tmp_path / "config.yaml")).validate() == cfg
