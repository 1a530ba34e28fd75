"""MART, added as one registry entry: its loss against a direct transcription of the paper's formula."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from training.methods import METHODS, LossSpec, training_loss


def mart_by_the_paper(o_nat, o_adv, y, beta):
    """Wang et al. (ICLR 2020), Eq. 8: BCE(p(x'), y) + beta * KL(p(x) || p(x')) * (1 - p_y(x)), averaged."""
    p_nat, p_adv = F.softmax(o_nat, 1), F.softmax(o_adv, 1)
    n = len(y)
    total = 0.0
    for i in range(n):
        others = [k for k in range(p_adv.shape[1]) if k != y[i]]
        bce = -torch.log(p_adv[i, y[i]]) - torch.log(1 - max(p_adv[i, k] for k in others))
        kl = sum(p_nat[i, j] * torch.log(p_nat[i, j] / p_adv[i, j]) for j in range(p_nat.shape[1]))
        total = total + bce + beta * kl * (1 - p_nat[i, y[i]])
    return total / n


def test_mart_loss_and_gradients_equal_the_paper_formula():
    gen = torch.Generator().manual_seed(0)
    o_nat = (torch.randn(6, 10, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    o_adv = (torch.randn(6, 10, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    y = torch.tensor([0, 3, 3, 9, 1, 5])
    ours, parts = METHODS["mart"].loss(LossSpec.of("mart", kl_weight=6.0), o_nat, o_adv, y, None, 1)
    want = mart_by_the_paper(o_nat, o_adv, y, beta=6.0)
    assert torch.allclose(ours, want, rtol=0, atol=1e-12)
    assert torch.allclose(ours, parts["bce"] + 6.0 * parts["kl"], rtol=0, atol=1e-12)
    g_ours = torch.autograd.grad(ours, (o_nat, o_adv))
    g_want = torch.autograd.grad(want, (o_nat, o_adv))
    for a, b in zip(g_ours, g_want):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    assert g_ours[0].abs().sum() > 0  # the KL term and its weight train the natural logits too


def test_mart_forwards_natural_then_adversarial_attacks_with_ce_and_uses_no_bank():
    method, spec = METHODS["mart"], LossSpec.of("mart", kl_weight=6.0)
    seen = []
    net = torch.nn.Linear(4, 3)
    hooked = torch.nn.Sequential(net)
    hooked.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x_nat, x_adv, y = torch.zeros(2, 4), torch.ones(2, 4), torch.tensor([0, 2])
    training_loss(spec, hooked, x_nat, x_adv, y, None)
    assert [t.sum().item() for t in seen] == [0.0, 8.0]  # natural first, as the released script
    assert method.attack(spec, None, None) == "ce" and method.random_start == "trades"
    assert not spec.uses_bank and method.metric_names() == ("loss", "bce", "kl", "acc_nat", "acc_adv")


def test_mart_two_view_batches_weigh_the_augmented_view():
    gen = torch.Generator().manual_seed(1)
    o_nat, o_adv = torch.randn(2, 8, 5, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    spec = LossSpec.of("mart", kl_weight=6.0, aug_weight=0.5)
    both, _ = METHODS["mart"].loss(spec, o_nat, o_adv, y, None, 2)
    basic, _ = METHODS["mart"].loss(spec, o_nat[:4], o_adv[:4], y[:4], None, 1)
    aug, _ = METHODS["mart"].loss(spec, o_nat[4:], o_adv[4:], y[4:], None, 1)
    assert torch.allclose(both, basic + 0.5 * aug, rtol=0, atol=1e-12)
