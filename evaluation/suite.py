"""The multi-epsilon evaluation suite: every attack of :data:`evaluation.spec.ATTACKS` over ascending radii.

Work is shared across radii: an adversarial example for a smaller eps is valid for a larger one,
so at each eps an attack only runs on the points it could not break at the previous eps (flags are
carried per attack and per chunk), and a point broken at a smaller eps is never reported robust at
a larger one. PGD and CW draw each point's random start from (seed, eps, attack, point index), so
every point they attack gets the same start as in a separate one-eps run: their numbers equal
separate runs or are lower (breaks carried from smaller eps).

The points are attacked in fixed chunks (:mod:`evaluation.sharding`): batches never mix chunks and
AutoAttack, whose randomness depends on the batch, is seeded per chunk from (seed, eps, attack,
chunk index). Under torchrun each process attacks its share of the chunks and every process
gathers all flags, so the result is the same for any number of processes, to the bit.

Seeds come from the suite seed (:func:`attack_seed`, :func:`~evaluation.sharding.chunk_seed`);
nothing here seeds the global generators. Attacks run in fp32 (autocast off) with the model in
eval mode and parameter grads off.
"""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from core.threat import eps_text

from .checks import sanity_checks
from .results import AttackResult, SuiteResult, SuiteSettings, attack_seed  # noqa: F401  (this module's API)
from .runners import model_device, perturbation_norm, predict
from .sharding import Chunk, Shard, chunk_seed, describe, gather, merge_dicts, split_chunks
from .spec import AttackSpec
from .store import ResultStore, attack_tag, eps_tag

_BOUND_TOL = 1e-5  # float slack (relative above eps 1) when checking ||x_adv - x|| <= eps


