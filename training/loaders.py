"""The data of a training run: the training loader (seeded, resumable, sharded over ranks) and the set
the per-epoch evaluation measures: a held-out part of the training set (``--val-size N``), or
without one (the paper presets, which train on every image) ``eval_subset`` fixed training images.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Union

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from data import (NUM_CLASSES, EpochBatchSampler, SeededDataset, build_dataset, eval_transform, image_shape_of,
                  train_transform)
from errors import UserError

VAL_SPLIT_SEED = 12345  # fixed, so every run of a dataset holds out the same images


@dataclass
class TrainingData:
    """What a run reads: batches (``sampler`` decides their order), the evaluated set, views per image."""

    loader: DataLoader
    sampler: Union[EpochBatchSampler, "MixedBatchSampler"]  # noqa: F821  (data.generated, imported lazily)
    val_set: Dataset  # held out (``held_out``) or, without a held-out split, images the run trains on
    n_views: int
    held_out: bool = True


def loader_workers(requested: int, device: torch.device) -> int:
    """``requested`` loader processes, or with ``requested < 0`` (auto): on CUDA min(8, the CPUs this
    process may use divided by the processes on this node), elsewhere 0 (the CPU computes the step)."""
    if requested >= 0:
        return requested
    if device.type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, cpus // per_node - 1))  # one CPU stays with the training process


def split_train_val(n: int, val_size: int) -> tuple[list[int], list[int]]:
    """Fixed held-out split of the training set (never the test set) for metrics and `best`.

    With ``val_size`` 0 every image trains and the second list is a fixed order of all of them
    (the first ``eval_subset`` are what the per-epoch evaluation then measures).
    """
    if val_size >= n:
        raise UserError(f"--val-size {val_size} leaves no training data ({n} training images): lower it")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(VAL_SPLIT_SEED)).tolist()
    if val_size == 0:
        return list(range(n)), perm
    return sorted(perm[val_size:]), sorted(perm[:val_size])


def _check_last_batch(images: int, world_size: int) -> None:
    """Every process needs at least one image of the epoch's last (partial) batch."""
    if images < world_size:
        raise UserError(f"the last batch of each epoch holds {images} image(s), fewer than the {world_size} "
                        "processes: pass --drop-last true, or change --batch-size or the number of processes")


def build_training_data(cfg, device: torch.device, rank: int = 0, world_size: int = 1) -> TrainingData:
    """Training loader and held-out set of a run with config ``cfg`` (this rank's share of each batch)."""
    n_views = 2 if cfg.augment == "autoaug" else 1
    size = image_shape_of(cfg.dataset, cfg.data_dir)[1:]  # random crops keep the data set's image size
    full_train = build_dataset(cfg.dataset, True, cfg.data_dir, cfg.download, train_transform(cfg.augment, size))
    plain_train = build_dataset(cfg.dataset, True, cfg.data_dir, False, eval_transform())
    train_idx, val_idx = split_train_val(len(full_train), cfg.val_size)
    train_set: Dataset = Subset(full_train, train_idx)
    if cfg.generated:
        from data.generated import GeneratedDataset, MixedBatchSampler

        gen = GeneratedDataset(cfg.generated, transform=train_transform(cfg.augment, size))
        if gen.num_classes != NUM_CLASSES[cfg.dataset]:
            raise UserError(f"--generated {cfg.generated} has {gen.num_classes} classes but --dataset "
                            f"{cfg.dataset} has {NUM_CLASSES[cfg.dataset]}: convert the matching generated set")
        # dataset-size: DM-AT's epoch, ceil(len(CIFAR training set) / batch) steps of the mixed batch
        steps = -(-len(full_train) // cfg.batch_size) if cfg.generated_epoch == "dataset-size" else None
        sampler = MixedBatchSampler(len(train_set), len(gen), cfg.batch_size, cfg.generated_fraction,
                                    seed=cfg.seed, rank=rank, world_size=world_size, steps_per_epoch=steps,
                                    drop_last=cfg.drop_last)
        _check_last_batch(sampler.batch_size_of(sampler.steps_per_epoch - 1), world_size)
        train_set = ConcatDataset([train_set, gen])
    else:
        if cfg.batch_size > len(train_set):
            raise UserError(f"--batch-size {cfg.batch_size} is larger than the training set "
                            f"({len(train_set)} images after holding out --val-size {cfg.val_size})")
        sampler = EpochBatchSampler(len(train_set), cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world_size,
                                    drop_last=cfg.drop_last)
        _check_last_batch(sampler.batch_size_of(sampler.steps_per_epoch - 1), world_size)
    workers = loader_workers(cfg.workers, device)
    loader = DataLoader(SeededDataset(train_set), batch_sampler=sampler, num_workers=workers,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                        prefetch_factor=4 if workers > 0 else None,
                        generator=torch.Generator())  # leaves the global RNG alone
    n_eval = min(cfg.eval_subset, len(val_idx))
    return TrainingData(loader, sampler, Subset(plain_train, val_idx[:n_eval]), n_views, held_out=cfg.val_size > 0)
