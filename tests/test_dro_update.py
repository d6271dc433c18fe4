"""DRO, Sheared-LLaMA and reference-ratio updates: simplex, chi-square constraint, floors, monotonicity."""

import numpy as np
import pytest

from drpruning_composer.dro.update import (chi_square_divergence, drift_ratio, dro_mirror_step, dro_step, sheared_step,
                                           smooth)


def _random_cases(n: int = 300):
    rng = np.random.default_rng(0)
    for _ in range(n):
        k = int(rng.integers(2, 8))
        yield (
            rng.normal(2.5, 0.5, k), rng.normal(2.3, 0.5, k), rng.dirichlet(np.ones(k)),
            float(rng.uniform(1e-3, 1.0)), float(rng.uniform(0.0, 0.5)),
        )


def test_dro_step_on_simplex_meets_constraint_and_floor():
    reached = 0
    for losses, refs, p, rho, min_prob in _random_cases():
        q = dro_step(losses, refs, p, rho, min_prob)
        assert np.all(q >= 0) and q.sum() == pytest.approx(1.0, abs=1e-12)
        assert np.all(q / p >= min_prob - 1e-12)
        divergence = chi_square_divergence(q, p)
        assert divergence <= rho * (1 + 1e-6) + 1e-12
        if divergence < rho * (1 - 1e-6):
            # The ball is larger than the most concentrated mixture: that mixture is the answer.
            np.testing.assert_allclose(q, dro_step(losses, refs, p, 1e9, min_prob), atol=1e-9)
        else:
            reached += 1
        # More excess loss never gets a smaller ratio q/p.
        order = np.argsort(losses - refs)
        assert np.all(np.diff((q / p)[order]) >= -1e-9)
    assert reached > 100  # the constraint is active (and met) in most cases


def test_dro_step_moves_weight_to_excess_domain():
    p = np.array([0.5, 0.3, 0.2])
    q = dro_step(losses=[2.0, 3.0, 2.0], ref_losses=[2.0, 2.0, 2.0], ref_ratio=p, rho=0.05, min_prob=0.2)
    assert q[1] > p[1] and q[0] < p[0] and q[2] < p[2]
    assert chi_square_divergence(q, p) == pytest.approx(0.05, rel=1e-6)
    assert q[0] / p[0] == pytest.approx(q[2] / p[2])  # equal excess, equal ratio


def test_dro_step_equal_excess_or_zero_radius_keeps_ratio():
    p = np.array([0.2, 0.8])
    np.testing.assert_allclose(dro_step([3.0, 2.0], [2.0, 1.0], p, 0.5, 0.1), p)
    np.testing.assert_allclose(dro_step([3.0, 2.0], [1.0, 1.0], p, 0.0, 0.1), p)


def test_sheared_step_exponentiated_update():
    w = np.array([0.25, 0.25, 0.5])
    new = sheared_step([3.0, 2.0, 2.0], [2.0, 2.5, 2.0], w, lr=1.0, smoothing=1e-4)
    expected = w * np.exp([1.0, 0.0, 0.0])
    expected = (1 - 1e-4) * expected / expected.sum() + 1e-4 / 3
    np.testing.assert_allclose(new, expected)


def test_drift_ratio_moves_toward_weights_within_band():
    p0 = np.array([0.25, 0.25, 0.5])
    moved = drift_ratio(p0, [0.4, 0.2, 0.4], delta=0.5, initial_ratio=p0, band=2.0)
    np.testing.assert_allclose(moved, [0.325, 0.225, 0.45])
    ratio = p0
    for _ in range(50):
        ratio = drift_ratio(ratio, [0.98, 0.01, 0.01], delta=0.5, initial_ratio=p0, band=1.25)
        assert ratio.sum() == pytest.approx(1.0)
        assert np.all(ratio >= p0 / 1.25 - 1e-9) and np.all(ratio <= 1.25 * p0 + 1e-9)
    assert ratio[0] == pytest.approx(0.3125)
    with pytest.raises(ValueError, match='ratio_band must be >= 1'):
        drift_ratio(p0, p0, delta=0.5, initial_ratio=p0, band=0.5)


