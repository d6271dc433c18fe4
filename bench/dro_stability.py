"""Stability of the DRO weights under evaluation noise: smoothing the excess loss vs smoothing the weights.

A fixed true excess per domain (skewed reference ratio as in the demo), read through Gaussian noise of std sigma at
every update; after 30 updates the true excess changes (another domain lags). For each smoothing setting, over 20
noise seeds: `jitter`, the mean L1 change of the weights from one update to the next (before the change; the noise-free
weights are constant there); `error`, the mean L1 distance to the noise-free DRO weights; `lag`, updates after the
change until the weights are within L1 0.1 of the new noise-free weights. Pure numpy, a few seconds.
Run: python bench/dro_stability.py
"""

import numpy as np

from drpruning_composer.dro.update import dro_step, smooth

RATIO = np.array([0.23, 0.09, 0.13, 0.55])
BEFORE, AFTER = np.array([0.06, 0.03, 0.0, 0.02]), np.array([0.0, 0.03, 0.06, 0.02])
SETTINGS = [('none', 0.0, 0.0), ('excess 0.5', 0.5, 0.0), ('excess 0.7', 0.7, 0.0), ('excess 0.8', 0.8, 0.0),
            ('weights 0.5', 0.0, 0.5), ('weights 0.8', 0.0, 0.8)]


def run(sigma: float, excess_decay: float, weight_decay: float, seed: int, rho: float = 0.1,
        min_prob: float = 0.2) -> tuple[float, float, int]:
    rng = np.random.default_rng(seed)
    weights, excess, history, targets = RATIO.copy(), None, [], []
    for k in range(60):
        true = BEFORE if k < 30 else AFTER
        excess = smooth(excess, true + sigma * rng.standard_normal(len(RATIO)), excess_decay)
        q = dro_step(excess, np.zeros(len(RATIO)), RATIO, rho, min_prob)
        weights = smooth(weights, q, weight_decay)
        history.append(weights)
        targets.append(dro_step(true, np.zeros(len(RATIO)), RATIO, rho, min_prob))
    w, t = np.array(history), np.array(targets)
    jitter = float(np.abs(np.diff(w[10:30], axis=0)).sum(1).mean())
    error = float(np.abs(w[10:30] - t[10:30]).sum(1).mean())
    lag = next((k - 30 for k in range(30, 60) if np.abs(w[k] - t[k]).sum() < 0.1), 30)
    return jitter, error, lag


def main() -> None:
    print(f"{'sigma':>6} {'smoothing (decay)':>18} {'jitter':>7} {'error':>7} {'lag':>5}")
    for sigma in (0.005, 0.01, 0.02, 0.04):
        for name, excess_decay, weight_decay in SETTINGS:
            jitter, error, lag = np.mean([run(sigma, excess_decay, weight_decay, s) for s in range(20)], axis=0)
            print(f'{sigma:>6} {name:>18} {jitter:>7.3f} {error:>7.3f} {lag:>5.1f}')


if __name__ == '__main__':
    main()
