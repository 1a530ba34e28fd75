"""Norm-specific geometry of the attacks: sizes, steepest-ascent steps, projections, random starts.

For every norm of :data:`core.threat.NORMS` the feasible set is the ``eps`` ball around ``x``
intersected with the [0, 1] box:

* L-inf: one box per coordinate, so projection is a clamp; steps are gradient signs.
* L2: radial scaling then a clamp (the usual PGD-L2 projection); normalised-gradient steps.
* L1: the exact Euclidean projection onto {||d||_1 <= eps} ∩ box (:func:`project_l1_box`, the set
  APGD-L1 projects onto), and a sparse steepest-ascent step (:func:`l1_step_direction`).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

_TINY = 1e-12
# Fraction of the coordinates an L1 step moves: the largest |gradient| among those the box lets
# move. 1% is SLIDE's 99th percentile (Tramer & Boneh 2019); APGD-L1 adapts the fraction (Croce &
# Hein 2021). PGD-20 with 1% broke more digits test points than 5% or 20% at every L1 eps from 3 to
# 12 (at 12, standard small-cnn: 88% of the points vs 51% and 14%).
L1_STEP_SPARSITY = 0.01


def per_sample_norm(t: torch.Tensor, norm: str = "L2") -> torch.Tensor:
    """The ``norm`` size of each sample of ``t`` (first dimension), in ``t``'s dtype."""
    flat = t.flatten(1)
    if norm == "Linf":
        return flat.abs().amax(dim=1)
    if norm == "L1":
        return flat.abs().sum(dim=1)
    return flat.norm(p=2, dim=1)


