"""Any data: SVHN, Tiny-ImageNet, folder:PATH and npz:PATH, read from files the tests write in the real
formats, trained on and evaluated through the scripts; bad data is one line and exit code 2."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import eval_autoattack
import export_robustbench
import train_at
from any_fixtures import (tree_digest, use_svhn_checksums, write_folder, write_npz, write_svhn, write_tiny_imagenet,
                          write_user_net)
from data import DATASETS, NUM_CLASSES, build_dataset, image_shape_of, train_transform
from errors import UserError
from evaluation.inputs import load_eval_data

# One quick epoch of the full GKL-AT step (K=5 attack, bank, averaging) on a few images.
ONE_EPOCH = ["--preset", "quickstart", "--epochs", "1", "--val-size", "0", "--eval-subset", "8", "--batch-size", "8",
             "--no-progress"]


def test_svhn_is_read_through_torchvision_with_its_label_convention(tmp_path, monkeypatch):
    written = write_svhn(tmp_path / "svhn")
    use_svhn_checksums(monkeypatch, tmp_path / "svhn")
    for data_dir in (tmp_path, tmp_path / "svhn"):  # the parent folder or the folder holding the .mat files
        for train, split in ((True, "train"), (False, "test")):
            ds = build_dataset("svhn", train, data_dir=str(data_dir))
            images, digits = written[split]
            assert np.array_equal(ds.data, images) and ds.targets == digits.tolist()  # 10 read as the digit 0
    assert 0 in ds.targets and NUM_CLASSES["svhn"] == 10
    x, y = load_eval_data("svhn", "test", str(tmp_path), n_ex=5)
    assert torch.equal(x, torch.from_numpy(written["test"][0][:5]).permute(0, 3, 1, 2).float() / 255)
    with open(tmp_path / "svhn" / "test_32x32.mat", "ab") as f:  # torchvision's MD5 check still runs
        f.write(b"\0")
    with pytest.raises(UserError, match="MD5 check failed"):
        build_dataset("svhn", False, data_dir=str(tmp_path))
    with pytest.raises(UserError, match="svhn not found.*--download"):
        build_dataset("svhn", True, data_dir=str(tmp_path / "elsewhere"))


def test_tiny_imagenet_reads_the_standard_layout(tmp_path):
    root, wnids, val = write_tiny_imagenet(tmp_path)
    train, test = build_dataset("tiny-imagenet", True, str(tmp_path)), build_dataset("tiny-imagenet", False, str(root))
    order = sorted(wnids)  # classes numbered as ImageFolder numbers train/: sorted wnids
    assert (len(train), NUM_CLASSES["tiny-imagenet"], image_shape_of("tiny-imagenet")) == (200, 200, (3, 64, 64))
    assert [order.index(Path(f).parts[-3]) for f in train.files] == train.targets == list(range(200))
    assert test.targets == [order.index(w) for _, w in val]  # the val split, in annotation order
    with Image.open(root / "val" / "images" / val[3][0]) as f:
        expected = torch.from_numpy(np.asarray(f.convert("RGB")).copy()).permute(2, 0, 1).float() / 255
    x, y = load_eval_data("tiny-imagenet", "test", str(tmp_path), n_ex=4)
    assert x.shape == (4, 3, 64, 64) and torch.equal(x[3], expected) and y.tolist() == test.targets[:4]
    crop = train_transform("basic", image_shape_of("tiny-imagenet")[1:])
    with Image.open(train.files[0]) as f:
        assert crop(f.convert("RGB")).shape == (3, 64, 64)
    (root / "wnids.txt").write_text("\n".join(wnids[:199]))
    with pytest.raises(UserError, match="lists 199 classes"):
        build_dataset("tiny-imagenet", True, str(tmp_path))
    with pytest.raises(UserError, match="tiny-imagenet not found.*--download"):
        build_dataset("tiny-imagenet", True, str(tmp_path / "elsewhere"))


def test_folder_and_npz_read_what_was_written(tmp_path):
    written = write_folder(tmp_path / "pets", size=(40, 40))
    name = f"folder:{tmp_path / 'pets'}"
    (tmp_path / "pets" / "train" / "dog" / "999.png").parent.mkdir(exist_ok=True)
    Image.new("RGB", (20, 30), (200, 10, 10)).save(tmp_path / "pets" / "train" / "dog" / "999.png")
    assert name in DATASETS and NUM_CLASSES[name] == 3 and image_shape_of(name) == (3, 40, 40)
    train, test = build_dataset(name, True), build_dataset(name, False)
    assert train.classes == ["cat", "dog", "fox"] and test.targets == [t for _, t in written["test"]]
    assert train[len(train) - 1 - 8][0].shape == (3, 40, 40)  # the 20x30 image, resized to the set's size
    x, y = load_eval_data(name, "test", n_ex=5)
    with Image.open(written["test"][2][0]) as f:
        assert torch.equal(x[2], torch.from_numpy(np.asarray(f).copy()).permute(2, 0, 1).float() / 255)

    path = write_npz(tmp_path / "mine.npz", num_classes=5)
    with np.load(path) as arrays:
        x_test, y_test = arrays["x_test"], arrays["y_test"]
    x, y = load_eval_data(f"npz:{path}", "test")
    assert NUM_CLASSES[f"npz:{path}"] == 5 and y.tolist() == y_test.tolist()
    assert torch.equal(x, torch.from_numpy(x_test).permute(0, 3, 1, 2).float() / 255)
    grey = write_npz(tmp_path / "grey.npz", x_train=np.zeros((4, 28, 28), np.uint8), y_train=np.arange(4),
                     x_test=np.zeros((2, 28, 28), np.uint8), y_test=np.arange(2))
    assert image_shape_of(f"npz:{grey}") == (1, 28, 28) and build_dataset(f"npz:{grey}", True)[0][0].shape == (1, 28, 28)


@pytest.mark.parametrize("arch", ["tiny-cnn", "small-cnn", "wrn-10-1", "wrn-16-4-silu", "preact-resnet-18"])
def test_registry_architectures_classify_64x64_images(arch):
    from models import build_model, check_output

    torch.manual_seed(0)
    model = build_model(arch, num_classes=200).eval()
    keys = list(model.state_dict())
    check_output(model, (3, 64, 64), 200, arch)  # global pooling: any input size, the same keys
    with torch.no_grad():
        assert torch.isfinite(model(torch.rand(2, 3, 64, 64))).all()
    assert list(model.state_dict()) == keys


def _train(tmp_path: Path, dataset: str, out: Path, *extra: str) -> dict:
    net = write_user_net(tmp_path / "code")
    code = train_at.main([*ONE_EPOCH, "--dataset", dataset, "--arch", f"{net}:make", "--arch-kwargs",
                          '{"width": 6}', "--out", str(out), *extra])
    assert code == 0
    return yaml.safe_load((out / "config.yaml").read_text())


def test_a_user_net_trains_one_epoch_on_npz_and_folder_data(tmp_path, monkeypatch, capsys):
    npz = write_npz(tmp_path / "data.npz", n_train=32, num_classes=4)
    write_folder(tmp_path / "pets", n_train=6, size=(40, 40))
    monkeypatch.chdir(tmp_path)  # relative paths on the command line; the run records them absolute
    config = _train(tmp_path, "npz:data.npz", tmp_path / "npz_run")
    assert config["dataset"] == f"npz:{npz}" and config["arch"] == f"{tmp_path / 'code' / 'my_nets.py'}:make"
    assert config["arch_kwargs"] == '{"width": 6}'
    config = _train(tmp_path, "folder:pets", tmp_path / "folder_run", "--augment", "basic")  # crops of 40x40
    assert config["dataset"] == f"folder:{tmp_path / 'pets'}"
    state = torch.load(tmp_path / "folder_run" / "checkpoints" / "last.pt", weights_only=True)
    assert state["num_classes"] == 3 and state["model"]["classifier.weight"].shape == (3, 12)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # evaluation, --resume and export find the factory and the data again
    capsys.readouterr()
    assert train_at.main(["--resume", str(tmp_path / "npz_run")]) == 0
    assert "finished at epoch 1, nothing to do" in capsys.readouterr().out
    for run in ("npz_run", "folder_run"):
        argv = [str(tmp_path / run), "--attacks", "pgd2", "--n-ex", "6", "--quiet"]
        assert eval_autoattack.main(argv) == 0, capsys.readouterr().err
        report = json.loads((tmp_path / run / "eval" / "report.json").read_text())
        assert report["n"] == 6 and report["model"]["arch"].endswith("my_nets.py:make")
    assert export_robustbench.main([str(tmp_path / "npz_run"), "--allow-unevaluated"]) == 2  # export finds it too,
    assert "my_nets.py:make' has no RobustBench counterpart" in capsys.readouterr().err  # and says what it supports


def _bad_data(tmp: Path) -> dict[str, tuple[str, str]]:
    (tmp / "empty" / "train").mkdir(parents=True)
    (tmp / "empty" / "test").mkdir()
    write_folder(tmp / "no_test", n_test=0)
    n = 8
    pixels = np.zeros((n, 32, 32, 3), np.uint8)
    return {
        "folder without classes": (f"folder:{tmp / 'empty'}", "has no class folders"),
        "folder without test images": (f"folder:{tmp / 'no_test'}", "holds no images"),
        "npz, mismatched lengths": (f"npz:{write_npz(tmp / 'a.npz', x_train=pixels, y_train=np.arange(n - 1))}",
                                    "x_train holds 8 images but y_train 7 labels"),
        "npz, float images": (f"npz:{write_npz(tmp / 'b.npz', x_train=pixels.astype(np.float32))}",
                              "x_train is float32, not uint8"),
        "npz, float labels": (f"npz:{write_npz(tmp / 'c.npz', y_test=np.zeros(16, np.float64))}",
                              "labels must be one integer per image"),
        "npz, not an archive": (f"npz:{tmp / 'not.npz'}", "is not a .npz archive (no zip file)"),
        "npz, missing": (f"npz:{tmp / 'nowhere.npz'}", "no such file"),
        "tiny-imagenet, missing": ("tiny-imagenet", "tiny-imagenet not found"),
        "svhn, missing": ("svhn", "svhn not found"),
    }


def test_bad_data_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "not.npz").write_text("these are not arrays")
    cases = _bad_data(tmp_path)
    net = write_user_net(tmp_path / "code")
    weights = {}
    for classes in (10, 200):  # fixed names know their class count before reading files: the weights load first
        weights[classes] = tmp_path / f"w{classes}.pt"
        torch.save(_user_model(net, classes).state_dict(), weights[classes])
    before = tree_digest(tmp_path)
    for case, (dataset, expected) in cases.items():
        classes = 200 if dataset == "tiny-imagenet" else 10
        for script, argv in (
                (train_at, [*ONE_EPOCH, "--dataset", dataset, "--arch", f"{net}:make", "--out", str(tmp_path / "run")]),
                (eval_autoattack, [str(weights[classes]), "--arch", f"{net}:make", "--dataset", dataset, "--quiet"])):
            code = script.main([*argv, "--data-dir", str(tmp_path / "d")])
            err = capsys.readouterr().err.strip().splitlines()
            assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (case, script.__name__, err)
            assert expected in err[0], (case, script.__name__, err[0])
    assert tree_digest(tmp_path) == before  # nothing written: no run folder, no evaluation folder


def _user_model(net: Path, num_classes: int) -> torch.nn.Module:
    from models import build_model

    return build_model(f"{net}:make", num_classes)
