"""Extending by one registry entry (docs/EXTENDING.md): a method with its own parameter, an evaluation
attack with its own runner; the parameters' names, old keys that keep loading, and the resume of a run
folder written before the rename."""
from __future__ import annotations

import argparse
import shutil
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from attacks import pgd
from errors import UserError
from evaluation import SuiteSettings, run_suite
from evaluation.report import rule_lines
from evaluation.runners import iterative_runner, run_cw, run_pgd
from evaluation.spec import ATTACKS, AttackSpec, EvalAttack, attack_examples, parse_attack
from evaluation.spec import register as register_attack
from training.config import TrainConfig, add_config_arguments, build_config, load_yaml
from training.methods import METHODS, LossSpec, Method, ce_on, training_loss
from training.methods import register as register_method
from training.params import Param


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    return p.parse_args(argv)


@contextmanager
def registered(table, key: str, entry, register):
    """``entry`` in ``table`` for the ``with`` block only (the registries are process-wide)."""
    register(entry)
    try:
        yield entry
    finally:
        del table[key]


# ------------------------------------------------------------------ a method with its own parameter
def _smoothed_ce(spec, o_nat, o_adv, y, scores, n_views):
    ce = F.cross_entropy(o_nat, y, label_smoothing=spec.params["smoothing"])
    return ce, {"ce": ce.detach()}


THROWAWAY = Method("ls-ce", "no attack; loss: CE(nat) with its own label smoothing", forwards=("nat",),
                   loss=_smoothed_ce, parts=("ce",),
                   params=(Param("smoothing", 0.1, "label smoothing of its CE", low=0, high=1, old_keys=("eps_ls",)),))


def test_a_method_with_its_own_parameter_is_one_registry_entry(capsys):
    with registered(METHODS, "ls-ce", THROWAWAY, register_method):
        cfg = build_config("quickstart", _args(["--loss", "ls-ce", "--ls-ce-smoothing", "0.3"]))
        assert cfg.ls_ce_smoothing == 0.3 and cfg.to_dict()["ls_ce_smoothing"] == 0.3  # config.yaml, --print-config
        assert LossSpec.from_config(cfg).params == {"smoothing": 0.3}
        assert TrainConfig.from_dict(cfg.to_dict()) == cfg
        with pytest.raises(UserError, match=r"--ls-ce-smoothing \(was --eps-ls\) must be in \[0, 1\], got 1.5"):
            build_config("quickstart", _args(["--loss", "ls-ce", "--ls-ce-smoothing", "1.5"]))
        with pytest.raises(UserError, match="--ls-ce-smoothing expects float"):
            build_config("quickstart", _args(["--loss", "ls-ce", "--eps-ls", "lots"]))
        assert build_config("quickstart", _args(["--loss", "ls-ce", "--eps-ls", "0.2"])).ls_ce_smoothing == 0.2
        assert "--ls-ce-smoothing" in _help() and "label smoothing of its CE (default 0.1, in [0, 1]" in _help()
        y = torch.tensor([0, 1])
        loss, _, _, _ = training_loss(LossSpec.from_config(cfg), torch.nn.Identity(), torch.eye(2) * 3, None, y, None)
        assert torch.equal(loss, F.cross_entropy(torch.eye(2) * 3, y, label_smoothing=0.3))
    assert "ls_ce_smoothing" not in TrainConfig().to_dict()
    with pytest.raises(ValueError, match="declared otherwise"):  # a shared key must mean one thing
        register_method(Method("other", "", forwards=("nat",), loss=ce_on("nat"), parts=("ce",), prefix="gkl",
                               params=(Param("ce_weight", 1.0, "something else"),)))


def _help() -> str:
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    return " ".join(p.format_help().split())


def test_alp_is_one_entry_with_its_lambda():
    cfg = build_config("quickstart", _args(["--loss", "alp", "--alp-pair-weight", "0.25"]))
    spec = LossSpec.from_config(cfg)
    assert spec.params == {"pair_weight": 0.25} and spec.random_start == "uniform"
    g = torch.Generator().manual_seed(0)
    o_nat, o_adv = (torch.randn(2, 6, 10, generator=g, dtype=torch.float64) * 3).requires_grad_().unbind(0)
    y = torch.tensor([0, 3, 3, 9, 1, 5])
    loss, parts = METHODS["alp"].loss(spec, o_nat, o_adv, y, None, 1)
    want = (F.cross_entropy(o_nat, y) + F.cross_entropy(o_adv, y)) / 2 + 0.25 * sum(
        ((o_nat[i] - o_adv[i]) ** 2).sum() for i in range(6)) / 6
    assert torch.allclose(loss, want, rtol=0, atol=1e-12) and parts["pair"] > 0
    assert METHODS["alp"].metric_names() == ("loss", "ce", "pair", "acc_nat", "acc_adv")


