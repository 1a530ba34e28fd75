"""torch.distributed (gloo, CPU): two processes train like one with the full batch, and resume across world sizes.

One pair of gloo processes (``torch.multiprocessing``) runs every two-process part at once, while
the test process runs the single-process references:

- ``sync``: a 2-process ``fit`` with ``--sync-bn``, killed at global step 5 (last checkpoint at
  step 4, mid epoch 2); its ``epoch_0001.pt`` is compared with a single process after the same
  3 steps, and a single process resumes its ``last.pt`` (2 -> 1);
- ``nosync``: one epoch without sync-bn; the ranks' weights must stay identical;
- ``resume12``: the 2 processes resume a checkpoint a single process wrote (1 -> 2);
- ``stop``: SIGTERM reaches one rank only; both save and stop at the same step;
- ``partial``: one epoch of 51 images at batch 16 with gamma = 0.4 and the last batch kept: its
  3 images split 2 / 1 over the ranks, whose losses DDP must not average with equal weights.

The attacks' random start is drawn from each rank's RNG, so no two world sizes could match; the
processes replace it by a deterministic function of the pixels. Two world sizes differ in the
last bits (sync-bn sums, gradient all-reduce), and PGD and AWP amplify such differences (about
100x per step at lr 0.05 with K = 2; L-inf sign steps flip outright). One L2 attack step at lr 0.005
keeps them near 1e-7 over the 6 steps, so the 1e-5 comparisons test the distributed code itself.
"""
from __future__ import annotations

import importlib
import os
import signal
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from checkpoints.io import load_checkpoint
from training.config import TrainConfig
import training.trainer as trainer_module
from training.trainer import Trainer, TrainingStopped

WORLD = 2
CRASH_AT = 5  # global steps completed when the run is killed; checkpoints every 4 steps
TRAINING_STEP = Trainer.training_step
PGD_MODULE = importlib.import_module("attacks.pgd")  # `attacks.pgd` is the function re-exported by the package


class Crash(Exception):
    pass


def config(**kw) -> TrainConfig:
    """50 training images at global batch 16: 3 steps per epoch, 2 epochs; AWP and the bank on."""
    base = dict(dataset="digits", arch="small-cnn", loss="gkl", gkl_wmse_weight=20.0, gkl_ce_weight=4.0, gkl_weight_exponent=1.0, tau=4.0,
                norm="L2", eps=0.5, attack_budget="fixed", attack_steps=1, attack_step_size=0.2,
                epochs=2, batch_size=16, lr=0.005, awp_gamma=0.005, awp_warmup=1, averaging="epoch-ema",
                avg_decay=0.5, val_size=1437 - 50, eval_subset=16, eval_pgd_steps=1, checkpoint_every_steps=4,
                device="cpu", amp="off", augment="crop", sync_bn=True, drop_last=True)
    base.update(kw)
    return TrainConfig(**base).validate()


# 51 images at batch 16: steps of 16, 16, 16 and 3 images; the last splits 2 / 1 over two ranks
PARTIAL = dict(val_size=1437 - 51, drop_last=False, gkl_weight_exponent=0.4, epochs=1, checkpoint_every_steps=0)


def _fixed_start(x, radius, norm, kind, generator):
    """Stands in for the random start: a function of the pixels alone, the same for any world size."""
    return x + 0.1 * torch.sin(997.0 * x + 1.0)


def _patch(target, name, value, monkeypatch=None) -> None:
    if monkeypatch is None:
        setattr(target, name, value)
    else:
        monkeypatch.setattr(target, name, value)


def instrument(log: list, crash_at: int | None, monkeypatch=None) -> None:
    """Deterministic attack start; record (global step, per-image pixel sums, labels) of every step; crash."""
    def step(self, x, y, epoch, lr):
        if crash_at is not None and self.global_step == crash_at:
            raise Crash
        log.append((self.global_step + 1, x.sum((1, 2, 3)).clone(), y.clone()))
        return TRAINING_STEP(self, x, y, epoch, lr)

    _patch(PGD_MODULE, "_random_start", _fixed_start, monkeypatch)
    _patch(Trainer, "training_step", step, monkeypatch)


