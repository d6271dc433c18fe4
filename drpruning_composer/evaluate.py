"""Per-domain validation loss, and per-domain task accuracy, of Hugging Face model folders on prepared MDS data.

``python -m drpruning_composer.evaluate --data DATA [--tasks TASKS] MODEL [MODEL ...]`` prints one row per model and
one column per domain (mean next-token cross-entropy over the whole val split, or its first `--max-samples` samples;
over the response tokens only for instruction data, `drpruning-prepare --instruct`),
plus the parameter count, and with `--tasks` (written by `drpruning-make-tasks`) the accuracy on each domain's
multiple-choice continuation task, scored as llm-foundry's `InContextLearningMultipleChoiceAccuracy` scores it.
It can write the table as JSON. It loads models with plain `transformers`, so it also checks that an exported
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


@torch.no_grad()
def response_loss(model: torch.nn.Module, rows: Sequence[tuple[np.ndarray, np.ndarray]], pad_token_id: int,
                  batch_size: int = 16) -> float:
    """Mean next-token cross-entropy over the response tokens of instruction rows (tokens, loss_mask): the
    response-only loss that training and the `instruct` eval loader compute."""
    from drpruning_composer.data.instruct import ResponseCollator

    collate = ResponseCollator(pad_token_id)
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = collate([{'tokens': torch.from_numpy(t.astype(np.int64)), 'loss_mask': torch.from_numpy(m.astype(np.int64))}
                         for t, m in rows[i:i + batch_size]])
        logits = model(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).logits[:, :-1].float()
        labels = batch['labels'][:, 1:]
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                   ignore_index=-100, reduction='sum').item()
        count += int((labels != -100).sum())
    return total / count


def choose(mean_nll: Sequence[float]) -> int:
    """The choice a multiple-choice metric picks: lowest mean negative log-likelihood of the continuation (lowest
    perplexity), the first one on a tie, as llm-foundry's `InContextLearningMultipleChoiceAccuracy` does."""
    return int(np.argmin(np.asarray(mean_nll)))


def tokenizer_conventions(tokenizer) -> tuple[list[int], bool]:
    """What llm-foundry's multiple-choice dataset derives once per tokenizer: the special-token preamble (without a
    trailing EOS) and whether a choice needs a leading space."""
    from llmfoundry.eval.datasets.utils import tokenizer_needs_prefix_space

    preamble = tokenizer('')['input_ids']
    if preamble and preamble[-1] == tokenizer.eos_token_id:
        preamble = preamble[:-1]
    return preamble, tokenizer_needs_prefix_space(tokenizer)


def encode_item(tokenizer, item: dict, max_seq_len: int,
                conventions: tuple[list[int], bool]) -> list[tuple[list[int], int]]:
    """Each choice as (context + continuation token ids, continuation length), tokenized as llm-foundry's
    multiple-choice dataset does with `continuation_delimiter: ''` and `strip_dataset: false`: the tokenizer's
    special-token preamble (without a trailing EOS), the query and the choice tokenized separately (a leading space
    added to the choice for tokenizers that need one), and the context cut from the left to fit `max_seq_len`."""
    preamble, prefix_space = conventions
    context = preamble + tokenizer(item['query'], add_special_tokens=False)['input_ids']
    encoded = []
    for choice in item['choices']:
        if prefix_space and not choice.startswith(' '):
            choice = ' ' + choice
        answer = tokenizer(choice, add_special_tokens=False)['input_ids']
        kept = context[max(len(context) + len(answer) - max_seq_len, 0):]
        encoded.append((kept + answer, len(answer)))
    return encoded


@torch.no_grad()
def task_accuracy(model: torch.nn.Module, tokenizer, items: Sequence[dict], max_seq_len: int,
                  batch_size: int = 64) -> float:
    """Fraction of items whose gold choice has the lowest mean continuation loss (`choose`)."""
    conventions = tokenizer_conventions(tokenizer)
    sequences = [(i, ids, n) for i, item in enumerate(items)
                 for ids, n in encode_item(tokenizer, item, max_seq_len, conventions)]
    nll = [[] for _ in items]
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        width = max(len(ids) for _, ids, _ in chunk)
        x = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, (_, ids, _) in enumerate(chunk):  # right padding: causal attention never sees it
            x[row, :len(ids)] = torch.tensor(ids)
        logits = model(input_ids=x).logits
        for row, (i, ids, n) in enumerate(chunk):
            positions = torch.arange(len(ids) - n, len(ids))
            logp = torch.log_softmax(logits[row, positions - 1].float(), dim=-1)
            nll[i].append(float(-logp[torch.arange(n), x[row, positions]].mean()))
    return float(np.mean([choose(scores) == item['gold'] for scores, item in zip(nll, items)]))


def read_tasks(tasks: str | Path) -> dict[str, tuple[list[dict], int]]:
    """Per domain: the items of `TASKS/{domain}.jsonl` and the task's max_seq_len, as `drpruning-make-tasks` wrote."""
    from omegaconf import OmegaConf as om

    out = {}
    for task in om.to_container(om.load(Path(tasks) / 'tasks.yaml'))['icl_tasks']:
        path = Path(task['dataset_uri'])
        domain = path.stem
        with open(Path(tasks) / path.name) as f:
            out[domain] = ([json.loads(line) for line in f], int(task['max_seq_len']))
    return out


