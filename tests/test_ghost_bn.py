"""Ghost BatchNorm (--ghost-bn) against what nn.DataParallel over 4 GPUs computes, emulated on the CPU.

``nn.DataParallel`` scatters the input with ``torch.chunk``, runs one replica of the whole network
per chunk and gathers the outputs. Replicas share the module's parameters (gradients flow back
into them), replica 0 shares its buffers as well and the others get copies, so only the first
chunk's statistics reach the running averages. ``data_parallel`` below does exactly that with
``torch.func.functional_call`` (replica k > 0: the module's parameters with cloned buffers).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from models import build_model
from models.batchnorm import GhostBatchNorm2d, convert_ghost_batchnorm


def data_parallel(module: nn.Module, x: torch.Tensor, devices: int) -> torch.Tensor:
    params = dict(module.named_parameters())
    outs = []
    for k, chunk in enumerate(x.chunk(devices)):
        if k == 0:
            outs.append(module(chunk))
        else:
            buffers = {n: b.clone() for n, b in module.named_buffers()}
            outs.append(functional_call(module, {**params, **buffers}, (chunk,)))
    return torch.cat(outs)


def _pair(arch: str = "small-cnn", splits: int = 4):
    torch.manual_seed(0)
    plain = build_model(arch, num_classes=10).double().train()
    ghost = convert_ghost_batchnorm(copy.deepcopy(plain), splits)
    return plain, ghost


@pytest.mark.parametrize("batch", [32, 10])  # full chunks of 8; a partial batch: chunks of 3, 3, 3, 1
def test_ghost_bn_equals_data_parallel_over_four_devices(batch):
    plain, ghost = _pair()
    x = torch.rand(batch, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.arange(batch) % 10
    want, got = data_parallel(plain, x, 4), ghost(x)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    nn.functional.cross_entropy(want, y).backward()
    nn.functional.cross_entropy(got, y).backward()
    for (name, p), q in zip(plain.named_parameters(), ghost.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=0, atol=1e-12), name
    for (name, a), b in zip(plain.named_buffers(), ghost.buffers()):
        assert torch.equal(a, b), name  # running statistics (and the count) of the first chunk only
    assert not torch.allclose(got, plain(x))  # one BatchNorm call over the whole batch differs


def test_running_statistics_are_the_first_chunks_alone():
    bn = convert_ghost_batchnorm(nn.BatchNorm2d(3, momentum=0.1).double(), splits=4)
    x = torch.randn(16, 3, 5, 5, dtype=torch.float64) * 2 + 1
    x[4:] += 10  # the other chunks would move the means a lot
    bn(x)
    first = x[:4]
    assert torch.allclose(bn.running_mean, 0.1 * first.mean((0, 2, 3)), atol=1e-12)
    assert torch.allclose(bn.running_var, 0.9 + 0.1 * first.var((0, 2, 3), unbiased=True), atol=1e-12)
    assert int(bn.num_batches_tracked) == 1


def test_eval_mode_is_plain_batchnorm_and_state_dict_keys_do_not_change():
    plain, ghost = _pair("wrn-16-4-silu")
    assert any(isinstance(m, GhostBatchNorm2d) for m in ghost.modules())
    assert list(ghost.state_dict()) == list(plain.state_dict())
    fresh = build_model("wrn-16-4-silu", num_classes=10).double()
    fresh.load_state_dict(ghost.state_dict(), strict=True)  # exports load into the plain architecture
    x = torch.rand(6, 3, 32, 32, dtype=torch.float64)
    assert torch.equal(ghost.eval()(x), fresh.eval()(x))


def test_the_run_normalises_in_chunks_in_the_model_and_the_awp_proxy():
    from training import engine
    from training.config import TrainConfig

    cfg = TrainConfig(dataset="digits", arch="small-cnn", batch_size=16, ghost_bn=4, augment="autoaug",
                      device="cpu", amp="off").validate()
    m = engine.build_step(cfg, 10, torch.device("cpu"), n_views=2)
    for net in (m.model, m.awp.proxy):
        layers = [mod for mod in net.modules() if isinstance(mod, nn.BatchNorm2d)]
        assert layers and all(isinstance(b, GhostBatchNorm2d) and b.splits == 8 for b in layers)  # (16 + 16) / 4
    assert cfg.ghost_bn_splits(world_size=2) == 4  # under DDP: within each process's share


@pytest.mark.parametrize("override,needle", [(dict(ghost_bn=48), "does not divide"),
                                             (dict(ghost_bn=32, sync_bn=True), "sync-bn")])
def test_bad_ghost_bn_settings_are_one_line_errors(override, needle):
    from errors import UserError
    from training.config import TrainConfig

    with pytest.raises(UserError, match=needle):
        TrainConfig(**{"batch_size": 128, **override}).validate()


@pytest.mark.parametrize("name,size", [("cifar100-gkl", 32), ("cifar10-gkl", 32), ("cifar100-trades", 32),
                                       ("cifar100-gkl-autoaug", 64), ("cifar10-gkl-autoaug", 64)])
def test_wrn_34_10_presets_normalise_as_the_four_gpu_release(name, size):
    from training.config import TrainConfig, load_preset

    cfg = TrainConfig.from_dict(load_preset(name)).validate()
    assert cfg.ghost_bn == size and cfg.ghost_bn_splits() == 4  # 4 GPUs' worth of chunks in one process
