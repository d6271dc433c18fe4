"""Evaluation noise: how well a subset of the val split measures a domain's loss, and a change of it.

The DRO update reads one loss per domain from each evaluation; with `eval_subset_num_batches` Composer evaluates the
first k batches of each (unshuffled) val split. For subset sizes n, this prints, per domain, the standard deviation
over random n-sequence subsets of (a) the subset's mean loss minus the whole split's, at a fixed model (`--model`),
and (b) with `--vs MODEL2`, the subset's estimate of the change between the two models minus the whole split's
change. (b) is what the update sees when the model changes between evaluations; it is compared with the spread of
the true change across domains (the signal the update must rank). Each table also gives the error of the subset
Composer actually evaluates, the first n sequences (`prefix`): a split written in document order is not a random
sample, and its prefix can be off by far more than the random subsets' std. Losses are token means per sequence,
and the subset mean weights sequences by their token count, as Composer's metric does.

    python bench/eval_noise.py                                   # the demo's source model
    python bench/eval_noise.py --model A --vs B --data DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipes import add_data_arguments, data_and_source, domains_of  # noqa: E402

SIZES = (16, 32, 64, 128, 256)
DRAWS = 2000


@torch.no_grad()
def sequence_losses(model_path: str, tokens: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Mean next-token cross-entropy of each sequence (all sequences are full length)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32).eval()
    out = []
    for i in range(0, len(tokens), batch_size):
        x = torch.from_numpy(tokens[i:i + batch_size])
        logits = model(input_ids=x).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction='none')
        out.append(loss.mean(1).numpy())
    return np.concatenate(out)


def subset_error(values: np.ndarray, n: int, rng: np.random.Generator) -> float:
    """Std over random n-subsets (without replacement) of the subset mean minus the full mean."""
    if n >= len(values):
        return 0.0
    idx = np.argsort(rng.random((DRAWS, len(values))), axis=1)[:, :n]
    return float((values[idx].mean(1) - values.mean()).std())


def prefix_error(values: np.ndarray, n: int) -> float:
    """The first n values' mean minus the full mean: the error of the subset `eval_subset_num_batches` evaluates."""
    return float(values[:n].mean() - values.mean())


def print_errors(values: dict[str, np.ndarray], rng: np.random.Generator, label: str) -> None:
    """Per domain: the random n-subsets' std (`rand`) and the prefix's error (`prefix`) for every size n."""
    sizes = ' '.join(f'{f"rand n={n}":>11} {"prefix":>7}' for n in SIZES)
    print(f"{'domain':>10} {'val seqs':>8} {label:>7} {sizes}")
    for d, v in values.items():
        print(f'{d:>10} {len(v):>8} {v.mean():>7.4f} '
              + ' '.join(f'{subset_error(v, n, rng):>11.4f} {prefix_error(v, n):>+7.4f}' for n in SIZES))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_data_arguments(p)
    p.add_argument('--model', type=Path, help='model folder (default: the source)')
    p.add_argument('--vs', type=Path, help='a second model: measure the error of the estimated change')
    args = p.parse_args(argv)
    from drpruning_composer.evaluate import read_split

    data, source = data_and_source(args)
    model = args.model or source
    rng = np.random.default_rng(0)
    domains = domains_of(data)
    tokens = {d: read_split(data, d, 'val') for d in domains}
    first = {d: sequence_losses(str(model), tokens[d]) for d in domains}
    print(f'model {model}\nsubset mean loss minus the whole split\'s: std over {DRAWS} random subsets, and the prefix')
    print_errors(first, rng, 'loss')
    if args.vs:
        second = {d: sequence_losses(str(args.vs), tokens[d]) for d in domains}
        change = {d: second[d] - first[d] for d in domains}
        spread = np.std([change[d].mean() for d in domains])
        print(f'\nvs {args.vs}: subset estimate of the loss change minus the whole split\'s')
        print_errors(change, rng, 'change')
        print(f'spread (std across domains) of the true change: {spread:.4f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
