"""The GKL-AT training loop (spec section 4) with exact resume.

One step, in order: schedules -> attack (natural logits computed once) -> AWP perturb -> natural
and adversarial forwards -> loss -> optimiser step -> AWP restore -> bank update -> weight-average
update. ``Trainer.fit`` runs epochs, evaluates on a held-out part of the training set, writes the
CSV log and checkpoints; ``Trainer(cfg, run_dir, resume=True)`` continues a run exactly.
"""
from __future__ import annotations

import copy
import functools
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
from checkpoints.io import (check_compatible, load_checkpoint, load_latest_checkpoint, nonfinite_entries,
                            remove_stale_temp_files, save_checkpoint, write_failure)
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


class TrainingStopped(KeyboardInterrupt):
    """SIGTERM/SIGINT stopped the run after a checkpoint of ``global_step`` was saved (``--resume`` continues)."""

    def __init__(self, signum: int, global_step: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum, self.global_step = signum, global_step


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``git describe`` of the code this process imported (asked once: it runs a subprocess)."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def resolve_device(name: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` as a device; a name this machine cannot run is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device name: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r}: this project runs on cpu or cuda only")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA but no GPU is visible: use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) are visible "
                        f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return device


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
    """Fixed held-out split of the training set (never the test set) for metrics and `best`."""
    if val_size >= n:
        raise UserError(f"--val-size {val_size} leaves no training data ({n} training images): lower it")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(VAL_SPLIT_SEED)).tolist()
    return sorted(perm[val_size:]), sorted(perm[:val_size])


