"""Domain-weight update rules: pure numpy functions, no framework state.

All functions take and return 1-D float arrays with one entry per domain.
"""

from __future__ import annotations

import numpy as np

_BISECTION_STEPS = 100
MIRROR_SCALES = ('spread', 'level')


def _as_distribution(p: np.ndarray, name: str) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 1 or p.size == 0 or np.any(p < 0) or not np.all(np.isfinite(p)) or p.sum() <= 0:
        raise ValueError(f'{name} must be a non-empty 1-D array of non-negative finite numbers, got {p!r}')
    return p / p.sum()


def _clamped_ratio(scores: np.ndarray, p: np.ndarray, min_prob: float) -> np.ndarray:
    """Ratio r = max(min_prob, c * scores) with c chosen so that sum(p * r) == 1 exactly.

    Clamping after a plain normalisation and renormalising again would push clamped entries
    back below `min_prob`; solving for the scale c keeps the floor exact.
    """
    clamped = np.zeros_like(scores, dtype=bool)
    while True:
        free_mass = float(np.sum(p[~clamped] * scores[~clamped]))
        budget = 1.0 - min_prob * float(np.sum(p[clamped]))
        if free_mass <= 0:
            # Every entry is at the floor; min_prob < 1 guarantees this only happens at a degenerate point.
            return np.ones_like(scores)
        r = np.where(clamped, min_prob, scores * budget / free_mass)
        newly = (~clamped) & (r < min_prob)
        if not newly.any():
            return r
        clamped |= newly


def _check_ball(rho: float, min_prob: float) -> None:
    """The chi-square ball's radius and the floor on q/p that `dro_step` and `dro_mirror_step` share."""
    if rho < 0:
        raise ValueError(f'rho must be >= 0, got {rho}')
    if not 0 <= min_prob < 1:
        raise ValueError(f'min_prob must be in [0, 1), got {min_prob}')


def _spread(e: np.ndarray, support: np.ndarray) -> float:
    """max - min of the excess over the support, or 0 when the excesses are equal up to rounding."""
    spread = float(e[support].max() - e[support].min())
    return spread if spread > 1e-12 * max(1.0, float(np.abs(e[support]).max())) else 0.0


