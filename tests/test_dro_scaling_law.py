"""RefLossPredictor / fit_scaling_law: parameter recovery under noise and outliers, speed, prediction rules."""

import time

import numpy as np
import pytest
import torch

from drpruning_composer.dro import scaling_law
from drpruning_composer.dro.scaling_law import RefLossPredictor, ScalingLawFit, fit_scaling_law

TRUTH = ScalingLawFit(A=2e4, alpha=0.3, beta=0.25, E=2.0)


def _curves(seed: int, noise: float = 0.003):
    """Four model sizes x 16 token counts over three decades, relative noise and two outliers."""
    rng = np.random.default_rng(seed)
    num_params = np.repeat([1e7, 2e7, 4e7, 8e7], 16)
    num_tokens = np.tile(np.geomspace(1e6, 1e9, 16), 4)
    losses = TRUTH(num_params, num_tokens) * (1 + noise * rng.standard_normal(64))
    losses[[5, 40]] += 0.5
    return num_params, num_tokens, losses


def test_fit_recovers_parameters_from_noisy_curves_quickly():
    num_params, num_tokens, losses = _curves(seed=0)
    fit_scaling_law(num_params, num_tokens, losses)  # warm-up (imports, caches)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fit = fit_scaling_law(num_params, num_tokens, losses)
        times.append(time.perf_counter() - start)
    assert fit.E == pytest.approx(TRUTH.E, rel=0.02)
    assert fit.alpha == pytest.approx(TRUTH.alpha, rel=0.05)
    assert fit.beta == pytest.approx(TRUTH.beta, rel=0.05)
    assert fit.A == pytest.approx(TRUTH.A, rel=0.3)  # A trades off against the exponents at large P, T
    assert np.median(times) < 0.05, f'fit of 64 points took {np.median(times) * 1e3:.1f} ms'


def test_fit_without_parameter_change_fixes_alpha():
    num_tokens = np.geomspace(1e6, 1e9, 32)
    losses = TRUTH(3e7, num_tokens)
    fit = fit_scaling_law(np.full(32, 3e7), num_tokens, losses)
    assert fit.alpha == 0.0
    assert fit(3e7, 4e9) == pytest.approx(TRUTH(3e7, 4e9), rel=1e-3)


def test_predictor_rules_and_state_round_trip(monkeypatch):
    predictor = RefLossPredictor(min_points=5)
    num_tokens = np.geomspace(1e6, 1e8, 8)
    losses = TRUTH(3e7, num_tokens)
    for t, loss in zip(num_tokens[:4], losses[:4]):
        predictor.add(3e7, t, loss)
        assert predictor.predict(3e7, 1e9) is None  # too few points
    predictor.add(3e7, num_tokens[4], losses[4])
    first = predictor.predict(3e7, 1e9)
    assert first == pytest.approx(TRUTH(3e7, 1e9), rel=0.01)
    assert first <= min(losses[:5])

    # Predicting at the current point is clipped to the best observed loss; never increases afterwards.
    assert predictor.predict(3e7, 1e6) == first
    predictor.add(3e7, num_tokens[5], float('nan'))  # ignored
    assert len(predictor.losses) == 5

    restored = RefLossPredictor(min_points=5)
    restored.load_state_dict(predictor.state_dict())
    assert restored.predict(3e7, 1e9) == predictor.predict(3e7, 1e9)

    # A failed or non-finite fit keeps the previous value.
    predictor.add(3e7, num_tokens[6], losses[6])
    monkeypatch.setattr(scaling_law, 'fit_scaling_law', lambda *args: None)
    assert predictor.predict(3e7, 1e9) == first
    monkeypatch.setattr(scaling_law, 'fit_scaling_law', lambda *args: ScalingLawFit(np.nan, 0.1, 0.1, 1.0))
    assert predictor.predict(3e7, 1e9) == first


def test_predictor_state_is_weights_only_loadable(tmp_path):
    predictor = RefLossPredictor(min_points=5)
    for t in np.geomspace(1e6, 1e8, 6):
        predictor.add(3e7, t, TRUTH(3e7, t))
    predictor.predict(3e7, 1e9)
    torch.save(predictor.state_dict(), tmp_path / 'state.pt')
    assert torch.load(tmp_path / 'state.pt', weights_only=True) == predictor.state_dict()