class StepLoss(nn.Module):
    """``training_loss`` of ``net`` as a module: ``forward(x, x_adv, y, scores) -> (loss, parts, o_nat, o_adv)``."""

    def __init__(self, net: nn.Module, spec: LossSpec, n_views: int) -> None:
        super().__init__()
        self.net, self.spec, self.n_views = net, spec, n_views

    def forward(self, x: torch.Tensor, x_adv: Optional[torch.Tensor], y: torch.Tensor,
                scores: Optional[torch.Tensor]):
        return training_loss(self.spec, self.net, x, x_adv, y, scores, self.n_views)


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
        # first global step at which each metric was non-finite (-1: never); updated without a host sync
        self._first_bad = torch.full((len(PART_NAMES),), -1, dtype=torch.long, device=self.device)
        if resume:
            self._resume(self.run_dir / "checkpoints")

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
            if gen.num_classes != self.num_classes:
                raise UserError(f"--generated {cfg.generated} has {gen.num_classes} classes but --dataset "
                                f"{cfg.dataset} has {self.num_classes}: convert the matching generated set")
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
        workers = loader_workers(cfg.workers, self.device)
        self.train_loader = DataLoader(SeededDataset(train_set), batch_sampler=self.sampler,
                                       num_workers=workers, pin_memory=pin,
                                       persistent_workers=workers > 0,
                                       prefetch_factor=4 if workers > 0 else None,
                                       generator=torch.Generator())  # leaves the global RNG alone
        n_eval = min(cfg.eval_subset, len(val_idx))
        self.val_set = Subset(plain_train, val_idx[:n_eval])

    def _build_model(self) -> None:
        cfg = self.cfg
        model = build_model(cfg.arch, self.num_classes).to(self.device)
        if cfg.sync_bn and self.dist.enabled:
            model = dist_utils.convert_sync_batchnorm(model, self.device.type)
        if cfg.channels_last and self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.model = model  # the plain module: state dicts, evaluation, weight averaging
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
        # Compiled views share the plain modules' weights; they are made after every deepcopy above,
        # so the copies hold no reference to a compiled forward.
        self.attack_model = torch.compile(model) if cfg.compile else model
        self.train_loss = self._loss_module(self.attack_model)
        self.proxy_loss = None
        if self.awp is not None:
            self.proxy_loss = self._loss_module(torch.compile(self.awp.proxy) if cfg.compile else self.awp.proxy)

    def _loss_module(self, net: nn.Module) -> nn.Module:
        """The training loss of ``net`` as one module call, wrapped in DDP under torch.distributed.

        DDP then sees one forward (both the adversarial and the natural pass) per backward. The
        AWP proxy gets its own wrapper so that its gradient is averaged over ranks like the
        model's: each rank then applies the same weight perturbation, which the full-batch
        released code computes; per-rank proxy gradients would make the ranks' weights drift apart
        (weight decay and momentum act on the perturbed weights).
        """
        module = StepLoss(net, self.spec, self.n_views)
        return dist_utils.ddp_wrap(module, self.device) if self.dist.enabled else module

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
                with attack_mode(self.attack_model), torch.no_grad():
                    logits_nat = self.attack_model(x)
                objective = attack_objective(spec, logits_nat, scores)
                x_adv = pgd(self.attack_model, x, y, eps=budget.eps, step=budget.step_size, steps=budget.steps,
                            norm=cfg.norm, objective=objective, random_start=spec.random_start,
                            check_range=False)
            self.model.train()
            if self.awp is not None and epoch >= cfg.awp_warmup:
                self.awp.perturb(lambda _proxy: self.proxy_loss(x, x_adv, y, scores)[0])
            loss, parts, o_nat, o_adv = self.train_loss(x, x_adv, y, scores)
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
        row.append(torch.full((), float(n), device=y.device))  # a fill kernel: no host-to-device copy
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
            sums = self.training_step(x, y, epoch, lr)
            self._epoch_sums += sums
            self._note_nonfinite(sums)
            self.step_in_epoch += 1
            if self.step_in_epoch % LOG_EVERY == 0 or self.step_in_epoch == steps:
                self._check_finite(epoch)
                s = self._epoch_sums
                bar.set_postfix(loss=f"{(s[0] / s[-1]).item():.3f}", adv=f"{(s[6] / s[-1]).item():.3f}")
            if cfg.checkpoint_every_steps and self.global_step % cfg.checkpoint_every_steps == 0 \
                    and self.step_in_epoch < steps:
                self._check_finite(epoch)
                self.save(epoch_end=False)
            if self._stop_requested(self.step_in_epoch):
                self._check_finite(epoch)
                self.save(epoch_end=False)
                raise TrainingStopped(self._stop_signal, self.global_step)
        sums = dist_utils.all_reduce_sum(self._epoch_sums.clone())
        self._check_finite(epoch)
        n = max(sums[-1].item(), 1.0)
        metrics = {f"train_{k}": (sums[i] / n).item() for i, k in enumerate(PART_NAMES)}
        metrics["train_time_s"] = time.time() - start
        return metrics

    def _note_nonfinite(self, sums: torch.Tensor) -> None:
        """Record the step at which each metric first turned non-finite, without a host-device sync."""
        bad = ~torch.isfinite(sums[: len(PART_NAMES)]) & (self._first_bad < 0)
        self._first_bad = torch.where(bad, self.global_step, self._first_bad)

    def _kept_checkpoint(self) -> str:
        last = self.run_dir / "checkpoints" / "last.pt"
        return f"the last good checkpoint {last} is kept" if last.is_file() else "no checkpoint was saved"

    def _check_finite(self, epoch: int) -> None:
        """Stop with ``TrainingDiverged`` (naming the step and the loss part) before anything non-finite is saved."""
        finite = bool(torch.isfinite(self._epoch_sums).all())
        if self.dist.enabled:  # the sums are per rank: all ranks must stop together or the rest wait in a collective
            finite = not dist_utils.max_over_ranks(int(not finite), self.device)
        if not finite:
            first = self._first_bad.tolist()
            step = min((s for s in first if s >= 0), default=self.global_step)
            parts = [k for k, s in zip(PART_NAMES, first) if s == step] or ["loss"]
            raise TrainingDiverged(f"non-finite {', '.join(parts)} at global step {step} (epoch {epoch}); "
                                   f"{self._kept_checkpoint()}. Lower --lr or check the data")
        if self.global_step and not bool(torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()):
            raise TrainingDiverged(f"non-finite weights at or before global step {self.global_step} (epoch {epoch}); "
                                   f"{self._kept_checkpoint()}. Lower --lr")

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
                if self._stop_requested() and epoch < cfg.epochs:  # signalled during evaluation
                    raise TrainingStopped(self._stop_signal, self.global_step)
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

    def _stop_requested(self, step_in_epoch: Optional[int] = None) -> bool:
        """Whether a signal asked the run to stop (``step_in_epoch``: called inside the epoch loop).

        Under torch.distributed the ranks agree through a one-element all-reduce, so every rank
        saves and stops at the same step (a rank that stopped alone would leave the others
        waiting in a collective); inside an epoch only every LOG_EVERY steps, as each check costs a
        host-device sync. Every rank calls this at the same points.
        """
        if not self.dist.enabled:
            return self._stop_signal is not None
        if step_in_epoch is not None and step_in_epoch % LOG_EVERY:
            return False
        agreed = dist_utils.max_over_ranks(self._stop_signal or 0, self.device)
        if agreed:  # ranks the signal did not reach stop as if it had
            self._stop_signal = self._stop_signal or agreed
        return bool(agreed)

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
        bank, epoch_sums = self.bank.state_dict(), self._epoch_sums.clone()
        if self.dist.enabled:  # a checkpoint holds the whole global batch's partial sums, for any world size
            for t in (bank["accumulator"], bank["counts"], epoch_sums):
                dist_utils.all_reduce_sum(t)
        return {
            "format": CHECKPOINT_FORMAT, "code_version": code_version(),
            "arch": self.cfg.arch, "num_classes": self.num_classes, "dataset": self.cfg.dataset,
            "config": self.cfg.to_dict(), "world_size": self.dist.world_size,
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "model": self.model.state_dict(),
            "avg_model": None if avg is None else avg.state_dict(),
            "avg_count": None if self.averager.avg is None else self.averager.avg.n_averaged.clone(),
            "optimizer": self.optimizer.state_dict(), "bank": bank,
            "epoch_sums": epoch_sums, "history": self.history.rows, "best": dict(self.best),
            "rng": rng, "rng_ranks": dist_utils.gather_objects(rng),
        }

    def save(self, *, epoch_end: bool, is_best: bool = False) -> None:
        """Atomically write ``last.pt`` (plus ``best.pt`` and rolling ``epoch_NNNN.pt`` at epoch ends)."""
        state = self.state_dict()
        bad = nonfinite_entries({k: state[k] for k in ("model", "avg_model", "optimizer", "bank", "epoch_sums")})
        if bad:
            raise TrainingDiverged(f"non-finite values in {', '.join(bad[:3])} at global step {self.global_step}; "
                                   f"refusing to save them: {self._kept_checkpoint()}. Lower --lr")
        if not self.dist.is_main:
            return
        folder = self.run_dir / "checkpoints"
        last = save_checkpoint(state, folder / "last.pt")
        target = folder
        try:
            if epoch_end:
                target = folder / f"epoch_{self.epoch:04d}.pt"
                _link_atomic(last, target)
                if is_best:
                    target = folder / "best.pt"
                    _link_atomic(last, target)
                olds = sorted(folder.glob("epoch_*.pt"))[: -self.cfg.keep_checkpoints or None]
                for old in olds if self.cfg.keep_checkpoints else []:
                    old.unlink(missing_ok=True)
            target = self.history.csv_path
            self.history.write()
        except OSError as e:  # last.pt is complete; only the extras failed
            raise write_failure(target, e, kept=f"{last} was saved") from None

    def _resume(self, folder: Path) -> None:
        """Continue from the newest complete checkpoint in ``folder``, removing temp files of killed writes."""
        if self.dist.is_main:
            for p in remove_stale_temp_files(folder):
                tqdm.write(f"note: removed {p.name}, an unfinished write of an interrupted run")
            remove_stale_temp_files(self.run_dir)  # the CSV log's temp file
        path, state, notes = load_latest_checkpoint(folder, map_location=self.device)
        for note in notes if self.dist.is_main else []:
            tqdm.write(f"note: {note}")
        self._load(path, state)

    def _load(self, path: Path, state: Optional[dict] = None) -> None:
        if state is None:
            state = load_checkpoint(path, map_location=self.device)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            fmt = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise UserError(f"{path} is not a training checkpoint of this project (format {fmt!r})")
        check_compatible(state, path, arch=self.cfg.arch, num_classes=self.num_classes)
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as e:
            from checkpoints.run import state_dict_mismatch

            detail = state_dict_mismatch(self.model, state["model"]) or str(e).splitlines()[0][:200]
            raise UserError(f"{path} does not fit the run's {self.cfg.arch} model: {detail}") from None
        self.optimizer.load_state_dict(state["optimizer"])
        if not self.dist.is_main:  # the saved partial sums cover every rank: rank 0 carries them on
            for t in (state["bank"]["accumulator"], state["bank"]["counts"], state["epoch_sums"]):
                t.zero_()
        self.bank.load_state_dict(state["bank"])
        self.averager.load(state["avg_model"], state["avg_count"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step = state["global_step"]
        self._epoch_sums.copy_(state["epoch_sums"])
        self.history.rows = list(state["history"])
        self.best = dict(state["best"])
        self._load_rng(state)
        if state.get("world_size", 1) != self.dist.world_size and self.dist.is_main:
            tqdm.write(f"resuming a {state['world_size']}-process run with {self.dist.world_size} process(es); "
                       "same global batch and sample order")

    def _load_rng(self, state: dict) -> None:
        """Each rank continues its own saved random stream; a rank the saved run did not have starts a fresh one."""
        rngs = state.get("rng_ranks") or [state["rng"]]
        if self.dist.rank >= len(rngs):
            torch.manual_seed(epoch_seed(self.cfg.seed + self.dist.rank, self.global_step))
            return
        rng = rngs[self.dist.rank]
        torch.set_rng_state(rng["cpu"].cpu())  # the checkpoint was mapped to the device; RNG states live on the CPU
        if self.device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"].cpu(), self.device)


def _link_atomic(src: Path, dst: Path) -> None:
    """Make ``dst`` a hard link to ``src`` (no extra disk), replacing ``dst`` atomically."""
    tmp = dst.with_name(f".{dst.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:  # file systems without hard links
            import shutil

            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
