"""The GKL-AT training loop (spec section 4) with exact resume.

One step, in order: schedules -> attack (natural logits computed once) -> AWP perturb -> natural
and adversarial forwards -> loss -> optimiser step -> AWP restore -> bank update -> weight-average
update. ``Trainer.fit`` runs epochs, evaluates on a held-out part of the training set, writes the
CSV log and checkpoints; ``Trainer(cfg, run_dir, resume=True)`` continues a run exactly.
"""
from __future__ import annotations

import copy
import math
import os
import signal
import subprocess
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from torch.utils.data import ConcatDataset, DataLoader, Subset
from tqdm.auto import tqdm

from attacks.context import attack_mode
from attacks.pgd import pgd
from checkpoints.io import load_checkpoint, save_checkpoint
from data import NUM_CLASSES, EpochBatchSampler, SeededDataset, build_dataset, eval_transform, train_transform
from data.sampler import epoch_seed
from errors import UserError
from losses import ScoreBank
from models import build_model

from . import distributed as dist_utils
from .averaging import WeightAverager
from .awp import AWP
from .config import TrainConfig, eps_str, save_config
from .logging import History
from .objectives import LossSpec, attack_objective, scores_for, training_loss
from .schedules import attack_budget, lr_at

CHECKPOINT_FORMAT = "gkl-at/1"
VAL_SPLIT_SEED = 12345  # fixed, so every run of a dataset holds out the same images
LOG_EVERY = 20  # steps between progress-bar updates (each costs one host-device sync)
PART_NAMES = ("loss", "ce", "soft_ce", "wmse", "kl", "acc_nat", "acc_adv")


class TrainingDiverged(RuntimeError):
    """A loss or weight became non-finite; the last good checkpoint is left untouched."""


def code_version() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device name: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA but no GPU is visible: use --device cpu")
    return device


def split_train_val(n: int, val_size: int) -> tuple[list[int], list[int]]:
    """Fixed held-out split of the training set (never the test set) for metrics and `best`."""
    if val_size >= n:
        raise UserError(f"--val-size {val_size} leaves no training data ({n} training images): lower it")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(VAL_SPLIT_SEED)).tolist()
    return sorted(perm[val_size:]), sorted(perm[:val_size])


