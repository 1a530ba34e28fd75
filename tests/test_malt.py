"""MALT targeting: the ranking, every target attacked, honest flags, exact constraints, the suite's
chunks/sharding/resume, the composite report with AutoAttack, the model_info export and bad input.

Ranking and targets are checked on linear models, where the linear estimate of the boundary
distance is exact. The evaluation runs use the session's PGD-AT digits CNN on 16 points with
``malt:k=2,iters=10`` (the code path is the real one; only the budget is cut).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

import eval_autoattack
from attacks import malt as malt_module
from attacks.malt import malt, rank_targets
from checkpoints.io import save_checkpoint
from training.config import TrainConfig, save_config

ARGS = ["--eps", "16", "--attacks", "aa:apgd-ce", "malt:k=2,iters=10", "--n-ex", "16", "--chunk-size", "6",
        "--batch-size", "4", "--device", "cpu", "--weights", "raw", "--quiet"]
MALT = "malt:k=2,iters=10"
KILL_AT = 2  # the killed run dies as it starts its 2nd target rank: inside the first chunk's MALT


def _linear(weight: torch.Tensor, bias: torch.Tensor, shape: tuple[int, ...]) -> nn.Module:
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return nn.Sequential(nn.Flatten(), layer).eval()


@pytest.mark.parametrize("norm, dual", [("Linf", 1), ("L2", 2)])
@pytest.mark.parametrize("testk", [9, 5])
def test_the_ranking_is_the_true_order_of_boundary_distances_on_a_linear_model(norm, dual, testk):
    gen = torch.Generator().manual_seed(7)
    weight, bias = torch.randn(10, 48, generator=gen), torch.randn(10, generator=gen)
    model = _linear(weight, bias, (3, 4, 4))
    x = torch.rand(40, 3, 4, 4, generator=gen)
    y = model(x).argmax(1)
    targets = rank_targets(model, x, y, norm=norm, k=4, testk=testk, batch_size=16)
    # The direct computation, in float64: distance to the hyperplane z_y = z_j in the dual norm.
    w, b, flat = weight.double().numpy(), bias.double().numpy(), x.flatten(1).double().numpy()
    logits = flat @ w.T + b
    changed = 0
    for i in range(len(y)):
        yi = int(y[i])
        others = [j for j in np.argsort(-logits[i], kind="stable") if j != yi][:testk]  # the testk highest logits
        dist = {j: (logits[i, yi] - logits[i, j]) / np.linalg.norm(w[yi] - w[j], ord=dual) for j in others}
        expected = sorted(dist.values())[:4]
        got = [dist.get(int(j), np.inf) for j in targets[i]]  # inf: a class outside the candidates
        np.testing.assert_allclose(got, expected, rtol=1e-5)
        changed += [int(j) for j in targets[i]] != others[:4]
    assert changed > 10  # the premise: the distance order is not the logit order for many points


def _box_trap(norm: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Class 1's linear boundary is nearest but lies beyond the [0, 1] box (its pixels are at 1 already);
    class 2's is further and reachable; the other classes are unreachable (zero gradient, far bias)."""
    weight, bias = torch.zeros(10, 48), torch.full((10,), -100.0)
    weight[1, :24], weight[2, 24:] = 1.0, 1.0
    bias[0], bias[1], bias[2] = 0.0, -25.0, -13.5  # margins: class 1 by 1.0, class 2 by 1.5
    x = torch.cat([torch.ones(3, 24), torch.full((3, 24), 0.5)], 1).view(3, 3, 4, 4)
    return _linear(weight, bias, (3, 4, 4)), x, torch.zeros(3, dtype=torch.long)


@pytest.mark.parametrize("norm, eps", [("Linf", 0.1), ("L2", 0.5)])
def test_every_one_of_the_k_targets_is_attacked(norm, eps):
    model, x, y = _box_trap(norm)
    one = malt(model, x, y, eps=eps, norm=norm, k=1, n_iter=20)
    two = malt(model, x, y, eps=eps, norm=norm, k=2, n_iter=20)
    assert (one.targets[:, 0] == 1).all() and (two.targets == torch.tensor([1, 2])).all()
    assert one.robust.all()  # the nearest estimate is a trap: its target alone breaks nothing
    assert not two.robust.any() and (two.broken_at == 1).all() and two.successes_per_rank() == [0, 3]
    assert (model(two.x_adv).argmax(1) == 2).all()


