"""Reference-loss fit (`fit_scaling_law`): time of one fit of 64 evaluations against the 50 ms budget, and the
accuracy of the prediction made at half a run.

Time: four 64-point histories, from well-determined (4 model sizes x 16 token counts, 0.3% noise) to degenerate
(nearly flat, exactly constant, rising at a fixed size). Accuracy: the synthetic runs of the tests (continued
pretraining; pruning, where the loss rises while P falls to half over the first third and then falls), fitted on the
first 32 of 64 evaluations and predicted at the final size and token count, over 20 noise seeds.
Run: python bench/scaling_law_fit.py [--repeats 50]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from drpruning_composer.dro.scaling_law import RefLossPredictor, ScalingLawFit, fit_scaling_law

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tests'))
from test_dro_scaling_law import _run_curve  # noqa: E402  (the synthetic runs the tests assert on)

WELL_DETERMINED = ScalingLawFit(A=2e4, alpha=0.3, beta=0.25, E=2.0)


def histories() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    num_params = np.repeat([8e7, 4e7, 2e7, 1e7], 16)
    num_tokens = np.tile(np.geomspace(1e6, 1e9, 16), 4)
    flat_tokens, fixed = np.linspace(1e8, 2e9, 64), np.full(64, 3e7)
    return {
        'well-determined': (num_params, num_tokens,
                            WELL_DETERMINED(num_params, num_tokens) * (1 + 0.003 * rng.standard_normal(64))),
        'nearly flat': (fixed, flat_tokens, 3.0 * (1 + 0.01 * rng.standard_normal(64))),
        'constant': (fixed, flat_tokens, np.full(64, 3.0)),
        'rising at fixed P': (fixed, flat_tokens, np.linspace(3.0, 3.5, 64)),
        'pruning run': _run_curve('pruning', 0)[:3],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--repeats', type=int, default=50)
    args = parser.parse_args()
    print('== time of one fit of 64 points (budget 50 ms)')
    for name, data in histories().items():
        fit_scaling_law(*data)  # warm-up: imports and caches
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fit_scaling_law(*data)
            times.append(time.perf_counter() - start)
        print(f'{name:>18}: median {statistics.median(times) * 1e3:5.1f} ms, max {max(times) * 1e3:5.1f} ms')
    print('\n== prediction at half the run vs the true final loss (20 noise seeds, 0.3% noise)')
    for kind in ('continued', 'pruning'):
        errors = []
        for seed in range(20):
            num_params, num_tokens, losses, law = _run_curve(kind, seed)
            predictor = RefLossPredictor(min_points=5)
            for p, t, loss in zip(num_params[:32], num_tokens[:32], losses[:32]):
                predictor.add(p, t, loss)
            prediction = predictor.predict(num_params[-1], num_tokens[-1])
            errors.append(100 * (prediction / law(num_params[-1], num_tokens[-1]) - 1))
        errors = np.abs(errors)
        print(f'{kind:>18}: |error| median {np.median(errors):.2f}%, max {errors.max():.2f}% (bound 2%)')


if __name__ == '__main__':
    main()
