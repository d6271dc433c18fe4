"""Throughput of the `dynamic_mixture` loader next to llm-foundry's `text` loader on the same MDS data.

Writes synthetic per-domain MDS shards (column `tokens`, int32) to --data-dir (kept and reused), then times both loaders
over the same domains and proportions (the `text` loader reads them as streams) and prints samples/s and the
ratio dynamic_mixture / text. CPU only.

    python bench/mixture_loader.py [--batches 300] [--num-workers 0] [--seq-len 2048]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault('HF_HUB_OFFLINE', '1')

DOMAINS = ('web', 'code', 'books', 'papers')
PROPORTIONS = (0.4, 0.3, 0.2, 0.1)


def write_data(root: Path, samples_per_domain: int, seq_len: int) -> None:
    from streaming import MDSWriter

    rng = np.random.default_rng(0)
    for domain in DOMAINS:
        with MDSWriter(out=str(root / domain / 'train'), columns={'tokens': 'ndarray:int32'}) as writer:
            for _ in range(samples_per_domain):
                writer.write({'tokens': rng.integers(3, 32000, size=seq_len, dtype=np.int32)})


def tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({'<pad>': 0, '<eos>': 1, '<unk>': 2}, unk_token='<unk>')),
        pad_token='<pad>', eos_token='<eos>', unk_token='<unk>',
    )


def loader_kwargs(num_workers: int) -> dict:
    return {
        'drop_last': True, 'num_workers': num_workers, 'prefetch_factor': 2 if num_workers else None,
        'persistent_workers': False, 'pin_memory': False,
    }


def build_text(root: Path, batch_size: int, seq_len: int, num_workers: int):
    from llmfoundry.data.text_data import build_text_dataloader

    streams = {d: {'local': str(root / d), 'split': 'train', 'proportion': p} for d, p in zip(DOMAINS, PROPORTIONS)}
    dataset = {'streams': streams, 'max_seq_len': seq_len, 'shuffle': True, 'shuffle_seed': 1}
    return build_text_dataloader(tokenizer(), batch_size, dataset, **loader_kwargs(num_workers)).dataloader


def build_mixture(root: Path, batch_size: int, seq_len: int, num_workers: int):
    from drpruning_composer.data.mixture import build_dynamic_mixture_dataloader

    dataset = {'local': str(root), 'domains': list(DOMAINS), 'proportions': list(PROPORTIONS), 'max_seq_len': seq_len}
    return build_dynamic_mixture_dataloader(tokenizer(), batch_size, dataset, **loader_kwargs(num_workers)).dataloader


def samples_per_second(loader, batches: int, batch_size: int, warmup: int = 5) -> float:
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batches', type=int, default=300)
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--seq-len', type=int, default=2048)
    parser.add_argument('--samples-per-domain', type=int, default=2000)
    parser.add_argument('--num-workers', type=int, default=0)
    parser.add_argument('--repeats', type=int, default=2)
    parser.add_argument('--data-dir', default='/tmp/drpruning_bench_mixture')
    args = parser.parse_args()

    # The data folder outlives the loaders on purpose: the `text` loader's shard-preparation thread may still run.
    root = Path(args.data_dir) / f'{args.samples_per_domain}x{args.seq_len}'
    if not root.exists():
        write_data(root, args.samples_per_domain, args.seq_len)
    results: dict[str, list[float]] = {'text': [], 'dynamic_mixture': []}
    for _ in range(args.repeats):  # interleaved, so background load affects both alike
        for name, build in (('text', build_text), ('dynamic_mixture', build_mixture)):
            loader = build(root, args.batch_size, args.seq_len, args.num_workers)
            results[name].append(samples_per_second(loader, args.batches, args.batch_size))
            del loader
    best = {name: max(values) for name, values in results.items()}
    print(f'batch {args.batch_size} x seq {args.seq_len}, num_workers={args.num_workers}, '
          f'{args.batches} batches, best of {args.repeats}')
    for name, value in best.items():
        print(f'{name:>16}: {value:10.1f} samples/s  (runs: {", ".join(f"{v:.1f}" for v in results[name])})')
    print(f'{"ratio":>16}: {best["dynamic_mixture"] / best["text"]:.3f} (dynamic_mixture / text)')


if __name__ == '__main__':
    main()
