"""Paper presets train what the released scripts trained (issue 16): the per-dataset attack, the
two-view AWP proxy loss, the TRADES baseline, every training image once per epoch, and the DM-AT
recipe's schedules. Ghost BatchNorm has its own file (test_ghost_bn.py)."""
from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from cifar_fixture import fake_cifar_root  # noqa: F401  (fixture)

from losses import gkl_loss
from training.config import TrainConfig, add_config_arguments, build_config, load_preset
from training.methods import LossSpec

PAPER_GKL = ("cifar100-gkl", "cifar100-gkl-autoaug", "cifar10-gkl", "cifar10-gkl-autoaug")


def preset(name: str, **override) -> TrainConfig:
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    cfg = build_config(name, p.parse_args([]))
    return TrainConfig.from_dict({**cfg.to_dict(), **override}).validate() if override else cfg


def _logits(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    o_nat = torch.randn(6, 10, generator=g, dtype=torch.float64) * 3
    o_adv = (o_nat + torch.randn(6, 10, generator=g, dtype=torch.float64)).requires_grad_()
    scores = torch.softmax(torch.randn(6, 10, generator=g, dtype=torch.float64) * 2, dim=1)
    return o_nat, o_adv, scores


# ------------------------------------------------------------------ item 1: the training attack
@pytest.mark.parametrize("name", ["cifar10-gkl", "cifar10-gkl-autoaug"])
def test_cifar10_presets_attack_with_the_soft_label_ce_alone(name):
    """train_dkl_cifar10.py attacks with alpha=1.0, beta=0.0 in its naming: CE weight 1, wMSE weight 0."""
    from training.methods import gkl_attack

    spec = LossSpec.from_config(preset(name))
    o_nat, o_adv, scores = _logits()
    value = gkl_attack(spec, o_nat, scores)(o_adv, None)
    soft_ce = -(torch.softmax(o_nat, 1) * F.log_softmax(o_adv, 1)).sum()
    assert torch.allclose(value, soft_ce, rtol=1e-14, atol=0)
    (g_attack,) = torch.autograd.grad(value, o_adv)
    (g_ce,) = torch.autograd.grad(soft_ce, o_adv)
    assert torch.allclose(g_attack, g_ce, rtol=0, atol=1e-14)


@pytest.mark.parametrize("name", ["cifar100-gkl", "cifar100-gkl-autoaug"])
def test_cifar100_presets_attack_with_both_terms(name):
    from training.methods import gkl_attack

    spec = LossSpec.from_config(preset(name))
    assert (spec.params["attack_wmse_weight"], spec.params["attack_ce_weight"]) == (1.0, 1.0)
    o_nat, o_adv, scores = _logits()
    value = gkl_attack(spec, o_nat, scores)(o_adv, None)
    both = gkl_loss(o_nat, o_adv, alpha=1.0, beta=1.0, scores=scores, reduction="sum")[0]
    soft_ce = -(torch.softmax(o_nat, 1) * F.log_softmax(o_adv, 1)).sum()
    assert torch.allclose(value, both, rtol=1e-14, atol=0)
    assert (value - soft_ce).item() > 0.1  # the wMSE term is there


def test_attack_weights_are_flags_and_both_zero_is_refused():
    from errors import UserError

    cfg = preset("cifar100-gkl", gkl_attack_wmse_weight=0.5, gkl_attack_ce_weight=2.0)
    params = LossSpec.from_config(cfg).params
    assert (params["attack_wmse_weight"], params["attack_ce_weight"]) == (0.5, 2.0)
    with pytest.raises(UserError, match="attack-ce-weight"):
        preset("cifar10-gkl", gkl_attack_ce_weight=0.0)


# ------------------------------------------------------------------ item 2: two-view AWP proxy loss
def _two_view_step(views: str):
    from training import engine

    cfg = TrainConfig(dataset="digits", arch="small-cnn", augment="autoaug", awp_proxy_views=views,
                      gkl_wmse_weight=20.0, gkl_ce_weight=4.0, gkl_weight_exponent=1.0, aug_weight=0.5, batch_size=8, device="cpu", amp="off").validate()
    torch.manual_seed(0)
    m = engine.build_step(cfg, 10, torch.device("cpu"), n_views=2)
    m.awp.proxy.double().train()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(16, 3, 32, 32, generator=g, dtype=torch.float64)  # [basic(8); aug(8)]
    x_adv = (x + 0.03 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    y = (torch.arange(8) % 10).repeat(2)
    scores = torch.softmax(torch.randn(16, 10, generator=g, dtype=torch.float64) * 2, dim=1)
    return cfg, m, x, x_adv, y, scores


def test_joint_proxy_loss_is_ce_plus_one_gkl_over_the_whole_batch():
    """TradesAWP.calc_awp: CE(proxy(x), y) + GKL(proxy(x), proxy(x_adv)) over [basic; aug] with the
    whole batch's class weights, normalised by the whole batch's weight sum (no aug_weight)."""
    cfg, m, x, x_adv, y, scores = _two_view_step("joint")
    got = m.proxy_loss(x, x_adv, y, scores)[0]
    proxy = m.awp.proxy
    o_nat, o_adv = proxy(x), proxy(x_adv)  # train mode: each call its own batch statistics
    want = F.cross_entropy(o_nat, y) + gkl_loss(o_nat, o_adv, alpha=cfg.gkl_wmse_weight, beta=cfg.gkl_ce_weight,
                                                gamma=cfg.gkl_weight_exponent, scores=scores)[0]
    assert torch.allclose(got, want, rtol=1e-13, atol=0)
    split = _two_view_step("split")
    split_loss = split[1].proxy_loss(*split[2:])[0]
    assert abs(split_loss.item() - got.item()) > 1e-3  # aug_weight 0.5 on the aug half: a different loss


@pytest.mark.parametrize("name", PAPER_GKL)
def test_two_view_presets_use_the_joint_proxy(name):
    cfg = preset(name)
    assert cfg.awp_proxy_views == ("joint" if cfg.augment == "autoaug" else "split")


# ------------------------------------------------------------------ item 3: TRADES
def test_trades_preset_is_the_released_trades_run(capsys):
    import train_at

    cfg = preset("cifar100-trades")
    assert (cfg.trades_kl_weight, cfg.lr_schedule, cfg.drop_last, cfg.epochs, cfg.awp_warmup) == (9.0, "cosine-trades",
                                                                                             True, 200, 10)
    from training.schedules import config_lr

    for e in (1, 2, 50, 100, 199, 200):  # train_trades_cifar.py's adjust_learning_rate_cosine
        assert config_lr(cfg, e) == pytest.approx(0.2 * 0.5 * (1 + math.cos((e - 1) / 200 * math.pi)), rel=1e-14)
    assert config_lr(cfg, 1) == 0.2
    assert abs(config_lr(cfg, 100) - config_lr(preset("cifar100-gkl"), 100)) > 5e-4  # not the DKL scripts' curve
    assert train_at.main(["--preset", "cifar100-trades", "--print-schedule"]) == 0
    out = capsys.readouterr().out
    assert "cosine-trades" in out and "cos(pi * (e - 1 - w) / (E - w))" in out


# ------------------------------------------------------------------ item 4: the training set
def _indices(cfg, rank: int, world: int, epoch: int = 1, start: int = 0) -> list[list[int]]:
    from training.loaders import build_training_data

    data = build_training_data(cfg, torch.device("cpu"), rank, world)
    data.sampler.set_epoch(epoch, start)
    return [[i for i, _ in batch] for batch in data.sampler]


@pytest.mark.parametrize("world,batch", [(1, 16), (2, 16), (3, 15), (4, 20)])
def test_every_training_image_once_per_epoch_with_the_last_partial_batch(fake_cifar_root, world, batch):  # noqa: F811
    """50 fake CIFAR-10 images: ceil(50 / batch) steps, the last one partial (split over the ranks
    as evenly as it goes), every image exactly once, the same global batches for any world size."""
    cfg = TrainConfig(dataset="cifar10", data_dir=str(fake_cifar_root), batch_size=batch, workers=0, device="cpu",
                      augment="basic").validate()
    assert cfg.val_size == 0 and not cfg.drop_last  # the defaults: the paper presets' training set
    steps = math.ceil(50 / batch)
    per_rank = [_indices(cfg, r, world) for r in range(world)]
    assert all(len(batches) == steps for batches in per_rank)
    last = [len(b[-1]) for b in per_rank]
    assert sum(last) == 50 - (steps - 1) * batch and max(last) - min(last) <= 1
    global_batches = [sum((b[s] for b in per_rank), []) for s in range(steps)]
    assert sorted(sum(global_batches, [])) == list(range(50))
    assert global_batches == _indices(cfg, 0, 1)  # the same global batches as one process
    assert _indices(cfg, 0, 1, start=steps - 1) == [global_batches[-1]]  # a resume at the last step sees it
    dropped = TrainConfig.from_dict({**cfg.to_dict(), "drop_last": True}).validate()
    assert len(_indices(dropped, 0, 1)) == 50 // batch


def test_paper_presets_train_on_every_image_without_a_held_out_split():
    for name in (*PAPER_GKL, "cifar100-trades"):
        assert preset(name).val_size == 0, name
    assert load_preset("quickstart")["val_size"] == 200  # the CPU demo keeps its explicit held-out split


def test_a_partial_batch_too_small_for_the_processes_is_refused(fake_cifar_root):  # noqa: F811
    from errors import UserError

    cfg = TrainConfig(dataset="cifar10", data_dir=str(fake_cifar_root), batch_size=24, workers=0, device="cpu")
    with pytest.raises(UserError, match="drop-last"):  # 50 = 2 x 24 + 2: two images for three processes
        _indices(TrainConfig.from_dict({**cfg.to_dict(), "batch_size": 24}).validate(), 0, 3)


def test_mixed_sampler_keeps_the_real_tail_and_splits_it_over_ranks():
    from data.generated import MixedBatchSampler

    n_real, n_gen, batch = 50, 400, 16  # 8 real + 8 generated per step: 6 full steps and a tail of 2
    per_rank = []
    for rank in range(2):
        s = MixedBatchSampler(n_real, n_gen, batch, 0.5, seed=2, rank=rank, world_size=2, drop_last=False)
        s.set_epoch(3)
        per_rank.append([[i for i, _ in b] for b in s])
        assert s.steps_per_epoch == 7 and s.batch_size_of(6) == 2 + 8
    real = [i for batches in per_rank for b in batches for i in b if i < n_real]
    assert sorted(real) == list(range(n_real))  # every real image once in the epoch
    assert [len(b) for b in per_rank[0]][-1] + [len(b) for b in per_rank[1]][-1] == 10
    assert MixedBatchSampler(n_real, n_gen, batch, 0.5).steps_per_epoch == 6  # drop_last: the old epoch


def test_without_a_held_out_split_the_log_says_what_it_measures(tmp_path):
    import pandas as pd

    from training.trainer import Trainer

    cfg = TrainConfig(dataset="digits", arch="tiny-cnn", epochs=1, batch_size=256, attack_budget="fixed",
                      attack_steps=1, attack_step_size=4 / 255, eps=8 / 255, awp_gamma=0.0, eval_subset=16,
                      eval_pgd_steps=1, device="cpu", amp="off", augment="none").validate()
    tr = Trainer(cfg, tmp_path / "run", progress=False)
    assert tr.sampler.steps_per_epoch == math.ceil(1437 / 256)
    tr.fit()
    df = pd.read_csv(tmp_path / "run" / "log.csv")
    assert {"seen_clean", "seen_pgd", "seen_clean_avg", "seen_pgd_avg"} <= set(df.columns)
    assert not any(c.startswith("val_") for c in df.columns)
    assert not (tmp_path / "run" / "checkpoints" / "best.pt").exists()  # best is chosen on held-out images only


# ------------------------------------------------------------------ item 7: DM-AT recipe
@pytest.mark.parametrize("name,epochs", [("cifar10-gkl-dm", 2400), ("cifar100-gkl-dm", 1600)])
def test_dm_presets_follow_the_dm_at_row(name, epochs):
    cfg = preset(name)
    assert (cfg.epochs, cfg.batch_size, cfg.generated_epoch, cfg.val_size) == (epochs, 2048, "dataset-size", 1024)
    steps = math.ceil(50000 / 2048)  # DM-AT's SemiSupervisedSampler: ceil(dataset_size / batch)
    assert cfg.warmup_epochs == 0.025 * epochs  # OneCycleLR(pct_start=0.025)
    assert cfg.step_ema_warmup + 1 == 0.025 * epochs * steps  # ema_update's warmup_steps
    assert (cfg.averaging, cfg.step_ema_decay, cfg.lr_schedule, cfg.lr) == ("step-ema", 0.995, "onecycle", 0.2)


@pytest.mark.parametrize("name", ["cifar10-gkl-dm", "cifar100-gkl-dm"])
def test_onecycle_schedule_equals_torch_onecyclelr_stepped_per_epoch(name):
    """DM-AT: OneCycleLR(max_lr=lr, pct_start=0.025, total_steps=epochs), one scheduler step per epoch,
    momentum cycled by the scheduler."""
    from training.schedules import config_lr, config_momentum

    cfg = preset(name)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, pct_start=0.025, total_steps=cfg.epochs)
    for e in range(1, cfg.epochs + 1):
        group = opt.param_groups[0]
        assert config_lr(cfg, e) == pytest.approx(group["lr"], rel=1e-9, abs=1e-15), e
        assert config_momentum(cfg, e) == pytest.approx(group["momentum"], rel=1e-9), e
        opt.step()
        sched.step()


def test_onecycle_momentum_reaches_the_optimiser(tmp_path):
    from training.trainer import Trainer

    cfg = TrainConfig(dataset="digits", arch="tiny-cnn", epochs=40, warmup_epochs=4, lr_schedule="onecycle",
                      nesterov=True, batch_size=8, awp_gamma=0.0, device="cpu", amp="off").validate()
    tr = Trainer(cfg, tmp_path / "run", progress=False)
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8)
    tr.training_step(x, y, epoch=4, lr=0.1)
    assert tr.optimizer.param_groups[0]["momentum"] == pytest.approx(0.85)  # the warm-up's end
    tr.training_step(x, y, epoch=1, lr=0.1)
    assert tr.optimizer.param_groups[0]["momentum"] == pytest.approx(0.95)