def _worker(rank: int, root: str, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    root_path = Path(root)
    logs: dict[str, list] = {"sync": [], "resume12": []}
    instrument(logs["sync"], crash_at=CRASH_AT)
    try:
        Trainer(config(), root_path / "sync", progress=False).fit()
    except Crash:
        pass
    instrument(logs["resume12"], crash_at=None)
    Trainer(config(), root_path / "resume12", resume=True, progress=False).fit()
    instrument([], crash_at=None)
    tr = Trainer(config(sync_bn=False), root_path / "nosync", progress=False)
    tr.train_one_epoch(1)
    accumulator = tr.bank.state_dict()["accumulator"]
    tr.bank.finish_epoch()
    partial = Trainer(config(**PARTIAL), root_path / "partial", progress=False)
    partial.train_one_epoch(1)
    uneven = slice(0, 5) if rank == 0 else slice(5, 8)
    torch.save({"logs": logs, "params": [p.detach().clone() for p in tr.model.parameters()],
                "accumulator": accumulator, "bank": tr.bank.bank, "stopped": _stop_one_rank(rank, root_path),
                "gkl_grads": _gkl_logit_grads(slice(rank * 4, rank * 4 + 4)),
                "gkl_grads_uneven": _gkl_logit_grads(uneven, share=(uneven.stop - uneven.start) * WORLD / 8),
                "partial": {k: v.clone() for k, v in partial.model.state_dict().items()}},
               root_path / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _gkl_logit_grads(rows: slice, share: float = 1.0) -> tuple:
    """Gradients of the robust term (gamma = 0.4, uneven bank rows) for logits ``rows`` of one batch of 8,
    the loss scaled by ``share`` as the training step scales it."""
    from training.methods import LossSpec, gkl_term

    gen = torch.Generator().manual_seed(0)
    o_nat, o_adv = torch.randn(2, 8, 10, generator=gen).mul(3)
    scores = torch.softmax(torch.randn(8, 10, generator=gen) * 3, dim=1)
    o_nat, o_adv = o_nat[rows].requires_grad_(), o_adv[rows].requires_grad_()
    spec = LossSpec.of("gkl", wmse_weight=20.0, ce_weight=4.0, weight_exponent=0.4, rank_share=share)
    loss, _ = gkl_term(spec, o_nat, o_adv, None, scores[rows])
    return torch.autograd.grad(loss * share, (o_nat, o_adv))


def _stop_one_rank(rank: int, root: Path) -> tuple:
    """SIGTERM reaches rank 1 alone during global step 2; returns (signal, step) at which this rank stopped."""
    trainer_module.LOG_EVERY = 1  # the ranks agree on stopping every LOG_EVERY steps
    tr = Trainer(config(sync_bn=False, checkpoint_every_steps=0), root / "stop", progress=False)

    def step(self, x, y, epoch, lr):
        if rank == 1 and self.global_step == 1:
            self._on_signal(signal.SIGTERM, None)
        return TRAINING_STEP(self, x, y, epoch, lr)

    Trainer.training_step = step
    try:
        tr.fit()
    except TrainingStopped as e:
        return int(e.signum), e.global_step
    return None, tr.global_step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_single(run: Path, log: list, crash_at: int | None, resume: bool = False) -> None:
    with pytest.MonkeyPatch.context() as mpatch:
        instrument(log, crash_at, mpatch)
        try:
            Trainer(config(), run, resume=resume, progress=False).fit()
        except Crash:
            pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    logs: dict[str, list] = {"single": [], "crash1": [], "resume21": []}
    _run_single(root / "resume12", logs["crash1"], CRASH_AT)  # the checkpoint the two processes resume
    ctx = mp.start_processes(_worker, args=(str(root), _free_port()), nprocs=WORLD, join=False, start_method="spawn")
    _run_single(root / "single", logs["single"], None)  # the uninterrupted reference, meanwhile
    while not ctx.join():
        pass
    _run_single(root / "sync", logs["resume21"], None, resume=True)
    with pytest.MonkeyPatch.context() as mpatch:
        instrument([], None, mpatch)
        partial = Trainer(config(**PARTIAL), root / "partial-single", progress=False)
        partial.train_one_epoch(1)
        logs["partial"] = partial.model.state_dict()
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    return root, logs, ranks


def _global_batch(rank_logs: list[list], step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel sums, labels) of the global batch of ``step``: the ranks' parts in rank order."""
    parts = [next(e for e in log if e[0] == step) for log in rank_logs]
    return torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])


def _assert_same_batches(rank_logs: list[list], reference: list, steps: range) -> None:
    """Same images (augmentation included, via their pixel sums) with the same labels in the same order."""
    for step in steps:
        x_sums, y = _global_batch(rank_logs, step)
        ref_sums, ref_y = _global_batch([reference], step)
        assert torch.equal(y, ref_y), step
        assert torch.allclose(x_sums, ref_sums, rtol=0, atol=1e-4), step


