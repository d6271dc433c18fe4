"""Export fidelity: is the exported model as good as the masked model pruning ended with?

For each variant of the pruning recipe (default: the demo's, on the demo's data and pretrained source), this runs
`composer train.py` and then, per domain on the whole val split, prints the loss of
- `end`: the masked model under the gates its last evaluation used: the noise-free soft gates, or the binary target
  masks after a `hard_finish`;
- `soft`: the masked model under the noise-free gates;
- `folded`: the masked model with the kept gates at those values and the dropped ones at 0, which is what an export
  that folds each kept gate's value into the weights would give;
- `export`: the exported Hugging Face folder, loaded with plain `transformers` (= the masked model under the
  binary top-k masks),
with the relative gap export / end - 1, and gate statistics per mask type: how many kept gates are below 0.9 and
how many dropped ones above 0.1 (per layer for per-layer masks).

    python bench/export_fidelity.py                       # the variants below, on the demo
    python bench/export_fidelity.py --data D --source S --variant mine='algorithms.l0_mask.hard_finish=0.2dur'
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipes import domains_of, ensure_demo, recipe, train  # noqa: E402

VARIANTS = {  # every option named, so that the variants do not move with the defaults
    'global': ['algorithms.l0_mask.constraint=global', 'algorithms.l0_mask.hard_finish=0ba'],
    'per_layer': ['algorithms.l0_mask.constraint=per_layer', 'algorithms.l0_mask.hard_finish=0ba'],
    'global+hard_finish': ['algorithms.l0_mask.constraint=global', 'algorithms.l0_mask.hard_finish=0.2dur'],
    'per_layer+hard_finish': ['algorithms.l0_mask.constraint=per_layer', 'algorithms.l0_mask.hard_finish=0.2dur'],
}


def load_masked_model(checkpoint: Path):
    """The source-shaped Hugging Face model of a pruning checkpoint with its `L0Masks` attached and loaded."""
    from composer.core import Time
    from transformers import AutoConfig, AutoModelForCausalLM

    from drpruning_composer.pruning.algorithm import L0MaskAlgorithm
    from drpruning_composer.pruning.attach import attach_masks, bias_layout
    from drpruning_composer.pruning.export import _algorithm_state
    from drpruning_composer.pruning.masks import L0Masks

    state = torch.load(checkpoint, map_location='cpu', weights_only=False)
    algorithm = _algorithm_state(state)
    hard_finish = algorithm['hparams'].get('hard_finish', '0ba')
    fields = dict(algorithm['source_config'])
    config = AutoConfig.for_model(fields.pop('model_type'), **fields)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    hparams = algorithm['hparams']
    source, target, active = L0MaskAlgorithm(target=hparams['target'], masks=hparams['masks']).resolve(config)
    masks = L0Masks(source, target, active, bias_layout(model))
    ends_on_target = Time.from_timestring(hard_finish).value > 0 or hparams['eval_mode'] == 'target'
    masks.end_gates = 'target' if ends_on_target else 'soft'
    attach_masks(model, masks)
    prefix = algorithm['model_prefix']
    model.load_state_dict({k[len(prefix):]: v for k, v in state['state']['model'].items() if k.startswith(prefix)})
    return model.eval(), masks


def folded_gates(masks) -> dict[str, torch.Tensor]:
    """Kept gates (top-k) at their noise-free values, dropped gates at 0."""
    from drpruning_composer.pruning.hard_concrete import soft_gates
    from drpruning_composer.pruning.masks import target_gates

    log_alpha = {k: v.detach() for k, v in masks.log_alpha.items()}
    binary = target_gates(log_alpha, masks.target)
    return {name: binary[name] * soft_gates(log_alpha[name]) for name in log_alpha}


@contextmanager
def fixed_gates(masks, gates: dict[str, torch.Tensor]):
    """Every forward inside uses `gates` (an instance attribute shadows `L0Masks.forward`)."""
    masks.forward = lambda: setattr(masks, 'gates', gates) or gates
    try:
        yield
    finally:
        del masks.forward


def masked_loss(model, masks, tokens: np.ndarray, gates: str) -> float:
    """Mean next-token loss with the masks' `soft` or `target` gates, or with `folded` ones."""
    from drpruning_composer.evaluate import domain_loss

    if gates in ('soft', 'target'):
        masks.eval_mode = gates
        return domain_loss(model, tokens)
    with fixed_gates(masks, folded_gates(masks)):
        return domain_loss(model, tokens)


