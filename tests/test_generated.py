"""Generated data (DM-AT): streaming .npz -> .npy shard converter, memory-mapped dataset, mixing sampler."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import ConcatDataset, DataLoader

from data.convert_generated import convert, main
from data.generated import GeneratedDataset, KeyedPermutation, MixedBatchSampler
from data.sampler import EpochBatchSampler, SeededDataset
from data.transforms import eval_transform
from errors import UserError

ROOT = Path(__file__).resolve().parents[1]
MODULE = "data.convert_generated"  # run as ``python -m data.convert_generated`` from the repository root
N_BIG, BLOCK, SHARD = 200_000, 25_000, 65_536  # shards do not line up with blocks or chunks
IMAGE_BYTES = 32 * 32 * 3
_POOL_OFFSETS = 1_000_003  # prime, > N_BIG: distinct offsets for all images
# Runs the converter as the wrapper's only child and prints that child's peak RSS (KiB).
PEAK_RSS_WRAPPER = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
                    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


@functools.lru_cache(maxsize=1)
def _pool() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, _POOL_OFFSETS + IMAGE_BYTES, dtype=np.uint8)


def _block(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Block ``k`` of the synthetic 200k-image set, regenerated on demand (never all kept).

    Image ``i`` is the window of a random pool at offset ``7919 * i mod P`` (P prime > N_BIG),
    so every image has its own content at a fraction of the cost of fresh random bytes.
    """
    i = np.arange(k * BLOCK, (k + 1) * BLOCK, dtype=np.int64)
    offsets = (i * 7919) % _POOL_OFFSETS
    windows = np.lib.stride_tricks.sliding_window_view(_pool(), IMAGE_BYTES)
    return windows[offsets].reshape(BLOCK, 32, 32, 3), _pool()[offsets] % 10


