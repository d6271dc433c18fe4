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
from recipes import add_data_arguments, data_and_source, domains_of, recipe, train  # noqa: E402

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
    fields = dict(algorithm['source_config'])
    config = AutoConfig.for_model(fields.pop('model_type'), **fields)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    hparams = algorithm['hparams']
    source, target, active = L0MaskAlgorithm(target=hparams['target'], masks=hparams['masks']).resolve(config)
    masks = L0Masks(source, target, active, bias_layout(model))
    hard_finish = Time.from_timestring(hparams.get('hard_finish', '0ba'))
    ends_on_target = hard_finish.value > 0 or hparams['eval_mode'] == 'target'
    masks.end_gates = 'target' if ends_on_target else 'soft'
    attach_masks(model, masks)
    prefix = algorithm['model_prefix']
    model.load_state_dict({k[len(prefix):]: v for k, v in state['state']['model'].items() if k.startswith(prefix)})
    return model.eval(), masks


def _kept_and_soft(masks) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The binary top-k target gates and the noise-free gate values of every mask type."""
    from drpruning_composer.pruning.hard_concrete import soft_gates
    from drpruning_composer.pruning.masks import target_gates

    log_alpha = {k: v.detach() for k, v in masks.log_alpha.items()}
    return target_gates(log_alpha, masks.target), {k: soft_gates(v) for k, v in log_alpha.items()}


def folded_gates(masks) -> dict[str, torch.Tensor]:
    """Kept gates (top-k) at their noise-free values, dropped gates at 0."""
    kept, soft = _kept_and_soft(masks)
    return {name: kept[name] * soft[name] for name in kept}


@contextmanager
def fixed_gates(masks, gates: dict[str, torch.Tensor]):
    """Every forward inside uses `gates` (an instance attribute shadows `L0Masks.forward`)."""
    masks.forward = lambda: setattr(masks, 'gates', gates) or gates
    try:
        yield
    finally:
        del masks.forward


def masked_loss(model, masks, tokens: np.ndarray, gates: str | dict[str, torch.Tensor]) -> float:
    """Mean next-token loss with the masks' `soft` or `target` gates, or with the given fixed gates."""
    from drpruning_composer.evaluate import domain_loss

    if isinstance(gates, str):
        masks.eval_mode = gates
        return domain_loss(model, tokens)
    with fixed_gates(masks, gates):
        return domain_loss(model, tokens)


def gate_statistics(masks) -> dict[str, dict]:
    kept, soft = _kept_and_soft(masks)

    def per_row(mask: torch.Tensor) -> list[int] | int:
        return mask.flatten(1).sum(-1).tolist() if mask.dim() > 1 else int(mask.sum())

    return {name: {'kept_below_0.9': per_row(kept[name].bool() & (soft[name] < 0.9)),
                   'dropped_above_0.1': per_row(~kept[name].bool() & (soft[name] > 0.1)),
                   'total': soft[name].numel()} for name in kept}


def measure(save: Path, data: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from drpruning_composer.evaluate import domain_loss, read_split

    model, masks = load_masked_model(save / 'latest-rank0.pt')
    export = AutoModelForCausalLM.from_pretrained(save / 'pruned_hf', torch_dtype=torch.float32).eval()
    gates = {'soft': 'soft', 'folded': folded_gates(masks)}
    if masks.end_gates == 'target':
        gates['target'] = 'target'
    rows = {}
    for domain in domains_of(data):
        tokens = read_split(data, domain, 'val')
        losses = {name: masked_loss(model, masks, tokens, g) for name, g in gates.items()}
        rows[domain] = {'samples': len(tokens), 'end': losses[masks.end_gates], 'soft': losses['soft'],
                        'folded': losses['folded'], 'export': domain_loss(export, tokens)}
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
    add_data_arguments(p)
    p.add_argument('--out', type=Path, default=Path('runs/export_fidelity'))
    p.add_argument('--variant', action='append', default=[], metavar='NAME=OVERRIDES',
                   help='a recipe variant: name=space-separated YAML overrides (default: the built-in variants)')
    p.add_argument('--seed', type=int, default=17)
    p.add_argument('--reuse', action='store_true', help='measure existing runs under --out instead of rerunning')
    args = p.parse_args(argv)
    data, source = data_and_source(args)
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
