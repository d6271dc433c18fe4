"""Per-domain validation loss of Hugging Face model folders on prepared MDS data.

``python -m drpruning_composer.evaluate --data DATA MODEL [MODEL ...]`` prints one row per model and one column
per domain (mean next-token cross-entropy over the whole val split, or its first `--max-samples` samples), plus the
parameter count,
and can write the table as JSON. It loads models with plain `transformers`, so it also checks that an exported
model is a valid Hugging Face folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch


def read_split(data: str | Path, domain: str, split: str, max_samples: int | None = None) -> np.ndarray:
    """The first `max_samples` token rows (all if None) of one domain's split (uncompressed MDS), int64 [n, seq]."""
    from streaming.base.format import reader_from_json

    root = Path(data) / domain / split
    index = json.loads((root / 'index.json').read_text())
    rows = []
    for shard_info in index['shards']:
        shard = reader_from_json(str(root.parent), split, shard_info)
        for i in range(shard.samples):
            rows.append(shard[i]['tokens'])
            if max_samples is not None and len(rows) >= max_samples:
                return np.stack(rows).astype(np.int64)
    return np.stack(rows).astype(np.int64)


def non_embedding_params(model: torch.nn.Module) -> int:
    """Parameters outside the input embedding and the LM head."""
    skip = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
            for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


@torch.no_grad()
def domain_loss(model: torch.nn.Module, tokens: np.ndarray, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy over all predicted positions."""
    total, count = 0.0, 0
    for i in range(0, len(tokens), batch_size):
        x = torch.from_numpy(tokens[i:i + batch_size])
        logits = model(input_ids=x).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                 reduction='sum')
        total += loss.item()
        count += x[:, 1:].numel()
    return total / count


def evaluate(models: Sequence[str], data: str, domains: Sequence[str] | None = None,
             max_samples: int | None = None) -> list[dict]:
    from transformers import AutoModelForCausalLM

    manifest = json.loads((Path(data) / 'manifest.json').read_text())
    domains = list(domains or manifest['domains'])
    tokens = {d: read_split(data, d, 'val', max_samples) for d in domains}
    rows = []
    for path in models:
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
        losses = {d: domain_loss(model, tokens[d]) for d in domains}
        rows.append({'model': str(path), 'non_embedding_params': non_embedding_params(model), 'loss': losses,
                     'samples': {d: len(tokens[d]) for d in domains},
                     'mean_loss': float(np.mean(list(losses.values()))),
                     'worst_loss': float(max(losses.values()))})
    return rows


def degradation(loss: dict[str, float], source_loss: dict[str, float]) -> dict[str, float]:
    """Each domain's loss relative to the source model's, L / L_source (1.0 = no degradation)."""
    return {d: loss[d] / source_loss[d] for d in source_loss}


def format_degradation(rows: list[dict], source_loss: dict[str, float]) -> str:
    """One line per row: L / L_source per domain and the worst of them."""
    domains = list(source_loss)
    head = f"{'model':<40} " + ' '.join(f'{d:>10}' for d in domains) + f" {'worst':>7}"
    lines = [head, '-' * len(head)]
    for r in rows:
        ratio = degradation(r['loss'], source_loss)
        name = r['model'] if len(r['model']) <= 40 else '...' + r['model'][-37:]
        lines.append(f'{name:<40} ' + ' '.join(f'{ratio[d]:>10.4f}' for d in domains)
                     + f' {max(ratio.values()):>7.4f}')
    return '\n'.join(lines)


def format_table(rows: list[dict]) -> str:
    domains = list(rows[0]['loss'])
    head = f"{'model':<40} {'params':>9} " + ' '.join(f'{d:>10}' for d in domains) + f" {'mean':>7} {'worst':>7}"
    lines = [head, '-' * len(head)]
    for r in rows:
        name = r['model'] if len(r['model']) <= 40 else '...' + r['model'][-37:]
        lines.append(f"{name:<40} {r['non_embedding_params'] / 1e6:>8.2f}M "
                     + ' '.join(f"{r['loss'][d]:>10.4f}" for d in domains)
                     + f" {r['mean_loss']:>7.4f} {r['worst_loss']:>7.4f}")
    return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog='python -m drpruning_composer.evaluate', description=__doc__.split('\n')[0])
    p.add_argument('models', nargs='+', help='Hugging Face model folders')
    p.add_argument('--data', required=True, help='prepared data folder (with manifest.json)')
    p.add_argument('--domains', nargs='*', default=None)
    p.add_argument('--max-samples', type=int, default=None, help='first N val samples per domain (default: all)')
    p.add_argument('--json', default=None, help='also write the rows to this JSON file')
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows = evaluate(args.models, args.data, args.domains, args.max_samples)
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