class Trainer:
    """Builds everything a run needs from its config and trains it."""

    def __init__(self, cfg: TrainConfig, run_dir: str | os.PathLike, *, resume: bool = False,
                 progress: bool = True) -> None:
        self.cfg, self.run_dir, self.progress = cfg, Path(run_dir), progress
        self.device = resolve_device(cfg.device)
        self.dist = dist_utils.init_from_env(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if cfg.batch_size % self.dist.world_size:
            raise UserError(f"--batch-size {cfg.batch_size} is not divisible by the world size "
                            f"{self.dist.world_size}: the global batch is split evenly across processes")
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(cfg.seed + self.dist.rank)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = not cfg.deterministic
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.num_classes = NUM_CLASSES[cfg.dataset]
        self.spec = LossSpec.from_config(cfg)
        self.amp = cfg.amp == "bf16" or (cfg.amp == "auto" and self.device.type == "cuda")
        self._build_data()
        self._build_model()
        self.bank = ScoreBank(self.num_classes, tau=cfg.tau, device=self.device)
        self.history = History(self.run_dir / "log.csv")
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best: dict = {"metric": -1.0, "epoch": 0}
        self._epoch_sums = torch.zeros(len(PART_NAMES) + 1, dtype=torch.float64, device=self.device)
        self._stop_signal: Optional[int] = None
        if resume:
            self._load(self.run_dir / "checkpoints" / "last.pt")

    # ----------------------------------------------------------------------------- building
    def _build_data(self) -> None:
        cfg = self.cfg
        n_views = 2 if cfg.augment == "autoaug" else 1
        self.n_views = n_views
        full_train = build_dataset(cfg.dataset, True, cfg.data_dir, cfg.download, train_transform(cfg.augment))
        plain_train = build_dataset(cfg.dataset, True, cfg.data_dir, False, eval_transform())
        train_idx, val_idx = split_train_val(len(full_train), cfg.val_size)
        train_set = Subset(full_train, train_idx)
        if cfg.generated:
            from data.generated import GeneratedDataset, MixedBatchSampler

            gen = GeneratedDataset(cfg.generated, transform=train_transform(cfg.augment))
            self.sampler = MixedBatchSampler(len(train_set), len(gen), cfg.batch_size, cfg.generated_fraction,
                                             seed=cfg.seed, rank=self.dist.rank, world_size=self.dist.world_size)
            train_set = ConcatDataset([train_set, gen])
        else:
            if cfg.batch_size > len(train_set):
                raise UserError(f"--batch-size {cfg.batch_size} is larger than the training set "
                                f"({len(train_set)} images after holding out --val-size {cfg.val_size})")
            self.sampler = EpochBatchSampler(len(train_set), cfg.batch_size, seed=cfg.seed,
                                             rank=self.dist.rank, world_size=self.dist.world_size)
        pin = self.device.type == "cuda"
        self.train_loader = DataLoader(SeededDataset(train_set), batch_sampler=self.sampler,
                                       num_workers=cfg.workers, pin_memory=pin,
                                       persistent_workers=cfg.workers > 0,
                                       prefetch_factor=4 if cfg.workers > 0 else None,
                                       generator=torch.Generator())  # leaves the global RNG alone
        n_eval = min(cfg.eval_subset, len(val_idx))
        self.val_set = Subset(plain_train, val_idx[:n_eval])

    def _build_model(self) -> None:
        cfg = self.cfg
        model = build_model(cfg.arch, self.num_classes).to(self.device)
        if cfg.sync_bn and self.dist.enabled:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if cfg.channels_last and self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.model = model  # the plain module: state dicts, attacks, evaluation
        self.train_model: nn.Module = model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay, nesterov=cfg.nesterov,
                                         fused=fused or None, foreach=None if fused else True)
        self.awp: Optional[AWP] = None
        if cfg.awp_gamma > 0 and self.spec.uses_attack:
            proxy = copy.deepcopy(model)
            self.awp = AWP(model, proxy, lr=cfg.lr, gamma=cfg.awp_gamma)
        self.averager = WeightAverager(model, cfg.averaging, decay=cfg.avg_decay, start_epoch=cfg.avg_start_epoch,
                                       step_decay=cfg.step_ema_decay, step_warmup=cfg.step_ema_warmup)

    # ----------------------------------------------------------------------------- one step
    def _autocast(self):
        if not self.amp:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _to_device(self, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(x, (list, tuple)):  # two-view: [basic; aug] with labels repeated
            views = len(x)
            x = torch.cat(list(x))
            y = y.repeat(views)
        x = x.to(self.device, non_blocking=True)
        if self.cfg.channels_last and self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=True)

    def training_step(self, x: torch.Tensor, y: torch.Tensor, epoch: int, lr: float) -> torch.Tensor:
        """One GKL-AT step on a batch already on the device; returns the step's metric sums."""
        cfg, spec = self.cfg, self.spec
        budget = attack_budget(cfg.eps, epoch, cfg.epochs, eps_schedule=cfg.eps_schedule, budget=cfg.attack_budget,
                               steps=cfg.attack_steps, step_size=cfg.attack_step_size)
        y_basic = y[: y.shape[0] // self.n_views]
        scores = scores_for(spec, self.bank, y, self.num_classes)
        x_adv = None
        with self._autocast():
            if spec.uses_attack:
                with attack_mode(self.model), torch.no_grad():
                    logits_nat = self.model(x)
                objective = attack_objective(spec, logits_nat, scores)
                x_adv = pgd(self.model, x, y, eps=budget.eps, step=budget.step_size, steps=budget.steps,
                            norm=cfg.norm, objective=objective, random_start=spec.random_start)
            self.model.train()
            if self.awp is not None and epoch >= cfg.awp_warmup:
                self.awp.perturb(lambda proxy: training_loss(spec, proxy, x, x_adv, y, scores, self.n_views)[0])
            loss, parts, o_nat, o_adv = training_loss(spec, self.train_model, x, x_adv, y, scores, self.n_views)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.awp is not None:
            self.awp.restore()
        if o_nat is not None and spec.uses_bank:
            self.bank.update(o_nat[: y_basic.shape[0]].detach(), y_basic)
        self.global_step += 1
        self.averager.after_step(self.model, self.global_step)
        return self._step_sums(loss, parts, o_nat, o_adv, y)

    def _step_sums(self, loss, parts, o_nat, o_adv, y) -> torch.Tensor:
        n = y.shape[0]
        zero = loss.new_zeros(())
        values = {"loss": loss.detach(), **parts}
        row = [values.get(k, zero).float() * n for k in PART_NAMES[:5]]
        row.append((o_nat.argmax(1) == y).sum().float() if o_nat is not None else zero.float())
        row.append((o_adv.argmax(1) == y).sum().float() if o_adv is not None else zero.float())
        row.append(torch.tensor(float(n), device=y.device))
        return torch.stack(row).double()

    # ----------------------------------------------------------------------------- epochs
    def train_one_epoch(self, epoch: int) -> dict:
        cfg = self.cfg
        self.sampler.set_epoch(epoch, self.step_in_epoch)
        steps = self.sampler.steps_per_epoch
        bar = tqdm(self.train_loader, total=steps, initial=self.step_in_epoch, desc=f"epoch {epoch}/{cfg.epochs}",
                   disable=not (self.progress and self.dist.is_main), leave=False, dynamic_ncols=True)
        start = time.time()
        for x, y in bar:
            lr = lr_at(cfg.lr, epoch, cfg.epochs, schedule=cfg.lr_schedule, warmup_epochs=cfg.warmup_epochs,
                       step=self.step_in_epoch, steps_per_epoch=steps)
            x, y = self._to_device(x, y)
            self._epoch_sums += self.training_step(x, y, epoch, lr)
            self.step_in_epoch += 1
            if self.step_in_epoch % LOG_EVERY == 0 or self.step_in_epoch == steps:
                self._check_finite(epoch)
                s = self._epoch_sums
                bar.set_postfix(loss=f"{(s[0] / s[-1]).item():.3f}", adv=f"{(s[6] / s[-1]).item():.3f}")
            if cfg.checkpoint_every_steps and self.global_step % cfg.checkpoint_every_steps == 0 \
                    and self.step_in_epoch < steps:
                self._check_finite(epoch)
                self.save(epoch_end=False)
            if self._stop_signal is not None:
                self._check_finite(epoch)
                self.save(epoch_end=False)
                raise KeyboardInterrupt(f"signal {self._stop_signal}")
        sums = dist_utils.all_reduce_sum(self._epoch_sums.clone())
        self._check_finite(epoch)
        n = max(sums[-1].item(), 1.0)
        metrics = {f"train_{k}": (sums[i] / n).item() for i, k in enumerate(PART_NAMES)}
        metrics["train_time_s"] = time.time() - start
        return metrics

    def _check_finite(self, epoch: int) -> None:
        s = self._epoch_sums
        if not bool(torch.isfinite(s).all()):
            bad = [k for i, k in enumerate(PART_NAMES) if not math.isfinite(s[i].item())]
            raise TrainingDiverged(f"non-finite {', '.join(bad)} in epoch {epoch} at or before global step "
                                   f"{self.global_step}; the last good checkpoint is kept. Lower --lr or check the data")
        if self.global_step and not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            raise TrainingDiverged(f"non-finite weights in epoch {epoch} at global step {self.global_step}; "
                                   "the last good checkpoint is kept. Lower --lr")

    @torch.no_grad()
    def _accuracy(self, model: nn.Module, epoch: int) -> tuple[float, float]:
        """Natural and PGD accuracy (eps = the final training eps, eps/4 steps, fp32) on the held-out subset."""
        cfg = self.cfg
        idx = list(range(self.dist.rank, len(self.val_set), self.dist.world_size))
        loader = DataLoader(Subset(self.val_set, idx), batch_size=256, num_workers=0)
        g = torch.Generator(device=self.device).manual_seed(epoch_seed(cfg.seed, epoch))
        counts = torch.zeros(3, dtype=torch.float64, device=self.device)
        was_training = model.training
        model.eval()
        for x, y in loader:
            x, y = x.to(self.device), y.to(self.device)
            counts[0] += (model(x).argmax(1) == y).sum()
            if cfg.eps > 0:
                with torch.enable_grad():
                    x_adv = pgd(model, x, y, eps=cfg.eps, step=cfg.eps / 4, steps=cfg.eval_pgd_steps, norm=cfg.norm,
                                objective="ce", random_start="uniform", generator=g)
                counts[1] += (model(x_adv).argmax(1) == y).sum()
            counts[2] += y.numel()
        model.train(was_training)
        counts = dist_utils.all_reduce_sum(counts)
        n = max(counts[2].item(), 1.0)
        return counts[0].item() / n, counts[1].item() / n

    def evaluate(self, epoch: int) -> dict:
        metrics = {}
        clean, rob = self._accuracy(self.model, epoch)
        metrics.update(val_clean=clean, val_pgd=rob)
        avg = self.averager.module
        if avg is not None:
            clean_a, rob_a = self._accuracy(avg, epoch)
            metrics.update(val_clean_avg=clean_a, val_pgd_avg=rob_a)
        return metrics

    def fit(self) -> list[dict]:
        """Train from the current state to ``cfg.epochs``; returns the per-epoch log rows."""
        cfg = self.cfg
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in previous:
            signal.signal(s, self._on_signal)
        try:
            for epoch in range(self.epoch + 1, cfg.epochs + 1):
                row = {"epoch": epoch}
                b = attack_budget(cfg.eps, epoch, cfg.epochs, eps_schedule=cfg.eps_schedule, budget=cfg.attack_budget,
                                  steps=cfg.attack_steps, step_size=cfg.attack_step_size)
                row.update(eps_x255=b.eps * 255, attack_steps=b.steps if self.spec.uses_attack else 0,
                           lr=lr_at(cfg.lr, epoch, cfg.epochs, schedule=cfg.lr_schedule,
                                    warmup_epochs=cfg.warmup_epochs),
                           awp=int(self.awp is not None and epoch >= cfg.awp_warmup))
                row.update(self.train_one_epoch(epoch))
                if self.spec.uses_bank:
                    self.bank.finish_epoch()
                self.averager.after_epoch(self.model, epoch)
                t0 = time.time()
                row.update(self.evaluate(epoch))
                row["eval_time_s"] = time.time() - t0
                self.epoch, self.step_in_epoch = epoch, 0
                self._epoch_sums.zero_()
                self.history.append(row)
                is_best = self._update_best(row)
                self.save(epoch_end=True, is_best=is_best)
                if self.dist.is_main:
                    self._print_row(row)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        if self.dist.is_main:
            self.history.plot(self.run_dir / "training_curves.png")
        return self.history.rows

    def _update_best(self, row: dict) -> bool:
        metric = row.get("val_pgd_avg", row["val_pgd"])
        if metric > self.best["metric"]:
            self.best = {"metric": metric, "epoch": row["epoch"]}
            return True
        return False

    def _print_row(self, r: dict) -> None:
        avg = f" | avg clean {r['val_clean_avg']:.3f} pgd {r['val_pgd_avg']:.3f}" if "val_pgd_avg" in r else ""
        tqdm.write(f"epoch {r['epoch']:>3}/{self.cfg.epochs} eps {eps_str(r['eps_x255'] / 255)} lr {r['lr']:.4f} "
                   f"loss {r['train_loss']:.3f} | val clean {r['val_clean']:.3f} pgd {r['val_pgd']:.3f}{avg} "
                   f"| {r['train_time_s']:.0f}s")

    def _on_signal(self, signum, frame) -> None:
        if self._stop_signal is not None:  # second signal: stop now
            raise KeyboardInterrupt(f"signal {signum}")
        self._stop_signal = signum
        tqdm.write(f"signal {signum}: saving a checkpoint at the end of this step, then stopping")

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        avg = self.averager.module
        return {
            "format": CHECKPOINT_FORMAT, "code_version": code_version(),
            "arch": self.cfg.arch, "num_classes": self.num_classes, "dataset": self.cfg.dataset,
            "config": self.cfg.to_dict(), "world_size": self.dist.world_size,
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "model": self.model.state_dict(),
            "avg_model": None if avg is None else avg.state_dict(),
            "avg_count": None if self.averager.avg is None else self.averager.avg.n_averaged.clone(),
            "optimizer": self.optimizer.state_dict(), "bank": self.bank.state_dict(),
            "epoch_sums": self._epoch_sums.clone(), "history": self.history.rows, "best": dict(self.best),
            "rng": rng,
        }

    def save(self, *, epoch_end: bool, is_best: bool = False) -> None:
        """Atomically write ``last.pt`` (plus ``best.pt`` and rolling ``epoch_NNNN.pt`` at epoch ends)."""
        state = self.state_dict()
        if not self.dist.is_main:
            return
        folder = self.run_dir / "checkpoints"
        last = save_checkpoint(state, folder / "last.pt")
        if epoch_end:
            _link_atomic(last, folder / f"epoch_{self.epoch:04d}.pt")
            if is_best:
                _link_atomic(last, folder / "best.pt")
            olds = sorted(folder.glob("epoch_*.pt"))[: -self.cfg.keep_checkpoints or None]
            for old in olds if self.cfg.keep_checkpoints else []:
                old.unlink(missing_ok=True)
        self.history.write()

    def _load(self, path: Path) -> None:
        state = load_checkpoint(path, map_location=self.device)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise UserError(f"{path} is not a training checkpoint of this project (format {state.get('format')!r})")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.bank.load_state_dict(state["bank"])
        if self.averager.avg is not None and state["avg_model"] is not None:
            self.averager.avg.module.load_state_dict(state["avg_model"])
            self.averager.avg.n_averaged.copy_(state["avg_count"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step = state["global_step"]
        self._epoch_sums.copy_(state["epoch_sums"])
        self.history.rows = list(state["history"])
        self.best = dict(state["best"])
        torch.set_rng_state(state["rng"]["cpu"])
        if self.device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        if state.get("world_size", 1) != self.dist.world_size and self.dist.is_main:
            tqdm.write(f"resuming a {state['world_size']}-process run with {self.dist.world_size} process(es); "
                       "same global batch and sample order")


def _link_atomic(src: Path, dst: Path) -> None:
    """Make ``dst`` a hard link to ``src`` (no extra disk), replacing ``dst`` atomically."""
    tmp = dst.with_name(f".{dst.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # file systems without hard links
        import shutil

        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