def gate_statistics(masks) -> dict[str, dict]:
    from drpruning_composer.pruning.hard_concrete import soft_gates
    from drpruning_composer.pruning.masks import target_gates

    log_alpha = {k: v.detach() for k, v in masks.log_alpha.items()}
    binary = target_gates(log_alpha, masks.target)
    out = {}
    for name, scores in log_alpha.items():
        soft, kept = soft_gates(scores), binary[name].bool()
        low = (kept & (soft < 0.9)).flatten(1).sum(-1) if scores.dim() > 1 else (kept & (soft < 0.9)).sum()
        high = (~kept & (soft > 0.1)).flatten(1).sum(-1) if scores.dim() > 1 else (~kept & (soft > 0.1)).sum()
        out[name] = {'kept_below_0.9': low.tolist(), 'dropped_above_0.1': high.tolist(),
                     'total': scores.numel()}
    return out


def measure(save: Path, data: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from drpruning_composer.evaluate import domain_loss, read_split

    model, masks = load_masked_model(save / 'latest-rank0.pt')
    export = AutoModelForCausalLM.from_pretrained(save / 'pruned_hf', torch_dtype=torch.float32).eval()
    rows = {}
    for domain in domains_of(data):
        tokens = read_split(data, domain, 'val')
        rows[domain] = {'samples': len(tokens), 'end': masked_loss(model, masks, tokens, masks.end_gates),
                        'soft': masked_loss(model, masks, tokens, 'soft'),
                        'folded': masked_loss(model, masks, tokens, 'folded'),
                        'export': domain_loss(export, tokens)}
    return {'end_gates': masks.end_gates, 'losses': rows, 'gates': gate_statistics(masks)}


def print_result(name: str, result: dict) -> None:
    print(f"\n== {name} (training ends on {result['end_gates']} gates)")
    columns = ('end', 'soft', 'folded', 'export')
    print(f"{'domain':<14} {'samples':>7} " + ' '.join(f'{c:>8}' for c in columns) + f" {'export/end-1':>13}")
    gaps = []
    for domain, r in result['losses'].items():
        gaps.append(r['export'] / r['end'] - 1)
        print(f"{domain:<14} {r['samples']:>7} " + ' '.join(f'{r[c]:>8.4f}' for c in columns) + f' {gaps[-1]:>+12.2%}')
    mean = {c: np.mean([r[c] for r in result['losses'].values()]) for c in columns}
    print(f"{'mean':<14} {'':>7} " + ' '.join(f'{mean[c]:>8.4f}' for c in columns)
          + f' {np.mean(gaps):>+12.2%}  (max gap {max(gaps):+.2%})')
    for mask, stats in result['gates'].items():
        print(f"  gates {mask:<13} kept<0.9: {stats['kept_below_0.9']}  dropped>0.1: {stats['dropped_above_0.1']}"
              f"  of {stats['total']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--demo', type=Path, default=Path('runs/bench_demo'),
                   help='demo folder whose data and pretrained source are used (built if absent)')
    p.add_argument('--data', type=Path, help='prepared data folder (default: the demo\'s)')
    p.add_argument('--source', type=Path, help='source Hugging Face folder (default: the demo\'s pretrained one)')
    p.add_argument('--out', type=Path, default=Path('runs/export_fidelity'))
    p.add_argument('--variant', action='append', default=[], metavar='NAME=OVERRIDES',
                   help='a recipe variant: name=space-separated YAML overrides (default: the built-in variants)')
    p.add_argument('--seed', type=int, default=17)
    p.add_argument('--reuse', action='store_true', help='measure existing runs under --out instead of rerunning')
    args = p.parse_args(argv)
    data, source = (args.data.resolve(), args.source.resolve()) if args.data and args.source else ensure_demo(
        args.demo.resolve())
    variants = dict(v.split('=', 1) for v in args.variant)
    variants = {k: v.split() for k, v in variants.items()} or VARIANTS
    results = {}
    for name, overrides in variants.items():
        save = (args.out / f'{name}-seed{args.seed}').resolve()
        if not (args.reuse and (save / 'pruned_hf').is_dir()):
            yaml = recipe('prune.yaml', data, source, save, [*overrides, f'variables.seed={args.seed}',
                                                             f'run_name={name}', 'save_overwrite=true'])
            print(f'== running {name}: {" ".join(overrides)}', flush=True)
            train(yaml, save / 'train.log')
        results[name] = measure(save, data)
        print_result(name, results[name])
    (args.out / f'results-seed{args.seed}.json').write_text(json.dumps(results, indent=2) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
