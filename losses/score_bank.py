"""The class-wise score bank of GKL (spec section 3): per-class mean natural scores, per epoch."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from errors import UserError

_STATE_KEYS = ("num_classes", "tau", "bank", "accumulator", "counts")


def _world_size_above_one() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class ScoreBank:
    """A ``C x C`` matrix whose row ``y`` is the mean of ``softmax(o_nat / tau)`` over class ``y``.

    During an epoch :meth:`update` accumulates the natural scores (float64, with per-class counts);
    :meth:`finish_epoch` turns the accumulator into the bank used during the next epoch. Until the
    first :meth:`finish_epoch` the bank is uniform ``1/C``. The state lives on one device; it
    starts on ``device`` (CPU when None) and moves to the logits' device on :meth:`update`.
    """

    def __init__(self, num_classes: int, tau: float = 1.0,
                 device: torch.device | str | None = None) -> None:
        if int(num_classes) < 1:
            raise UserError(f"num_classes={num_classes} must be >= 1")
        if not tau > 0:
            raise UserError(f"score bank tau={tau} must be > 0; the released presets use 4 or 1")
        self.num_classes, self.tau = int(num_classes), float(tau)
        c, dev = self.num_classes, torch.device("cpu" if device is None else device)
        self._bank = torch.full((c, c), 1.0 / c, dtype=torch.float64, device=dev)
        self._acc = torch.zeros((c, c), dtype=torch.float64, device=dev)
        self._counts = torch.zeros(c, dtype=torch.float64, device=dev)

    @property
    def device(self) -> torch.device:
        """The device holding the bank and the accumulator."""
        return self._bank.device

    @property
    def bank(self) -> Tensor:
        """The finished bank as a float32 ``(C, C)`` copy; rows sum to 1."""
        return self._bank.to(torch.float32, copy=True)

    def to(self, device: torch.device | str) -> ScoreBank:
        """Move the bank, the accumulator and the counts to ``device``; returns self."""
        self._bank, self._acc, self._counts = (
            t.to(device) for t in (self._bank, self._acc, self._counts))
        return self

    @torch.no_grad()
    def update(self, logits_nat: Tensor, y: Tensor) -> None:
        """Add ``onehot(y)^T @ softmax(logits_nat / tau)`` to the accumulator (no host sync).

        Labels are not range-checked here (that would need a device sync); out-of-range labels
        raise in ``index_add_`` on CPU and trigger a device assert on CUDA.
        """
        if logits_nat.ndim != 2 or logits_nat.shape[1] != self.num_classes:
            raise ValueError(f"logits must be (B, {self.num_classes}); got {tuple(logits_nat.shape)}")
        if y.ndim != 1 or y.shape[0] != logits_nat.shape[0]:
            raise ValueError(f"labels must be ({logits_nat.shape[0]},); got {tuple(y.shape)}")
        if logits_nat.device != self.device:
            self.to(logits_nat.device)
        probs = torch.softmax(logits_nat.detach().to(torch.float64) / self.tau, dim=-1)
        y = y.to(self.device, non_blocking=True)
        self._acc.index_add_(0, y, probs)
        self._counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))

    @torch.no_grad()
    def finish_epoch(self) -> None:
        """Sum the accumulator over ranks, normalise its rows into the bank, and reset it.

        Under torch.distributed every rank must call this (it is a collective). A class that no
        rank saw this epoch keeps its previous row.
        """
        packed = torch.cat([self._acc, self._counts.unsqueeze(1)], dim=1)
        if _world_size_above_one():
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        acc, counts = packed[:, :-1], packed[:, -1]
        rows = acc / acc.sum(1, keepdim=True).clamp_min(torch.finfo(acc.dtype).tiny)
        self._bank = torch.where((counts > 0).unsqueeze(1), rows, self._bank)
        self._acc.zero_()
        self._counts.zero_()

    def weights(self, y: Tensor) -> Tensor:
        """The finished-bank rows of the labels ``y``: float32 ``(B, C)`` on ``y``'s device."""
        return self._bank.to(device=y.device, dtype=torch.float32)[y]

    def state_dict(self) -> dict[str, object]:
        """Finished bank, running accumulator and counts (copies), so a mid-epoch resume is exact."""
        return {"num_classes": self.num_classes, "tau": self.tau, "bank": self._bank.clone(),
                "accumulator": self._acc.clone(), "counts": self._counts.clone()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore a :meth:`state_dict`; refuses one with another class count or tau."""
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise UserError(f"score bank state lacks {missing}; the checkpoint was not written by "
                            "ScoreBank.state_dict, start the run without resuming its bank")
        if int(state["num_classes"]) != self.num_classes:
            raise UserError(f"checkpoint score bank has {state['num_classes']} classes, this run has "
                            f"{self.num_classes}; resume with the dataset the run was trained on")
        if float(state["tau"]) != self.tau:
            raise UserError(f"checkpoint score bank uses tau={state['tau']}, this run tau={self.tau}; "
                            "resume with the run's saved config")
        c = self.num_classes
        shapes = {"bank": (c, c), "accumulator": (c, c), "counts": (c,)}
        for key, shape in shapes.items():
            if tuple(state[key].shape) != shape:
                raise UserError(f"score bank {key} has shape {tuple(state[key].shape)}, expected "
                                f"{shape}; the checkpoint is damaged or from another run")
        as_bank = dict(device=self.device, dtype=torch.float64)
        self._bank = state["bank"].to(**as_bank).clone()
        self._acc = state["accumulator"].to(**as_bank).clone()
        self._counts = state["counts"].to(**as_bank).clone()

    def __repr__(self) -> str:
        return f"ScoreBank(num_classes={self.num_classes}, tau={self.tau}, device={self.device})"
