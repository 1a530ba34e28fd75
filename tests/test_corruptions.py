"""Common corruptions: the CIFAR-10-C layout, per-severity tables, accuracy by hand, RobustBench's loader."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from corruptions_fixture import ConstantModel, DecodingModel, write_fake_cifar_c

from data.corruptions import CORRUPTIONS, FOLDERS, SOURCES, CorruptedCifar
from errors import UserError
from evaluation.corruptions import CorruptionSection, CorruptionSettings, run_corruptions
from evaluation.store import ResultStore

NAMES = ("snow", "fog")  # written in this order; results come in RobustBench's order (snow before fog too)


def test_constant_model_gives_the_accuracy_expected_by_hand(tmp_path) -> None:
    # 8 images per severity; severity s has label 3 on exactly s of its first 6 images, and 3 again on
    # images 7 and 8, which --n-ex 6 must leave out. A model always answering 3 scores s/6 at severity s.
    m, labels = 8, []
    for s in range(1, 6):
        block = [3] * s + [0] * (6 - s) + [3, 3]
        labels += block
    write_fake_cifar_c(tmp_path, NAMES, m, labels=np.array(labels))
    data = CorruptedCifar.open("cifar10", tmp_path, NAMES)
    result = run_corruptions(ConstantModel(3), data, CorruptionSettings.build(NAMES, n_ex=6), progress=False)
    table = result.table()
    for s in range(1, 6):
        assert table.loc["snow", str(s)] == table.loc["fog", str(s)] == round(100 * s / 6, 2)
        assert table.loc["Mean", str(s)] == round(100 * s / 6, 2)  # the per-severity row
    assert result.mean == pytest.approx(sum(range(1, 6)) / 30)  # (1+2+3+4+5)/6/5 = 0.5
    assert table.loc["Mean", "Mean"] == 50.0 and result.n == 6 and result.available == 8
    assert not result.robustbench_figure


def test_each_severity_block_is_read(tmp_path) -> None:
    # Every image's grey level encodes its (corruption, severity): the model decodes it into a class,
    # so an accuracy of 100% means the loader handed over exactly that block's images and labels.
    m = 6
    labels = np.concatenate([np.full(m, s - 1) for s in range(1, 6)])  # right for corruption index 0
    write_fake_cifar_c(tmp_path, NAMES, m, labels=labels)
    data = CorruptedCifar.open("cifar10", tmp_path, NAMES)
    result = run_corruptions(DecodingModel(), data, CorruptionSettings.build(NAMES, [2, 5], n_ex=4), progress=False)
    assert result.accuracy("snow", 2) == result.accuracy("snow", 5) == 1.0  # index 0: label s - 1
    assert result.accuracy("fog", 2) == result.accuracy("fog", 5) == 0.0  # index 1: predicted s - 1 + 5
    assert list(result.table().columns) == ["2", "5", "Mean"]
    x, y = next(data.batches("fog", 5, n=3))
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32 and torch.equal(y, torch.full((3,), 4))
    assert torch.allclose(x, torch.full_like(x, (40 * 5 + 2) / 255))


def test_same_images_as_robustbench_loader(tmp_path) -> None:
    """A file of the published size (50,000 images; sparse on disk) read by ours and by robustbench's loader."""
    from export import install_robustbench

    install_robustbench()
    from robustbench.data import load_cifar10c

    folder = tmp_path / "CIFAR-10-C"
    folder.mkdir()
    rng = np.random.default_rng(0)
    images = np.lib.format.open_memmap(folder / "fog.npy", mode="w+", dtype=np.uint8, shape=(50_000, 32, 32, 3))
    for s in (2, 5):
        images[(s - 1) * 10_000:(s - 1) * 10_000 + 7] = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    images.flush()
    del images
    np.save(folder / "labels.npy", np.tile(rng.integers(0, 10, 10_000).astype(np.uint8), 5))
    ours = CorruptedCifar.open("cifar10", tmp_path, ["fog"])
    assert ours.per_severity == 10_000
    for s in (2, 5):
        x_rb, y_rb = load_cifar10c(7, severity=s, data_dir=str(tmp_path), corruptions=["fog"])
        x, y = next(ours.batches("fog", s, n=7))
        assert torch.equal(x, x_rb) and torch.equal(y, y_rb.long()) and x.abs().sum() > 0


