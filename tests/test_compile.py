"""``--compile`` keeps the numbers: AWP, the bank, both averaging modes, two-view batches and resume.

The compiled step runs through torch.compile with the ``aot_eager`` backend (dynamo capture and
AOTAutograd, without code generation, so it stays cheap on CPU) and must give the eager step's
weights to 1e-5. The GPU path (inductor, CUDA graphs) is measured by ``python -m bench.gpu_throughput``.
"""
from __future__ import annotations

import pytest
import torch

from training import engine
from training.config import TrainConfig
from training.schedules import attack_budget
from training.trainer import Trainer

BASE = dict(dataset="digits", arch="tiny-cnn", eps=16 / 255, epochs=2, batch_size=8, lr=0.05, awp_gamma=0.005,
            awp_warmup=1, device="cpu", amp="off", gkl_wmse_weight=20.0, gkl_ce_weight=4.0, compile_backend="aot_eager")


def _steps(cfg: TrainConfig, n_views: int, compiled: bool) -> engine.StepModules:
    torch.manual_seed(0)
    m = engine.build_step(TrainConfig(**{**cfg.__dict__, "compile": compiled}), 10, torch.device("cpu"),
                          n_views=n_views)
    gen = torch.Generator().manual_seed(1)
    budget = attack_budget(cfg.eps, 2, cfg.epochs)
    torch.manual_seed(2)
    for step in range(1, 4):
        x, y = torch.rand(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8 // n_views,), generator=gen)
        m.bank.finish_epoch() if step == 2 else None  # a non-uniform bank from the second step on
        engine.training_step(m, x, y.repeat(n_views), budget=budget, lr=cfg.lr, awp_on=True, step=step)
    return m


@pytest.mark.parametrize("averaging,n_views,loss", [("epoch-ema", 1, "gkl"), ("step-ema", 2, "gkl"),
                                                    ("step-ema", 1, "trades")])
def test_compiled_step_gives_the_eager_weights(averaging, n_views, loss):
    cfg = TrainConfig(**BASE, averaging=averaging, loss=loss, augment="autoaug" if n_views == 2 else "crop").validate()
    eager, compiled = _steps(cfg, n_views, False), _steps(cfg, n_views, True)
    assert compiled.attack_model is not compiled.model  # really compiled
    for a, b in zip(eager.model.state_dict().values(), compiled.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6)
    assert torch.allclose(eager.bank.bank, compiled.bank.bank, rtol=1e-5, atol=1e-7)
    if averaging == "step-ema":
        for a, b in zip(eager.averager.avg.module.parameters(), compiled.averager.avg.module.parameters()):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


class Crash(Exception):
    pass


def test_compiled_run_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    from checkpoints.io import load_checkpoint

    cfg = TrainConfig(**{**BASE, "batch_size": 32, "compile": True, "val_size": 1341, "eval_subset": 16,
                         "eval_pgd_steps": 1, "attack_budget": "fixed", "attack_steps": 1,
                         "attack_step_size": 8 / 255, "averaging": "epoch-ema", "avg_decay": 0.5}).validate()
    Trainer(cfg, tmp_path / "full", progress=False).fit()
    steps_per_epoch = (1437 - 1341) // 32
    original = Trainer.training_step

    def crash_in_epoch_2(self, *a, **k):
        if self.global_step == steps_per_epoch + 1:
            raise Crash
        return original(self, *a, **k)

    monkeypatch.setattr(Trainer, "training_step", crash_in_epoch_2)
    with pytest.raises(Crash):
        Trainer(cfg, tmp_path / "cut", progress=False).fit()
    monkeypatch.setattr(Trainer, "training_step", original)
    Trainer(cfg, tmp_path / "cut", resume=True, progress=False).fit()
    full, resumed = (load_checkpoint(tmp_path / run / "checkpoints" / "last.pt") for run in ("full", "cut"))
    assert resumed["global_step"] == full["global_step"] == 2 * steps_per_epoch
    for key in ("model", "avg_model"):
        for k, v in full[key].items():
            assert torch.allclose(v.float(), resumed[key][k].float(), rtol=1e-6, atol=1e-7), (key, k)


def test_the_phase_hook_sees_every_phase_of_a_step():
    from bench.step_profile import PhaseTimer

    cfg = TrainConfig(**{**BASE, "compile": False}).validate()
    m = engine.build_step(cfg, 10, torch.device("cpu"))
    m.phase = timer = PhaseTimer(torch.device("cpu"))
    engine.training_step(m, torch.rand(8, 3, 32, 32), torch.arange(8) % 10, budget=attack_budget(cfg.eps, 2, 2),
                         lr=0.05, awp_on=True, step=1)
    assert timer.names == ["natural forward", "attack", "awp perturb", "training forward",
                                     "training backward", "optimizer", "awp restore", "bank + averaging"]