@contextmanager
def fp32_eval(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Eval mode, parameter grads off (``attacks.attack_mode``) and autocast disabled."""
    from attacks import attack_mode

    autocast = torch.autocast(device_type=device.type, enabled=False) if device.type in ("cuda", "cpu") \
        else nullcontext()
    with attack_mode(model), autocast:
        yield


@dataclass
class ChunkOutcome:
    """One attack at one eps on one chunk: flags over the chunk's points and what it took."""

    robust: torch.Tensor
    attacked: int
    seconds: float
    cached: bool
    warnings: tuple[str, ...] = ()


class _Runner:
    """Runs the (eps, attack, chunk) grid of this process for one model and data set (a RunContext)."""

    progress = False  # RunContext: run functions draw no bars of their own; the suite draws one per (eps, attack)

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: SuiteSettings,
                 store: Optional[ResultStore], adv_dir: Optional[Path], progress: bool, shard: Shard) -> None:
        self.model, self.x, self.y, self.settings = model, x, y, settings
        self.store, self.adv_dir, self.shard = store, adv_dir, shard
        self.show = progress and shard.is_main
        self.device = model_device(model)
        self.warnings: list[str] = []  # seen by this process (each printed once)
        self._found: list[str] = []  # raised while attacking the current chunk

    def say(self, message: str) -> None:
        if self.show:
            tqdm.write(message)

    def warn(self, message: str) -> None:
        if message not in self._found:
            self._found.append(message)
        if message not in self.warnings:
            self.warnings.append(message)
            self.say(f"warning: {message}")

    def run(self) -> SuiteResult:
        s = self.settings
        chunks = split_chunks(len(self.y), s.chunk_size)
        mine = self.shard.owned(chunks)
        scope = describe(self.shard, mine, chunks)
        clean = {c.index: (predict(self.model, self.x[c.part], s.batch_size) == self.y[c.part]).cpu() for c in mine}
        n_clean, n_mine = sum(int(f.sum()) for f in clean.values()), sum(len(c) for c in mine)
        self.say(f"clean: {n_clean / max(n_mine, 1):.2%} ({n_clean}/{n_mine}{'; ' + scope if scope else ''})")
        attacks = [a for a in s.attacks if a.entry.run is not None]
        carried = {(a.name, c.index): clean[c.index].clone() for a in attacks for c in mine}
        outcomes: dict[tuple[float, str, int], ChunkOutcome] = {}
        chain: list[float] = []
        for eps in s.eps:
            chain.append(eps)
            for spec in attacks:
                todo = sum(int(carried[(spec.name, c.index)].sum()) for c in mine)
                with tqdm(total=todo, desc=f"{spec.name} {eps_text(eps, s.norm)}", unit="img", leave=False,
                          disable=not self.show) as bar:
                    for chunk in mine:
                        out = self.one(spec, eps, list(chain), chunk, carried[(spec.name, chunk.index)])
                        carried[(spec.name, chunk.index)] = out.robust
                        outcomes[(eps, spec.name, chunk.index)] = out
                        bar.update(out.attacked)
                self._summary(spec, eps, [outcomes[(eps, spec.name, c.index)] for c in mine], scope)
        parts = gather((clean, outcomes), self.shard)
        all_clean = merge_dicts([p[0] for p in parts])
        all_outcomes = merge_dicts([p[1] for p in parts])
        if self.adv_dir is not None and self.shard.is_main:
            self._merge_adv(attacks, chunks)
        return self._assemble(chunks, attacks, all_clean, all_outcomes)

    def _summary(self, spec: AttackSpec, eps: float, outs: list[ChunkOutcome], scope: Optional[str]) -> None:
        robust = sum(int(o.robust.sum()) for o in outs)
        total = sum(len(o.robust) for o in outs)
        resumed = " (resumed)" if outs and all(o.cached for o in outs) else ""
        self.say(f"{eps_text(eps, self.settings.norm)} {spec.name}: {robust / max(total, 1):.2%} ({robust}/{total}), attacked "
                 f"{sum(o.attacked for o in outs)}, {sum(o.seconds for o in outs):.1f} s{resumed}"
                 f"{'; ' + scope if scope else ''}")

    def _assemble(self, chunks: list[Chunk], attacks: list[AttackSpec], clean: dict[int, torch.Tensor],
                  outcomes: dict[tuple[float, str, int], ChunkOutcome]) -> SuiteResult:
        """The whole result in chunk order; warnings in the order one process would have raised them."""
        s = self.settings
        flags = torch.cat([clean[c.index] for c in chunks]) if chunks else torch.zeros(0, dtype=torch.bool)
        result = SuiteResult(s, self.y.cpu(), flags)
        warnings: list[str] = []
        for eps in s.eps:
            for spec in attacks:
                outs = [outcomes[(eps, spec.name, c.index)] for c in chunks]
                robust = torch.cat([o.robust for o in outs]) if outs else flags.clone()
                result.results[(eps, spec.name)] = AttackResult(
                    spec.name, eps, robust, sum(o.attacked for o in outs), sum(o.seconds for o in outs),
                    attack_seed(s.seed, eps, spec.name), cached=bool(outs) and all(o.cached for o in outs))
                warnings += [m for o in outs for m in o.warnings if m not in warnings]
        result.warnings = warnings
        return result

    def one(self, spec: AttackSpec, eps: float, chain: list[float], chunk: Chunk,
            candidates: torch.Tensor) -> ChunkOutcome:
        """``spec`` at ``eps`` on the ``candidates`` (flags over ``chunk``) still robust at the previous eps."""
        s = self.settings
        seed = chunk_seed(s.seed, eps, spec.name, chunk.index) if spec.is_autoattack \
            else attack_seed(s.seed, eps, spec.name)
        key = self.store.key(spec.name, chain, s.key_dict(), chunk.as_dict()) if self.store is not None else ""
        cached = self.store.load(spec.name, eps, key, chunk.index) if self.store is not None else None
        self._found = []
        if cached is not None and (self.adv_dir is None or self._adv_part(spec, eps, chunk).is_file()):
            for message in cached.get("warnings", []):
                self.warn(message)
            return ChunkOutcome(cached["robust"].bool(), int(cached["attacked"]), float(cached["seconds"]), True,
                                tuple(self._found))
        start = time.perf_counter()
        idx = candidates.nonzero().flatten() + chunk.start
        state = self.store.state_path(spec.name, eps, key, chunk.index) if self.store is not None else None
        broken, x_adv = spec.entry.run(self, spec, eps, idx, seed, state)
        robust = candidates.clone()
        robust[idx[broken] - chunk.start] = False
        seconds = time.perf_counter() - start
        if self.adv_dir is not None:
            self.save_adv(self._adv_part(spec, eps, chunk), spec, eps, idx[broken], x_adv[broken])
        if self.store is not None:
            self.store.save(spec.name, eps, key, robust, chunk.index, attacked=len(idx), seconds=seconds,
                            seed=seed, warnings=list(self._found))
        return ChunkOutcome(robust, len(idx), seconds, False, tuple(self._found))

    def check_bound(self, spec: AttackSpec, eps: float, x_adv: torch.Tensor, x: torch.Tensor) -> None:
        """Warn when an attack left the eps-ball or the [0, 1] box (a bug in the attack)."""
        if x_adv.numel() == 0:
            return
        norm = self.settings.norm
        size = perturbation_norm(x_adv, x, norm).max().item()
        if size > eps + _BOUND_TOL * max(1.0, eps) or x_adv.min().item() < -_BOUND_TOL or \
                x_adv.max().item() > 1 + _BOUND_TOL:
            self.warn(f"{spec.name} at {eps_text(eps, norm)} returned points outside the {norm} ball "
                      f"or [0, 1] (largest perturbation {eps_text(size, norm)}): its numbers are invalid")

    # ----------------------------------------------------------------------- adversarial examples
    def _adv_path(self, spec: AttackSpec, eps: float) -> Path:
        assert self.adv_dir is not None
        return self.adv_dir / f"{attack_tag(spec.name)}_{eps_tag(eps)}.pt"

    def _adv_part(self, spec: AttackSpec, eps: float, chunk: Chunk) -> Path:
        """One chunk's examples (kept for resume); rank 0 merges the parts into :meth:`_adv_path`."""
        assert self.adv_dir is not None
        return self.adv_dir / "chunks" / f"{attack_tag(spec.name)}_{eps_tag(eps)}_c{chunk.index:05d}.pt"

    def save_adv(self, path: Path, spec: AttackSpec, eps: float, idx: torch.Tensor, x_adv: torch.Tensor) -> None:
        """Save the adversarial examples found at this eps (indices into the evaluated points).

        Points broken at a smaller eps are not repeated here: their examples are in that eps's file.
        """
        from core.torch_files import save_checkpoint

        found = perturbation_norm(x_adv, self.x[idx].cpu(), self.settings.norm) > 0
        save_checkpoint({"attack": spec.name, "eps": eps, "norm": self.settings.norm,
                         "indices": idx[found].clone(), "x_adv": x_adv[found].clone(),
                         "labels": self.y[idx[found]].cpu().clone()}, path)

    def _merge_adv(self, attacks: list[AttackSpec], chunks: list[Chunk]) -> None:
        """One file per (eps, attack) from every chunk's part, in chunk order (parts of all processes)."""
        from core.torch_files import load_checkpoint, save_checkpoint

        for eps in self.settings.eps:
            for spec in attacks:
                parts = [load_checkpoint(self._adv_part(spec, eps, c)) for c in chunks]
                merged = {k: parts[0][k] for k in ("attack", "eps", "norm")} if parts else {}
                for k in ("indices", "x_adv", "labels"):
                    merged[k] = torch.cat([p[k] for p in parts]) if parts else torch.zeros(0)
                save_checkpoint(merged, self._adv_path(spec, eps))