def expand(per_sample: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return per_sample.view(-1, *([1] * (like.dim() - 1)))


def radius(eps: float, dtype: torch.dtype) -> float:
    """The largest value of ``dtype`` that is <= ``eps``, so checks pass in ``dtype`` and in float64."""
    r = torch.tensor(float(eps), dtype=torch.float64).to(dtype)
    if r.double().item() > eps:
        r = torch.nextafter(r, torch.zeros_like(r))
    return r.double().item()


def ascent_direction(grad: torch.Tensor, norm: str, x_adv: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The steepest-ascent direction of unit ``norm`` size (L1: sparse, see :func:`l1_step_direction`)."""
    if norm == "Linf":
        return grad.sign()
    if norm == "L1":
        assert x_adv is not None, "the L1 step needs the current point (the box decides what can move)"
        return l1_step_direction(grad, x_adv)
    return grad / expand(per_sample_norm(grad).clamp_min(_TINY), grad)


def l1_step_direction(grad: torch.Tensor, x_adv: torch.Tensor, sparsity: float = L1_STEP_SPARSITY) -> torch.Tensor:
    """Sparse L1 ascent: the sign of the gradient on its ``sparsity`` largest coordinates, L1 size 1.

    Coordinates at a face of the box that the gradient pushes outwards are left out (moving them
    is undone by the projection, as Croce & Hein 2021 point out for APGD-L1), so the step's whole
    budget goes where it can act. Each chosen coordinate moves by ``step / k``.
    """
    flat_g = grad.flatten(1)
    flat_x = x_adv.flatten(1)
    blocked = ((flat_x >= 1) & (flat_g > 0)) | ((flat_x <= 0) & (flat_g < 0))
    score = flat_g.abs().masked_fill(blocked, -1.0)
    k = max(1, int(math.ceil(sparsity * flat_g.shape[1])))
    top = score.topk(k, dim=1).indices
    chosen = torch.zeros_like(flat_g, dtype=torch.bool).scatter_(1, top, True) & (score > 0)
    direction = flat_g.sign() * chosen
    size = direction.abs().sum(dim=1, keepdim=True).clamp_min(1.0)
    return (direction / size).view_as(grad)


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project ``x_adv`` onto the ``norm`` ball of radius ``eps`` around ``x`` and the [0, 1] box.

    L-inf and L1 project onto the intersection exactly (Euclidean); L2 scales into the ball and
    then clamps (the usual PGD-L2 step). Up to floating-point rounding; :func:`clip_exact` makes
    the constraints hold exactly.
    """
    if norm == "L1":
        return project_l1_box(x_adv, x, eps)
    delta = x_adv - x
    if norm == "Linf":
        delta = delta.clamp(-eps, eps)
    else:
        factor = (eps / per_sample_norm(delta).clamp_min(_TINY)).clamp(max=1.0)
        delta = delta * expand(factor, delta)
    return (x + delta).clamp(0.0, 1.0)


def project_l1_box(p: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Euclidean projection of ``p`` onto {z : ||z - x||_1 <= eps, 0 <= z <= 1}, per sample.

    With ``y = p - x`` the solution is ``z = x + sign(y) * clip(|y| - lam, 0, c)`` where ``c`` is
    the room the box leaves in the direction of ``y`` (``1 - x`` or ``x``) and ``lam >= 0`` the
    smallest value whose L1 size is <= eps (Lagrangian of a separable problem: each coordinate's
    1-D problem is solved by clipping its soft-threshold). The size is piecewise linear in ``lam``;
    its breakpoints are sorted and the linear piece holding ``eps`` is solved exactly, in float64.
    """
    shape, dtype = p.shape, p.dtype
    y = (p - x).flatten(1).double()
    xf = x.flatten(1).double()
    room = torch.where(y > 0, 1 - xf, xf).clamp_min(0.0)
    b = y.abs()  # lam at which a coordinate reaches 0
    a = (b - room).clamp_min(0.0)  # lam below which it is held by the box at size `room`
    size0 = (b - a).sum(dim=1)  # the L1 size of the box projection alone (lam = 0)
    lam = torch.zeros_like(size0)
    over = size0 > eps
    if bool(over.any()):
        lam[over] = _l1_threshold(a[over], b[over], size0[over], eps)
    w = torch.minimum((b - lam[:, None]).clamp_min(0.0), b - a) * y.sign()
    return (xf + w).clamp(0.0, 1.0).to(dtype).view(shape)


def _l1_threshold(a: torch.Tensor, b: torch.Tensor, size0: torch.Tensor, eps: float) -> torch.Tensor:
    """The ``lam`` with ``sum(clip(b - lam, 0, b - a)) == eps`` for rows whose size at 0 exceeds eps."""
    points, order = torch.sort(torch.cat([a, b], dim=1), dim=1)
    # A coordinate is on the sloped part of its piece between a and b: +1 at a, -1 at b.
    steps = torch.cat([torch.ones_like(a), -torch.ones_like(b)], dim=1).gather(1, order)
    active = steps.cumsum(dim=1)  # coordinates on the slope right after each breakpoint
    gaps = torch.diff(points, dim=1, prepend=torch.zeros_like(points[:, :1]))
    # size(points[k]) = size0 - sum_{j<k} active[j-1] * gaps[j]: slope times length, piece by piece.
    shifted = torch.cat([torch.zeros_like(active[:, :1]), active[:, :-1]], dim=1)
    size_at = size0[:, None] - (shifted * gaps).cumsum(dim=1)
    # The first breakpoint at or below eps ends the piece holding the solution.
    k = (size_at <= eps).to(torch.int8).argmax(dim=1, keepdim=True)
    start = (k - 1).clamp_min(0)
    lam_start = torch.where(k > 0, points.gather(1, start), torch.zeros_like(start, dtype=points.dtype))
    size_start = torch.where(k > 0, size_at.gather(1, start), size0[:, None])
    slope = torch.where(k > 0, active.gather(1, start), torch.zeros_like(start, dtype=active.dtype))
    lam = lam_start + (size_start - eps) / slope.clamp_min(1.0)
    return lam.squeeze(1).clamp_min(0.0)


def clip_exact(x_adv: torch.Tensor, x: torch.Tensor, *, eps: float, norm: str) -> torch.Tensor:
    """Project onto the ``norm`` ball around ``x`` and [0, 1] so that both checks hold exactly.

    Exact in ``x.dtype`` and against the Python float ``eps`` (``|x_adv - x| <= eps`` for L-inf,
    ``(x_adv - x).flatten(1).norm(dim=1) <= eps`` for L2, ``(x_adv - x).abs().flatten(1).sum(1) <= eps``
    for L1, the last two also when summed in float64).
    """
    return exactly_inside(x_adv, x, radius(eps, x.dtype), norm)


def exactly_inside(x_adv: torch.Tensor, x: torch.Tensor, radius: float, norm: str) -> torch.Tensor:
    """Remove the last-bit overshoot that ``x + delta`` rounding can leave after :func:`project`."""
    x_adv = project(x_adv, x, radius, norm)
    if norm == "Linf":
        # One step toward x suffices: rounding x + delta overshoots by at most half an ulp.
        over = (x_adv - x).abs() > radius
        return torch.where(over, torch.nextafter(x_adv, x), x_adv)
    # A few ulps inside, so that norms summed in another order (another library) also pass.
    limit = radius * (1 - 8 * torch.finfo(x.dtype).eps)
    shrink = 4 * torch.finfo(x.dtype).eps

    def size(t: torch.Tensor) -> torch.Tensor:
        own = per_sample_norm(t - x, norm)
        if norm == "L1":  # sums of thousands of terms: check the float64 sum of the same values too
            own = torch.maximum(own.double(), per_sample_norm(t.double() - x.double(), norm)).to(own.dtype)
        return own

    for _ in range(30):  # the margin doubles each round; one round is the rule in practice
        current = size(x_adv)
        over = current > limit
        if not bool(over.any()):
            return x_adv
        factor = torch.where(over, limit / current * (1 - shrink), 1.0)
        x_adv = (x + (x_adv - x) * expand(factor, x)).clamp(0.0, 1.0)
        shrink *= 2
    return torch.where(expand(size(x_adv) > limit, x), x, x_adv)


def uniform_ball_start(x: torch.Tensor, eps: float, norm: str, generator: Optional[torch.Generator]) -> torch.Tensor:
    """``x`` plus a perturbation uniform in the ``norm`` ball, projected onto the box (and the ball)."""
    if norm == "Linf":
        uniform = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return project(x + (2 * uniform - 1) * eps, x, eps, norm)
    if norm == "L1":
        return project(x + _l1_ball_noise(x.shape, eps, generator, x.device, x.dtype), x, eps, norm)
    # Uniform in the L2 ball: Gaussian direction, radius eps * U^(1/d).
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    u = torch.rand((x.shape[0],), generator=generator, device=x.device, dtype=x.dtype)
    scale = eps * u.pow(1.0 / x[0].numel()) / per_sample_norm(noise).clamp_min(_TINY)
    return project(x + noise * expand(scale, x), x, eps, norm)


def ball_noise(shape: torch.Size, eps: float, norm: str, generator: torch.Generator) -> torch.Tensor:
    """One sample (``shape`` without batch dimension) uniform in the ``norm`` ball, float32 on the CPU."""
    d = math.prod(shape)
    if norm == "Linf":
        return (2 * torch.rand(shape, generator=generator) - 1) * eps
    if norm == "L1":
        return _l1_ball_noise((1, *shape), eps, generator, torch.device("cpu"), torch.float32)[0]
    noise = torch.randn(shape, generator=generator)
    r = eps * torch.rand((), generator=generator).pow(1.0 / d)
    return noise * (r / noise.norm().clamp_min(_TINY))


def _l1_ball_noise(shape: tuple[int, ...] | torch.Size, eps: float, generator: Optional[torch.Generator],
                   device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Uniform in the L1 ball: random signs times Exp(1) values normalised to the sphere (uniform
    on the simplex), scaled by eps * U^(1/d)."""
    n, d = shape[0], math.prod(shape[1:])
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    magnitude = -torch.log1p(-u)  # Exp(1)
    signs = torch.rand(shape, generator=generator, device=device, dtype=dtype) < 0.5
    noise = torch.where(signs, -magnitude, magnitude)
    r = eps * torch.rand((n,), generator=generator, device=device, dtype=dtype).pow(1.0 / d)
    return noise * expand(r / per_sample_norm(noise, "L1").clamp_min(_TINY), noise)