def chi_square_divergence(q: np.ndarray, p: np.ndarray) -> float:
    """0.5 * sum_i p_i (q_i/p_i - 1)^2, the divergence bounded by `rho` in the DRO step."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    mask = p > 0
    return float(0.5 * np.sum(p[mask] * (q[mask] / p[mask] - 1.0) ** 2))


def dro_step(
    losses: np.ndarray,
    ref_losses: np.ndarray,
    ref_ratio: np.ndarray,
    rho: float,
    min_prob: float,
) -> np.ndarray:
    """Worst-case mixture in the chi-square ball of radius `rho` around `ref_ratio`.

    Excess loss e = losses - ref_losses; q(eta) is proportional to p * relu(e - eta), with the ratio
    q/p floored at `min_prob`; eta is found by bisection so that 0.5 * sum p (q/p - 1)^2 == rho.
    If even the most concentrated q stays inside the ball, that q is returned. Equal excess losses
    leave the reference ratio unchanged.
    """
    p = _as_distribution(ref_ratio, 'ref_ratio')
    e = np.asarray(losses, dtype=np.float64) - np.asarray(ref_losses, dtype=np.float64)
    if e.shape != p.shape:
        raise ValueError(f'losses, ref_losses and ref_ratio must have the same length, got {e.shape} and {p.shape}')
    if not np.all(np.isfinite(e)):
        raise ValueError(f'losses and ref_losses must be finite, got excess {e!r}')
    _check_ball(rho, min_prob)

    support = p > 0
    spread = _spread(e, support)
    if rho == 0 or spread == 0:
        return p.copy()

    def ratio_at(eta: float) -> np.ndarray:
        return _clamped_ratio(np.maximum(e - eta, 0.0), p, min_prob)

    def divergence_at(eta: float) -> float:
        return chi_square_divergence(p * ratio_at(eta), p)

    # Divergence grows with eta: it tends to 0 for eta -> -inf and is largest just below max(e).
    top = float(e[support].max())
    hi = top - 1e-9 * spread
    if divergence_at(hi) <= rho:
        return p * ratio_at(hi)
    lo = top - spread
    while divergence_at(lo) > rho:
        lo = top - 2.0 * (top - lo)
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if divergence_at(mid) > rho:
            hi = mid
        else:
            lo = mid
    return p * ratio_at(lo)


def dro_mirror_step(
    weights: np.ndarray,
    excess: np.ndarray,
    ref_ratio: np.ndarray,
    rho: float,
    min_prob: float,
    lr: float = 0.5,
    scale: str = 'spread',
) -> np.ndarray:
    """One accumulating (mirror-descent) step on the mixture q, kept in the same set as `dro_step`'s answer.

    An exponentiated-gradient step on the excess loss e, as group DRO updates its group weights (Sagawa et al. 2020,
    Algorithm 1), with e divided by a scale s so that `lr` has no unit: q' = normalise(q * exp(lr * (e - max e) / s)).
    `scale='spread'`: s = max e - min e, so before the floor and the ball the domain with the largest excess gains a
    factor exp(lr) against the one with the smallest, however small the gap. `scale='level'`: s = max |e|, so that
    factor is exp(lr * gap / level): the step shrinks as the domains approach balance and is 0 at balance (with a
    relative excess, a 0.1 gap between degradations of 0.5 nats moves by a fifth of a full step).
    The ratio q'/p is then floored at `min_prob` as in `dro_step`; if q' leaves the chi-square ball
    0.5 * sum p (q/p - 1)^2 <= rho around the reference ratio p, it is pulled back toward p along the segment,
    q = p + t (q' - p) with t = sqrt(rho / divergence(q')) (the divergence is quadratic in t), so the floor still
    holds. At the boundary the pull-back mixes in a move toward p, which can change the per-domain factors (it is not
    a KL projection). Unlike the best response, which jumps to the worst case of each evaluation's excess, q
    accumulates: equal excesses leave q unchanged when it is inside the ball and above the floor. With `spread`, any
    difference between the excesses moves q by a full step: near balance the weights move by noise (the callback's
    `excess_smoothing` averages it first). With either scale the rate per run grows with the number of evaluations.

    Args:
        weights: current mixture q, one entry per domain (normalised here).
        excess: excess loss per domain (nats, or log-ratios); only its ranking and relative gaps matter.
        ref_ratio: reference ratio p, the centre of the ball.
        rho: ball radius (>= 0; 0 returns p).
        min_prob: floor on q/p, in [0, 1).
        lr: step size per update (finite, >= 0): log of the factor between the largest- and smallest-excess
            domains' changes before the floor and the ball (times gap / level with `scale='level'`).
        scale: `spread` or `level`, the divisor s above.

    Raises:
        ValueError: on lengths that differ, non-finite excess, or an option out of range.
    """
    p = _as_distribution(ref_ratio, 'ref_ratio')
    q = _as_distribution(weights, 'weights')
    e = np.asarray(excess, dtype=np.float64)
    if e.shape != p.shape or q.shape != p.shape:
        raise ValueError(f'weights, excess and ref_ratio must have the same length, got {q.shape}, {e.shape} and '
                         f'{p.shape}')
    if not np.all(np.isfinite(e)):
        raise ValueError(f'excess must be finite, got {e!r}')
    _check_ball(rho, min_prob)
    if not (np.isfinite(lr) and lr >= 0):
        raise ValueError(f'lr must be a finite number >= 0, got {lr}')
    if scale not in MIRROR_SCALES:
        raise ValueError(f'scale must be one of {MIRROR_SCALES}, got {scale!r}')
    support = p > 0
    q = np.where(support, q, 0.0)
    if q.sum() <= 0:
        q = p.copy()
    spread = _spread(e, support)
    divisor = spread if scale == 'spread' else float(np.abs(e[support]).max())
    step = (e - e[support].max()) / divisor if spread else np.zeros_like(e)
    with np.errstate(divide='ignore'):
        logits = np.log(q / q.sum()) + lr * step
    moved = np.exp(logits) * support
    ratio = _clamped_ratio(np.divide(moved, p, out=np.zeros_like(p), where=support), p, min_prob)
    moved = p * ratio
    divergence = chi_square_divergence(moved, p)
    if divergence <= rho:
        return moved
    t = float(np.sqrt(rho / divergence))
    return p + t * (moved - p)


def sheared_step(
    losses: np.ndarray,
    ref_losses: np.ndarray,
    weights: np.ndarray,
    lr: float = 1.0,
    smoothing: float = 1e-4,
) -> np.ndarray:
    """Sheared-LLaMA's exponentiated update: w <- (1-c) * normalise(w * exp(lr * relu(L - L_ref))) + c / k."""
    w = _as_distribution(weights, 'weights')
    excess = np.maximum(np.asarray(losses, dtype=np.float64) - np.asarray(ref_losses, dtype=np.float64), 0.0)
    if excess.shape != w.shape:
        raise ValueError(f'losses, ref_losses and weights must have the same length, got {excess.shape} and {w.shape}')
    if not np.all(np.isfinite(excess)):
        raise ValueError(f'losses and ref_losses must be finite, got excess {excess!r}')
    if not 0 <= smoothing <= 1:
        raise ValueError(f'smoothing must be in [0, 1], got {smoothing}')
    with np.errstate(divide='ignore'):
        logits = np.log(w) + lr * excess
    logits -= logits[np.isfinite(logits)].max()
    new = np.exp(logits)
    new /= new.sum()
    return (1.0 - smoothing) * new + smoothing / new.size