def test_dataset_size_epoch_of_the_mixed_sampler(fake_cifar_root, tmp_path):  # noqa: F811
    """DM-AT's epoch: ceil(len(CIFAR training set) / batch) mixed steps, however many real images a pass takes."""
    import numpy as np

    from data.convert_generated import convert
    from training.loaders import build_training_data

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "gen.npz", image=rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8),
             label=rng.integers(0, 10, 64))
    convert([tmp_path / "gen.npz"], tmp_path / "gen", progress=False)
    base = dict(dataset="cifar10", data_dir=str(fake_cifar_root), generated=str(tmp_path / "gen"), batch_size=10,
                generated_fraction=0.8, workers=0, device="cpu")
    dm = build_training_data(TrainConfig(**base, generated_epoch="dataset-size").validate(), torch.device("cpu"))
    assert dm.sampler.steps_per_epoch == math.ceil(50 / 10)
    one_pass = build_training_data(TrainConfig(**base).validate(), torch.device("cpu"))
    assert one_pass.sampler.steps_per_epoch == math.ceil(50 / 2)  # 2 real images per step


def test_a_run_saved_before_drop_last_existed_resumes_dropping_its_last_batch(tmp_path):
    import yaml

    import train_at

    old = {k: v for k, v in preset("quickstart").to_dict().items() if k != "drop_last"}
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").touch()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    cfg, _, resuming = train_at.resolve(train_at.get_args_parser().parse_args(["--resume", str(tmp_path)]))
    assert resuming and cfg.drop_last  # as the run was trained (its step counts stay valid)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**old, "drop_last": False}))
    assert not train_at.resolve(train_at.get_args_parser().parse_args(["--resume", str(tmp_path)]))[0].drop_last
