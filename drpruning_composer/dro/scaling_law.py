"""Online reference-loss prediction from a per-domain scaling law L(P, T) = A * P^-alpha * T^-beta + E."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from scipy.optimize import least_squares


class ScalingLawFit(NamedTuple):
    """Parameters of L(P, T) = A * P^-alpha * T^-beta + E."""

    A: float
    alpha: float
    beta: float
    E: float

    def __call__(self, num_params: float, num_tokens: float) -> float:
        return self.A * num_params**-self.alpha * num_tokens**-self.beta + self.E


_MAX_EXPONENT = 3.0
# Deterministic starts: (alpha, beta, E as a fraction of the smallest observed loss).
_STARTS = ((0.3, 0.3, 0.5), (0.1, 0.5, 0.9), (0.5, 0.1, 0.2), (0.05, 0.05, 0.0))


def fit_scaling_law(
    num_params: np.ndarray,
    num_tokens: np.ndarray,
    losses: np.ndarray,
    robust_scale: float = 0.01,
) -> ScalingLawFit | None:
    """Robust least-squares fit of L(P, T) = A * P^-alpha * T^-beta + E; None if no start converges.

    Residuals are log(prediction) - log(loss) (relative errors, so `robust_scale` is unit-free) with a
    soft-L1 loss against outlier evaluations. P and T are centred in log space for conditioning and the
    amplitude is fitted as a log. When P does not vary (no pruning) alpha is not identifiable and is fixed at 0.
    """
    log_p = np.log(np.asarray(num_params, dtype=np.float64))
    log_t = np.log(np.asarray(num_tokens, dtype=np.float64))
    y = np.asarray(losses, dtype=np.float64)
    if not (np.all(np.isfinite(log_p)) and np.all(np.isfinite(log_t)) and np.all(y > 0) and np.all(np.isfinite(y))):
        return None
    p0, t0 = float(log_p.mean()), float(log_t.mean())
    x_p, x_t = log_p - p0, log_t - t0
    log_y = np.log(y)
    fit_alpha = float(np.ptp(log_p)) > 1e-6
    e_max = float(y.min()) * (1.0 - 1e-9)

    def unpack(theta: np.ndarray) -> tuple[float, float, float, float]:
        if fit_alpha:
            return theta[0], theta[1], theta[2], theta[3]
        return theta[0], 0.0, theta[1], theta[2]

    def residuals(theta: np.ndarray) -> np.ndarray:
        log_a, alpha, beta, e = unpack(theta)
        return np.log(np.exp(log_a - alpha * x_p - beta * x_t) + e) - log_y

    def jacobian(theta: np.ndarray) -> np.ndarray:
        log_a, alpha, beta, e = unpack(theta)
        power = np.exp(log_a - alpha * x_p - beta * x_t)
        inv = 1.0 / (power + e)
        columns = [power * inv]
        if fit_alpha:
            columns.append(-x_p * power * inv)
        columns += [-x_t * power * inv, inv]
        return np.stack(columns, axis=1)

    best = None
    for alpha0, beta0, e_frac in _STARTS:
        e0 = e_frac * e_max
        log_a0 = math.log(max(float(np.mean(y)) - e0, 1e-6 * float(np.mean(y))))
        x0 = [log_a0, alpha0, beta0, e0] if fit_alpha else [log_a0, beta0, e0]
        lower = [-np.inf, 0.0, 0.0, 0.0] if fit_alpha else [-np.inf, 0.0, 0.0]
        upper = [np.inf, _MAX_EXPONENT, _MAX_EXPONENT, e_max] if fit_alpha else [np.inf, _MAX_EXPONENT, e_max]
        try:
            result = least_squares(
                residuals, x0, jac=jacobian, bounds=(lower, upper), loss='soft_l1', f_scale=robust_scale,
                x_scale='jac', max_nfev=100, ftol=1e-8, xtol=1e-8, gtol=1e-8,
            )
        except (ValueError, FloatingPointError):
            continue
        if not (np.all(np.isfinite(result.x)) and np.isfinite(result.cost)):
            continue
        if best is not None and abs(result.cost - best.cost) <= 1e-6 * best.cost:
            # Two starts reached the same optimum: further starts are very unlikely to beat it.
            best = min(best, result, key=lambda r: r.cost)
            break
        if best is None or result.cost < best.cost:
            best = result
    if best is None:
        return None
    log_a, alpha, beta, e = unpack(best.x)
    a = math.exp(log_a + alpha * p0 + beta * t0)
    if not math.isfinite(a):
        return None
    return ScalingLawFit(A=a, alpha=float(alpha), beta=float(beta), E=float(e))


class RefLossPredictor:
    """Reference loss of one domain: the scaling-law prediction at the end of training.

    Call `add(P, T, loss)` after each evaluation and `predict(P_end, T_end)` for the reference loss.
    The prediction is clipped to [0, best observed loss] and never increases; with fewer than
    `min_points` observations it is None; a failed or non-finite fit keeps the previous prediction.
    """

    def __init__(self, min_points: int = 5, robust_scale: float = 0.01) -> None:
        if min_points < 4:
            raise ValueError(f'min_points must be >= 4 (the law has 4 parameters), got {min_points}')
        self.min_points = min_points
        self.robust_scale = robust_scale
        self.num_params: list[float] = []
        self.num_tokens: list[float] = []
        self.losses: list[float] = []
        self.prediction: float | None = None
        self.fit: ScalingLawFit | None = None

    def add(self, num_params: float, num_tokens: float, loss: float) -> None:
        """Record one evaluation; non-finite or non-positive values are ignored."""
        values = (float(num_params), float(num_tokens), float(loss))
        if all(math.isfinite(v) and v > 0 for v in values):
            self.num_params.append(values[0])
            self.num_tokens.append(values[1])
            self.losses.append(values[2])

    def predict(self, num_params_end: float, num_tokens_end: float) -> float | None:
        """Refit on all observations and return the (clipped, non-increasing) reference loss."""
        if len(self.losses) < self.min_points:
            return self.prediction
        fit = fit_scaling_law(
            np.array(self.num_params), np.array(self.num_tokens), np.array(self.losses), self.robust_scale,
        )
        if fit is None:
            return self.prediction
        value = fit(float(num_params_end), float(num_tokens_end))
        if not math.isfinite(value):
            return self.prediction
        self.fit = fit
        value = min(max(value, 0.0), min(self.losses))
        self.prediction = value if self.prediction is None else min(self.prediction, value)
        return self.prediction

    def state_dict(self) -> dict[str, Any]:
        return {
            'num_params': list(self.num_params),
            'num_tokens': list(self.num_tokens),
            'losses': list(self.losses),
            'prediction': self.prediction,
            'fit': None if self.fit is None else list(self.fit),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_params = [float(v) for v in state['num_params']]
        self.num_tokens = [float(v) for v in state['num_tokens']]
        self.losses = [float(v) for v in state['losses']]
        self.prediction = None if state['prediction'] is None else float(state['prediction'])
        self.fit = None if state['fit'] is None else ScalingLawFit(*state['fit'])
