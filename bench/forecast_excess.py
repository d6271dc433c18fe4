"""Does a forecast of each domain's end-of-run loss name the domain that ends worst earlier than today's loss does?

Reads the running evaluations of finished runs (`RUN/dro/history.csv`, written by `dro_reweight` in every run, also
with `update: constant`): per domain, the eval loss against the samples seen, and the reference loss (`ref_loss`; the
teacher's loss in runs with `reference_loss: teacher`). At every evaluation t from `--start` on, it fits
L(T) = A * T^-beta + E to each domain's losses up to t (`fit_scaling_law` with the size fixed) and predicts the loss
at the run's last evaluation. It prints, per run and t, the domain with the largest excess log(L_t / L_ref) today
(the raw excess; the DRO step reads it smoothed) and the one with the largest forecast excess
log(L_end_predicted / L_ref), against the domain whose excess is largest at the last evaluation; then, per t, in how
many runs each names that domain, and the forecast's mean absolute error on the last loss (nats). A forecast
assumes the mixture stays as it was: read it on runs with a fixed mixture. Pure numpy/scipy on the CSVs, seconds.

Run: python bench/forecast_excess.py runs/mq_real_lr5e-4/uniform-seed17 runs/mq_real_lr5e-4/uniform-seed18 ...
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from drpruning_composer.dro.report import read_history_csv
from drpruning_composer.dro.scaling_law import fit_scaling_law


def forecast_end_loss(samples: list[float], losses: list[float], end_samples: float) -> float:
    """Loss at `end_samples` from L(T) = A * T^-beta + E fitted to (samples, losses) at a fixed size.

    Raises ValueError when the fit fails (non-positive or non-finite inputs).
    """
    fit = fit_scaling_law(np.ones(len(samples)), np.asarray(samples, dtype=np.float64),
                          np.asarray(losses, dtype=np.float64))
    if fit is None:
        raise ValueError(f'no scaling-law fit for samples {samples} and losses {losses}')
    return fit(1.0, end_samples)


def worst_domains(path: Path, start: int, min_points: int = 3) -> tuple[str, list[tuple[int, str, str, float]]]:
    """For one run's history: (the domain with the largest excess at the last evaluation, per evaluation t >= start:
    (batch, today's worst domain, the forecast's worst domain, mean |forecast - last loss| over domains in nats)).

    Only evaluations with finite, positive losses and reference losses for every domain count; a forecast needs
    `min_points` of them (the law has 3 parameters). Raises ValueError when the history has none.
    """
    domains, rows = read_history_csv(str(path / 'dro' / 'history.csv'))

    def usable(r: dict) -> bool:  # an evaluation with finite, positive losses and reference losses for every domain
        values = [r['sample']] + [r[f'{q}/{d}'] for d in domains for q in ('loss', 'ref_loss')]
        return r['batch'] is not None and all(v is not None and math.isfinite(v) and v > 0 for v in values)

    rows = [r for r in rows if usable(r)]
    if not rows:
        raise ValueError(f'{path}: no evaluation with finite losses and reference losses for every domain')
    last = rows[-1]

    def excess(r: dict, d: str, loss: float | None = None) -> float:
        return math.log((r[f'loss/{d}'] if loss is None else loss) / r[f'ref_loss/{d}'])

    end_worst = max(domains, key=lambda d: excess(last, d))
    table = []
    for k, row in enumerate(rows):
        if row['batch'] < start or row is last or k + 1 < min_points:
            continue
        seen = rows[:k + 1]
        try:
            predicted = {d: forecast_end_loss([r['sample'] for r in seen], [r[f'loss/{d}'] for r in seen],
                                              last['sample']) for d in domains}
        except ValueError:
            continue  # no fit from these evaluations: the row is left out
        if min(predicted.values()) <= 0:
            continue
        today = max(domains, key=lambda d: excess(row, d))
        ahead = max(domains, key=lambda d: excess(last, d, predicted[d]))
        error = float(np.mean([abs(predicted[d] - last[f'loss/{d}']) for d in domains]))
        table.append((int(row['batch']), today, ahead, error))
    return end_worst, table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('runs', nargs='+', type=Path, help='run folders holding dro/history.csv')
    p.add_argument('--start', type=int, default=20, help='first evaluation (batch) to forecast from')
    p.add_argument('--min-points', type=int, default=3, help='evaluations a forecast is fitted to, at least')
    args = p.parse_args(argv)
    per_batch: dict[int, list[tuple[bool, bool, float]]] = {}
    for run in args.runs:
        end_worst, table = worst_domains(run, args.start, args.min_points)
        print(f'{run}: worst at the last evaluation {end_worst}')
        print(f"  {'batch':>5} {'today':>12} {'forecast':>12} {'|error|':>8}")
        for batch, today, ahead, error in table:
            print(f'  {batch:>5} {today:>12} {ahead:>12} {error:>8.3f}')
            per_batch.setdefault(batch, []).append((today == end_worst, ahead == end_worst, error))
    print('\nruns in which each signal names the domain that ends worst')
    print(f"{'batch':>5} {'runs':>5} {'today':>6} {'forecast':>9} {'mean |error| of the forecast':>29}")
    for batch, hits in sorted(per_batch.items()):
        print(f'{batch:>5} {len(hits):>5} {sum(h[0] for h in hits):>6} {sum(h[1] for h in hits):>9} '
              f'{np.mean([h[2] for h in hits]):>29.3f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
