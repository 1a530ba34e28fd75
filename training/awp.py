"""Adversarial Weight Perturbation (Wu et al. 2020) as GKL-AT's released scripts use it.

One proxy model is built once and refreshed in place each step (no rebuild, no state-dict copy).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn


class AWP:
    """``perturb(loss_fn)`` moves the model's weights to the adversarial point; ``restore()`` removes
    that move while keeping whatever optimiser update happened in between.

    ``loss_fn(proxy) -> Tensor`` is the training loss evaluated with the proxy (in train mode);
    the proxy takes one SGD step *up* that loss with learning rate ``lr``. Every weight with
    ndim > 1 is then moved by ``gamma * ||w|| / ||Δ|| * Δ`` with Δ = w_proxy - w.
    """

    def __init__(self, model: nn.Module, proxy: nn.Module, lr: float, gamma: float = 0.005) -> None:
        self.model, self.proxy, self.gamma = model, proxy, gamma
        self.proxy_opt = torch.optim.SGD(proxy.parameters(), lr=lr)
        names = [n for n, p in model.named_parameters() if p.ndim > 1]
        # The Parameter objects outlive dtype/device moves and state-dict loads (they are filled in place).
        params, proxy_params = dict(model.named_parameters()), dict(proxy.named_parameters())
        self._w = [params[n] for n in names]
        self._wp = [proxy_params[n] for n in names]
        self._diff: list[torch.Tensor] | None = None
        self._backup: list[torch.Tensor] = []  # reused every step (refilled in place)

    @torch.no_grad()
    def _sync_proxy(self) -> None:
        src = list(self.model.parameters()) + list(self.model.buffers())
        dst = list(self.proxy.parameters()) + list(self.proxy.buffers())
        torch._foreach_copy_(dst, src)

    def perturb(self, loss_fn: Callable[[nn.Module], torch.Tensor]) -> None:
        """Compute the weight perturbation with ``loss_fn`` on the proxy and apply it to the model."""
        if self._diff is not None:
            raise RuntimeError("AWP.perturb called twice without restore")
        self._sync_proxy()
        self.proxy.train()
        loss = -loss_fn(self.proxy)
        self.proxy_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.proxy_opt.step()
        with torch.no_grad():
            w, wp = self._w, self._wp
            delta = torch._foreach_sub(wp, w)
            w_norm = torch._foreach_norm(w)
            d_norm = torch._foreach_norm(delta)
            torch._foreach_add_(d_norm, 1e-20)
            scale = torch._foreach_div(w_norm, d_norm)
            torch._foreach_mul_(delta, scale)
            self._diff = delta
            self._save_backup(w)
            torch._foreach_add_(w, self._diff, alpha=self.gamma)

    def _save_backup(self, w: list[torch.Tensor]) -> None:
        """Copy ``w`` into the persistent backup (allocated again only if shapes or dtypes changed)."""
        if len(self._backup) != len(w) or any(b.shape != t.shape or b.dtype != t.dtype or b.device != t.device
                                              for b, t in zip(self._backup, w)):
            self._backup = [t.clone() for t in w]
        else:
            torch._foreach_copy_(self._backup, w)

    @torch.no_grad()
    def restore(self) -> None:
        """w <- w_orig + (w - w_perturbed): the optimiser's update is kept, the perturbation removed.

        Written this way (rather than w -= γ·diff) so that with no update in between the original
        weights come back bit for bit.
        """
        if self._diff is None:
            return
        w = self._w
        perturbed = torch._foreach_add(self._backup, self._diff, alpha=self.gamma)
        torch._foreach_sub_(perturbed, w)  # -(update)
        torch._foreach_copy_(w, torch._foreach_sub(self._backup, perturbed))
        self._diff = None

    @property
    def active(self) -> bool:
        return self._diff is not None
