"""Architectures: RobustBench key layout and outputs, parameter counts, registry, channels_last."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn as nn

from models import MODELS, build_model
from models.dm_wide_resnet import CIFAR10_MEAN, CIFAR100_MEAN, CIFAR100_STD, DMWideResNet


def _robustbench_architecture(module: str) -> ModuleType:
    """Load ``robustbench/model_zoo/architectures/<module>.py`` by path.

    These files import only torch; importing them through the ``robustbench`` package would pull
    in its whole model zoo (about 10 s here) and the AutoAttack bridge.
    """
    spec = importlib.util.find_spec("robustbench")
    assert spec is not None and spec.submodule_search_locations, "robustbench is not installed"
    path = Path(spec.submodule_search_locations[0]) / "model_zoo" / "architectures" / f"{module}.py"
    mod_spec = importlib.util.spec_from_file_location(f"_robustbench_arch_{module}", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def _perturb_bn_stats(model: nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm affine parameters and running statistics, so eval outputs test them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))


def _check_strict_both_ways(ours: nn.Module, theirs: nn.Module, batch: int = 2) -> None:
    """Keys equal; each model's weights load strictly into the other and give the same logits."""
    ours.eval()
    theirs.eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for source, target in ((ours, theirs), (theirs, ours)):
        _perturb_bn_stats(source, seed=1 if source is ours else 2)
        target.load_state_dict(source.state_dict(), strict=True)
        with torch.no_grad():
            a, b = source(x), target(x)
        assert a.shape == (batch, _num_classes(source))
        assert (a - b).abs().max().item() < 1e-5, (a - b).abs().max().item()
        assert a.std().item() > 1e-3  # the logits are not degenerate


def _num_classes(model: nn.Module) -> int:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features


def test_wrn_34_10_matches_robustbench_wideresnet_c100():
    rb = _robustbench_architecture("wide_resnet")
    theirs = rb.WideResNet(depth=34, num_classes=100, widen_factor=10, sub_block1=False)
    _check_strict_both_ways(build_model("wrn-34-10", num_classes=100), theirs)


def test_wrn_28_10_silu_matches_robustbench_dmwideresnet_c10():
    rb = _robustbench_architecture("dm_wide_resnet")
    theirs = rb.DMWideResNet(num_classes=10, depth=28, width=10, activation_fn=nn.SiLU,
                             mean=rb.CIFAR10_MEAN, std=rb.CIFAR10_STD)
    _check_strict_both_ways(build_model("wrn-28-10-silu", num_classes=10), theirs)


def test_small_variants_match_robustbench():
    wrn, dm, resnet = (_robustbench_architecture(m) for m in ("wide_resnet", "dm_wide_resnet", "resnet"))
    _check_strict_both_ways(build_model("wrn-10-1", num_classes=10), wrn.WideResNet(depth=10, widen_factor=1))
    _check_strict_both_ways(build_model("wrn-16-4-silu", num_classes=100),
                            dm.DMWideResNet(num_classes=100, depth=16, width=4, activation_fn=nn.SiLU,
                                            mean=dm.CIFAR100_MEAN, std=dm.CIFAR100_STD))
    _check_strict_both_ways(build_model("preact-resnet-18", num_classes=10),
                            resnet.PreActResNet(resnet.PreActBlockV2, [2, 2, 2, 2], bn_before_fc=True))


def test_dm_normalisation_defaults_follow_robustbench_entries():
    def tiny(num_classes: int, **kwargs) -> DMWideResNet:
        return DMWideResNet(num_classes, depth=10, width=1, **kwargs)

    assert torch.equal(tiny(100).mean.flatten(), torch.tensor(CIFAR100_MEAN))
    assert torch.equal(tiny(100).std.flatten(), torch.tensor(CIFAR100_STD))
    assert torch.equal(tiny(10).mean.flatten(), torch.tensor(CIFAR10_MEAN))
    plain = tiny(10, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert "mean" not in plain.state_dict() and "std" not in plain.state_dict()
    # Without normalisation, feeding (x - m) / s equals feeding x to the normalising twin.
    twin = tiny(10)
    _perturb_bn_stats(twin, seed=4)
    plain.load_state_dict(twin.state_dict())
    plain.eval()
    twin.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected, got = twin(x), plain((x - twin.mean) / twin.std)
    assert (expected - got).abs().max().item() < 1e-5
    assert (expected - plain(x)).abs().max().item() > 1e-3  # and the normalisation matters
    with pytest.raises(ValueError, match="3 values"):
        tiny(10, mean=(0.5, 0.5))


@pytest.mark.parametrize("name, num_classes, millions", [
    ("wrn-34-10", 100, 46.218164), ("wrn-34-10", 10, 46.160474), ("wrn-28-10", 10, 36.479194),
    ("wrn-34-20", 10, 184.531674), ("wrn-28-10-silu", 10, 36.479194), ("wrn-70-16-silu", 10, 266.796506),
    ("preact-resnet-18", 10, 11.17217), ("wrn-16-4", 10, 2.74889), ("wrn-10-1", 10, 0.07785),
])
def test_parameter_counts(name, num_classes, millions):
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = build_model(name, num_classes=num_classes)
    assert sum(p.numel() for p in model.parameters()) == round(millions * 1e6)


def test_registry_lists_expected_names_and_rejects_unknown():
    expected = {"wrn-34-10", "wrn-28-10", "wrn-34-20", "wrn-16-4", "wrn-10-1", "wrn-28-10-silu",
                "wrn-70-16-silu", "wrn-16-4-silu", "preact-resnet-18", "small-cnn"}
    assert expected <= set(MODELS)
    with pytest.raises(KeyError, match="wrn-34-10"):  # the message lists the valid choices
        build_model("wrn-99-1", num_classes=10)


@pytest.mark.parametrize("name", ["wrn-10-1", "wrn-16-4-silu", "preact-resnet-18", "small-cnn"])
def test_channels_last_forward_equals_contiguous(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7)
    _perturb_bn_stats(model, seed=3)
    model.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        out = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert ref.shape == out.shape == (2, 7)
    assert (ref - out).abs().max().item() < 1e-4 * max(1.0, ref.abs().max().item())
