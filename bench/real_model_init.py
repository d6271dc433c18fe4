"""Short-budget pruning of the real model: mask initialisation from importance against the uniform one.

Runs `yamls/demo/prune_real.yaml` (SmolLM2-135M-Instruct -> 20 layers / hidden 448 / 6 heads / MLP 1024, batches of
4 x 256 tokens) as users run it (`composer train.py`), once per variant, and judges each export on whole val splits:
per-domain loss, mean, worst, mean excess over the source, and greedy continuations. Variants:

- `oneshot`: importance over 8 calibration batches with the learning rate at 0, then export (0 training batches);
- `importance-N`: the YAML's default, importance initialisation, N batches;
- `uniform-N`: every mask logit at +5 (the previous default) with the warm-up and mask/Lagrangian lr that made the
  masks move fastest in a 100-batch run (40 batches, 0.5);
- `kd-` before any of these: distillation from the source (`algorithms.distill`, KD weight 1: the teacher's whole
  distribution instead of the next token, Minitron's retraining loss).

`--set KEY=VALUE` overrides the YAML for every variant of the invocation; the results are keyed by the variant name
followed by the overrides (`importance-100 optimizer.lr=1e-3`).

``python bench/real_model_init.py --demo demo_real --variants oneshot importance-100 uniform-100``
(the demo folder's source and data stages are built if absent; results in ``--out``/results.json, reused with
``--reuse``; ``--max-samples N`` judges on the first N val sequences per domain, for a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from drpruning_composer.demo_real import PROMPTS, greedy_continuations, run_stage  # noqa: E402


def overrides(variant: str) -> list[str]:
    """YAML overrides of one variant name (see the module docstring)."""
    if variant.startswith('kd-'):
        return [*overrides(variant[3:]), 'algorithms.distill.alpha=1.0']
    if variant == 'oneshot':
        return ['max_duration=8ba', 'optimizer.lr=0.0', 'algorithms.l0_mask.hard_finish=0ba',
                'scheduler.t_warmup=0ba', 'eval_interval=100ba', 'save_interval=100ba']
    kind, _, batches = variant.partition('-')
    common = [f'max_duration={int(batches)}ba', f'save_interval={int(batches)}ba']
    if kind == 'importance':
        return common
    if kind == 'uniform':
        return [*common, 'algorithms.l0_mask.init=uniform', f'algorithms.l0_mask.lagrangian_warmup={int(batches) * 2 // 5}ba',
                'algorithms.l0_mask.mask_lr=0.5', 'algorithms.l0_mask.lagrangian_lr=0.5']
    raise ValueError(f'unknown variant {variant!r}')


def run_variant(demo: Path, out: Path, folder_name: str, variant: str, extra: list[str]) -> Path:
    """Prune with one variant's overrides and `extra` into `out/folder_name`; returns its export folder."""
    folder = out / folder_name
    cmd = ['composer', str(REPO / 'train.py'), str(REPO / 'yamls/demo/prune_real.yaml'), f'variables.demo={demo}',
           f'variables.save_folder={folder}', *overrides(variant), *extra]
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / 'train.log', 'w') as log:
        code = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, 'HF_HUB_OFFLINE': '1'}).returncode
    if code:
        raise RuntimeError(f'{variant} failed ({code}); see {folder / "train.log"}')
    return folder / 'pruned_hf'


def main(argv: list[str] | None = None) -> int:
    from drpruning_composer.evaluate import evaluate

    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--demo', type=Path, default=Path('demo_real'), help='real demo folder (source, data)')
    p.add_argument('--out', type=Path, default=Path('runs/real_init'))
    p.add_argument('--variants', nargs='+', default=['oneshot', 'importance-100', 'uniform-100'])
    p.add_argument('--set', action='append', default=[], dest='extra', metavar='KEY=VALUE')
    p.add_argument('--reuse', action='store_true', help='keep the results of variants already in results.json')
    p.add_argument('--max-samples', type=int, default=None,
                   help='judge on the first N val sequences per domain (default: whole splits)')
    args = p.parse_args(argv)
    demo, out = args.demo.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stage in ('source', 'data'):
        if not (demo / stage).is_dir():
            run_stage(stage, demo)
    path = out / 'results.json'
    results = json.loads(path.read_text()) if args.reuse and path.is_file() else {}
    if 'source' not in results:
        row = evaluate([str(demo / 'source')], str(demo / 'data'), max_samples=args.max_samples)[0]
        results['source'] = {**row, 'continuations': greedy_continuations(demo / 'source', PROMPTS)}
        path.write_text(json.dumps(results, indent=2) + '\n')
    for variant in args.variants:
        name = ' '.join([variant, *args.extra])
        if name in results:
            continue
        export = run_variant(demo, out, name.replace(' ', '+').replace('/', '_'), variant, args.extra)
        row = evaluate([str(export)], str(demo / 'data'), max_samples=args.max_samples)[0]
        results[name] = {**row, 'continuations': greedy_continuations(export, PROMPTS)}
        path.write_text(json.dumps(results, indent=2) + '\n')
    source = results['source']['loss']
    domains = list(source)
    print(f"samples per domain: {results['source']['samples']}")
    print('| model | ' + ' | '.join(domains) + ' | mean | worst | mean - source mean |')
    print('|---|' + '---:|' * (len(domains) + 3))
    for name, row in results.items():
        cells = [f"{row['loss'][d]:.3f}" for d in domains]
        excess = row['mean_loss'] - float(np.mean(list(source.values())))
        print(f"| {name} | {' | '.join(cells)} | {row['mean_loss']:.3f} | {row['worst_loss']:.3f} | {excess:+.3f} |")
    print('\ngreedy continuations')
    for i, prompt in enumerate(PROMPTS):
        print(f'{prompt!r}')
        for name, row in results.items():
            print(f"  {name}: {row['continuations'][i]!r}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
