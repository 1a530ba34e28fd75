"""Weight averaging: per-epoch EMA (released weights) and per-step EMA with warm-up (DM-AT)."""
import copy

import torch
import torch.nn as nn

from training.averaging import WeightAverager


def _net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def _set(model, seed):
    src = _net(seed)
    model.load_state_dict(src.state_dict())
    model[1].running_mean.fill_(float(seed))


def test_epoch_ema_copies_first_then_decays_including_bn_buffers():
    model = _net(0)
    avg = WeightAverager(model, "epoch-ema", decay=0.9, start_epoch=2)
    avg.after_epoch(model, 1)
    assert avg.module is None  # before avg_start_epoch
    _set(model, 1)
    avg.after_epoch(model, 2)
    first = copy.deepcopy(avg.module.state_dict())
    assert torch.equal(first["0.weight"], model.state_dict()["0.weight"])
    _set(model, 2)
    avg.after_epoch(model, 3)
    want = 0.9 * first["0.weight"] + 0.1 * model.state_dict()["0.weight"]
    assert torch.allclose(avg.module.state_dict()["0.weight"], want, atol=1e-7)
    want_bn = 0.9 * 1.0 + 0.1 * 2.0
    assert torch.allclose(avg.module.state_dict()["1.running_mean"], torch.full((3,), want_bn))


def test_step_ema_warmup_decay_and_exact_reload():
    model = _net(0)
    avg = WeightAverager(model, "step-ema", step_decay=0.995, step_warmup=2)
    ref = None
    for step in range(1, 8):
        _set(model, step)
        avg.after_step(model, step)
        w = model.state_dict()["0.weight"]
        if step <= 2:
            assert avg.module is None
            continue
        n = step - 3  # updates before this one
        ref = w.clone() if n == 0 else min(0.995, (1 + n) / (10 + n)) * ref + (1 - min(0.995, (1 + n) / (10 + n))) * w
        assert torch.allclose(avg.module.state_dict()["0.weight"], ref, atol=1e-6), step
    assert int(avg.avg.n_averaged) == 5
    # a reloaded averager continues with the same count, so the same decay
    again = WeightAverager(_net(9), "step-ema", step_decay=0.995, step_warmup=2)
    again.load(avg.module.state_dict(), avg.avg.n_averaged.clone())
    _set(model, 8)
    avg.after_step(model, 8)
    again.after_step(model, 8)
    assert torch.equal(avg.module.state_dict()["0.weight"], again.module.state_dict()["0.weight"])