def test_resume_reuses_finished_pairs(tmp_path) -> None:
    write_fake_cifar_c(tmp_path, NAMES, 4)
    data = CorruptedCifar.open("cifar10", tmp_path, NAMES)
    settings = CorruptionSettings.build(NAMES, [1, 3])
    first = run_corruptions(DecodingModel(), data, settings, store=ResultStore(tmp_path / "c", {"m": 1}),
                            progress=False)
    again = run_corruptions(ConstantModel(0), data, settings, progress=False,
                            store=ResultStore(tmp_path / "c", {"m": 1}, resume=True))
    assert again.resumed == 4 and again.to_dict()["results"] == first.to_dict()["results"]
    other = run_corruptions(ConstantModel(0), data, CorruptionSettings.build(NAMES, [1, 3], n_ex=2),
                            store=ResultStore(tmp_path / "c", {"m": 1}, resume=True), progress=False)
    assert other.resumed == 0  # other settings: nothing reused
    more = run_corruptions(ConstantModel(0), data, CorruptionSettings.build(NAMES, [1, 2, 3]),
                           store=ResultStore(tmp_path / "c", {"m": 1}, resume=True), progress=False)
    assert more.resumed == 4 and more.accuracy("snow", 1) == first.accuracy("snow", 1)  # a severity more
    labels = np.zeros(20, dtype=np.uint8)  # another copy of the data, other labels: never its flags
    elsewhere = CorruptedCifar.open("cifar10", write_fake_cifar_c(tmp_path / "b", NAMES, 4, labels=labels).parent,
                                    NAMES)
    moved = run_corruptions(DecodingModel(), elsewhere, settings, progress=False,
                            store=ResultStore(tmp_path / "c", {"m": 1}, resume=True))
    assert moved.resumed == 0


def test_section_files_and_json(tmp_path) -> None:
    import pandas as pd

    write_fake_cifar_c(tmp_path, NAMES, 4)
    data = CorruptedCifar.open("cifar10", tmp_path, NAMES)
    result = run_corruptions(DecodingModel(), data, CorruptionSettings.build(NAMES), progress=False)
    paths = CorruptionSection(result).write_files(tmp_path)
    wide = pd.read_csv(paths["corruptions"], index_col=0)
    long = pd.read_csv(paths["corruptions_long"])
    assert wide.shape == (3, 6) and len(long) == 10 and set(long.corruption) == set(NAMES)
    assert long.accuracy.mean() == pytest.approx(result.mean) == pytest.approx(wide.loc["Mean", "Mean"] / 100)
    assert paths["corruptions_plot"].read_bytes()[:4] == b"\x89PNG"
    assert "| snow |" in CorruptionSection(result).markdown()


@pytest.mark.parametrize("problem", ["no folder", "missing file", "labels of another length", "not uint8",
                                     "labels out of range"])
def test_bad_folders_are_one_clear_line(tmp_path, problem) -> None:
    root = tmp_path / "data"
    if problem != "no folder":
        folder = write_fake_cifar_c(root, NAMES, 4)
    if problem == "missing file":
        (folder / "fog.npy").unlink()
    elif problem == "labels of another length":
        np.save(folder / "labels.npy", np.zeros(25, dtype=np.uint8))
    elif problem == "not uint8":
        np.save(folder / "snow.npy", np.zeros((20, 32, 32, 3), dtype=np.float32))
    elif problem == "labels out of range":
        np.save(folder / "labels.npy", np.full(20, 10, dtype=np.uint8))
    with pytest.raises(UserError) as info:
        CorruptedCifar.open("cifar10", root, NAMES)
    message = str(info.value)
    assert "\n" not in message and SOURCES["cifar10"] in message and "Hendrycks" in message
    expected = {"no folder": str(root / "CIFAR-10-C"), "missing file": "fog.npy",
                "labels of another length": "20 images but labels.npy 25 labels", "not uint8": "float32",
                "labels out of range": "outside 0..9"}[problem]
    assert expected in message, message


def test_settings_and_names_match_robustbench() -> None:
    from export import install_robustbench

    install_robustbench()
    from robustbench import data as rb

    assert CORRUPTIONS == rb.CORRUPTIONS
    assert {d: v for d, v in FOLDERS.items()} == {
        d.value: v[rb.ThreatModel.corruptions] for d, v in rb.CORRUPTIONS_DIR_NAMES.items() if d.value in FOLDERS}
    assert {d: u.rsplit("/", 1)[1] for d, u in SOURCES.items()} == {
        d.value: v[0] for d, v in rb.ZENODO_CORRUPTIONS_LINKS.items()}
    with pytest.raises(UserError, match="unknown corruption"):
        CorruptionSettings.build(["fog", "rain"])
    with pytest.raises(UserError, match="severities are 1 to 5"):
        CorruptionSettings.build(None, [0, 6])
    assert CorruptionSettings.build(["fog", "snow", "fog"]).corruptions == ("snow", "fog")
    assert CorruptionSettings.build().complete and not CorruptionSettings.build(None, [1]).complete
