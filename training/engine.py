"""One training step as a function of explicit arguments, and one epoch around it.

``build_step`` makes the pieces a step touches (:class:`StepModules`: model, optimiser, AWP proxy,
score bank, weight averager, loss modules); ``training_step`` runs spec section 4 once on a batch;
``train_one_epoch`` runs it over an epoch's batches and returns the sample-weighted averages of
the metrics, all-reduced over processes (the shape of the torchvision and DeiT reference engines).
The Trainer builds these from a config and adds saving and resuming around them.
"""
from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Callable, ContextManager, Iterable, Optional

import torch
import torch.nn as nn

from attacks.context import attack_mode
from attacks.pgd import pgd
from core import distributed as dist_utils
from losses import ScoreBank
from models.batchnorm import convert_sync_batchnorm

from .averaging import WeightAverager
from .awp import AWP
from .methods import LossSpec, scores_for, training_loss
from .schedules import AttackBudget

Tensor = torch.Tensor


class StepLoss(nn.Module):
    """``training_loss`` of ``net`` as a module: ``forward(x, x_adv, y, scores) -> (loss, parts, o_nat, o_adv)``.

    ``n_views`` is how the loss splits the batch (2: ``[basic; aug]`` halves); ``share`` is this
    process's :attr:`LossSpec.rank_share` for the step (1 unless the step's batch splits unevenly).
    """

    def __init__(self, net: nn.Module, spec: LossSpec, n_views: int) -> None:
        super().__init__()
        self.net, self.spec, self.n_views = net, spec, n_views

    def forward(self, x: Tensor, x_adv: Optional[Tensor], y: Tensor, scores: Optional[Tensor], share: float = 1.0):
        spec = self.spec if share == 1.0 else replace(self.spec, rank_share=share)
        return training_loss(spec, self.net, x, x_adv, y, scores, self.n_views)


@dataclass
class StepModules:
    """Everything one training step reads or updates; built once per run by :func:`build_step`."""

    model: nn.Module  # the plain module: state dicts, evaluation, weight averaging
    attack_model: nn.Module  # what the attack calls: ``model`` or its compiled view
    train_loss: nn.Module  # StepLoss of the model (DDP-wrapped under torch.distributed)
    optimizer: torch.optim.Optimizer
    bank: ScoreBank
    averager: WeightAverager
    spec: LossSpec
    num_classes: int
    norm: str = "Linf"
    n_views: int = 1
    awp: Optional[AWP] = None
    proxy_loss: Optional[nn.Module] = None  # StepLoss of the AWP proxy
    amp_dtype: Optional[torch.dtype] = None  # autocast dtype; None runs in the weights' dtype
    phase: Callable[[str], ContextManager] = lambda name: nullcontext()  # a profiler's hook around each phase

    @property
    def metric_names(self) -> tuple[str, ...]:
        return self.spec.method.metric_names()

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(next(self.model.parameters()).device.type, dtype=self.amp_dtype)


def build_step(cfg, num_classes: int, device: torch.device, *, n_views: int = 1, distributed: bool = False,
               amp: bool = False, world_size: int = 1) -> StepModules:
    """The model, optimiser, AWP proxy, bank, averager and loss modules of a run with config ``cfg``."""
    from models import build_model, parse_arch_kwargs
    from models.batchnorm import convert_ghost_batchnorm

    spec = LossSpec.from_config(cfg)
    model = build_model(cfg.arch, num_classes, **parse_arch_kwargs(cfg.arch_kwargs)).to(device)
    if cfg.sync_bn and distributed:
        model = convert_sync_batchnorm(model, device.type)
    # Before the AWP deepcopy: the released proxy was a DataParallel module too.
    model = convert_ghost_batchnorm(model, cfg.ghost_bn_splits(world_size))
    if cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    fused = device.type == "cuda"
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                nesterov=cfg.nesterov, fused=fused or None, foreach=None if fused else True)
    awp = None
    if cfg.awp_gamma > 0 and spec.uses_attack:
        awp = AWP(model, copy.deepcopy(model), lr=cfg.lr, gamma=cfg.awp_gamma)
    averager = WeightAverager(model, cfg.averaging, decay=cfg.avg_decay, start_epoch=cfg.avg_start_epoch,
                              step_decay=cfg.step_ema_decay, step_warmup=cfg.step_ema_warmup)

    def loss_module(net: nn.Module, views: int = n_views) -> nn.Module:
        # DDP sees one forward (adversarial and natural passes together) per backward. The AWP proxy
        # gets its own wrapper so that its gradient is averaged over ranks like the model's: every
        # rank then applies the perturbation the full-batch released code computes (per-rank proxy
        # gradients would let the ranks' weights drift apart through weight decay and momentum).
        module = StepLoss(net, spec, views)
        return dist_utils.ddp_wrap(module, device) if distributed else module

    def compiled(net: nn.Module) -> nn.Module:
        if not cfg.compile:
            return net
        mode = None if cfg.compile_mode == "default" else cfg.compile_mode
        return torch.compile(net, mode=mode, backend=cfg.compile_backend)

    # Compiled views share the plain modules' weights; they are made after every deepcopy above,
    # so the copies hold no reference to a compiled forward.
    attack_model = compiled(model)
    proxy_loss = None
    if awp is not None:
        # joint: the released TradesAWP.calc_awp, one CE and one GKL term over the whole [basic; aug]
        # batch with its class weights; split: the proxy loss is the training loss itself.
        proxy_views = 1 if cfg.awp_proxy_views == "joint" else n_views
        proxy_loss = loss_module(compiled(awp.proxy), proxy_views)
    return StepModules(model=model, attack_model=attack_model, train_loss=loss_module(attack_model),
                       optimizer=optimizer, bank=ScoreBank(num_classes, tau=cfg.tau, device=device),
                       averager=averager, spec=spec, num_classes=num_classes, norm=cfg.norm, n_views=n_views,
                       awp=awp, proxy_loss=proxy_loss, amp_dtype=torch.bfloat16 if amp else None)


