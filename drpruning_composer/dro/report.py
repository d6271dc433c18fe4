"""The DRO history file: one CSV row per weight update, a PNG plot of it, and a text table for the demo.

Columns: `batch`, `sample`, `update`, then for each domain `weight/<d>`, `loss/<d>`, `ref_loss/<d>`,
`excess/<d>` (the smoothed loss - ref_loss that the update read) and `ratio/<d>` (empty where a value is unknown).

CLI: ``python -m drpruning_composer.dro.report [NAME=]RUN/dro/history.csv ...`` prints each run's weight
trajectory and, for several runs, their final per-domain losses side by side.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
from collections.abc import Sequence
from typing import Any

QUANTITIES = ('weight', 'loss', 'ref_loss', 'excess', 'ratio')
HISTORY_CSV = 'history.csv'
HISTORY_PNG = 'history.png'


def history_columns(domains: Sequence[str]) -> list[str]:
    return ['batch', 'sample', 'update'] + [f'{q}/{d}' for d in domains for q in QUANTITIES]


def write_history_csv(path: str, domains: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
    """Write all rows (atomically: a reader never sees a half-written file)."""
    columns = history_columns(domains)
    tmp = f'{path}.tmp'
    with open(tmp, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ('' if row.get(k) is None else row[k]) for k in columns})
    os.replace(tmp, path)


def read_history_csv(path: str) -> tuple[list[str], list[dict[str, float | None]]]:
    """Return (domains, rows) with numeric values (None where empty)."""
    with open(path, newline='') as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        domains = [c.split('/', 1)[1] for c in columns if c.startswith('weight/')]
        rows = [{k: (float(v) if v != '' else None) for k, v in row.items()} for row in reader]
    return domains, rows


def plot_history(path: str, domains: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
    """PNG with domain weights (top) and eval losses with reference losses dashed (bottom) per update."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, (ax_w, ax_l) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    x = [r['batch'] for r in rows]
    for i, d in enumerate(domains):
        color = f'C{i % 10}'
        ax_w.plot(x, [_nan(r.get(f'weight/{d}')) for r in rows], color=color, marker='.', label=d)
        ax_l.plot(x, [_nan(r.get(f'loss/{d}')) for r in rows], color=color, marker='.', label=f'{d} loss')
        ax_l.plot(x, [_nan(r.get(f'ref_loss/{d}')) for r in rows], color=color, linestyle='--', label=f'{d} ref')
    ax_w.set_ylabel('domain weight')
    ax_w.legend(loc='best', fontsize='small')
    ax_l.set_ylabel('loss')
    ax_l.set_xlabel('batch')
    ax_l.legend(loc='best', fontsize='small', ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _nan(v: Any) -> float:
    return math.nan if v is None or v == '' else float(v)


def format_trajectory(domains: Sequence[str], rows: Sequence[dict[str, Any]], quantity: str = 'weight') -> str:
    """Fixed-width table: one line per update, one column per domain."""
    width = max(10, *(len(d) + 1 for d in domains))
    lines = [f'{"batch":>8}' + ''.join(f'{d:>{width}}' for d in domains)]
    for r in rows:
        values = ''.join(f'{_nan(r.get(f"{quantity}/{d}")):>{width}.4f}' for d in domains)
        lines.append(f'{int(r["batch"]):>8}' + values)
    return '\n'.join(lines)


def format_final_losses(runs: dict[str, tuple[Sequence[str], Sequence[dict[str, Any]]]]) -> str:
    """Per-domain loss at the last update of each run, one column per run (e.g. dro vs constant)."""
    names = list(runs)
    domains = list(next(iter(runs.values()))[0])
    width = max(12, *(len(n) + 2 for n in names))
    lines = [f'{"domain":<16}' + ''.join(f'{n:>{width}}' for n in names)]
    for d in domains + ['mean', 'worst']:
        values = []
        for name in names:
            run_domains, rows = runs[name]
            last = [_nan(rows[-1].get(f'loss/{x}')) if rows else math.nan for x in run_domains]
            by_domain = dict(zip(run_domains, last))
            values.append({'mean': sum(last) / len(last), 'worst': max(last)}.get(d, by_domain.get(d, math.nan)))
        lines.append(f'{d:<16}' + ''.join(f'{v:>{width}.4f}' for v in values))
    return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description='Print DRO weight trajectories and compare final losses.')
    parser.add_argument('runs', nargs='+', help='[NAME=]path to a history.csv written by DROReweightCallback')
    parser.add_argument('--quantity', default='weight', choices=QUANTITIES)
    args = parser.parse_args(argv)
    runs = {}
    for spec in args.runs:
        name, _, path = spec.rpartition('=')
        runs[name or path] = read_history_csv(path)
    for name, (domains, rows) in runs.items():
        print(f'{args.quantity} per update: {name}')
        print(format_trajectory(domains, rows, args.quantity))
        print()
    if len(runs) > 1:
        print('final eval loss per domain')
        print(format_final_losses(runs))


if __name__ == '__main__':
    main()