def _assert_close_state(a: dict, b: dict, atol: float = 1e-5) -> None:
    for key in ("model", "avg_model"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.allclose(a[key][k].double(), b[key][k].double(), rtol=0, atol=atol), (key, k)
    for k in ("bank", "accumulator", "counts"):
        assert torch.allclose(a["bank"][k], b["bank"][k], rtol=0, atol=1e-6), k


def test_two_processes_with_sync_bn_equal_one_process_with_the_full_batch(runs):
    root, logs, ranks = runs
    two = load_checkpoint(root / "sync" / "checkpoints" / "epoch_0001.pt")
    one = load_checkpoint(root / "single" / "checkpoints" / "epoch_0001.pt")
    assert two["global_step"] == one["global_step"] == 3 and two["world_size"] == 2
    _assert_close_state(two, one)  # weights, BN buffers, averaged model, finished bank after 3 steps
    assert not torch.allclose(one["bank"]["bank"], torch.full_like(one["bank"]["bank"], 0.1))
    for k in ("train_loss", "train_ce", "train_wmse", "train_acc_adv", "val_clean", "val_pgd"):
        assert two["history"][0][k] == pytest.approx(one["history"][0][k], abs=1e-5), k
    images = [h["history"][0]["train_images_per_s"] * h["history"][0]["train_time_s"] for h in (two, one)]
    assert images[0] == pytest.approx(images[1], rel=1e-9) and images[1] > 0  # images/s counts every rank's images
    _assert_same_batches([r["logs"]["sync"] for r in ranks], logs["single"], range(1, CRASH_AT + 1))


def test_without_sync_bn_ranks_keep_identical_weights(runs):
    _, _, ranks = runs
    for p0, p1 in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(p0, p1)


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(runs):
    root, _, ranks = runs
    assert [r["stopped"] for r in ranks] == [(int(signal.SIGTERM), 2)] * 2
    assert load_checkpoint(root / "stop" / "checkpoints" / "last.pt")["global_step"] == 2


def test_bank_is_normalised_sum_of_every_ranks_accumulator(runs):
    _, _, ranks = runs
    total = ranks[0]["accumulator"] + ranks[1]["accumulator"]
    assert not torch.allclose(ranks[0]["accumulator"], ranks[1]["accumulator"])
    seen = total.sum(1) > 0
    expected = (total[seen] / total[seen].sum(1, keepdim=True)).float()
    for r in ranks:
        assert torch.allclose(r["bank"][seen], expected, atol=1e-7)
    assert torch.equal(ranks[0]["bank"], ranks[1]["bank"])


def test_gkl_normaliser_is_the_global_batchs_weight_sum(runs):
    """DDP averages the ranks' gradients: with gamma < 1 that equals one process only if every rank
    divides the wMSE by the weight sum of the whole batch, not its own."""
    _, _, ranks = runs
    single = _gkl_logit_grads(slice(0, 8))
    for i in range(2):  # d/d o_nat, d/d o_adv
        averaged = torch.cat([r["gkl_grads"][i] for r in ranks]) / WORLD
        assert torch.allclose(averaged, single[i], rtol=0, atol=1e-6), (averaged - single[i]).abs().max()


def test_gkl_normaliser_with_an_uneven_split_is_still_the_global_one(runs):
    """Ranks holding 5 and 3 of 8 rows: each scales its loss by its share (rows x world / 8); the
    average of the scaled gradients equals one process only if the normaliser carries the share too."""
    _, _, ranks = runs
    single = _gkl_logit_grads(slice(0, 8))
    for i in range(2):
        averaged = torch.cat([r["gkl_grads_uneven"][i] for r in ranks]) / WORLD
        assert torch.allclose(averaged, single[i], rtol=0, atol=1e-6), (averaged - single[i]).abs().max()


def test_an_uneven_last_batch_trains_as_one_process_with_the_full_batch(runs):
    """4 steps (the last of 3 images, 2 / 1 over the ranks), AWP on, gamma 0.4, sync-bn: the same weights
    and BatchNorm buffers as one process (DDP alone would weigh the 1-image rank like the 2-image one)."""
    _, logs, ranks = runs
    one = logs["partial"]
    for r in ranks:
        for k, v in one.items():
            assert torch.allclose(r["partial"][k].double(), v.double(), rtol=0, atol=1e-5), k


def test_two_process_checkpoint_resumes_in_one_process(runs):
    root, logs, _ = runs
    resumed = [e[0] for e in logs["resume21"]]
    assert resumed == [5, 6]  # continues after the step-4 checkpoint
    _assert_same_batches([logs["resume21"]], logs["single"], range(5, 7))
    _assert_close_state(load_checkpoint(root / "sync" / "checkpoints" / "last.pt"),
                        load_checkpoint(root / "single" / "checkpoints" / "last.pt"))


def test_one_process_checkpoint_resumes_in_two_processes(runs):
    root, logs, ranks = runs
    rank_logs = [r["logs"]["resume12"] for r in ranks]
    assert [e[0] for e in rank_logs[0]] == [e[0] for e in rank_logs[1]] == [5, 6]
    _assert_same_batches(rank_logs, logs["single"], range(5, 7))
    state = load_checkpoint(root / "resume12" / "checkpoints" / "last.pt")
    assert state["world_size"] == 2
    _assert_close_state(state, load_checkpoint(root / "single" / "checkpoints" / "last.pt"))


def test_bf16_autocast_step_runs_on_cpu(tmp_path):
    torch.manual_seed(0)
    cfg = config(amp="bf16", norm="Linf", eps=8 / 255, attack_steps=3, attack_step_size=2 / 255, lr=0.05)
    tr = Trainer(cfg, tmp_path / "run", progress=False)
    dtypes = []
    tr.model.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    before = [p.detach().clone() for p in tr.model.parameters()]
    sums = tr.training_step(torch.rand(16, 3, 32, 32), torch.arange(16) % 10, epoch=1, lr=0.05)
    assert torch.isfinite(sums).all() and sums[0] > 0
    # natural logits, 3 attack steps, adversarial and natural training passes (the AWP proxy is another module)
    assert dtypes == [torch.bfloat16] * 6
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.model.parameters()))
