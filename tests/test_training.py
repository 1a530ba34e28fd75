"""The training pipeline: one step equals a straight-line reading of spec section 4; AWP; exact resume."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from training.awp import AWP
from training.config import TrainConfig
from training.methods import METHODS
from training.trainer import Trainer


def tiny_config(**kw) -> TrainConfig:
    base = dict(dataset="digits", arch="small-cnn", loss="gkl", gkl_wmse_weight=20.0, gkl_ce_weight=4.0, gkl_weight_exponent=1.0, tau=4.0,
                eps=16 / 255, epochs=4, batch_size=32, lr=0.05, awp_gamma=0.005, awp_warmup=1,
                averaging="epoch-ema", avg_decay=0.5, val_size=1000, eval_subset=64, eval_pgd_steps=2,
                device="cpu", amp="off", augment="crop")
    base.update(kw)
    return TrainConfig(**base).validate()


# ------------------------------------------------------------------ straight-line oracle (spec section 4)
def pairwise_gkl(o_m, o_n, v, alpha, beta):
    """GKL with the B x C x C pairwise wMSE and weight-sum normalisation, written from the spec."""
    dm = o_m[:, :, None] - o_m[:, None, :]
    dn = o_n[:, :, None] - o_n[:, None, :]
    w = v[:, :, None] * v[:, None, :]
    wmse = (w * (dm - dn) ** 2).sum() / w.sum()
    soft_ce = -(F.softmax(o_m, 1).detach() * F.log_softmax(o_n, 1)).sum(1).mean()
    return alpha / 4 * wmse + beta * soft_ce


def straight_line_step(model, x, y, v, *, eps, steps, step, alpha, beta, gamma, lr, awp_gamma, momentum, wd):
    model.eval()
    with torch.no_grad():
        o_nat = model(x)
    x_adv = x + 0.001 * torch.randn_like(x)
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        loss = pairwise_gkl(o_nat, model(x_adv), v, 1.0, 1.0)
        (g,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + step * g.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    x_adv = x_adv.detach()
    vg = v ** gamma
    # AWP
    proxy = copy.deepcopy(model)
    proxy.train()
    p_opt = torch.optim.SGD(proxy.parameters(), lr=lr)
    loss = -(F.cross_entropy(proxy(x), y) + pairwise_gkl(proxy(x), proxy(x_adv), vg, alpha, beta))
    p_opt.zero_grad()
    loss.backward()
    p_opt.step()
    diffs = {}
    with torch.no_grad():
        for (name, w), wp in zip(model.named_parameters(), proxy.parameters()):
            if w.ndim > 1:
                delta = wp - w
                diffs[name] = w.norm() / (delta.norm() + 1e-20) * delta
                w.add_(awp_gamma * diffs[name])
    # training step
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
    o_adv = model(x_adv)
    o_nat = model(x)
    loss = F.cross_entropy(o_nat, y) + pairwise_gkl(o_nat, o_adv, vg, alpha, beta)
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        for name, w in model.named_parameters():
            if name in diffs:
                w.sub_(awp_gamma * diffs[name])
    return o_nat.detach()


@pytest.mark.parametrize("gamma", [1.0, 0.4])
def test_one_step_equals_straight_line_spec(tmp_path, gamma):
    cfg = tiny_config(gkl_weight_exponent=gamma, averaging="none")
    tr = Trainer(cfg, tmp_path / "run", progress=False)
    torch.manual_seed(3)
    tr.bank.update(torch.randn(200, 10) * 3, torch.arange(200) % 10)  # a non-uniform bank
    tr.bank.finish_epoch()
    tr.model.double()
    tr.awp.proxy.double()
    reference = copy.deepcopy(tr.model)
    x = torch.rand(16, 3, 32, 32, dtype=torch.float64)
    y = torch.arange(16) % 10
    v = tr.bank.weights(y).double()
    epoch = 2
    eps_t = cfg.eps * epoch / cfg.epochs
    torch.manual_seed(11)
    tr.training_step(x, y, epoch, lr=cfg.lr)
    torch.manual_seed(11)
    straight_line_step(reference, x, y, v, eps=eps_t, steps=5, step=eps_t / 2, alpha=cfg.gkl_wmse_weight, beta=cfg.gkl_ce_weight,
                       gamma=gamma, lr=cfg.lr, awp_gamma=cfg.awp_gamma, momentum=cfg.momentum, wd=cfg.weight_decay)
    got, want = tr.model.state_dict(), reference.state_dict()
    for k in want:
        assert torch.allclose(got[k].double(), want[k].double(), rtol=0, atol=1e-10), k


def test_bank_accumulates_natural_logits_of_the_step(tmp_path):
    tr = Trainer(tiny_config(averaging="none"), tmp_path / "run", progress=False)
    x, y = torch.rand(8, 3, 32, 32), torch.tensor([0, 1, 1, 2, 2, 2, 3, 3])
    tr.training_step(x, y, epoch=1, lr=0.05)
    tr.bank.finish_epoch()
    rows = tr.bank.weights(torch.tensor([0, 1, 2, 3, 4]))
    assert torch.allclose(rows.sum(1), torch.ones(5))
    assert not torch.allclose(rows[0], torch.full((10,), 0.1))  # updated from the step
    assert torch.allclose(rows[4], torch.full((10,), 0.1))  # class 4 unseen: keeps the uniform row


# ------------------------------------------------------------------ AWP
def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def test_awp_restore_is_bit_exact_without_update():
    model = _net()
    before = copy.deepcopy(model.state_dict())
    awp = AWP(model, copy.deepcopy(model), lr=0.1, gamma=0.01)
    x, y = torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1])
    awp.perturb(lambda m: F.cross_entropy(m(x), y))
    moved = [k for k in before if not torch.equal(before[k], model.state_dict()[k])]
    assert moved == ["0.weight", "4.weight"]  # only weights with ndim > 1
    awp.restore()
    for k, v in before.items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_awp_keeps_the_update_made_at_the_perturbed_point():
    model = _net().double()
    awp = AWP(model, copy.deepcopy(model), lr=0.1, gamma=0.01)
    x, y = torch.randn(5, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    w0 = {k: v.clone() for k, v in model.named_parameters()}
    awp.perturb(lambda m: F.cross_entropy(m(x), y))
    w_pert = {k: v.clone() for k, v in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    opt.step()
    awp.restore()
    for k, p in model.named_parameters():
        # the SGD update computed at the perturbed point, applied to the unperturbed weights
        assert torch.allclose(p, w0[k] - 0.1 * grads[k], atol=1e-12), k
        if p.ndim > 1:
            assert not torch.allclose(w_pert[k], w0[k])


def test_awp_inactive_before_warmup(tmp_path, monkeypatch):
    tr = Trainer(tiny_config(awp_warmup=3, averaging="none"), tmp_path / "run", progress=False)
    calls = []
    monkeypatch.setattr(tr.awp, "perturb", lambda fn: calls.append(1))
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8)
    tr.training_step(x, y, epoch=2, lr=0.05)
    assert calls == []
    tr.training_step(x, y, epoch=3, lr=0.05)
    assert calls == [1]


# ------------------------------------------------------------------ every loss runs, two-view
@pytest.mark.parametrize("loss", list(METHODS))
def test_each_loss_takes_a_finite_step(tmp_path, loss):
    tr = Trainer(tiny_config(loss=loss, averaging="none"), tmp_path / "run", progress=False)
    before = [p.clone() for p in tr.model.parameters()]
    sums = tr.training_step(torch.rand(8, 3, 32, 32), torch.arange(8), epoch=2, lr=0.05)
    assert torch.isfinite(sums).all()
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.model.parameters()))


def test_two_view_step_updates_bank_from_basic_half_only(tmp_path):
    tr = Trainer(tiny_config(augment="autoaug", averaging="none"), tmp_path / "run", progress=False)
    x_basic, x_aug = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)
    x, y = tr._to_device([x_basic, x_aug], torch.tensor([0, 1, 2, 3]))
    assert x.shape[0] == 8 and y.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    tr.training_step(x, y, epoch=2, lr=0.05)
    assert tr.bank.state_dict()["counts"].sum().item() == 4


# ------------------------------------------------------------------ exact resume
def _weights(run: Path) -> dict:
    from checkpoints.io import load_checkpoint

    return load_checkpoint(run / "checkpoints" / "last.pt")


def _assert_same_state(a: dict, b: dict) -> None:
    for key in ("model", "avg_model"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    for k in ("bank", "accumulator", "counts"):
        assert torch.equal(a["bank"][k], b["bank"][k]), k
    assert a["history"][-1]["train_loss"] == b["history"][-1]["train_loss"]


class Crash(Exception):
    pass


def test_resume_after_epoch_and_mid_epoch_is_bitwise_exact(tmp_path, monkeypatch):
    cfg = tiny_config(epochs=2, checkpoint_every_steps=5, val_size=1200, eval_subset=32)
    Trainer(cfg, tmp_path / "full", progress=False).fit()
    full = _weights(tmp_path / "full")
    steps_per_epoch = -(-(1437 - 1200) // 32)  # the last partial batch is kept (drop_last false)

    for crash_at in (steps_per_epoch + 1, steps_per_epoch + 5):  # just after epoch 1; mid-epoch 2 (after step ckpt)
        run = tmp_path / f"crash{crash_at}"
        tr = Trainer(cfg, run, progress=False)
        original = Trainer.training_step

        def crashing(self, *a, **k):
            if self.global_step == crash_at:
                raise Crash
            return original(self, *a, **k)

        monkeypatch.setattr(Trainer, "training_step", crashing)
        with pytest.raises(Crash):
            tr.fit()
        monkeypatch.setattr(Trainer, "training_step", original)
        saved = _weights(run)
        assert saved["global_step"] <= crash_at and saved["global_step"] >= steps_per_epoch
        Trainer(cfg, run, resume=True, progress=False).fit()
        _assert_same_state(full, _weights(run))


def test_run_folder_outputs(tmp_path):
    import pandas as pd

    run = tmp_path / "run"
    Trainer(tiny_config(epochs=2), run, progress=False).fit()
    df = pd.read_csv(run / "log.csv")
    assert list(df.epoch) == [1, 2]
    for col in ("train_loss", "train_ce", "train_soft_ce", "train_wmse", "val_clean", "val_pgd", "val_clean_avg",
                "val_pgd_avg", "eps_x255", "lr", "train_time_s"):
        assert col in df, col
    assert df.eps_x255.tolist() == pytest.approx([8.0, 16.0])
    names = {p.name for p in (run / "checkpoints").iterdir()}
    assert {"last.pt", "best.pt", "epoch_0001.pt", "epoch_0002.pt"} <= names
    assert (run / "training_curves.png").stat().st_size > 1000
    assert (run / "config.yaml").is_file()
