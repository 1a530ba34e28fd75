"""Any model: ``--arch MODULE:CALLABLE`` (a user's .py file, a RobustBench architecture class), weights in the
shapes other code bases save, and the Python entry point :func:`evaluation.api.evaluate`, which gives the
command line's numbers point for point, resumes, and shards over processes like the command line."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import eval_autoattack
import train_at
from any_fixtures import tree_digest, write_user_net
from checkpoints.run import load_model
from conftest import fixture_seed
from errors import UserError
from evaluation.api import evaluate
from models import build_model

RESNET18 = "robustbench.model_zoo.architectures.resnet:ResNet18"
EPS = [f"{e}/255" for e in (0.25, 0.5, 1, 2, 4, 8, 16, 32)]  # fine enough that points break at different radii
ATTACKS = ["pgd5", "cw5"]


def _digits(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from data import Digits

    ds = Digits(train=train)
    return torch.from_numpy(ds.data).permute(0, 3, 1, 2).float().div(255), torch.tensor(ds.targets)


def _trained_user_net(net: Path) -> torch.nn.Module:
    """The user's net, width 8, after 40 steps of clean training on digits: weak, but its margins differ from
    point to point (a freshly initialised one predicts one class everywhere, and no attack changes that)."""
    torch.manual_seed(fixture_seed())
    model = build_model(f"{net}:make", 10, width=8)
    x, y = _digits(train=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for idx in torch.randperm(len(y)).split(32)[:40]:
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _points_of(model: torch.nn.Module, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` digits test images labelled with the model's own predictions: every point starts correct."""
    x = _digits(train=False)[0][:n]
    with torch.no_grad():
        return x, model(x).argmax(1)


def _write_points(path: Path, x: torch.Tensor, y: torch.Tensor) -> str:
    """The points as an ``npz:`` data set (digits pixels are multiples of 1/255: the uint8 form is exact)."""
    pixels = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.savez(path, x_train=pixels, y_train=y.numpy(), x_test=pixels, y_test=y.numpy(),
             classes=np.array([str(k) for k in range(10)]))  # the count, whichever classes the labels hold
    return f"npz:{path}"


def _cli(weights: Path, arch: str, dataset: str, out: Path, *extra: str) -> pd.DataFrame:
    argv = [str(weights), "--arch", arch, "--dataset", dataset, "--out", str(out), "--quiet", *extra]
    assert eval_autoattack.main(argv) == 0
    return pd.read_csv(out / "per_sample.csv", index_col=0)


def test_a_user_net_from_a_py_file_gives_the_same_flags_from_the_command_line_and_from_python(tmp_path):
    net = write_user_net(tmp_path)
    model = _trained_user_net(net)
    x, y = _points_of(model, 12)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 2},
               tmp_path / "w.pt")  # as DataParallel code saves it
    cli = _cli(tmp_path / "w.pt", f"{net}:make", _write_points(tmp_path / "pts.npz", x, y), tmp_path / "cli",
               "--arch-kwargs", '{"width": 8}', "--eps", *EPS, "--attacks", *ATTACKS, "--chunk-size", "5")

    ev = evaluate(model, x, y, eps=EPS, attacks=ATTACKS, chunk_size=5, out=tmp_path / "api", progress=False)
    assert ev.per_sample().equals(cli)
    assert pd.read_csv(tmp_path / "api" / "per_sample.csv", index_col=0).equals(cli)
    robust = [int(ev.robust(e / 255).sum()) for e in (0.25, 0.5, 1, 2, 4, 8, 16, 32)]
    assert ev.accuracy(8 / 255, "clean") == 1.0 and any(0 < r < len(y) for r in robust), robust  # flags that differ
    again = evaluate(model, x, y, eps=EPS, attacks=ATTACKS, chunk_size=5, out=tmp_path / "api", resume=True,
                     progress=False)
    assert all(r.cached for r in again.result.results.values()) and again.per_sample().equals(cli)
    with pytest.raises(UserError, match="chunk-size"):  # a resume never mixes settings
        evaluate(model, x, y, eps=EPS, attacks=ATTACKS, chunk_size=4, out=tmp_path / "api", resume=True)