def _shard_range(folder: Path, index: dict, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels ``a:b`` read back from the shard files."""
    images, labels, start = [], [], 0
    for shard in index["shards"]:
        lo, hi = max(a, start) - start, min(b, start + shard["count"]) - start
        if lo < hi:
            images.append(np.load(folder / shard["images"], mmap_mode="r")[lo:hi])
            labels.append(np.load(folder / shard["labels"], mmap_mode="r")[lo:hi])
        start += shard["count"]
    return np.concatenate(images), np.concatenate(labels)


def _run_converter(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PEAK_RSS_WRAPPER, sys.executable, "-m", MODULE, *args],
                          capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A 200k-image uncompressed .npz converted by ``python -m`` in a subprocess: (folder, peak RSS bytes)."""
    tmp = tmp_path_factory.mktemp("generated_big")
    images, labels = np.empty((N_BIG, 32, 32, 3), np.uint8), np.empty(N_BIG, np.int64)
    for k in range(N_BIG // BLOCK):
        images[k * BLOCK:(k + 1) * BLOCK], labels[k * BLOCK:(k + 1) * BLOCK] = _block(k)
    np.savez(tmp / "big.npz", image=images, label=labels)
    del images, labels
    proc = _run_converter(str(tmp / "big.npz"), str(tmp / "shards"), "--shard-size", str(SHARD), "--quiet")
    (tmp / "big.npz").unlink()
    assert proc.returncode == 0, proc.stderr
    peak = int(proc.stdout.strip().splitlines()[-1]) * 1024  # ru_maxrss is in KiB on Linux
    print(f"converter peak RSS {peak / 2**20:.1f} MiB for {N_BIG * IMAGE_BYTES / 2**20:.0f} MiB decoded")
    yield tmp / "shards", peak
    shutil.rmtree(tmp, ignore_errors=True)


def _small_npz(path: Path, n: int, seed: int, compressed: bool = False, **override) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {"image": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), "label": rng.integers(0, 10, n)}
    arrays.update(override)
    (np.savez_compressed if compressed else np.savez)(path, **{k: v for k, v in arrays.items() if v is not None})
    return arrays["image"], arrays["label"]


# ---------------------------------------------------------------------------------------------
# Converter


def test_converter_streams_200k_images_in_small_memory_and_bit_identical_shards(big):
    folder, peak = big
    assert peak < 0.25 * N_BIG * IMAGE_BYTES, f"peak RSS {peak / 2**20:.0f} MiB"
    index = json.loads((folder / "index.json").read_text())
    assert index["count"] == N_BIG and index["num_classes"] == 10
    assert [s["count"] for s in index["shards"]] == [SHARD] * 3 + [N_BIG - 3 * SHARD]
    for k in range(N_BIG // BLOCK):
        images, labels = _shard_range(folder, index, k * BLOCK, (k + 1) * BLOCK)
        src_images, src_labels = _block(k)
        assert images.dtype == np.uint8 and np.array_equal(images, src_images)
        assert labels.dtype == np.int64 and np.array_equal(labels, src_labels)
    last = index["shards"][-1]
    assert hashlib.sha256((folder / last["labels"]).read_bytes()).hexdigest() == last["labels_sha256"]
    assert sum(index["class_counts"]) == N_BIG


def test_dataset_items_equal_source_images_across_shard_boundaries(big):
    folder, _ = big
    raw, tensors = GeneratedDataset(folder), GeneratedDataset(folder, transform=eval_transform())
    assert len(raw) == N_BIG and raw.num_classes == 10
    for k, j in ((0, 0), (2, SHARD - 2 * BLOCK - 1), (2, SHARD - 2 * BLOCK), (7, BLOCK - 1)):
        images, labels = _block(k)  # image k * BLOCK + j; shard boundaries at multiples of SHARD
        img, label = raw[k * BLOCK + j]
        assert np.array_equal(np.asarray(img), images[j]) and label == labels[j] and isinstance(label, int)
        x, _ = tensors[k * BLOCK + j]
        assert torch.equal(x, torch.from_numpy(images[j].copy()).permute(2, 0, 1).float() / 255)
    assert np.array_equal(np.asarray(raw[-1][0]), np.asarray(raw[N_BIG - 1][0]))
    blob = pickle.dumps(raw)  # what a spawned DataLoader worker receives: no image data
    assert len(blob) < 100_000 and np.array_equal(np.asarray(pickle.loads(blob)[SHARD][0]), np.asarray(raw[SHARD][0]))
    with pytest.raises(IndexError):
        raw[N_BIG]


def test_compressed_and_multiple_inputs_concatenate_exactly(tmp_path):
    a_img, a_lbl = _small_npz(tmp_path / "a.npz", 700, seed=1, compressed=True)
    b_img, b_lbl = _small_npz(tmp_path / "b.npz", 333, seed=2, label=np.arange(333, dtype=np.uint8) % 10)
    with zipfile.ZipFile(tmp_path / "a.npz") as zf:
        assert zf.getinfo("image.npy").compress_type == zipfile.ZIP_DEFLATED
    index = convert([tmp_path / "a.npz", tmp_path / "b.npz"], tmp_path / "out", shard_size=256,
                    num_classes=10, chunk_size=100, progress=False)
    assert index["count"] == 1033 and len(index["shards"]) == 5
    ds = GeneratedDataset(tmp_path / "out")
    got = np.stack([np.asarray(ds[i][0]) for i in range(len(ds))])
    assert np.array_equal(got, np.concatenate([a_img, b_img]))
    assert [ds[i][1] for i in range(len(ds))] == np.concatenate([a_lbl, b_lbl]).tolist()
    assert not list(tmp_path.glob(".out.partial-*"))


BAD_NPZ = {
    "missing key": dict(label=None),
    "float images": dict(image=np.zeros((4, 32, 32, 3), np.float32)),
    "CHW images": dict(image=np.zeros((4, 3, 32, 32), np.uint8)),
    "float labels": dict(label=np.zeros(4, np.float32)),
    "label count": dict(label=np.zeros(5, np.int64)),
    "label too large": dict(label=np.array([0, 1, 10, 2])),
    "negative label": dict(label=np.array([0, -1, 3, 2])),
}


@pytest.mark.parametrize("case", list(BAD_NPZ))
def test_bad_npz_is_a_one_line_user_error_and_writes_nothing(tmp_path, case):
    _small_npz(tmp_path / "bad.npz", 4, seed=0, **BAD_NPZ[case])
    with pytest.raises(UserError) as err:
        convert([tmp_path / "bad.npz"], tmp_path / "out", num_classes=10, progress=False)
    assert "\n" not in str(err.value) and "bad.npz" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz"]


def test_cli_as_a_module_exits_2_with_one_line(tmp_path, capsys):
    _small_npz(tmp_path / "bad.npz", 4, seed=0, label=np.array([0, 1, 10, 2]))
    (tmp_path / "not_a_zip.npz").write_bytes(b"hello")
    for args in (["bad.npz", "out", "--num-classes", "10"], ["not_a_zip.npz", "out"]):
        proc = subprocess.run([sys.executable, "-m", MODULE, *args], capture_output=True, text=True, cwd=tmp_path,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    for args in ([str(tmp_path / "missing.npz"), str(tmp_path / "out")], [str(tmp_path / "bad.npz")]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_converter_refuses_a_non_empty_output_and_imports_no_torch(tmp_path):
    _small_npz(tmp_path / "a.npz", 8, seed=0)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        convert([tmp_path / "a.npz"], tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"
    code = f"import sys, {MODULE}; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.stdout.strip() == "False", proc.stderr


# ---------------------------------------------------------------------------------------------
# Dataset errors


def test_dataset_rejects_missing_or_damaged_folders(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        GeneratedDataset(tmp_path / "nowhere")
    with pytest.raises(UserError, match="index.json"):
        GeneratedDataset(tmp_path)
    _small_npz(tmp_path / "a.npz", 50, seed=0)
    convert([tmp_path / "a.npz"], tmp_path / "out", shard_size=20, progress=False)
    (tmp_path / "out" / "images_00001.npy").unlink()
    with pytest.raises(UserError, match="images_00001.npy is missing"):
        GeneratedDataset(tmp_path / "out")
    (tmp_path / "out" / "index.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid shard index"):
        GeneratedDataset(tmp_path / "out")


def test_labels_are_checked_when_the_set_is_opened(tmp_path, monkeypatch):
    import data.generated as generated

    _, labels = _small_npz(tmp_path / "a.npz", 50, seed=1)
    index = convert([tmp_path / "a.npz"], tmp_path / "out", shard_size=20, progress=False)
    assert len(GeneratedDataset(tmp_path / "out")) == 50
    monkeypatch.setattr(generated, "_LABEL_CHUNK", 7)  # the scan goes chunk by chunk: positions must add up
    shard = tmp_path / "out" / index["shards"][1]["labels"]
    bad = np.load(shard)
    bad[16] = 10
    np.save(shard, bad)
    with pytest.raises(UserError, match=r"labels_00001.npy holds label 10 at position 16, outside the 10 classes"):
        GeneratedDataset(tmp_path / "out")
    bad[16] = (labels[36] + 1) % 10  # in range, but then the class counts are not the index's
    np.save(shard, bad)
    with pytest.raises(UserError, match="differ from its index.json"):
        GeneratedDataset(tmp_path / "out")


def test_verify_shards_checks_sizes_and_digests(tmp_path):
    from data.generated import verify_shards

    _small_npz(tmp_path / "a.npz", 30, seed=2)
    index = convert([tmp_path / "a.npz"], tmp_path / "out", shard_size=20, progress=False)
    verify_shards(tmp_path / "out", progress=False)
    images = tmp_path / "out" / index["shards"][1]["images"]
    data = bytearray(images.read_bytes())
    data[-1] ^= 0xFF
    images.write_bytes(bytes(data))
    GeneratedDataset(tmp_path / "out")  # opening checks shapes and labels, not every pixel
    with pytest.raises(UserError, match="images_00001.npy does not match its SHA-256"):
        verify_shards(tmp_path / "out", progress=False)
    images.write_bytes(bytes(data[:-1]))
    with pytest.raises(UserError, match=r"images_00001.npy is \d+ bytes, index.json says \d+ bytes"):
        verify_shards(tmp_path / "out", progress=False)


# ---------------------------------------------------------------------------------------------
# Sampler


def _epoch(n_real=1000, n_gen=10_000, batch=64, fraction=0.7, seed=0, epoch=1, start=0, **kw) -> list:
    s = MixedBatchSampler(n_real, n_gen, batch, fraction, seed=seed, **kw)
    s.set_epoch(epoch, start)
    return list(s)


@pytest.mark.parametrize("batch,fraction", [(64, 0.7), (50, 0.3), (10, 0.55), (32, 1.0)])
def test_every_batch_has_the_exact_generated_fraction(batch, fraction):
    n_real = 1000
    batches = _epoch(n_real=n_real, batch=batch, fraction=fraction)
    m = round(fraction * batch)
    assert len(batches) == (n_real // (batch - m) if batch > m else 10_000 // batch)
    for b in batches:
        assert len(b) == batch and sum(i >= n_real for i, _ in b) == m
    real = [i for b in batches for i, _ in b if i < n_real]
    assert len(real) == len(set(real))  # one pass over the real set without repeats


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_partition_every_global_batch_and_never_overlap(world_size):
    kw = dict(n_real=1000, n_gen=50_000, batch=48, fraction=0.7, seed=5, epoch=3)
    full = _epoch(**kw)
    parts = [_epoch(rank=r, world_size=world_size, **kw) for r in range(world_size)]
    m = round(0.7 * 48)
    for step, batch in enumerate(full):
        ranks = [p[step] for p in parts]
        assert Counter(x for r in ranks for x in r) == Counter(batch)  # same indices and seeds
        for r in ranks:
            assert len(r) == 48 // world_size
            assert abs(sum(i >= 1000 for i, _ in r) - m / world_size) < 1  # same mix on every rank
    seen = [{i for b in p for i, _ in b} for p in parts]
    for a in range(world_size):
        for b in range(a + 1, world_size):
            assert not seen[a] & seen[b]


def test_order_is_deterministic_and_resume_yields_the_tail():
    a, b = _epoch(seed=1, epoch=2), _epoch(seed=1, epoch=2)
    assert a == b
    assert a != _epoch(seed=1, epoch=3) and a != _epoch(seed=2, epoch=2)
    s = MixedBatchSampler(1000, 10_000, 64, 0.7, seed=1, rank=1, world_size=2)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start_step=7)
    assert len(s) == len(full) - 7 and list(s) == full[7:]


def test_generated_images_are_drawn_without_replacement_across_epochs():
    n_real, n_gen, batch, fraction = 600, 1000, 52, 0.4
    s = MixedBatchSampler(n_real, n_gen, batch, fraction)
    per_epoch = s.steps_per_epoch * s.generated_per_batch  # 19 x 21 = 399: cycles end mid-epoch
    epochs = range(1, 2 * n_gen // per_epoch + 2)
    stream = [i - n_real for e in epochs for b in _epoch(n_real, n_gen, batch, fraction, epoch=e)
              for i, _ in b if i >= n_real]
    assert len(stream) == len(epochs) * per_epoch >= 2 * n_gen
    assert sorted(stream[:n_gen]) == list(range(n_gen))
    assert sorted(stream[n_gen:2 * n_gen]) == list(range(n_gen))
    assert stream[:n_gen] != stream[n_gen:2 * n_gen]  # each cycle has its own order


def test_fraction_zero_matches_epoch_batch_sampler_and_long_epochs_repermute():
    for rank in (0, 1):
        ours = _epoch(n_real=100, n_gen=0, batch=20, fraction=0.0, seed=3, epoch=4, rank=rank, world_size=2)
        ref = EpochBatchSampler(100, 20, seed=3, rank=rank, world_size=2)
        ref.set_epoch(4)
        assert ours == list(ref)
    long = _epoch(n_real=100, n_gen=500, batch=20, fraction=0.5, steps_per_epoch=25)
    assert len(long) == 25
    real = [[i for i, _ in b if i < 100] for b in long]
    for p in range(2):  # each pass of 10 real batches is a permutation; the partial third too
        assert sorted(i for b in real[10 * p:10 * p + 10] for i in b) == list(range(100))
    assert len({i for b in real[20:] for i in b}) == 50


def test_sampler_rejects_bad_settings():
    with pytest.raises(UserError, match="fraction"):
        MixedBatchSampler(100, 100, 32, 1.5)
    with pytest.raises(UserError, match="world size"):
        MixedBatchSampler(100, 100, 30, 0.5, world_size=4)
    with pytest.raises(UserError, match="generated set is empty"):
        MixedBatchSampler(100, 0, 32, 0.5)
    with pytest.raises(UserError, match="real set"):
        MixedBatchSampler(10, 100, 64, 0.5)


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4097])
def test_keyed_permutation_is_a_bijection_that_shuffles(n):
    p = KeyedPermutation(n, key=7)(np.arange(n))
    assert sorted(p.tolist()) == list(range(n))
    if n >= 1000:
        assert np.mean(p == np.arange(n)) < 0.01
        assert abs(np.corrcoef(p, np.arange(n))[0, 1]) < 0.1
        assert not np.array_equal(p, KeyedPermutation(n, key=8)(np.arange(n)))


def test_loader_over_real_and_generated_yields_mixed_batches(tmp_path):
    _small_npz(tmp_path / "real.npz", 60, seed=3)
    _small_npz(tmp_path / "gen.npz", 300, seed=4, label=np.full(300, 9))
    convert([tmp_path / "real.npz"], tmp_path / "real", progress=False)
    convert([tmp_path / "gen.npz"], tmp_path / "gen", shard_size=128, progress=False)
    real, gen = GeneratedDataset(tmp_path / "real", eval_transform()), GeneratedDataset(tmp_path / "gen", eval_transform())
    sampler = MixedBatchSampler(len(real), len(gen), 20, 0.75, seed=0)
    sampler.set_epoch(1)
    loader = DataLoader(SeededDataset(ConcatDataset([real, gen])), batch_sampler=sampler, num_workers=0)
    batches = list(loader)
    assert len(batches) == 60 // 5
    for (x, y), idx in zip(batches, sampler):
        assert x.shape == (20, 3, 32, 32)
        gen_pos = [k for k, (i, _) in enumerate(idx) if i >= len(real)]
        assert len(gen_pos) == 15 and (y[gen_pos] == 9).all()