@pytest.mark.parametrize("norm, eps", [("Linf", 24 / 255), ("L2", 1.5)])
def test_flags_match_their_own_examples_and_the_examples_are_exactly_inside(robust_digits_model, digits_test,
                                                                           norm, eps):
    x, y = digits_test[0][:24], digits_test[1][:24]
    result = malt(robust_digits_model, x, y, eps=eps, norm=norm, k=2, n_iter=10, batch_size=8)
    with torch.no_grad():
        wrong = robust_digits_model(result.x_adv).argmax(1) != y
    assert torch.equal(wrong, ~result.robust)  # a flag never disagrees with a forward pass on its own example
    assert (result.x_adv[result.robust] == x[result.robust]).all()
    assert (~result.robust).any()  # the premise: there are examples to check
    delta = (result.x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "Linf" else delta.norm(dim=1)
    assert (size <= eps).all() and result.x_adv.min() >= 0 and result.x_adv.max() <= 1


# ------------------------------------------------------------------------------- the evaluation script
def _count_ranks(calls: list, kill_at: int | None = None) -> None:
    """Count MALT's target ranks in this process; SIGKILL it as it starts rank number ``kill_at``."""
    attack_rank = malt_module._attack_rank

    def counted(*args, **kwargs):
        calls.append(1)
        if kill_at is not None and len(calls) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return attack_rank(*args, **kwargs)

    malt_module._attack_rank = counted


def _worker(rank: int, world: int, port: int, argv: list[str], record: str, kill_rank: int | None) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    calls: list = []
    _count_ranks(calls, KILL_AT if rank == kill_rank else None)
    code = eval_autoattack.main(argv)
    Path(f"{record}-rank{rank}.json").write_text(json.dumps({"code": code, "ranks": len(calls)}))


def _start(world: int, argv: list[str], record: Path, kill_rank: int | None = None):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return mp.start_processes(_worker, args=(world, port, argv, str(record), kill_rank), nprocs=world,
                              join=False, start_method="spawn")


def _join(ctx) -> None:
    while not ctx.join():
        pass


def _in_process(argv: list[str]) -> int:
    calls: list = []
    with pytest.MonkeyPatch.context() as m:
        m.setattr(malt_module, "_attack_rank", malt_module._attack_rank)
        _count_ranks(calls)
        assert eval_autoattack.main(argv) == 0
    return len(calls)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, robust_digits_model) -> Path:
    run = tmp_path_factory.mktemp("malt") / "run"
    (run / "checkpoints").mkdir(parents=True)
    cfg = TrainConfig(dataset="digits", arch="small-cnn")
    save_config(cfg, run / "config.yaml")
    sd = {k: v.clone() for k, v in robust_digits_model.state_dict().items()}
    save_checkpoint({"format": "gkl-at/1", "model": sd, "avg_model": None, "arch": "small-cnn", "num_classes": 10,
                     "dataset": "digits", "config": cfg.to_dict(), "epoch": 1, "global_step": 1},
                    run / "checkpoints" / "last.pt")
    return run


@pytest.fixture(scope="module")
def runs(run_folder):
    root = run_folder.parent

    def argv(name: str, *extra: str) -> list[str]:
        return [str(run_folder), *ARGS, "--out", str(root / name), *extra]

    two = _start(2, argv("w2"), root / "w2")
    ranks = {"w1": _in_process(argv("w1"))}
    _join(two)
    killed = _start(1, argv("killed"), root / "killed", kill_rank=0)
    with pytest.raises(mp.ProcessExitedException):
        _join(killed)
    assert list((root / "killed" / "cache").glob("malt*_state.pt")), "no MALT state left by the killed run"
    ranks["resume1"] = _in_process(argv("killed", "--resume"))
    assert [json.loads(Path(f"{root / 'w2'}-rank{r}.json").read_text())["code"] for r in range(2)] == [0, 0]
    return root, ranks


def test_per_sample_flags_are_identical_for_1_and_2_processes_and_after_a_kill(runs):
    root, ranks = runs
    reference = (root / "w1" / "per_sample.csv").read_bytes()
    assert (root / "w2" / "per_sample.csv").read_bytes() == reference
    assert (root / "killed" / "per_sample.csv").read_bytes() == reference
    assert ranks["resume1"] < ranks["w1"]  # the resume continued inside the killed chunk, not from scratch