@pytest.mark.parametrize('kwargs, message', [
    (dict(rho=-1.0), 'rho'),
    (dict(min_prob=1.0), 'min_prob'),
    (dict(losses=[1.0, float('nan')]), 'finite'),
    (dict(ref_ratio=[0.5, 0.3, 0.2]), 'same length'),
])
def test_dro_step_rejects_bad_input(kwargs, message):
    args = dict(losses=[1.0, 2.0], ref_losses=[1.0, 1.0], ref_ratio=[0.5, 0.5], rho=0.1, min_prob=0.1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        dro_step(**args)


def test_excess_smoothing_steadies_weights_under_noise_without_losing_the_target():
    """Noisy evaluations of a fixed true excess: smoothing the excess (decay 0.5) at least halves the update-to-update
    change of the weights, and brings their average closer to the noise-free DRO weights, not further."""
    p = np.array([0.23, 0.09, 0.13, 0.55])
    true_excess = np.array([0.06, 0.03, 0.0, 0.02])
    target = dro_step(true_excess, np.zeros(4), p, rho=0.1, min_prob=0.2)
    rng = np.random.default_rng(0)
    noise = 0.01 * rng.standard_normal((400, 4))

    def trajectory(decay):
        excess, out = None, []
        for n in noise:
            excess = smooth(excess, true_excess + n, decay)
            out.append(dro_step(excess, np.zeros(4), p, rho=0.1, min_prob=0.2))
        return np.array(out[5:])

    raw, smoothed = trajectory(0.0), trajectory(0.5)
    jitter = [np.abs(np.diff(w, axis=0)).sum(1).mean() for w in (raw, smoothed)]
    error = [np.abs(w - target).sum(1).mean() for w in (raw, smoothed)]
    assert jitter[1] < 0.5 * jitter[0]
    assert error[1] < error[0]
    np.testing.assert_allclose(smoothed.mean(0), target, atol=0.03)


def test_smooth_is_an_exponential_moving_average():
    np.testing.assert_allclose(smooth(None, [1.0, 2.0], 0.5), [1.0, 2.0])
    np.testing.assert_allclose(smooth(np.array([1.0, 2.0]), [3.0, 0.0], 0.75), [1.5, 1.5])
    with pytest.raises(ValueError, match='decay'):
        smooth(None, [1.0], 1.0)


def test_dro_mirror_step_stays_in_the_ball_above_the_floor_and_is_scale_free():
    for losses, refs, p, rho, min_prob in _random_cases(200):
        e = losses - refs
        q = p.copy()
        for _ in range(5):
            q = dro_mirror_step(q, e, p, rho, min_prob, lr=0.7)
            assert np.all(q >= 0) and q.sum() == pytest.approx(1.0, abs=1e-12)
            assert np.all(q / p >= min_prob - 1e-12)
            assert chi_square_divergence(q, p) <= rho * (1 + 1e-9) + 1e-12
        # The excess is scaled by its spread: nats or a tenth of them, the same step.
        np.testing.assert_allclose(dro_mirror_step(p, 0.1 * e + 3.0, p, rho, min_prob, lr=0.7),
                                   dro_mirror_step(p, e, p, rho, min_prob, lr=0.7), atol=1e-12)


def test_dro_mirror_step_accumulates_instead_of_jumping():
    """Inside the ball, one step multiplies the most lagging domain's weight by exp(lr) against the least lagging;
    a domain keeps the weight it gained once the excesses are equal again, where the best response returns to p."""
    p = np.array([0.5, 0.3, 0.2])
    q = dro_mirror_step(p, [0.0, 2.0, 1.0], p, rho=10.0, min_prob=0.0, lr=0.5)
    assert (q[1] / p[1]) / (q[0] / p[0]) == pytest.approx(np.exp(0.5))
    assert (q[2] / p[2]) / (q[0] / p[0]) == pytest.approx(np.exp(0.25))
    np.testing.assert_allclose(dro_mirror_step(q, [1.0, 1.0, 1.0], p, rho=10.0, min_prob=0.0), q)
    np.testing.assert_allclose(dro_step([1.0, 1.0, 1.0], [0.0] * 3, p, 10.0, 0.0), p)
    # At the boundary: pulled back toward p along the segment, onto the ball.
    q = dro_mirror_step(p, [0.0, 5.0, 0.0], p, rho=0.01, min_prob=0.1, lr=3.0)
    assert chi_square_divergence(q, p) == pytest.approx(0.01, rel=1e-9) and q[1] > p[1]


def test_dro_mirror_step_scaled_by_level_stops_at_balance():
    """`scale='level'`: the factor between the largest- and smallest-excess domains is exp(lr * gap / max|e|), so
    the step shrinks with the gap at a fixed level, and is unchanged when the excess is multiplied by a constant."""
    p = np.array([0.5, 0.3, 0.2])

    def log_factor(e):
        q = dro_mirror_step(p, e, p, rho=10.0, min_prob=0.0, lr=0.5, scale='level')
        return np.log((q[1] / p[1]) / (q[0] / p[0]))

    assert log_factor([0.5, 0.6, 0.55]) == pytest.approx(0.5 * 0.1 / 0.6)
    assert log_factor([0.5, 0.52, 0.51]) == pytest.approx(0.5 * 0.02 / 0.52)
    assert log_factor([0.0, 0.6, 0.3]) == pytest.approx(0.5)   # one domain at its reference: a full step
    assert log_factor([5.0, 6.0, 5.5]) == pytest.approx(log_factor([0.5, 0.6, 0.55]))
    # the spread scale moves as far for the 0.02 gap as for the 0.1 gap
    spread = [dro_mirror_step(p, e, p, rho=10.0, min_prob=0.0, lr=0.5) for e in ([0.5, 0.6, 0.55], [0.5, 0.52, 0.51])]
    np.testing.assert_allclose(spread[0], spread[1])
    np.testing.assert_allclose(dro_mirror_step(p, [0.4] * 3, p, rho=10.0, min_prob=0.0, scale='level'), p)
    for losses, refs, p_case, rho, min_prob in _random_cases(100):
        q = dro_mirror_step(p_case, losses - refs, p_case, rho, min_prob, lr=2.0, scale='level')
        assert np.all(q / p_case >= min_prob - 1e-12) and q.sum() == pytest.approx(1.0, abs=1e-12)
        assert chi_square_divergence(q, p_case) <= rho * (1 + 1e-9) + 1e-12


@pytest.mark.parametrize('kwargs, message', [
    (dict(rho=-1.0), 'rho'), (dict(min_prob=1.0), 'min_prob'), (dict(lr=-0.1), 'lr'), (dict(scale='gap'), 'scale'),
    (dict(excess=[1.0, float('inf')]), 'finite'), (dict(ref_ratio=[0.5, 0.3, 0.2]), 'same length'),
])
def test_dro_mirror_step_rejects_bad_input(kwargs, message):
    args = dict(weights=[0.5, 0.5], excess=[1.0, 2.0], ref_ratio=[0.5, 0.5], rho=0.1, min_prob=0.1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        dro_mirror_step(**args)