def test_a_robustbench_resnet18_from_the_command_line_equals_python(tmp_path):
    torch.manual_seed(fixture_seed())
    model = build_model(RESNET18, 10).eval()
    assert type(model).__module__ == "robustbench.model_zoo.architectures.resnet"
    x, y = _points_of(model, 4)
    from safetensors.torch import save_file

    save_file(model.state_dict(), tmp_path / "resnet18.safetensors")
    cli = _cli(tmp_path / "resnet18.safetensors", RESNET18, _write_points(tmp_path / "pts.npz", x, y),
               tmp_path / "cli", "--eps", "1/255", "--attacks", "pgd2")
    ev = evaluate(model, x, y, eps=["1/255"], attacks=["pgd2"], progress=False)
    assert ev.per_sample().equals(cli) and ev.accuracy(1 / 255, "clean") == 1.0


def test_weights_load_in_the_shapes_people_save(tmp_path):
    net = write_user_net(tmp_path)
    torch.manual_seed(0)
    model = build_model(f"{net}:make", 10).eval()
    for name, buffer in model.named_buffers():  # statistics that differ from a fresh model's
        if buffer.is_floating_point():
            buffer.copy_(torch.rand_like(buffer) + 0.5)
    sd = model.state_dict()
    from safetensors.torch import save_file

    shapes = {
        "plain": sd, "state_dict": {"state_dict": sd, "epoch": 9, "optimizer": {"lr": 0.1}}, "model": {"model": sd},
        "nested": {"model": {"state_dict": sd}}, "module.": {f"module.{k}": v for k, v in sd.items()},
        "compiled": {f"_orig_mod.{k}": v for k, v in sd.items()},
        "wrapped module.": {"model_state_dict": {f"module.model.{k}": v for k, v in sd.items()}},
    }
    for label, state in shapes.items():
        torch.save(state, tmp_path / f"{label}.pt")
    save_file(sd, tmp_path / "weights.safetensors")
    save_file(sd, tmp_path / "weights.bin")  # read by its header, whatever its name
    probe = torch.rand(3, 3, 32, 32)
    expected = model(probe)
    for path in [*(tmp_path / f"{label}.pt" for label in shapes), tmp_path / "weights.safetensors",
                 tmp_path / "weights.bin"]:
        loaded, info = load_model(path, arch=f"{net}:make", num_classes=10)
        assert info["kind"] == "state_dict" and torch.equal(loaded(probe), expected), path.name
    wrapped = build_model(f"{net}:Wrapped", 10)  # its own keys start with "model.": loaded as saved
    wrapped.load_state_dict({f"model.{k}": v for k, v in sd.items()})
    torch.save(wrapped.state_dict(), tmp_path / "wrapped.pt")
    loaded, _ = load_model(tmp_path / "wrapped.pt", arch=f"{net}:Wrapped", num_classes=10)
    assert torch.equal(loaded(probe), expected)