def test_the_report_puts_autoattack_and_malt_side_by_side(runs):
    import pandas as pd

    root, _ = runs
    flags = pd.read_csv(root / "w1" / "per_sample.csv", index_col=0)
    aa, m, worst = flags["aa:apgd-ce@16/255"], flags[f"{MALT}@16/255"], flags["worst@16/255"]
    assert (worst == (aa & m)).all() and 0 < m.sum() < flags["clean"].sum()
    report = json.loads((root / "w1" / "report.json").read_text())
    (row,) = report["autoattack_and_malt"]
    assert (row["autoattack_robust"], row["malt_robust"], row["worst_robust"]) == (aa.sum(), m.sum(), worst.sum())
    assert row["only_malt_broke"] == int((aa & ~m).sum()) and row["only_autoattack_broke"] == int((m & ~aa).sum())
    text = (root / "w1" / "report.md").read_text()
    assert "who found the extra points" in text and "| MALT(k=2,iters=10) |" in text


def _write_report(folder: Path, aa: list[int], malt_flags: list[int]) -> Path:
    from evaluation import SuiteResult, SuiteSettings, write_reports
    from evaluation.results import AttackResult

    settings = SuiteSettings.build([8 / 255], ["aa", "malt"])
    n = len(aa)
    result = SuiteResult(settings, torch.arange(n) % 10, torch.ones(n, dtype=torch.bool))
    for name, flags in (("aa", aa), ("malt", malt_flags)):
        result.results[(8 / 255, name)] = AttackResult(name, 8 / 255, torch.tensor(flags, dtype=torch.bool), n, 1.0, 0)
    meta = {"model": {"arch": "small-cnn"}, "data": {"dataset": "cifar10", "split": "test"}}
    return write_reports(result, folder, meta)["json"]


@pytest.mark.parametrize("malt_flags, external", [([1, 0, 0, 0, 0], "20.00"), ([1, 1, 1, 1, 0], None)])
def test_model_info_carries_malt_as_external_only_when_below_autoattack(tmp_path, malt_flags, external):
    from evaluation.report import read_report
    from export.model_info import ModelCard, build_model_info, figures_from_report, validate_model_info

    path = _write_report(tmp_path, [1, 1, 0, 1, 0], malt_flags)
    figures = figures_from_report(read_report(path), dataset="cifar10", norm="Linf", eps=8 / 255)
    info = build_model_info(ModelCard(footnote="It uses 50M generated images."), dataset="cifar10",
                            architecture="WideResNet-28-10", eps=8 / 255, norm="Linf", figures=figures)
    assert validate_model_info(info) == []
    assert info["autoattack_acc"] == "60.00" and info.get("external") == external
    if external is None:
        assert info["footnote"] == "It uses 50M generated images."
    else:
        assert list(info)[-3:] == ["external", "footnote", "unreliable"]  # RobustBench's order
        assert info["footnote"] == ("It uses 50M generated images. 20.00% robust accuracy is given by the worst case "
                                    "over AutoAttack and MALT (Melamed et al., 2024): MALT broke 2 of the 3 points "
                                    "AutoAttack left robust.")


@pytest.mark.parametrize("attack, named", [("malt:k=0", "k in 'malt:k=0'"), ("malt:k=10", "k=10"),
                                           ("malt:testk=12", "testk=12"), ("malt:k=4,testk=3", "k=4"),
                                           ("malt:topk=3", "'topk=3'")])
def test_bad_malt_options_are_one_line_and_exit_2(run_folder, tmp_path, capsys, attack, named):
    out = tmp_path / "out"
    code = eval_autoattack.main([str(run_folder), "--eps", "8", "--attacks", attack, "--n-ex", "4", "--device", "cpu",
                                 "--weights", "raw", "--quiet", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1 and named in err, err
    assert not (out / "per_sample.csv").exists()


def test_malt_refuses_l1_in_one_line(run_folder, tmp_path, capsys):
    code = eval_autoattack.main([str(run_folder), "--norm", "L1", "--eps", "12", "--attacks", "malt", "--n-ex", "4",
                                 "--device", "cpu", "--weights", "raw", "--quiet", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "L1" in err, err