def run_suite(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: SuiteSettings, *,
              store: Optional[ResultStore] = None, adv_dir: Optional[str | Path] = None,
              progress: bool = True, shard: Optional[Shard] = None) -> SuiteResult:
    """Evaluate ``model`` on ``(x, y)`` (images in [0, 1]) with every attack at every eps.

    ``store`` caches finished (eps, attack, chunk) results and AutoAttack state (resumable runs);
    ``adv_dir`` saves the adversarial examples. ``shard`` says which chunks this process attacks
    (default: all, one process); with ``Shard.current()`` every process of the initialised group
    must call this, and every process gets the whole result. The sanity checks' warnings are in
    the result.
    """
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} images but y has {len(y)} labels")
    if adv_dir is not None:
        Path(adv_dir).mkdir(parents=True, exist_ok=True)
    shard = shard or Shard()
    runner = _Runner(model, x, y.to(x.device), settings, store, Path(adv_dir) if adv_dir else None, progress, shard)
    with fp32_eval(model, runner.device):
        result = runner.run()
    for message in sanity_checks(result):
        if message not in result.warnings:
            result.warnings.append(message)
            runner.say(f"warning: {message}")
    return result


def summary_line(result: SuiteResult) -> str:
    """One line: clean accuracy, then per eps the worst case over the attacks run."""
    parts = [f"n={result.n}", f"clean {result.accuracy(result.settings.eps[0], 'clean'):.2%}"]
    if result.attack_names:
        norm = result.settings.norm
        worst = " ".join(f"{eps_text(e, norm)} {result.accuracy(e, 'worst'):.2%}" for e in result.settings.eps)
        parts.append(f"worst over {'+'.join(result.attack_names)}: {worst}")
    parts.append(f"{len(result.warnings)} warning(s)")
    return " | ".join(parts)
