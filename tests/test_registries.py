"""The registries: one entry per training method and per evaluation attack; unknown names are errors.

Also the step as a function: ``training.engine`` runs a step and an epoch without a Trainer.
"""
from __future__ import annotations

import pytest
import torch

from errors import UserError
from evaluation.spec import ATTACKS, AttackSpec, EvalAttack, parse_attack
from evaluation.spec import register as register_attack
from training import engine
from training.config import TrainConfig
from training.methods import METHODS, LossSpec, Method, ce_on, get_method
from training.methods import register as register_method
from training.schedules import attack_budget


def test_unknown_training_method_is_refused_everywhere():
    with pytest.raises(UserError, match=r"--loss 'mart2' is not one of: gkl, ikl"):
        get_method("mart2")
    with pytest.raises(UserError, match="mart2"):
        TrainConfig(dataset="digits", arch="tiny-cnn", loss="mart2").validate()
    with pytest.raises(UserError, match="mart2"):
        LossSpec("mart2").method


def test_a_method_is_registered_once_and_checks_its_shape():
    with pytest.raises(ValueError, match="twice"):
        register_method(METHODS["gkl"])
    with pytest.raises(ValueError, match="attack"):
        Method("adv-without-attack", "", forwards=("adv",), loss=ce_on("adv"), parts=("ce",))
    with pytest.raises(ValueError, match="forwards"):
        Method("typo", "", forwards=("natural",), loss=ce_on("nat"), parts=("ce",))


def test_every_method_logs_its_parts_and_the_accuracy_of_each_forward():
    for method in METHODS.values():
        names = method.metric_names()
        assert names[0] == "loss" and names[1:1 + len(method.parts)] == method.parts
        assert [n for n in names if n.startswith("acc_")] == [f"acc_{w}" for w in ("nat", "adv") if w in method.forwards]


def test_unknown_evaluation_attack_is_refused_and_never_runs_autoattack():
    for name in ("fgsm", "aa:apgd-xx", "pgd0", "autoattack"):
        with pytest.raises(UserError):
            parse_attack(name)
    with pytest.raises(KeyError):
        AttackSpec("bogus", "bogus").entry  # a kind outside the table has no runner (no silent AutoAttack)
    with pytest.raises(ValueError, match="twice"):
        register_attack(ATTACKS["pgd"])
    with pytest.raises(ValueError, match="family"):
        EvalAttack("x", "x", lambda t, n: None, lambda s: "X", "other", lambda s: True)


def test_the_attack_table_decides_labels_families_and_white_box():
    expect = {"clean": ("Clean", "clean", False), "pgd7": ("PGD-7", "iterative", True),
              "cw20": ("CW-20", "iterative", True), "aa": ("AA", "autoattack", True),
              "aa-plus": ("AA+", "autoattack", True), "aa:square": ("AA(square)", "autoattack", False)}
    for name, (label, family, white) in expect.items():
        spec = parse_attack(name)
        assert (spec.label, spec.family, spec.white_box) == (label, family, white), name
        assert (spec.entry.run is None) == (family == "clean")


def _cfg(**kw) -> TrainConfig:
    base = dict(dataset="digits", arch="tiny-cnn", eps=8 / 255, epochs=2, batch_size=8, lr=0.05, awp_gamma=0.005,
                awp_warmup=1, averaging="step-ema", device="cpu", amp="off", gkl_wmse_weight=20.0, gkl_ce_weight=4.0)
    return TrainConfig(**{**base, **kw}).validate()


def test_one_step_runs_from_the_engine_alone_and_equals_the_trainers(tmp_path):
    from training.trainer import Trainer

    cfg = _cfg()
    torch.manual_seed(0)
    m = engine.build_step(cfg, 10, torch.device("cpu"))
    tr = Trainer(cfg, tmp_path / "run", progress=False)
    tr.model.load_state_dict(m.model.state_dict())
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8)
    budget = attack_budget(cfg.eps, 1, cfg.epochs, budget=cfg.attack_budget)
    torch.manual_seed(5)
    sums = engine.training_step(m, x, y, budget=budget, lr=cfg.lr, awp_on=True, step=1)
    torch.manual_seed(5)
    tr.training_step(x, y, epoch=1, lr=cfg.lr)
    assert sums.shape == (len(m.metric_names) + 1,) and sums[-1] == 8
    for a, b in zip(m.model.state_dict().values(), tr.model.state_dict().values()):
        assert torch.equal(a, b)
    assert int(m.averager.avg.n_averaged) == 1  # the per-step EMA ran once


def test_train_one_epoch_returns_sample_weighted_averages():
    meter = engine.EpochMeter(("loss", "acc_nat"), torch.device("cpu"))
    batches = [(torch.zeros(4), torch.zeros(4)), (torch.zeros(2), torch.zeros(2))]
    values = iter([torch.tensor([4 * 1.0, 4.0, 4.0], dtype=torch.float64),  # loss 1, all 4 right
                   torch.tensor([2 * 4.0, 0.0, 2.0], dtype=torch.float64)])  # loss 4, none right
    seen, lrs = [], []
    metrics = engine.train_one_epoch(lambda x, y, lr: (lrs.append(lr), next(values))[1], batches, meter,
                                     lr_of_step=lambda s: 0.1 * (s + 1), after_step=seen.append)
    assert metrics["loss"] == pytest.approx((4 * 1 + 2 * 4) / 6) and metrics["acc_nat"] == pytest.approx(4 / 6)
    assert seen == [1, 2] and lrs == pytest.approx([0.1, 0.2]) and metrics["time_s"] >= 0


def test_the_meter_names_the_first_step_that_went_non_finite():
    meter = engine.EpochMeter(("loss", "ce"), torch.device("cpu"))
    meter.add(torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64), 1)
    meter.add(torch.tensor([1.0, float("nan"), 1.0], dtype=torch.float64), 2)
    meter.add(torch.tensor([float("inf"), float("nan"), 1.0], dtype=torch.float64), 3)
    assert not meter.finite() and meter.first_nonfinite() == (2, ["ce"])
