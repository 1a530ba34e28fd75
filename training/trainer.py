"""The Trainer: builds a run from its config, trains it epoch by epoch, saves it and resumes it exactly.

The step and the epoch are :mod:`training.engine`'s functions; this module adds the data, the
per-epoch evaluation on a held-out part of the training set, the CSV log, checkpoints, signals
and divergence checks. ``Trainer(cfg, run_dir, resume=True)`` continues a run bit for bit.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from checkpoints.io import (
    check_compatible,
    load_checkpoint,
    load_latest_checkpoint,
    nonfinite_entries,
    remove_stale_temp_files,
    save_checkpoint,
    write_failure,
)
from core import distributed as dist_utils
from core.device import resolve_device
from core.files import atomic_copy
from core.provenance import code_version
from core.tracking import make_tracker
from core.threat import eps_text
from data import NUM_CLASSES, image_shape_of
from data.sampler import epoch_seed
from errors import UserError
from models import check_output

from . import engine
from .config import TrainConfig, save_config
from .loaders import VAL_SPLIT_SEED, build_training_data  # noqa: F401  (VAL_SPLIT_SEED: API)
from .logging import History, epoch_scalars
from .schedules import AttackBudget, attack_budget, config_lr, config_momentum

CHECKPOINT_FORMAT = "gkl-at/1"
RESUME_KEYS = ("model", "optimizer", "bank", "avg_model", "avg_count", "epoch", "step_in_epoch", "global_step",
               "epoch_sums", "history", "best", "rng")
LOG_EVERY = 20  # steps between progress-bar updates (each costs one host-device sync)


class TrainingDiverged(RuntimeError):
    """A loss or weight became non-finite; the last good checkpoint is left untouched."""


class TrainingStopped(KeyboardInterrupt):
    """SIGTERM/SIGINT stopped the run after a checkpoint of ``global_step`` was saved (``--resume`` continues)."""

    def __init__(self, signum: int, global_step: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum, self.global_step = signum, global_step


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
        data = build_training_data(cfg, self.device, self.dist.rank, self.dist.world_size)
        self.train_loader, self.sampler, self.val_set, self.n_views = data.loader, data.sampler, data.val_set, data.n_views
        self.monitor = "val" if data.held_out else "seen"  # log prefix: held-out images, or ones it trains on
        self.amp = cfg.amp == "bf16" or (cfg.amp == "auto" and self.device.type == "cuda")
        self.modules = engine.build_step(cfg, self.num_classes, self.device, n_views=self.n_views,
                                         distributed=self.dist.enabled, amp=self.amp,
                                         world_size=self.dist.world_size)
        check_output(self.modules.model, image_shape_of(cfg.dataset, cfg.data_dir), self.num_classes, cfg.arch)
        m = self.modules  # the pieces a step touches, under their usual names
        self.spec, self.model, self.optimizer, self.awp = m.spec, m.model, m.optimizer, m.awp
        self.bank, self.averager = m.bank, m.averager
        self.history = History(self.run_dir / "log.csv")
        self.tracker = make_tracker(cfg.tracker if self.dist.is_main else "none", self.run_dir, config=cfg.to_dict())
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best: dict = {"metric": -1.0, "epoch": 0}
        self.meter = engine.EpochMeter(m.metric_names, self.device)
        self._stop_signal: Optional[int] = None
        if resume:
            self._resume(self.run_dir / "checkpoints")

    # ----------------------------------------------------------------------------- one step
    def _to_device(self, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(x, (list, tuple)):  # two-view: [basic; aug] with labels repeated
            views = len(x)
            x = torch.cat(list(x))
            y = y.repeat(views)
        x = x.to(self.device, non_blocking=True)
        if self.cfg.channels_last and self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=True)

    def budget(self, epoch: int) -> AttackBudget:
        cfg = self.cfg
        return attack_budget(cfg.eps, epoch, cfg.epochs, eps_schedule=cfg.eps_schedule, budget=cfg.attack_budget,
                             steps=cfg.attack_steps, step_size=cfg.attack_step_size)

    def training_step(self, x: torch.Tensor, y: torch.Tensor, epoch: int, lr: float) -> torch.Tensor:
        """One GKL-AT step (:func:`training.engine.training_step`) on a batch already on the device."""
        share = 1.0
        if self.dist.enabled:  # an uneven last batch: this rank's images times the world size over the batch's
            share = y.shape[0] // self.n_views * self.dist.world_size / self.sampler.batch_size_of(self.step_in_epoch)
        sums = engine.training_step(self.modules, x, y, budget=self.budget(epoch), lr=lr,
                                    awp_on=epoch >= self.cfg.awp_warmup, step=self.global_step + 1, share=share,
                                    momentum=config_momentum(self.cfg, epoch))
        self.global_step += 1
        return sums

    # ----------------------------------------------------------------------------- epochs
    def train_one_epoch(self, epoch: int) -> dict:
        """One epoch (:func:`training.engine.train_one_epoch`) from ``step_in_epoch``; ``train_*`` averages."""
        cfg = self.cfg
        self.sampler.set_epoch(epoch, self.step_in_epoch)
        steps = self.sampler.steps_per_epoch
        bar = tqdm(self.train_loader, total=steps, initial=self.step_in_epoch, desc=f"epoch {epoch}/{cfg.epochs}",
                   disable=not (self.progress and self.dist.is_main), leave=False, dynamic_ncols=True)
        shown = "acc_adv" if "acc_adv" in self.meter.names else "acc_nat"

        def after_step(position: int) -> None:
            self.step_in_epoch = position
            if position % LOG_EVERY == 0 or position == steps:
                self._check_finite(epoch)
                bar.set_postfix(loss=f"{self.meter.mean('loss'):.3f}", adv=f"{self.meter.mean(shown):.3f}")
            if cfg.checkpoint_every_steps and self.global_step % cfg.checkpoint_every_steps == 0 and position < steps:
                self._check_finite(epoch)
                self.save(epoch_end=False)
            if self._stop_requested(position):
                self._check_finite(epoch)
                self.save(epoch_end=False)
                raise TrainingStopped(self._stop_signal, self.global_step)

        def lr_of_step(step: int) -> float:
            return config_lr(cfg, epoch, step, steps)

        with bar:
            metrics = engine.train_one_epoch(lambda x, y, lr: self.training_step(x, y, epoch, lr),
                                             (self._to_device(x, y) for x, y in bar), self.meter,
                                             lr_of_step=lr_of_step, first_step=self.step_in_epoch,
                                             after_step=after_step)
        self._check_finite(epoch)
        return {f"train_{k}": v for k, v in metrics.items()}

    def _kept_checkpoint(self) -> str:
        last = self.run_dir / "checkpoints" / "last.pt"
        return f"the last good checkpoint {last} is kept" if last.is_file() else "no checkpoint was saved"

    def _check_finite(self, epoch: int) -> None:
        """Stop with ``TrainingDiverged`` (naming the step and the loss part) before anything non-finite is saved."""
        finite = self.meter.finite()
        if self.dist.enabled:  # the sums are per rank: all ranks must stop together or the rest wait in a collective
            finite = not dist_utils.max_over_ranks(int(not finite), self.device)
        if not finite:
            position, parts = self.meter.first_nonfinite()
            step = self.global_step if position is None else self.global_step - (self.step_in_epoch - position)
            raise TrainingDiverged(f"non-finite {', '.join(parts or ['loss'])} at global step {step} (epoch {epoch}); "
                                   f"{self._kept_checkpoint()}. Lower --lr or check the data")
        if self.global_step and not bool(torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()):
            raise TrainingDiverged(f"non-finite weights at or before global step {self.global_step} (epoch {epoch}); "
                                   f"{self._kept_checkpoint()}. Lower --lr")

    def evaluate(self, epoch: int) -> dict:
        """Natural and PGD accuracy of the raw and (when there are any) the averaged weights on the held-out
        images (``val_*``) or, without a held-out split, on ``eval_subset`` training images (``seen_*``)."""
        cfg, metrics = self.cfg, {}
        models = {"": self.model, "_avg": self.averager.module}
        for suffix, model in models.items():
            if model is not None:
                acc = engine.evaluate(model, self.val_set, eps=cfg.eps, norm=cfg.norm, pgd_steps=cfg.eval_pgd_steps,
                                      seed=epoch_seed(cfg.seed, epoch), device=self.device, rank=self.dist.rank,
                                      world_size=self.dist.world_size)
                metrics.update({f"{self.monitor}_{k}{suffix}": acc[k] for k in ("clean", "pgd")})
        return metrics

    def fit(self) -> list[dict]:
        """Train from the current state to ``cfg.epochs``; returns the per-epoch log rows."""
        cfg = self.cfg
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self.tracker.start(first_step=self.epoch + 1)  # hides points an interrupted process logged past the checkpoint
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in previous:
            signal.signal(s, self._on_signal)
        try:
            for epoch in range(self.epoch + 1, cfg.epochs + 1):
                row = {"epoch": epoch}
                b = self.budget(epoch)
                row.update(eps_x255=b.eps * 255, attack_steps=b.steps if self.spec.uses_attack else 0,
                           lr=config_lr(cfg, epoch),
                           awp=int(self.awp is not None and epoch >= cfg.awp_warmup))
                row.update(self.train_one_epoch(epoch))
                if self.spec.uses_bank:
                    self.bank.finish_epoch()
                self.averager.after_epoch(self.model, epoch)
                t0 = time.time()
                row.update(self.evaluate(epoch))
                row["eval_time_s"] = time.time() - t0
                self.epoch, self.step_in_epoch = epoch, 0
                self.meter.reset()
                self.history.append(row)
                self.tracker.log(epoch_scalars(row), step=epoch)  # before the checkpoint: see start()
                is_best = self._update_best(row)
                self.save(epoch_end=True, is_best=is_best)
                if self.dist.is_main:
                    self._print_row(row)
                if self._stop_requested() and epoch < cfg.epochs:  # signalled during evaluation
                    raise TrainingStopped(self._stop_signal, self.global_step)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            self.tracker.close()
        if self.dist.is_main:
            self.history.plot(self.run_dir / "training_curves.png")
        return self.history.rows

    def _update_best(self, row: dict) -> bool:
        if self.monitor != "val":  # best.pt is chosen on held-out images only
            return False
        metric = row.get("val_pgd_avg", row["val_pgd"])
        if metric > self.best["metric"]:
            self.best = {"metric": metric, "epoch": row["epoch"]}
            return True
        return False

    def _print_row(self, r: dict) -> None:
        m = self.monitor
        avg = f" | avg clean {r[f'{m}_clean_avg']:.3f} pgd {r[f'{m}_pgd_avg']:.3f}" if f"{m}_pgd_avg" in r else ""
        eps = eps_text(r["eps_x255"] / 255, self.cfg.norm)
        tqdm.write(f"epoch {r['epoch']:>3}/{self.cfg.epochs} eps {eps} lr {r['lr']:.4f} "
                   f"loss {r['train_loss']:.3f} | {m} clean {r[f'{m}_clean']:.3f} pgd {r[f'{m}_pgd']:.3f}{avg} "
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
        bank, epoch_sums = self.bank.state_dict(), self.meter.sums.clone()
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
        """Atomically write ``last.pt`` (plus ``best.pt`` and rolling ``epoch_NNNN.pt`` at epoch ends).

        The epoch and best files are copies, not links: a damaged ``last.pt`` leaves them intact.
        """
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
                atomic_copy(last, target)
                olds = sorted(folder.glob("epoch_*.pt"))[: -self.cfg.keep_checkpoints or None]
                for old in olds if self.cfg.keep_checkpoints else []:  # before best's copy: less disk at the peak
                    old.unlink(missing_ok=True)
                if is_best:
                    target = folder / "best.pt"
                    atomic_copy(last, target)
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
        missing = [k for k in RESUME_KEYS if k not in state]
        if missing:
            raise UserError(f"{path} is a damaged training checkpoint: it lacks {', '.join(missing)}; "
                            "resume from an epoch_NNNN.pt (move last.pt away) or start a new run")
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
        self.meter.sums.copy_(state["epoch_sums"])
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

