"""Numerical checks of the KL/DKL/GKL losses and the class score bank (spec sections 2, 3, 8)."""
from __future__ import annotations

import io
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from errors import UserError
from losses import GKLLoss, ScoreBank, gkl_kd, gkl_loss, kl_loss

F64 = torch.float64


def _logits(b: int, c: int, seed: int, scale: float = 3.0, dtype=F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(b, c, generator=g, dtype=F64)).to(dtype).requires_grad_()


def _rows(b: int, c: int, seed: int) -> torch.Tensor:
    """Random probability rows with some exact zeros, like a bank with unseen classes."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.rand(b, c, generator=g, dtype=F64)
    rows[:, 0] = 0.0
    return rows / rows.sum(1, keepdim=True)


def _pairwise_wmse(o_m, o_n, v, normalize, break_asymmetry=True):
    """The B x C x C oracle: per-sample sums of w_jk (dm_jk - dn_jk)^2 reduced like 'mean'."""
    o_n = o_n if break_asymmetry else o_n.detach()
    dm = o_m[:, :, None] - o_m[:, None, :]
    dn = o_n[:, :, None] - o_n[:, None, :]
    w = v[:, :, None] * v[:, None, :]
    per_sample = (w * (dm - dn) ** 2).sum((1, 2))
    if normalize == "weight_sum":
        return per_sample.sum() / w.sum(), per_sample / w.sum((1, 2))
    return per_sample.mean(), per_sample


def _hand_ce(o_m, o_n, t=1.0):
    return -(torch.softmax(o_m.detach() / t, -1) * torch.log_softmax(o_n / t, -1)).sum(-1)


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors, retain_graph=True)


# --- DKL == KL (Theorem 1) -------------------------------------------------------------------

@pytest.mark.parametrize("c", [10, 100])
def test_dkl_has_the_gradients_of_kl(c):
    o_m, o_n = _logits(16, c, seed=c), _logits(16, c, seed=c + 1)
    dkl, _ = gkl_loss(o_m, o_n, alpha=1.0, beta=1.0, gamma=1.0, break_asymmetry=False)
    kl = kl_loss(o_m, o_n)
    dkl_m, dkl_n = _grads(dkl, o_m, o_n)
    kl_m, kl_n = _grads(kl, o_m, o_n)
    assert kl_m.abs().max() > 1e-3 and kl_n.abs().max() > 1e-3
    torch.testing.assert_close(dkl_m, kl_m, atol=1e-10, rtol=0)
    torch.testing.assert_close(dkl_n, kl_n, atol=1e-10, rtol=0)


def test_kl_minus_soft_ce_is_the_negative_entropy_of_m_for_any_o_n():
    o_m = _logits(8, 10, seed=0).detach()
    s_m = torch.softmax(o_m, -1)
    neg_entropy = (s_m * torch.log(s_m)).sum(-1)
    for seed in (1, 2, 3):
        o_n = _logits(8, 10, seed=seed, scale=5.0).detach()
        _, parts = gkl_loss(o_m, o_n, break_asymmetry=False, reduction="none")
        gap = kl_loss(o_m, o_n, reduction="none") - parts["soft_ce"]
        torch.testing.assert_close(gap, neg_entropy, atol=1e-12, rtol=0)


# --- breaking asymmetry ------------------------------------------------------------------------

@pytest.mark.parametrize("class_wise", [False, True])
def test_break_asymmetry_decides_whether_wmse_reaches_o_n(class_wise):
    o_m, o_n = _logits(8, 10, seed=3), _logits(8, 10, seed=4)
    scores = _rows(8, 10, seed=5) if class_wise else None
    off, _ = gkl_loss(o_m, o_n, beta=0.0, scores=scores, break_asymmetry=False)
    off_m, off_n = _grads(off, o_m, o_n)
    assert off_m.abs().max() > 1e-3
    assert torch.count_nonzero(off_n) == 0
    on, _ = gkl_loss(o_m, o_n, beta=0.0, scores=scores, break_asymmetry=True)
    on_m, on_n = _grads(on, o_m, o_n)
    torch.testing.assert_close(on_m, off_m, atol=1e-12, rtol=0)
    torch.testing.assert_close(on_n, -on_m, atol=1e-12, rtol=0)


# --- O(B*C) form against the pairwise oracle ---------------------------------------------------

@pytest.mark.parametrize("normalize", ["weight_sum", "batch"])
@pytest.mark.parametrize("class_wise", [False, True])
@pytest.mark.parametrize("gamma", [0.0, 0.4, 1.0])
def test_fast_wmse_equals_pairwise_oracle(gamma, class_wise, normalize):
    o_m, o_n = _logits(6, 10, seed=7, scale=4.0), _logits(6, 10, seed=8, scale=4.0)
    scores = _rows(6, 10, seed=9) if class_wise else None
    base = scores if class_wise else torch.softmax(o_m.detach(), -1)
    v = base**gamma
    loss, parts = gkl_loss(o_m, o_n, alpha=4.0, beta=0.0, gamma=gamma, scores=scores,
                           normalize=normalize)
    oracle, oracle_none = _pairwise_wmse(o_m, o_n, v, normalize)
    torch.testing.assert_close(loss, oracle, atol=1e-10, rtol=0)
    for got, want in zip(_grads(loss, o_m, o_n), _grads(oracle, o_m, o_n)):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    _, parts_none = gkl_loss(o_m, o_n, gamma=gamma, scores=scores, normalize=normalize,
                             reduction="none")
    torch.testing.assert_close(parts_none["wmse"], oracle_none.detach(), atol=1e-10, rtol=0)


def test_wmse_float32_survives_a_large_common_offset():
    """d = o_m - o_n with a mean of ~3000: the uncentred identity cancels to noise in float32."""
    o_m = _logits(32, 100, seed=11, scale=1.0).detach() + 3000.0
    o_n = _logits(32, 100, seed=12, scale=1.0).detach()
    scores = _rows(32, 100, seed=13)
    d = (o_m.float() - o_n.float()).double()  # the float32 difference the loss works with
    want, _ = _pairwise_wmse(d, torch.zeros_like(d), scores**0.4, "weight_sum")
    _, parts = gkl_loss(o_m.float(), o_n.float(), gamma=0.4, scores=scores.float())
    assert parts["wmse"].dtype == torch.float32
    torch.testing.assert_close(parts["wmse"].double(), want, rtol=1e-5, atol=0)


# --- special cases, temperature, reductions, dtypes ---------------------------------------------

def test_ikl_is_gkl_with_gamma_one_and_a_tau_bank():
    c, b = 10, 12
    bank_logits = _logits(c, c, seed=20).detach()
    bank = ScoreBank(c, tau=4.0)
    bank.update(bank_logits, torch.arange(c))
    bank.finish_epoch()
    y = torch.arange(b) % c
    scores = bank.weights(y)
    torch.testing.assert_close(scores, torch.softmax(bank_logits / 4.0, -1)[y].float())
    o_m, o_n = _logits(b, c, seed=21), _logits(b, c, seed=22)
    ikl, _ = gkl_loss(o_m, o_n, alpha=20.0, beta=5.0, gamma=1.0, scores=scores)
    batch, _ = gkl_loss(o_m, o_n, alpha=20.0, beta=5.0, gamma=1.0, scores=scores, normalize="batch")
    oracle, _ = _pairwise_wmse(o_m, o_n, scores.double(), "batch")
    want = 20.0 / 4 * oracle + 5.0 * _hand_ce(o_m, o_n).mean()
    torch.testing.assert_close(ikl, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(batch, want, rtol=1e-12, atol=0)


def test_temperature_follows_the_kd_t_squared_convention():
    t = 3.0
    o_m, o_n = _logits(8, 10, seed=30), _logits(8, 10, seed=31)
    dkl, parts = gkl_loss(o_m, o_n, break_asymmetry=False, temperature=t)
    kd = t**2 * kl_loss(o_m / t, o_n / t)
    for got, want in zip(_grads(dkl, o_m, o_n), _grads(kd, o_m, o_n)):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    torch.testing.assert_close(parts["soft_ce"], t**2 * _hand_ce(o_m, o_n, t).mean().detach())
    scores = _rows(8, 10, seed=32)
    _, at_1 = gkl_loss(o_m, o_n, scores=scores)
    _, at_t = gkl_loss(o_m, o_n, scores=scores, temperature=t)
    torch.testing.assert_close(at_t["wmse"], at_1["wmse"], atol=1e-12, rtol=0)
    assert not torch.allclose(at_t["soft_ce"], at_1["soft_ce"])


@pytest.mark.parametrize("normalize", ["weight_sum", "batch"])
def test_reductions_are_consistent(normalize):
    o_m, o_n = _logits(8, 10, seed=40), _logits(8, 10, seed=41)
    scores = _rows(8, 10, seed=42)
    kw = dict(alpha=6.0, beta=2.0, gamma=0.4, scores=scores, normalize=normalize)
    none, p_none = gkl_loss(o_m, o_n, reduction="none", **kw)
    total, p_sum = gkl_loss(o_m, o_n, reduction="sum", **kw)
    mean, p_mean = gkl_loss(o_m, o_n, reduction="mean", **kw)
    assert none.shape == (8,)
    for loss, parts in ((none, p_none), (total, p_sum), (mean, p_mean)):
        assert not parts["wmse"].requires_grad and not parts["soft_ce"].requires_grad
        torch.testing.assert_close(loss.detach(), 6.0 / 4 * parts["wmse"] + 2.0 * parts["soft_ce"])
    torch.testing.assert_close(total, none.sum())
    torch.testing.assert_close(p_mean["soft_ce"], p_none["soft_ce"].mean())
    w = (scores**0.4).sum(1) ** 2
    want = (p_none["wmse"] * w).sum() / w.sum() if normalize == "weight_sum" else p_none["wmse"].mean()
    torch.testing.assert_close(p_mean["wmse"], want)


def test_bfloat16_logits_are_computed_in_float32():
    o_m32, o_n32 = _logits(16, 100, seed=50, dtype=torch.float32), _logits(16, 100, seed=51,
                                                                             dtype=torch.float32)
    o_m = o_m32.detach().bfloat16().requires_grad_()
    o_n = o_n32.detach().bfloat16().requires_grad_()
    loss, parts = gkl_loss(o_m, o_n, alpha=20.0, beta=5.0)
    assert loss.dtype == torch.float32 and parts["wmse"].dtype == torch.float32
    ref_m, ref_n = o_m.detach().float().requires_grad_(), o_n.detach().float().requires_grad_()
    ref, _ = gkl_loss(ref_m, ref_n, alpha=20.0, beta=5.0)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    loss.backward()
    ref.backward()
    assert o_m.grad.dtype == torch.bfloat16 and torch.isfinite(o_n.grad.float()).all()
    torch.testing.assert_close(o_n.grad.float(), ref_n.grad.bfloat16().float())


def test_kl_loss_matches_torch_kl_div_for_each_reduction():
    o_m, o_n = _logits(8, 10, seed=60), _logits(8, 10, seed=61)
    want = F.kl_div(F.log_softmax(o_n, -1), F.log_softmax(o_m, -1), log_target=True,
                    reduction="none").sum(1)
    torch.testing.assert_close(kl_loss(o_m, o_n, reduction="none"), want)
    torch.testing.assert_close(kl_loss(o_m, o_n, reduction="sum"), want.sum())
    torch.testing.assert_close(kl_loss(o_m, o_n), want.mean())
    g_m, g_n = _grads(kl_loss(o_m, o_n), o_m, o_n)
    assert g_m.abs().max() > 1e-3 and g_n.abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_one_kl_gives_the_bits_of_the_three_it_replaced(dtype):
    """The TRADES attack objective, TRADES' loss term and MART's term all use ``losses.kl_divergence`` now;
    each gives bitwise the values and gradients of the separate KL it had before (written out here)."""
    from attacks import kl_objective
    from training.methods import METHODS, LossSpec, mart_term, trades_attack

    o_nat, o_adv = _logits(16, 10, seed=62, dtype=dtype), _logits(16, 10, seed=63, dtype=dtype)
    y = torch.arange(16) % 10
    # attacks.pgd.kl_objective was F.kl_div(log_softmax(adv), log_softmax(nat.detach()), log_target=True).sum(1)
    old = F.kl_div(F.log_softmax(o_adv, 1), F.log_softmax(o_nat.detach(), 1), reduction="none", log_target=True)
    for new in (kl_objective(o_nat)(o_adv, y), trades_attack(LossSpec.of("trades"), o_nat, None)(o_adv, y)):
        assert torch.equal(new, old.sum(1))
        assert torch.equal(*(torch.autograd.grad(v.sum(), o_adv, retain_graph=True)[0] for v in (new, old.sum(1))))
    # the TRADES attack summed losses.kl_loss(nat, adv, reduction="sum") over the batch
    old_sum = kl_loss(o_nat, o_adv, reduction="sum")
    assert torch.equal(kl_objective(o_nat)(o_adv, y).sum(), old_sum)
    # methods.mart_term computed its own KL from the log-probabilities it also weighs with (its old body)
    spec = LossSpec.of("mart", kl_weight=6.0)
    is_label = F.one_hot(y, 10).bool()
    without_top = o_adv.scatter(1, o_adv.masked_fill(is_label, float("-inf")).argmax(1, keepdim=True), float("-inf"))
    margin = torch.logsumexp(o_adv, 1) - torch.logsumexp(without_top, 1)
    bce = F.cross_entropy(o_adv, y) + margin.mean()
    log_p_nat, log_p_adv = F.log_softmax(o_nat, 1), F.log_softmax(o_adv, 1)
    kl = (log_p_nat.exp() * (log_p_nat - log_p_adv)).sum(1)
    old_kl = (kl * (1 - log_p_nat.gather(1, y[:, None]).squeeze(1).exp())).mean()
    old_loss = bce + 6.0 * old_kl
    new_loss, parts = mart_term(spec, o_nat, o_adv, y, None)
    assert torch.equal(parts["kl"], old_kl.detach()) and torch.equal(new_loss, old_loss)
    for a, b in zip(torch.autograd.grad(new_loss, (o_nat, o_adv)), torch.autograd.grad(old_loss, (o_nat, o_adv))):
        assert torch.equal(a, b)
    assert METHODS["mart"].loss(spec, o_nat, o_adv, y, None, 1)[0].item() == new_loss.item()


def test_bad_options_and_shapes_are_rejected():
    o = torch.zeros(4, 10)
    for kw in (dict(normalize="pairs"), dict(reduction="avg"), dict(temperature=0.0),
               dict(gamma=-1.0)):
        with pytest.raises(UserError):
            gkl_loss(o, o, **kw)
    with pytest.raises(UserError):
        kl_loss(o, o, reduction="mean")
    with pytest.raises(UserError):
        GKLLoss(normalize="pairs")
    with pytest.raises(ValueError):
        gkl_loss(o, torch.zeros(4, 9))
    with pytest.raises(ValueError):
        gkl_loss(o, o, scores=torch.zeros(4, 9))


def test_module_matches_the_function():
    o_m, o_n = _logits(8, 10, seed=70), _logits(8, 10, seed=71)
    scores = _rows(8, 10, seed=72)
    module = GKLLoss(alpha=20.0, beta=4.0, gamma=0.4, normalize="batch", temperature=2.0)
    got, got_parts = module(o_m, o_n, scores)
    want, want_parts = gkl_loss(o_m, o_n, alpha=20.0, beta=4.0, gamma=0.4, scores=scores,
                                normalize="batch", temperature=2.0)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(got_parts["wmse"], want_parts["wmse"], atol=0, rtol=0)
    assert "gamma=0.4" in repr(module)


def test_gkl_kd_gives_the_teacher_no_gradient():
    teacher, student = _logits(8, 10, seed=80), _logits(8, 10, seed=81)
    loss, _ = gkl_kd(student, teacher, alpha=1.0, beta=0.0, gamma=0.5, temperature=2.0)
    loss.backward()
    assert teacher.grad is None
    assert student.grad.abs().max() > 1e-3  # BA: wMSE alone trains the student
    dkl_kd, _ = gkl_kd(student, teacher, alpha=1.0, beta=0.0, gamma=0.5, temperature=2.0,
                       break_asymmetry=False)
    (grad,) = _grads(dkl_kd, student)
    assert torch.count_nonzero(grad) == 0  # DKL-KD: wMSE is fully detached (paper Eq. 10)


# --- score bank ----------------------------------------------------------------------------------

def test_score_bank_hand_example():
    p = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.7, 0.2], [0.2, 0.2, 0.6]], dtype=F64)
    bank = ScoreBank(3, tau=2.0)
    torch.testing.assert_close(bank.weights(torch.tensor([2])), torch.full((1, 3), 1 / 3))
    bank.update(2.0 * p.log(), torch.tensor([0, 0, 1]))  # softmax(2 log p / 2) = p
    bank.finish_epoch()
    want = torch.tensor([[0.3, 0.475, 0.225], [0.2, 0.2, 0.6], [1 / 3, 1 / 3, 1 / 3]])
    torch.testing.assert_close(bank.bank, want)
    torch.testing.assert_close(bank.weights(torch.tensor([1, 0])), want[[1, 0]])
    assert bank.weights(torch.tensor([1])).dtype == torch.float32


def test_score_bank_rows_sum_to_one_and_an_empty_class_keeps_its_row():
    bank = ScoreBank(5, tau=1.0)
    bank.update(_logits(40, 5, seed=90).detach(), torch.arange(40) % 5)
    bank.finish_epoch()
    first = bank.bank
    torch.testing.assert_close(first.sum(1), torch.ones(5))
    y = torch.tensor([0, 2, 3, 4, 0, 2])  # no class 1 this epoch
    logits = _logits(6, 5, seed=91).detach()
    bank.update(logits, y)
    bank.finish_epoch()
    second = bank.bank
    torch.testing.assert_close(second.sum(1), torch.ones(5))
    assert torch.equal(second[1], first[1])
    torch.testing.assert_close(second[0], torch.softmax(logits[y == 0], -1).mean(0).float())
    bank.finish_epoch()  # an epoch without any update changes nothing
    assert torch.equal(bank.bank, second)


def _feed(bank, batches):
    for logits, y in batches:
        bank.update(logits, y)


def test_score_bank_state_round_trip_mid_epoch_is_exact():
    batches = [(_logits(16, 10, seed=100 + i).detach(), torch.randint(0, 10, (16,),
                generator=torch.Generator().manual_seed(i))) for i in range(7)]
    straight = ScoreBank(10, tau=4.0)
    _feed(straight, batches[:3])
    straight.finish_epoch()
    _feed(straight, batches[3:5])
    buffer = io.BytesIO()
    torch.save(straight.state_dict(), buffer)
    buffer.seek(0)
    resumed = ScoreBank(10, tau=4.0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for bank in (straight, resumed):
        _feed(bank, batches[5:])
        bank.finish_epoch()
    assert torch.equal(resumed.bank, straight.bank)
    assert torch.equal(resumed.state_dict()["accumulator"], straight.state_dict()["accumulator"])
    with pytest.raises(UserError):
        ScoreBank(100, tau=4.0).load_state_dict(straight.state_dict())
    with pytest.raises(UserError):
        ScoreBank(10, tau=1.0).load_state_dict(straight.state_dict())


def _two_rank_batches():
    logits = _logits(12, 5, seed=110).detach()
    y = torch.tensor([0, 1, 2, 0, 1, 2, 2, 3, 4, 3, 4, 2])  # rank 0 never sees 3, 4; rank 1 no 0, 1
    return logits, y


def _bank_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        logits, y = _two_rank_batches()
        bank = ScoreBank(5, tau=2.0)
        bank.update(logits[6 * rank: 6 * rank + 6], y[6 * rank: 6 * rank + 6])
        bank.finish_epoch()
        torch.save(bank.bank, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_score_bank_all_reduce_over_two_gloo_processes(tmp_path):
    mp.spawn(_bank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    logits, y = _two_rank_batches()
    whole = ScoreBank(5, tau=2.0)
    whole.update(logits, y)
    whole.finish_epoch()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got, whole.bank, atol=1e-7, rtol=0)
    assert not torch.allclose(whole.bank[3], torch.full((5,), 0.2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to detect host syncs")
def test_cuda_update_and_loss_do_not_sync_with_the_host():
    dev = torch.device("cuda")
    bank = ScoreBank(10, tau=4.0, device=dev)
    logits = torch.randn(32, 10, device=dev, requires_grad=True)
    y = torch.randint(0, 10, (32,), device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        bank.update(logits, y)
        bank.finish_epoch()
        loss, _ = gkl_loss(logits, logits.flip(0), scores=bank.weights(y), gamma=0.4)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(float(loss.detach()))