def evaluate(models: Sequence[str], data: str, domains: Sequence[str] | None = None,
             max_samples: int | None = None, tasks: str | Path | None = None) -> list[dict]:
    """Per model: per-domain loss on the val split (response-only for instruction data), mean and worst loss, and
    with `tasks` per-domain accuracy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from drpruning_composer.data.instruct import is_instruct, read_examples

    manifest = json.loads((Path(data) / 'manifest.json').read_text())
    domains = list(domains or manifest['domains'])
    if is_instruct(data):
        tokens = {d: read_examples(data, d, 'val')[:max_samples] for d in domains}
        pad = manifest['eos_token_id']  # any id: padded positions are masked out of attention and loss

        def loss_of(model: torch.nn.Module, d: str) -> float:
            return response_loss(model, tokens[d], pad)
    else:
        tokens = {d: read_split(data, d, 'val', max_samples) for d in domains}

        def loss_of(model: torch.nn.Module, d: str) -> float:
            return domain_loss(model, tokens[d])
    task_items = read_tasks(tasks) if tasks else {}
    task_tokenizer = json.loads((Path(tasks) / 'manifest.json').read_text())['tokenizer'] if tasks else None
    rows = []
    for path in models:
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
        losses = {d: loss_of(model, d) for d in domains}
        rows.append({'model': str(path), 'non_embedding_params': non_embedding_params(model), 'loss': losses,
                     'samples': {d: len(tokens[d]) for d in domains},
                     'mean_loss': float(np.mean(list(losses.values()))),
                     'worst_loss': float(max(losses.values()))})
        if task_items:
            has_tokenizer = any((Path(path) / f).is_file() for f in ('tokenizer.json', 'tokenizer_config.json'))
            tokenizer = AutoTokenizer.from_pretrained(path if has_tokenizer else task_tokenizer)
            accuracy = {d: task_accuracy(model, tokenizer, *task_items[d]) for d in domains if d in task_items}
            rows[-1].update(accuracy=accuracy, mean_accuracy=float(np.mean(list(accuracy.values()))))
    return rows


def degradation(loss: dict[str, float], source_loss: dict[str, float]) -> dict[str, float]:
    """Each domain's loss relative to the source model's, L / L_source (1.0 = no degradation)."""
    return {d: loss[d] / source_loss[d] for d in source_loss}


def _table(rows: list[dict], columns: Sequence[tuple[str, int]], cells) -> str:
    """A text table: the model's name, then one right-aligned cell per (header, width) column from `cells(row)`."""
    head = f"{'model':<40} " + ' '.join(f'{c:>{w}}' for c, w in columns)
    lines = [head, '-' * len(head)]
    for r in rows:
        name = r['model'] if len(r['model']) <= 40 else '...' + r['model'][-37:]
        lines.append(f'{name:<40} ' + ' '.join(f'{v:>{w}}' for v, (_, w) in zip(cells(r), columns)))
    return '\n'.join(lines)


def format_degradation(rows: list[dict], source_loss: dict[str, float]) -> str:
    """One line per row: L / L_source per domain and the worst of them."""
    domains = list(source_loss)

    def cells(r: dict) -> list[str]:
        ratio = degradation(r['loss'], source_loss)
        return [f'{ratio[d]:.4f}' for d in domains] + [f'{max(ratio.values()):.4f}']

    return _table(rows, [(d, 10) for d in domains] + [('worst', 7)], cells)


def format_table(rows: list[dict]) -> str:
    """One line per row: non-embedding parameters, per-domain loss, mean and worst loss."""
    domains = list(rows[0]['loss'])
    return _table(rows, [('params', 9)] + [(d, 10) for d in domains] + [('mean', 7), ('worst', 7)],
                  lambda r: [f"{r['non_embedding_params'] / 1e6:.2f}M"] + [f"{r['loss'][d]:.4f}" for d in domains]
                  + [f"{r['mean_loss']:.4f}", f"{r['worst_loss']:.4f}"])


def format_accuracy(rows: list[dict]) -> str:
    """One line per row: per-domain task accuracy (%) and their average, as the paper's per-domain table."""
    domains = list(rows[0]['accuracy'])
    return _table(rows, [(d, 10) for d in domains] + [('average', 8)],
                  lambda r: [f"{100 * r['accuracy'][d]:.2f}" for d in domains] + [f"{100 * r['mean_accuracy']:.2f}"])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog='python -m drpruning_composer.evaluate', description=__doc__.split('\n')[0])
    p.add_argument('models', nargs='+', help='Hugging Face model folders')
    p.add_argument('--data', required=True, help='prepared data folder (with manifest.json)')
    p.add_argument('--domains', nargs='*', default=None)
    p.add_argument('--tasks', default=None, help='folder written by drpruning-make-tasks: also report accuracy')
    p.add_argument('--max-samples', type=int, default=None, help='first N val samples per domain (default: all)')
    p.add_argument('--json', default=None, help='also write the rows to this JSON file')
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows = evaluate(args.models, args.data, args.domains, args.max_samples, args.tasks)
    print(format_table(rows))
    if args.tasks:
        print('\nper-domain task accuracy (%)')
        print(format_accuracy(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
