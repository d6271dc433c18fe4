"""The embedded end-to-end demo (``make demo``): offline, on CPU.

Stages, each a plain ``composer train.py`` run of a YAML under ``yamls/demo`` (all outputs under ``--out``):

1. data: corpus from the Python installation, BPE tokenizer, per-domain MDS shards, tiny Llama config, each
   domain's multiple-choice continuation task (`drpruning-make-tasks`), and a four-task instruction set
   (:mod:`drpruning_composer.data.demo_instruct`);
2. pretrain: the tiny GQA source model, one eval loader per domain;
3. prune-dro: DRPruning to about half the non-embedding parameters (L0 masks + DRO mixing from the corpus's natural,
   skewed proportions), exported as an HF model;
4. prune-constant: the same pruning with the mixture fixed at the natural proportions, for comparison;
5. continue-dro: continued pretraining of the DRO-pruned model with DRO and a dynamic reference loss;
6. instruct-dro, instruct-constant: instruction tuning of the continued model on the four tasks (response-only loss),
   with DRO over the tasks and with the mixture fixed at each task's share of the examples.

Then it prints the corpus composition, the DRO weight trajectories, the per-domain validation losses of every
model with each domain's degradation against the source (L / L_source) and each domain's task accuracy, and the wall
time of each stage, the per-task response loss of the tuned models beside their starting point, and writes
them to ``OUT/report.json``. One seed: `bench/method_quality.py` is the measurement over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
STAGES = ('data', 'pretrain', 'prune-dro', 'prune-constant', 'continue-dro', 'instruct-dro', 'instruct-constant')


def _train(yaml: str, out: Path, *overrides: str) -> None:
    cmd = ['composer', str(REPO / 'train.py'), str(REPO / 'yamls' / 'demo' / yaml), f'variables.demo={out}',
           *overrides]
    print('+', ' '.join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, 'HF_HUB_OFFLINE': '1'})


def run_stage(stage: str, out: Path) -> None:
    if stage == 'data':
        from drpruning_composer.data.demo_corpus import main as build_demo
        from drpruning_composer.data.demo_instruct import build_instruct
        from drpruning_composer.data.prepare import format_manifest
        from drpruning_composer.data.tasks import make_tasks

        build_demo(['--out', str(out)])
        make_tasks(out / 'data', str(out / 'tokenizer'), out / 'tasks', overwrite=True)
        print(format_manifest(build_instruct(out, out / 'tokenizer')))
    elif stage == 'pretrain':
        _train('pretrain.yaml', out)
    else:
        kind, update = stage.split('-')
        _train(f'{kind}.yaml', out, f'variables.update={update}')


def models(out: Path) -> dict[str, Path]:
    return {'source': out / 'runs/source/huggingface/model', 'pruned (dro)': out / 'runs/prune-dro/pruned_hf',
            'pruned (constant)': out / 'runs/prune-constant/pruned_hf',
            'pruned (dro) + continued': out / 'runs/continue-dro/huggingface/model'}


def instruct_models(out: Path) -> dict[str, Path]:
    return {'continued (start)': out / 'runs/continue-dro/huggingface/model',
            'instruct (dro)': out / 'runs/instruct-dro/huggingface/model',
            'instruct (constant)': out / 'runs/instruct-constant/huggingface/model'}


def report(out: Path, timings: dict[str, float]) -> dict:
    from drpruning_composer.data.prepare import format_manifest
    from drpruning_composer.dro.report import format_trajectory, read_history_csv
    from drpruning_composer.evaluate import evaluate, format_accuracy, format_degradation, format_table

    manifest = json.loads((out / 'data' / 'manifest.json').read_text())
    print('\n== corpus')
    print(format_manifest(manifest))
    trajectories = {}
    for run in ('prune-dro', 'continue-dro', 'instruct-dro'):
        csv = out / 'runs' / run / 'dro' / 'history.csv'
        if csv.is_file():
            domains, rows = read_history_csv(str(csv))
            trajectories[run] = rows
            print(f'\n== domain weights over time: {run} ({csv.with_suffix(".png")})')
            print(format_trajectory(domains, rows))
    found = {k: v for k, v in models(out).items() if v.is_dir()}
    tasks = out / 'tasks' if (out / 'tasks' / 'tasks.yaml').is_file() else None
    rows = evaluate([str(p) for p in found.values()], str(out / 'data'), tasks=tasks) if found else []
    for name, row in zip(found, rows):
        row['model'] = name
    if rows:
        counts = ', '.join(f'{d} {n}' for d, n in rows[0]['samples'].items())
        print(f'\n== per-domain validation loss (whole val splits: {counts} samples)')
        print(format_table(rows))
    else:
        print(f'\n== no model to evaluate yet under {out / "runs"} (the pretrain stage makes the first)')
    if 'source' in found:
        print('\n== degradation against the source, L / L_source (lower is better; one seed, see bench/method_quality.py)')
        print(format_degradation(rows[1:], rows[0]['loss']))
    if rows and tasks:
        choices = json.loads((tasks / 'manifest.json').read_text())['shape']['num_choices']
        print(f'\n== per-domain continuation accuracy, % ({tasks}; chance {100 / choices:.0f}%)')
        print(format_accuracy(rows))
    tuned = {k: v for k, v in instruct_models(out).items() if v.is_dir()}
    instruct_rows = evaluate([str(p) for p in tuned.values()], str(out / 'instruct_data')) \
        if len(tuned) > 1 and (out / 'instruct_data').is_dir() else []
    for name, row in zip(tuned, instruct_rows):
        row['model'] = name
    if instruct_rows:
        counts = ', '.join(f'{d} {n}' for d, n in instruct_rows[0]['samples'].items())
        print(f'\n== instruction tuning: per-task response loss (whole val splits: {counts} examples; one seed, see '
              'bench/method_quality.py --stage instruct)')
        print(format_table(instruct_rows))
    print('\n== wall time per stage (s): ' + ', '.join(f'{k} {v:.0f}' for k, v in timings.items()))
    result = {'timings_s': timings, 'corpus': manifest['domains'], 'losses': rows, 'dro_history': trajectories,
              'instruct_losses': instruct_rows}
    (out / 'report.json').write_text(json.dumps(result, indent=2) + '\n')
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog='python -m drpruning_composer.demo', description=__doc__.split('\n')[0])
    p.add_argument('--out', default='demo')
    p.add_argument('--stages', nargs='*', default=list(STAGES), choices=STAGES,
                   help='stages to run (default: all); the report covers whatever exists')
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    timings = {}
    for stage in args.stages:
        start = time.perf_counter()
        run_stage(stage, out)
        timings[stage] = round(time.perf_counter() - start, 1)
        print(f'== stage {stage} done in {timings[stage]:.0f} s', flush=True)
    report(out, timings)
    return 0


if __name__ == '__main__':
    sys.exit(main())
