"""Config: presets, overrides, eps parsing, validation errors."""
import argparse

import pytest

from errors import UserError
from training.config import TrainConfig, add_config_arguments, build_config, list_presets, parse_eps


def _args(argv):
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    return p.parse_args(argv)


@pytest.mark.parametrize("text,value", [("8", 8 / 255), ("8/255", 8 / 255), ("0.0314", 0.0314), (0.5, 0.5)])
def test_parse_eps(text, value):
    assert parse_eps(text) == pytest.approx(value)


@pytest.mark.parametrize("bad", ["300/255", "abc", "-1", "1/0", "nan"])
def test_parse_eps_rejects(bad):
    with pytest.raises(UserError, match="epsilon"):
        parse_eps(bad)


def test_every_preset_loads_and_validates():
    names = list_presets()
    for required in ("quickstart", "cifar100-gkl", "cifar100-gkl-autoaug", "cifar10-gkl", "cifar10-gkl-autoaug",
                     "cifar100-gkl-dm", "cifar10-gkl-dm", "cifar100-trades"):
        assert required in names
    for name in names:
        cfg = build_config(name, _args([]))
        assert cfg.preset == name and 0 < cfg.eps <= 1


def test_overrides_are_typed():
    cfg = build_config("cifar100-gkl", _args(["--epochs", "5", "--gkl-wmse-weight", "12", "--eps", "4",
                                              "--nesterov", "true"]))
    assert (cfg.epochs, cfg.gkl_wmse_weight, cfg.nesterov) == (5, 12.0, True)
    assert cfg.eps == pytest.approx(4 / 255)
    assert cfg.gkl_ce_weight == 4.0  # the preset's value stays


@pytest.mark.parametrize("argv,needle", [(["--epochs", "2.5"], "2.5"), (["--loss", "foo"], "foo"),
                                         (["--arch", "resnet9000"], "resnet9000"), (["--gamma", "2"], "gamma"),
                                         (["--batch-size", "0"], "batch-size"), (["--nesterov", "maybe"], "maybe")])
def test_bad_overrides_name_the_value(argv, needle):
    with pytest.raises(UserError, match=needle):
        build_config("quickstart", _args(argv))


def test_paper_defaults():
    cfg = TrainConfig()
    assert (cfg.lr, cfg.batch_size, cfg.epochs, cfg.awp_gamma, cfg.awp_warmup, cfg.tau) == (0.2, 128, 200, 0.005, 10, 4.0)