def training_step(m: StepModules, x: Tensor, y: Tensor, *, budget: AttackBudget, lr: float, awp_on: bool,
                  step: int, share: float = 1.0, momentum: Optional[float] = None) -> Tensor:
    """One step of spec section 4 on a batch already on the device; returns the step's metric sums.

    Attack (natural logits computed once) -> AWP perturb -> training forwards -> loss -> optimiser
    step -> AWP restore -> bank update -> per-step weight average. ``step`` is the 1-based global
    number of this step (the per-step EMA's warm-up counts it). ``share``: this process's images
    times the world size over the step's global batch (1 unless an uneven last batch); DDP
    averages the processes' gradients with equal weights, so each loss is scaled by it and the
    average is the full-batch gradient. ``momentum``: set the optimiser's momentum (a cycled schedule).
    """
    spec, method, phase = m.spec, m.spec.method, m.phase
    scores = scores_for(spec, m.bank, y, m.num_classes)
    x_adv = None
    with m.autocast():
        if method.attack is not None:
            logits_nat = None
            if method.attack_uses_nat:
                with phase("natural forward"), attack_mode(m.attack_model), torch.no_grad():
                    logits_nat = m.attack_model(x)
            with phase("attack"):
                x_adv = pgd(m.attack_model, x, y, eps=budget.eps, step=budget.step_size, steps=budget.steps,
                            norm=m.norm, objective=method.attack(spec, logits_nat, scores),
                            random_start=method.random_start, check_range=False)
        m.model.train()
        if m.awp is not None and awp_on:
            with phase("awp perturb"):
                m.awp.perturb(lambda _proxy: _scaled(m.proxy_loss(x, x_adv, y, scores, share=share)[0], share))
        with phase("training forward"):
            loss, parts, o_nat, o_adv = m.train_loss(x, x_adv, y, scores, share=share)
    for group in m.optimizer.param_groups:
        group["lr"] = lr
        if momentum is not None:
            group["momentum"] = momentum
    with phase("training backward"):
        m.optimizer.zero_grad(set_to_none=True)
        _scaled(loss, share).backward()
    with phase("optimizer"):
        m.optimizer.step()
    with phase("awp restore"):
        if m.awp is not None:
            m.awp.restore()
    with phase("bank + averaging"):
        if o_nat is not None and spec.uses_bank:
            b = y.shape[0] // m.n_views  # the basic view only
            m.bank.update(o_nat[:b].detach(), y[:b])
        m.averager.after_step(m.model, step)
    return step_sums(m.metric_names, loss, parts, o_nat, o_adv, y)


def _scaled(loss: Tensor, share: float) -> Tensor:
    return loss if share == 1.0 else loss * share


def step_sums(names: tuple[str, ...], loss: Tensor, parts: dict[str, Tensor], o_nat: Optional[Tensor],
              o_adv: Optional[Tensor], y: Tensor) -> Tensor:
    """The step's metrics times its batch size, then the batch size: float64, on the device, no sync."""
    n = y.shape[0]
    values = {"loss": loss.detach(), **parts}
    row = []
    for name in names:
        if name.startswith("acc_"):
            logits = o_nat if name == "acc_nat" else o_adv
            row.append((logits.argmax(1) == y).sum().float())
        else:
            row.append(values[name].float() * n)
    row.append(torch.full((), float(n), device=y.device))  # a fill kernel: no host-to-device copy
    return torch.stack(row).double()


