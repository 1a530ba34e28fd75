"""Datasets, transforms and the seeded batch sampler."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data import NUM_CLASSES, EpochBatchSampler, SeededDataset, build_dataset, eval_transform, train_transform
from data.transforms import AUGMENTATIONS, TwoViewTransform
from errors import UserError
from cifar_fixture import FAKE_SIZES, fake_cifar_root, write_fake_cifar  # noqa: F401  (fixture)


def _check_images(x: torch.Tensor) -> None:
    assert x.dtype == torch.float32 and x.shape[-3:] == (3, 32, 32)
    assert x.min().item() >= 0.0 and x.max().item() <= 1.0


# ---------------------------------------------------------------- digits

def test_digits_splits_shapes_ranges_and_labels():
    train, test = build_dataset("digits", train=True), build_dataset("digits", train=False)
    assert (len(train), len(test)) == (1437, 360) and NUM_CLASSES["digits"] == 10
    for ds in (train, test):
        x, y = ds[0]
        _check_images(x)
        assert isinstance(y, int)
        assert set(ds.targets) == set(range(10))
        assert ds.data.shape == (len(ds), 32, 32, 3) and ds.data.dtype == np.uint8
    images = torch.stack([train[i][0] for i in range(0, 1437, 100)])
    _check_images(images)
    assert images.max().item() > 0.9 and images.min().item() < 0.1  # full range used, not a blank image


def test_digits_split_is_fixed_across_constructions():
    a, b = build_dataset("digits", train=True), build_dataset("digits", train=True)
    assert np.array_equal(a.data, b.data) and a.targets == b.targets
    test = build_dataset("digits", train=False)
    assert np.array_equal(test.data, build_dataset("digits", train=False).data)


# ---------------------------------------------------------------- CIFAR on disk

@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_fake_cifar_reads_through_torchvision(fake_cifar_root, name):
    n_train, n_test = FAKE_SIZES[name]
    train = build_dataset(name, train=True, data_dir=str(fake_cifar_root))
    test = build_dataset(name, train=False, data_dir=str(fake_cifar_root))
    assert (len(train), len(test)) == (n_train, n_test)
    assert len(train.classes) == NUM_CLASSES[name]
    assert set(train.targets) == set(range(NUM_CLASSES[name]))  # every class written at least once
    x, y = train[3]
    _check_images(x)
    assert 0 <= y < NUM_CLASSES[name]
    # Pixel and label agree with the raw pickle rows (R, G, B planes of 1024 bytes each).
    raw_file = "data_batch_1" if name == "cifar10" else "train"
    with open(fake_cifar_root / train.base_folder / raw_file, "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    row = torch.from_numpy(raw["data"][3].reshape(3, 32, 32)).float() / 255
    assert torch.equal(x, row)
    assert y == raw["labels" if name == "cifar10" else "fine_labels"][3]


def test_data_dir_may_name_the_cifar_folder_itself(fake_cifar_root):
    ds = build_dataset("cifar10", train=False, data_dir=str(fake_cifar_root / "cifar-10-batches-py"))
    assert len(ds) == FAKE_SIZES["cifar10"][1]


@pytest.mark.parametrize("name, folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_missing_cifar_is_one_user_error_naming_layout_and_flags(tmp_path, name, folder):
    with pytest.raises(UserError) as info:
        build_dataset(name, train=True, data_dir=str(tmp_path / "nowhere"))
    message = str(info.value)
    assert folder in message and "--download" in message and "--data-dir" in message
    assert "\n" not in message


def test_corrupted_cifar_file_is_a_user_error(fake_cifar_root):
    with open(fake_cifar_root / "cifar-10-batches-py" / "test_batch", "ab") as f:
        f.write(b"\0")
    with pytest.raises(UserError, match="corrupted"):
        build_dataset("cifar10", train=False, data_dir=str(fake_cifar_root))


def test_failed_download_is_a_user_error(tmp_path, monkeypatch):
    from urllib.error import URLError

    import torchvision.datasets.cifar as tv_cifar

    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    with pytest.raises(UserError, match="could not download cifar100"):
        build_dataset("cifar100", train=True, data_dir=str(tmp_path), download=True)


# ---------------------------------------------------------------- transforms

def test_train_transforms_keep_images_in_unit_range(fake_cifar_root):
    ds = build_dataset("cifar10", train=True, data_dir=str(fake_cifar_root), transform=train_transform("basic"))
    raw = build_dataset("cifar10", train=True, data_dir=str(fake_cifar_root), transform=eval_transform())
    torch.manual_seed(0)
    views = torch.stack([ds[i][0] for i in range(20)])
    _check_images(views)
    assert not torch.equal(views, torch.stack([raw[i][0] for i in range(20)]))  # crops/flips happened
    for augment in AUGMENTATIONS:
        assert train_transform(augment) is not None
    with pytest.raises(ValueError, match="autoaug"):
        train_transform("mixup")


def test_two_view_dataset_gives_two_different_views_with_one_label(fake_cifar_root):
    transform = train_transform("autoaug")
    assert isinstance(transform, TwoViewTransform)
    ds = build_dataset("cifar10", train=True, data_dir=str(fake_cifar_root), transform=transform)
    plain = build_dataset("cifar10", train=True, data_dir=str(fake_cifar_root))
    torch.manual_seed(0)
    n_different = 0
    for i in range(10):
        (basic, aug), y = ds[i]
        _check_images(basic)
        _check_images(aug)
        assert y == plain[i][1]
        n_different += int(not torch.equal(basic, aug))
    assert n_different >= 9
    loader = DataLoader(ds, batch_size=8, shuffle=False)
    (xb, xa), y = next(iter(loader))
    assert xb.shape == xa.shape == (8, 3, 32, 32) and y.shape == (8,)
    assert torch.equal(y, torch.tensor(plain.targets[:8]))


def test_autoaug_view_is_more_than_crop_and_flip(fake_cifar_root):
    """AutoAugment changes colours/geometry: the aug view's pixel statistics differ from crops'."""
    ds = build_dataset("cifar10", train=True, data_dir=str(fake_cifar_root), transform=train_transform("autoaug"))
    torch.manual_seed(1)
    pairs = [ds[i % len(ds)][0] for i in range(100)]
    basic_stats = torch.stack([b.mean((1, 2)) for b, _ in pairs])
    aug_stats = torch.stack([a.mean((1, 2)) for _, a in pairs])
    assert (basic_stats - aug_stats).abs().max().item() > 0.05


# ---------------------------------------------------------------- sampler

def _batches(sampler: EpochBatchSampler, epoch: int, start_step: int = 0) -> list[list[tuple[int, int]]]:
    sampler.set_epoch(epoch, start_step)
    return list(sampler)


def test_sampler_order_is_a_function_of_seed_and_epoch():
    a, b = EpochBatchSampler(100, 16, seed=3), EpochBatchSampler(100, 16, seed=3)
    assert _batches(a, 2) == _batches(b, 2) == _batches(a, 2)
    assert _batches(a, 2) != _batches(a, 3)
    assert _batches(a, 2) != _batches(EpochBatchSampler(100, 16, seed=4), 2)
    epoch = _batches(a, 2)
    assert len(epoch) == len(a) == 6  # drop_last: 100 // 16
    indices = [i for batch in epoch for i, _ in batch]
    assert len(set(indices)) == 96 and set(indices) <= set(range(100))


def test_sampler_resume_yields_the_tail_exactly():
    sampler = EpochBatchSampler(100, 16, seed=0)
    full = _batches(sampler, 5)
    sampler.set_epoch(5, start_step=4)
    assert len(sampler) == 2
    assert list(sampler) == full[4:]


def test_two_ranks_partition_each_global_batch():
    single = _batches(EpochBatchSampler(100, 16, seed=7), 1)
    ranks = [_batches(EpochBatchSampler(100, 16, seed=7, rank=r, world_size=2), 1) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for whole, part0, part1 in zip(single, *ranks):
        assert len(part0) == len(part1) == 8
        assert not {i for i, _ in part0} & {i for i, _ in part1}
        assert part0 + part1 == whole  # same indices and same per-sample seeds


def _load_all(dataset, sampler: EpochBatchSampler, num_workers: int) -> list[torch.Tensor]:
    # A private generator: DataLoader itself draws a base seed from the global RNG otherwise.
    loader = DataLoader(SeededDataset(dataset), batch_sampler=sampler, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(0))
    out = []
    for (basic, aug), y in loader:
        out.append(torch.cat([basic.flatten(1), aug.flatten(1), y[:, None].float()], 1))
    return out


def test_seeded_augmentation_is_independent_of_workers_and_global_rng(fake_cifar_root):
    ds = build_dataset("cifar10", train=True, data_dir=str(fake_cifar_root), transform=train_transform("autoaug"))
    sampler = EpochBatchSampler(len(ds), 10, seed=11)
    sampler.set_epoch(1)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    serial = _load_all(ds, sampler, num_workers=0)
    assert torch.equal(torch.get_rng_state(), state)  # augmentation did not consume the global RNG
    torch.manual_seed(999)  # a different global state must not matter either
    parallel = _load_all(ds, sampler, num_workers=2)
    assert len(serial) == len(parallel) == 5
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel))
    sampler.set_epoch(2)
    assert not torch.equal(serial[0], _load_all(ds, sampler, num_workers=0)[0])


def test_fixture_writer_is_deterministic(tmp_path):
    a = write_fake_cifar(tmp_path / "a", "cifar100", n_train=30, n_test=10, seed=5)
    b = write_fake_cifar(tmp_path / "b", "cifar100", n_train=30, n_test=10, seed=5)
    for f in ("train", "test", "meta"):
        assert (a / f).read_bytes() == (b / f).read_bytes()