# ------------------------------------------------------------------ names that say what they weigh; old keys
def test_every_method_parameter_says_what_it_weighs_and_has_a_flag():
    text = _help()
    for key, flag, paper in [("gkl_wmse_weight", "--gkl-wmse-weight", "the paper's alpha"),
                             ("gkl_ce_weight", "--gkl-ce-weight", "the paper's beta"),
                             ("gkl_weight_exponent", "--gkl-weight-exponent", "the paper's gamma"),
                             ("trades_kl_weight", "--trades-kl-weight", "the TRADES paper's beta"),
                             ("mart_kl_weight", "--mart-kl-weight", "the MART paper's beta"),
                             ("alp_pair_weight", "--alp-pair-weight", "ALP's lambda")]:
        assert key in TrainConfig().to_dict() and flag in text and paper in text, key
    assert "--beta CFG_BETA" not in text and "(default 5.0, >= 0; was --beta)" in text  # old flags: hidden, named


def test_old_keys_load_from_files_and_flags_with_one_note(capsys):
    old = build_config(None, _args(["--alpha", "12", "--attack-alpha", "0", "--trades-beta", "9"]),
                       base={"loss": "gkl", "beta": 3.0, "gamma": 0.4, "attack_beta": 1.0})
    assert (old.gkl_wmse_weight, old.gkl_ce_weight, old.gkl_weight_exponent) == (12.0, 3.0, 0.4)
    assert (old.gkl_attack_wmse_weight, old.trades_kl_weight) == (0.0, 9.0)
    note = capsys.readouterr().err
    assert note.count("\n") == 1 and "alpha -> gkl_wmse_weight" in note and "beta -> gkl_ce_weight" in note
    # each source is renamed before the sources are merged: the command line wins either way
    assert build_config(None, _args(["--gkl-ce-weight", "7"]), base={"beta": 3.0}).gkl_ce_weight == 7.0
    assert build_config(None, _args(["--beta", "7"]), base={"gkl_ce_weight": 3.0}).gkl_ce_weight == 7.0
    assert TrainConfig.from_dict({"beta": 2.0, "gkl_ce_weight": 3.0}).gkl_ce_weight == 3.0  # later key wins
    with pytest.raises(UserError, match="unknown config key"):
        TrainConfig.from_dict({"method_params": {}})


def test_old_beta_is_the_weight_of_the_method_that_used_it():
    mart = build_config(None, _args(["--beta", "4"]), base={"loss": "mart"})
    assert (mart.mart_kl_weight, mart.gkl_ce_weight) == (4.0, 5.0)
    assert build_config(None, _args(["--loss", "mart"]), base={"beta": 4.0}).mart_kl_weight == 4.0
    assert build_config(None, _args(["--beta", "4"]), base={"loss": "dkl"}).gkl_ce_weight == 4.0
    trades = TrainConfig.from_dict({"loss": "trades", "beta": 4.0, "trades_beta": 9.0})
    assert (trades.trades_kl_weight, trades.gkl_ce_weight, trades.mart_kl_weight) == (9.0, 4.0, 6.0)


# A config.yaml as train_at.py wrote it before the rename (its key list and order), shrunk to seconds.
OLD_CONFIG = """\
dataset: digits
data_dir: ./datasets
download: false
augment: crop
aug_weight: 0.5
generated: null
generated_fraction: 0.7
generated_epoch: real-pass
val_size: 1245
drop_last: true
arch: tiny-cnn
sync_bn: false
ghost_bn: 0
loss: mart
alpha: 20.0
beta: 2.5
gamma: 1.0
tau: 4.0
weight_source: class
trades_beta: 6.0
attack_alpha: 1.0
attack_beta: 1.0
label_smoothing: 0.0
norm: Linf
eps: 0.06274509803921569
eps_schedule: linear
attack_budget: fixed
attack_steps: 2
attack_step_size: 0.03137254901960784
awp_gamma: 0.005
awp_warmup: 1
awp_proxy_views: split
epochs: 2
batch_size: 64
lr: 0.05
lr_schedule: cosine-epoch
lr_milestones: []
lr_decay: 0.1
warmup_epochs: 0
momentum: 0.9
nesterov: false
weight_decay: 0.0005
averaging: epoch-ema
avg_decay: 0.5
avg_start_epoch: 1
step_ema_decay: 0.995
step_ema_warmup: 0
seed: 3
workers: 0
eval_subset: 16
eval_pgd_steps: 1
checkpoint_every_steps: 0
keep_checkpoints: 2
device: cpu
amp: auto
channels_last: true
compile: false
compile_mode: default
compile_backend: inductor
deterministic: false
preset: null
"""


