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
_GRID = np.linspace(0.0, _MAX_EXPONENT, 31)


def _soft_l1(r: np.ndarray, scale: float) -> np.ndarray:
    """Sum over the last axis of scipy's soft-L1 loss, 2 * (sqrt(1 + (r/scale)^2) - 1)."""
    return np.sum(2.0 * (np.sqrt(1.0 + (r / scale) ** 2) - 1.0), axis=-1)


def _amplitude_and_floor(x: np.ndarray, y: np.ndarray, e_max: float, robust_scale: float
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each row of x (one per exponent pair), the best y ~ a * x + e with a >= 0 and 0 <= e <= e_max.

    Least squares of relative residuals, in closed form: the unconstrained solution where it is feasible, else the
    best of the box's faces (e = 0, e = e_max, a = 0), which is where a convex quadratic's optimum then lies. Returns
    a, e and the soft-L1 cost of each row's relative residuals (the robust score that ranks the rows).
    """
    w = 1.0 / y**2
    sw, sy = w.sum(), float(w @ y)
    sx, sxx, sxy = x @ w, (x * x) @ w, x @ (w * y)
    det = sw * sxx - sx * sx
    with np.errstate(divide='ignore', invalid='ignore'):
        candidates = [((sw * sxy - sx * sy) / det, (sxx * sy - sx * sxy) / det)]
        candidates += [(np.maximum((sxy - e * sx) / sxx, 0.0), np.full_like(sx, e)) for e in (0.0, e_max)]
    candidates.append((np.zeros_like(sx), np.full_like(sx, min(max(sy / sw, 0.0), e_max))))
    best_a, best_e, best_cost = None, None, None
    for a, e in candidates:
        feasible = np.isfinite(a) & np.isfinite(e) & (a >= 0) & (e >= 0) & (e <= e_max)
        a, e = np.where(feasible, a, 0.0), np.where(feasible, e, 0.0)
        cost = np.where(feasible, _soft_l1((a[:, None] * x + e[:, None] - y) / y, robust_scale), np.inf)
        if best_cost is None:
            best_a, best_e, best_cost = a, e, cost
        else:
            better = cost < best_cost
            best_a, best_e, best_cost = (np.where(better, a, best_a), np.where(better, e, best_e),
                                         np.minimum(cost, best_cost))
    return best_a, best_e, best_cost


def fit_scaling_law(
    num_params: np.ndarray,
    num_tokens: np.ndarray,
    losses: np.ndarray,
    robust_scale: float = 0.01,
) -> ScalingLawFit | None:
    """Robust fit of L(P, T) = A * P^-alpha * T^-beta + E with 0 <= E < min(losses); None if it fails.

    Variable projection: for fixed exponents the law is linear in (A, E), solved in closed form under the bounds on
    a grid of (alpha, beta) in [0, 3]^2; the best grid point (soft-L1 of relative residuals, `robust_scale` being
    the relative error treated as noise) starts one robust least-squares refinement of all four parameters. The
    grid makes the result independent of starting guesses, so flat or nearly flat curves fit as reliably as
    well-determined ones. P and T are centred in log space for conditioning. When P does not vary (no pruning),
    alpha is not identifiable and is fixed at 0.
    """
    log_p = np.log(np.asarray(num_params, dtype=np.float64))
    log_t = np.log(np.asarray(num_tokens, dtype=np.float64))
    y = np.asarray(losses, dtype=np.float64)
    if not (y.size and np.all(np.isfinite(log_p)) and np.all(np.isfinite(log_t)) and np.all(y > 0)
            and np.all(np.isfinite(y))):
        return None
    p0, t0 = float(log_p.mean()), float(log_t.mean())
    x_p, x_t = log_p - p0, log_t - t0
    fit_alpha = float(np.ptp(log_p)) > 1e-6
    e_max = float(y.min()) * (1.0 - 1e-9)

    alphas, betas = np.meshgrid(_GRID if fit_alpha else np.zeros(1), _GRID, indexing='ij')
    alphas, betas = alphas.ravel(), betas.ravel()
    power = np.exp(-alphas[:, None] * x_p - betas[:, None] * x_t)
    a, e, cost = _amplitude_and_floor(power, y, e_max, robust_scale)
    k = int(np.argmin(cost))
    if not np.isfinite(cost[k]) or a[k] <= 0:
        return ScalingLawFit(A=0.0, alpha=0.0, beta=0.0, E=float(e[k])) if np.isfinite(cost[k]) else None

    def unpack(theta: np.ndarray) -> tuple[float, float, float, float]:
        if fit_alpha:
            return theta[0], theta[1], theta[2], theta[3]
        return theta[0], 0.0, theta[1], theta[2]

    def residuals(theta: np.ndarray) -> np.ndarray:
        log_a, alpha, beta, floor = unpack(theta)
        return np.log(np.exp(log_a - alpha * x_p - beta * x_t) + floor) - np.log(y)

    def jacobian(theta: np.ndarray) -> np.ndarray:
        log_a, alpha, beta, floor = unpack(theta)
        term = np.exp(log_a - alpha * x_p - beta * x_t)
        inv = 1.0 / (term + floor)
        columns = [term * inv] + ([-x_p * term * inv] if fit_alpha else []) + [-x_t * term * inv, inv]
        return np.stack(columns, axis=1)

    x0 = [math.log(a[k])] + ([alphas[k]] if fit_alpha else []) + [betas[k], e[k]]
    lower = [-np.inf] + ([0.0] if fit_alpha else []) + [0.0, 0.0]
    upper = [np.inf] + ([_MAX_EXPONENT] if fit_alpha else []) + [_MAX_EXPONENT, e_max]
    theta = np.clip(np.asarray(x0, dtype=np.float64), lower, upper)
    try:
        result = least_squares(residuals, theta, jac=jacobian, bounds=(lower, upper), loss='soft_l1',
                               f_scale=robust_scale, x_scale='jac', max_nfev=50, ftol=1e-8, xtol=1e-8, gtol=1e-8)
        if np.all(np.isfinite(result.x)):
            theta = result.x
    except (ValueError, FloatingPointError):
        pass  # keep the grid's solution
    log_a, alpha, beta, floor = unpack(theta)
    amplitude = math.exp(log_a + alpha * p0 + beta * t0)
    if not math.isfinite(amplitude):
        return None
    return ScalingLawFit(A=amplitude, alpha=float(alpha), beta=float(beta), E=float(floor))


class RefLossPredictor:
    """Reference loss of one domain: the scaling-law prediction at the end of training.

    Call `add(P, T, loss)` after each evaluation and `predict(P_end, T_end)` for the reference loss. The prediction
    may not exceed the best loss already observed at the final size (P <= P_end, within `size_tolerance`): more
    tokens only lower the law. While pruning, the final size has not been seen yet and the prediction may lie above
    every observed loss (the loss rises as P falls), but not above the worst one. With fewer than `min_points`
    observations it is None; a failed or non-finite fit keeps the previous prediction.
    """

    def __init__(self, min_points: int = 5, robust_scale: float = 0.01, size_tolerance: float = 0.01) -> None:
        if min_points < 4:
            raise ValueError(f'min_points must be >= 4 (the law has 4 parameters), got {min_points}')
        self.min_points = min_points
        self.robust_scale = robust_scale
        self.size_tolerance = size_tolerance
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

    def upper_bound(self, num_params_end: float) -> float:
        """Best loss observed at the final size, or the worst observed loss if that size has not been reached."""
        at_size = [loss for p, loss in zip(self.num_params, self.losses)
                   if p <= num_params_end * (1 + self.size_tolerance)]
        return min(at_size) if at_size else max(self.losses)

    def predict(self, num_params_end: float, num_tokens_end: float) -> float | None:
        """Refit on all observations and return the (bounded) reference loss."""
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
        self.prediction = min(max(value, 0.0), self.upper_bound(float(num_params_end)))
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


class DomainReferenceLoss:
    """One `RefLossPredictor` per domain: observe every domain's eval loss, predict every domain's reference loss."""

    def __init__(self, num_domains: int, min_points: int = 5) -> None:
        self.predictors = [RefLossPredictor(min_points=min_points) for _ in range(num_domains)]

    def observe_and_predict(self, num_params: float, num_tokens: np.ndarray, losses: np.ndarray,
                            num_params_end: float, num_tokens_end: np.ndarray) -> np.ndarray | None:
        """Record (P, T_d, L_d) per domain and predict each at (P_end, T_end_d); None until every domain has one."""
        predictions = []
        for d, predictor in enumerate(self.predictors):
            predictor.add(num_params, num_tokens[d], losses[d])
            predictions.append(predictor.predict(num_params_end, num_tokens_end[d]))
        if any(p is None for p in predictions):
            return None
        return np.array(predictions, dtype=np.float64)

    def state_dict(self) -> list[dict[str, Any]]:
        return [p.state_dict() for p in self.predictors]

    def load_state_dict(self, state: list[dict[str, Any]]) -> None:
        for predictor, predictor_state in zip(self.predictors, state):
            predictor.load_state_dict(predictor_state)
