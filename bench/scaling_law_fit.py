"""Time of one reference-loss fit (`fit_scaling_law`) on 64 noisy evaluations, against the 50 ms budget.

Two curves: a well-determined one (4 model sizes x 16 token counts over three decades, 0.3% noise) and a nearly
flat one (the power-law term about as large as the 1% noise, as late in a short run). Prints the median and worst
time over repeated fits and the recovered parameters next to the true ones.
Run: python bench/scaling_law_fit.py [--repeats 50]
"""

import argparse
import statistics
import time

import numpy as np

from drpruning_composer.dro.scaling_law import fit_scaling_law

CURVES = {
    'well-determined': {'A': 2e4, 'alpha': 0.3, 'beta': 0.25, 'E': 2.0},
    'nearly flat': {'A': 400.0, 'alpha': 0.3, 'beta': 0.25, 'E': 1.8},
}


def curve(name: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """64 evaluations of the named curve with multiplicative noise."""
    true, rng = CURVES[name], np.random.default_rng(seed)
    num_params = np.repeat([8e7, 4e7, 2e7, 1e7], 16)
    if name == 'well-determined':
        num_tokens, noise = np.tile(np.geomspace(1e6, 1e9, 16), 4), 0.003
    else:
        num_tokens, noise = np.linspace(1e8, 2e9, 64), 0.01
    clean = true['A'] * num_params ** -true['alpha'] * num_tokens ** -true['beta'] + true['E']
    return num_params, num_tokens, clean * (1 + noise * rng.standard_normal(64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--repeats', type=int, default=50)
    args = parser.parse_args()
    for name, true in CURVES.items():
        data = curve(name)
        fit = fit_scaling_law(*data)  # warm-up: imports and caches
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fit = fit_scaling_law(*data)
            times.append(time.perf_counter() - start)
        print(f'{name}: fit of 64 points: median {statistics.median(times) * 1e3:.1f} ms, '
              f'max {max(times) * 1e3:.1f} ms (budget 50 ms), {args.repeats} repeats')
        print('  ' + ', '.join(f'{k} true {v:.3g} fitted {getattr(fit, k):.3g}' for k, v in true.items()))


if __name__ == '__main__':
    main()