def test_a_run_folder_written_before_the_rename_resumes_exactly(tmp_path):
    """Train 2 epochs from the old-keyed file; then make a copy look as the old code left it after epoch 1
    (old config.yaml, old config in the checkpoint, no last.pt) and resume it: the same weights."""
    from checkpoints.io import load_checkpoint
    from train_at import main

    (tmp_path / "old.yaml").write_text(OLD_CONFIG)
    straight = tmp_path / "straight"
    assert main(["--config", str(tmp_path / "old.yaml"), "--out", str(straight), "--no-progress"]) == 0
    assert load_yaml(straight / "config.yaml")["mart_kl_weight"] == 2.5  # saved under the new names
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    for name in ("last.pt", "best.pt", "epoch_0002.pt"):
        (resumed / "checkpoints" / name).unlink(missing_ok=True)
    (resumed / "config.yaml").write_text(OLD_CONFIG)
    state = load_checkpoint(resumed / "checkpoints" / "epoch_0001.pt")
    state["config"] = load_yaml(tmp_path / "old.yaml")
    torch.save(state, resumed / "checkpoints" / "epoch_0001.pt")
    assert main(["--resume", str(resumed), "--no-progress"]) == 0
    a, b = (load_checkpoint(run / "checkpoints" / "last.pt") for run in (straight, resumed))
    assert a["epoch"] == b["epoch"] == 2
    for key in ("model", "avg_model"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)


# ------------------------------------------------------------------ an evaluation attack with its own runner
def _fgsm(model, x, y, *, eps, step, steps, norm, start):
    """FGSM: one step of size eps on the CE loss from the clean point (the random start is not used)."""
    return pgd(model, x, y, eps=eps, step=eps, steps=1, norm=norm, random_start="none")


def _parse_fgsm(text: str, name: str):
    return AttackSpec("fgsm", "fgsm", steps=1) if text == "fgsm" else None


FGSM = EvalAttack("fgsm", "fgsm (one step of size eps on the CE loss)", _parse_fgsm, lambda s: "FGSM", "iterative",
                  lambda s: True, iterative_runner(_fgsm), examples=("fgsm",),
                  rule="FGSM: one signed gradient step of size eps on the CE loss")


def test_a_new_evaluation_attack_is_one_entry_with_its_own_runner(robust_digits_model, digits_test):
    x, y = digits_test[0][:48], digits_test[1][:48]
    eps = 16 / 255
    with registered(ATTACKS, "fgsm", FGSM, register_attack):
        assert "fgsm" in attack_examples() and parse_attack("FGSM").label == "FGSM"
        settings = SuiteSettings.build([eps], ["fgsm", "pgd5"], batch_size=16)
        result = run_suite(robust_digits_model, x, y, settings, progress=False)
        assert rule_lines(settings)[-1] == "FGSM: one signed gradient step of size eps on the CE loss"
    direct = result.clean.clone()
    idx = direct.nonzero().flatten()
    for i in range(0, len(idx), 16):  # the suite's batches: the clean-correct points, 16 at a time
        part = idx[i:i + 16]
        x_adv = _fgsm(robust_digits_model, x[part], y[part], eps=eps, step=0, steps=1, norm="Linf", start=None)
        with torch.no_grad():
            direct[part] = robust_digits_model(x_adv).argmax(1) == y[part]
    assert torch.equal(result.robust(eps, "fgsm"), direct)
    assert not torch.equal(result.robust(eps, "fgsm"), result.robust(eps, "pgd5"))  # FGSM ran, not PGD or CW
    with pytest.raises(UserError, match="fgsm"):
        parse_attack("fgsm")  # gone with its entry


def test_every_attack_kind_has_its_own_runner_and_rule():
    runs = [entry.run for entry in ATTACKS.values() if entry.run is not None]
    assert len(set(map(id, runs))) == len(runs) and ATTACKS["pgd"].run is run_pgd and ATTACKS["cw"].run is run_cw
    settings = SuiteSettings.build([8 / 255], ["pgd10", "cw10", "aa"])
    assert [line.split(":")[0] for line in rule_lines(settings)] == ["PGD-K", "CW-K", "AA"]
    assert "eps * 0.25" in rule_lines(settings)[0]
    with pytest.raises(ValueError, match="refuses its example"):
        EvalAttack("x", "x", lambda t, n: None, lambda s: "X", "iterative", lambda s: True, run_pgd, examples=("x",))
    with pytest.raises(ValueError, match="run function"):
        EvalAttack("x", "x", lambda t, n: None, lambda s: "X", "iterative", lambda s: True)