class EpochMeter:
    """Sample-weighted sums of an epoch's metrics on the device, and where each first went non-finite."""

    def __init__(self, names: tuple[str, ...], device: torch.device) -> None:
        self.names = names
        self.sums = torch.zeros(len(names) + 1, dtype=torch.float64, device=device)
        # position in the epoch (1-based) of the step at which each metric was first non-finite; -1: never
        self.first_bad = torch.full((len(names),), -1, dtype=torch.long, device=device)

    def add(self, sums: Tensor, position: int) -> None:
        """Add one step's :func:`step_sums` (no host-device sync)."""
        self.sums += sums
        bad = ~torch.isfinite(sums[: len(self.names)]) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, position, self.first_bad)

    def finite(self) -> bool:
        return bool(torch.isfinite(self.sums).all())

    def first_nonfinite(self) -> tuple[Optional[int], list[str]]:
        """The earliest epoch position with a non-finite metric and the metrics that went bad there."""
        first = self.first_bad.tolist()
        position = min((s for s in first if s >= 0), default=None)
        return position, [k for k, s in zip(self.names, first) if s == position and position is not None]

    def mean(self, name: str) -> float:
        """Running average of one metric on this process (one host sync)."""
        return (self.sums[self.names.index(name)] / self.sums[-1]).item()

    def averages(self) -> dict[str, float]:
        """Sample-weighted averages over every process (a collective under torch.distributed)."""
        sums = dist_utils.all_reduce_sum(self.sums.clone())
        n = max(sums[-1].item(), 1.0)
        return {k: (sums[i] / n).item() for i, k in enumerate(self.names)}

    def reset(self) -> None:
        self.sums.zero_()
        self.first_bad.fill_(-1)


def train_one_epoch(step: Callable[[Tensor, Tensor, float], Tensor], batches: Iterable[tuple[Tensor, Tensor]],
                    meter: EpochMeter, *, lr_of_step: Callable[[int], float], first_step: int = 0,
                    after_step: Optional[Callable[[int], None]] = None) -> dict[str, float]:
    """Run ``step(x, y, lr)`` on each batch (the epoch's steps ``first_step``, ``first_step + 1``, ...).

    ``after_step(k)`` runs after the k-th step of the epoch (1-based; logging, checkpoints, stop
    requests). Returns the epoch's sample-weighted metric averages over all processes (the meter
    may hold earlier steps of the epoch, from before a resume) and :func:`epoch_speed`'s figures.
    """
    device = meter.sums.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start, images, steps = time.time(), 0, 0
    for position, (x, y) in enumerate(batches, start=first_step + 1):
        meter.add(step(x, y, lr_of_step(position - 1)), position)
        images, steps = images + y.shape[0], steps + 1  # shapes are on the host: no device sync
        if after_step is not None:
            after_step(position)
    metrics = meter.averages()  # its .item() waits for the device: the time below covers every step
    metrics.update(epoch_speed(time.time() - start, steps, images, device))
    return metrics


def epoch_speed(seconds: float, steps: int, images: int, device: torch.device) -> dict[str, float]:
    """``time_s``; ``images_per_s`` over all processes (each view of a two-view batch counts) and the mean
    ``step_time_s``, over the steps this process ran; on CUDA ``gpu_peak_mem_gb``, this process's peak
    allocated memory (GiB) since the epoch (or resume) started. One collective per epoch, no per-step sync."""
    total = dist_utils.all_reduce_sum(torch.tensor([float(images)], dtype=torch.float64, device=device)).item()
    speed = {"time_s": seconds, "images_per_s": total / seconds if seconds > 0 else 0.0,
             "step_time_s": seconds / steps if steps else 0.0}
    if device.type == "cuda":
        speed["gpu_peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return speed


@torch.no_grad()
def evaluate(model: nn.Module, dataset, *, eps: float, norm: str, pgd_steps: int, seed: int,
             device: torch.device, rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """Natural and PGD-CE accuracy (``eps``, step eps/4, uniform start from ``seed``, fp32) on ``dataset``.

    Each rank takes every ``world_size``-th point; the counts are all-reduced. The model's
    train/eval mode is restored. Returns ``{"clean": ..., "pgd": ...}``.
    """
    from torch.utils.data import DataLoader, Subset

    loader = DataLoader(Subset(dataset, list(range(rank, len(dataset), world_size))), batch_size=256, num_workers=0)
    g = torch.Generator(device=device).manual_seed(seed)
    counts = torch.zeros(3, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        counts[0] += (model(x).argmax(1) == y).sum()
        if eps > 0:
            with torch.enable_grad():
                x_adv = pgd(model, x, y, eps=eps, step=eps / 4, steps=pgd_steps, norm=norm, objective="ce",
                            random_start="uniform", generator=g)
            counts[1] += (model(x_adv).argmax(1) == y).sum()
        counts[2] += y.numel()
    model.train(was_training)
    counts = dist_utils.all_reduce_sum(counts)
    n = max(counts[2].item(), 1.0)
    return {"clean": counts[0].item() / n, "pgd": counts[1].item() / n}
