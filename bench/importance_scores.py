"""One-shot pruning of a real model by importance: the project's scores against simpler ones, one axis at a time.

For each pruned axis (layers, hidden dims, query heads, MLP channels) and for all of them together, the source is
cut to the target by one score, with no training, and judged by its loss per domain. Scores of
`drpruning_composer.pruning.importance` ('ours': what a unit writes into the residual stream; layers by the loss
increase when skipped) against the activation-only scores it replaced ('activation': a head's attention output norm
before W_o, a channel's |a_j|, and ShortGPT's block importance 1 - cos(h_in, h_out) for layers). Hidden dims use the
same score in both. Calibration: the first `--calibration` train rows of each domain, batches of 4; judgement: the
first `--max-samples` val rows of each domain.

``python bench/importance_scores.py --source demo_real/source --data demo_real/data``
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForCausalLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from drpruning_composer.evaluate import domain_loss, read_split  # noqa: E402
from drpruning_composer.pruning.export import LOG_ALPHA_PREFIX, pruned_weights  # noqa: E402
from drpruning_composer.pruning.importance import ImportanceCollector, importance_log_alpha  # noqa: E402
from drpruning_composer.pruning.structure import ModelShape, required_masks, resolve_target  # noqa: E402
from recipes import domains_of  # noqa: E402

TARGET = {'num_hidden_layers': 20, 'hidden_size': 448, 'num_attention_heads': 6, 'num_key_value_heads': 3,
          'intermediate_size': 1024}
AXES = {'layers': ('num_hidden_layers',), 'hidden': ('hidden_size',),
        'heads': ('num_attention_heads', 'num_key_value_heads'), 'mlp': ('intermediate_size',),
        'all': tuple(TARGET)}


def activation_scores(model: nn.Module, shape: ModelShape, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Head output norm before W_o [L, n_kv, group], |a_j| [L, I] and 1 - cos(h_in, h_out) [L], mean per token."""
    sums = {'query_head': torch.zeros(shape.num_hidden_layers, shape.num_attention_heads),
            'intermediate': torch.zeros(shape.num_hidden_layers, shape.intermediate_size),
            'layer': torch.zeros(shape.num_hidden_layers)}
    handles = []
    for i, layer in enumerate(model.model.layers):
        def head(m, args, i=i):
            sums['query_head'][i] += args[0].unflatten(-1, (shape.num_attention_heads, shape.head_dim)).norm(
                dim=-1).flatten(0, -2).sum(0)

        def channel(m, args, i=i):
            sums['intermediate'][i] += args[0].abs().flatten(0, -2).sum(0)

        def block(m, args, kwargs, out, i=i):
            h_in = args[0] if args else kwargs['hidden_states']
            h_out = out[0] if isinstance(out, tuple) else out
            sums['layer'][i] += (1 - nn.functional.cosine_similarity(h_in, h_out, dim=-1)).sum()

        handles += [layer.self_attn.o_proj.register_forward_pre_hook(head),
                    layer.mlp.down_proj.register_forward_pre_hook(channel),
                    layer.register_forward_hook(block, with_kwargs=True)]
    with torch.no_grad():
        for x in batches:
            model(input_ids=x)
    for handle in handles:
        handle.remove()
    tokens = sum(x.numel() for x in batches)
    out = {k: v / tokens for k, v in sums.items()}
    out['query_head'] = out['query_head'].unflatten(-1, (shape.num_key_value_heads, shape.group_size))
    return out


def project_scores(model: nn.Module, shape: ModelShape, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The scores `init: importance` computes, with the project's collector (training-mode forwards, no update)."""
    collector = ImportanceCollector(model, shape)
    with torch.no_grad():
        for x in batches:
            model.train()(input_ids=x)

            def loss(x=x) -> float:
                return float(model.eval()(input_ids=x, labels=x).loss)

            collector.measure_layer_ablation(loss)
            collector.sync(lambda t: None, 'cpu')
    collector.remove()
    model.eval()
    return collector.scores()


def one_shot_losses(model: nn.Module, shape: ModelShape, scores: dict[str, torch.Tensor], fields: tuple[str, ...],
                    val: dict[str, np.ndarray]) -> dict[str, float]:
    """Loss per domain of the source cut to TARGET's `fields` (the others kept) by `scores`, without training."""
    target = {k: TARGET[k] for k in fields}
    shape_target = resolve_target(shape, target)
    log_alpha = importance_log_alpha(scores, required_masks(shape, shape_target), shape_target, 5.0)
    masked = {**model.state_dict(), **{LOG_ALPHA_PREFIX + k: v for k, v in log_alpha.items()}}
    config, weights = pruned_weights(masked, model.config.to_dict(), target, torch.float32)
    pruned = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    pruned.load_state_dict(weights, strict=False)
    return {domain: domain_loss(pruned.eval(), rows) for domain, rows in val.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--source', type=Path, default=Path('demo_real/source'))
    p.add_argument('--data', type=Path, default=Path('demo_real/data'))
    p.add_argument('--calibration', type=int, default=8, help='train rows per domain (batches of 4)')
    p.add_argument('--max-samples', type=int, default=16, help='val rows per domain')
    args = p.parse_args(argv)
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.source, torch_dtype=torch.float32).eval()
    shape = ModelShape.from_config(model.config)
    domains = domains_of(args.data)
    rows = torch.from_numpy(np.concatenate([read_split(args.data, d, 'train', args.calibration) for d in domains]))
    batches = list(rows.split(4))
    val = {d: read_split(args.data, d, 'val', args.max_samples) for d in domains}
    ours = project_scores(model, shape, batches)
    activation = {**ours, **activation_scores(model, shape, batches)}
    source = {d: domain_loss(model, rows) for d, rows in val.items()}
    print(f'{len(rows)} calibration rows of {rows.shape[1]} tokens; {args.max_samples} val rows per domain')
    print('| cut | scores | ' + ' | '.join(domains) + ' | mean | mean - source |')
    print('|---|---|' + '---:|' * (len(domains) + 2))
    base = float(np.mean(list(source.values())))
    print(f"| none | - | {' | '.join(f'{source[d]:.3f}' for d in domains)} | {base:.3f} | +0.000 |")
    for axis, fields in AXES.items():
        for name, scores in (('activation', activation), ('ours', ours)):
            if axis == 'hidden' and name == 'activation':
                continue  # the same score in both
            loss = one_shot_losses(model, shape, scores, fields, val)
            mean = float(np.mean(list(loss.values())))
            print(f"| {axis} | {name} | {' | '.join(f'{loss[d]:.3f}' for d in domains)} | {mean:.3f} | "
                  f'{mean - base:+.3f} |', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