def _api_worker(rank: int, world: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    saved = torch.load(Path(folder) / "inputs.pt", weights_only=True)
    model = build_model(saved["arch"], 10, width=8)
    model.load_state_dict(saved["weights"])
    ev = evaluate(model.eval(), saved["x"], saved["y"], eps=EPS, attacks=ATTACKS, chunk_size=5,
                  out=Path(folder) / "sharded", progress=False)
    ev.per_sample().to_csv(Path(folder) / f"rank{rank}.csv")  # every process gets the whole result


def test_the_python_entry_point_shards_over_processes_with_the_same_result(tmp_path):
    net = write_user_net(tmp_path)
    model = _trained_user_net(net)
    x, y = _points_of(model, 16)
    torch.save({"arch": f"{net}:make", "weights": model.state_dict(), "x": x, "y": y}, tmp_path / "inputs.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_api_worker, args=(2, port, str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    one = evaluate(model, x, y, eps=EPS, attacks=ATTACKS, chunk_size=5, progress=False).per_sample()
    while not ctx.join():
        pass
    for rank in (0, 1):
        assert pd.read_csv(tmp_path / f"rank{rank}.csv", index_col=0).equals(one), rank
    assert pd.read_csv(tmp_path / "sharded" / "per_sample.csv", index_col=0).equals(one)
    report = json.loads((tmp_path / "sharded" / "report.json").read_text())
    assert report["environment"]["processes"] == 2 and report["model"]["kind"] == "python"


def test_bad_models_are_one_line_and_exit_2(tmp_path, capsys):
    net = write_user_net(tmp_path / "code")
    torch.save(build_model(f"{net}:make", 10, width=8).state_dict(), tmp_path / "w8.pt")
    torch.save(build_model(f"{net}:seven_outputs", 10).state_dict(), tmp_path / "w7.pt")
    evaluate_with = [str(tmp_path / "w8.pt"), "--dataset", "digits", "--n-ex", "4", "--quiet", "--arch"]
    train_with = ["--preset", "quickstart", "--epochs", "1", "--out", str(tmp_path / "run"), "--arch"]
    cases = {
        "no such module": (["nosuch_pkg_xyz:make"], "no module named 'nosuch_pkg_xyz'"),
        "no such file": ([f"{tmp_path / 'missing.py'}:make"], "no file"),
        "no such callable": ([f"{net}:nope"], "has no 'nope'; it defines: TwoConv, Wrapped, make"),
        "not MODULE:CALLABLE": ([f"{net}:"], "write MODULE:CALLABLE"),
        "the factory raises": ([f"{net}:raising"], "raised RuntimeError: the factory could not build its network"),
        "not a module": ([f"{net}:not_a_module"], "returned a dict, not a torch.nn.Module"),
        "weights that do not fit": ([f"{net}:make", "--arch-kwargs", '{"width": 4}'],
                                    "does not load strictly into"),
        "kwargs not JSON": ([f"{net}:make", "--arch-kwargs", "{width: 4}"], "is not JSON"),
        "kwargs not an object": ([f"{net}:make", "--arch-kwargs", "[4]"], "is a JSON list, not an object"),
    }
    seven = [str(tmp_path / "w7.pt"), "--dataset", "digits", "--quiet", "--arch", f"{net}:seven_outputs"]
    before = tree_digest(tmp_path)
    for case, (arch, expected) in cases.items():
        runs = [(eval_autoattack, evaluate_with + arch), (train_at, train_with + arch)]
        if case == "weights that do not fit":
            runs = runs[:1]
        for script, argv in runs:
            code = script.main(argv)
            err = capsys.readouterr().err.strip().splitlines()
            assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (case, script.__name__, err)
            assert expected in err[0], (case, script.__name__, err[0])
    for script, argv in ((eval_autoattack, seven), (train_at, train_with + [f"{net}:seven_outputs"])):
        assert script.main(argv) == 2
        assert "returns (2, 7) for a batch of 2 images of 3x32x32, but the data set has 10 classes" in \
            capsys.readouterr().err
    assert tree_digest(tmp_path) == before


def test_the_python_entry_point_refuses_bad_points_before_attacking(tmp_path):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    x, y = torch.rand(6, 3, 8, 8), torch.arange(6) % 4
    for bad, expected in (((x * 255, y), r"the suite attacks images in \[0, 1\]"), ((x, y[:5]), "one integer label"),
                          ((x, y + 4), "labels go up to 7"), ((x[:, :2], y), "fails on images of 2x8x8")):
        with pytest.raises(UserError, match=expected):
            evaluate(model, *bad, eps=["8/255"], attacks=["pgd2"], out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