def project_to_band(x: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Euclidean projection of x onto {y : sum(y) = 1, lower <= y <= upper} (bisection on a shift)."""
    x, lower, upper = (np.asarray(a, dtype=np.float64) for a in (x, lower, upper))
    if lower.sum() > 1 + 1e-12 or upper.sum() < 1 - 1e-12:
        raise ValueError(f'band is empty: sum(lower)={lower.sum()}, sum(upper)={upper.sum()}')
    lo = float(np.min(lower - x)) - 1.0
    hi = float(np.max(upper - x)) + 1.0
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if np.clip(x + mid, lower, upper).sum() > 1:
            hi = mid
        else:
            lo = mid
    y = np.clip(x + 0.5 * (lo + hi), lower, upper)
    return y / y.sum()


def drift_ratio(
    ratio: np.ndarray,
    weights: np.ndarray,
    delta: float,
    initial_ratio: np.ndarray,
    band: float,
) -> np.ndarray:
    """Move the reference ratio toward the current weights: p <- (1-delta) p + delta q.

    The result stays within a factor `band` of the initial ratio, p0_i / band <= p_i <= band * p0_i (the reference
    implementation's [p0/2, 2 p0] is band 2), enforced by projection onto the simplex.
    """
    p = _as_distribution(ratio, 'ratio')
    q = _as_distribution(weights, 'weights')
    p0 = _as_distribution(initial_ratio, 'initial_ratio')
    if not 0 <= delta <= 1:
        raise ValueError(f'ratio_delta must be in [0, 1], got {delta}')
    if band < 1:
        raise ValueError(f'ratio_band must be >= 1 (a factor around the initial ratio), got {band}')
    moved = (1.0 - delta) * p + delta * q
    return project_to_band(moved, p0 / band, np.minimum(band * p0, 1.0))


def smooth(previous: np.ndarray | None, value: np.ndarray, decay: float) -> np.ndarray:
    """Exponential moving average: decay * previous + (1 - decay) * value (value itself when there is none)."""
    if not 0 <= decay < 1:
        raise ValueError(f'smoothing decay must be in [0, 1), got {decay}')
    value = np.asarray(value, dtype=np.float64)
    return value.copy() if previous is None else decay * np.asarray(previous, dtype=np.float64) + (1 - decay) * value
