"""Per-domain multiple-choice continuation tasks from a prepared data folder's val split.

``drpruning-make-tasks --data PREPARED --tokenizer TOK --out TASKS`` writes, for each domain, ``TASKS/{domain}.jsonl``
in llm-foundry's multiple-choice ICL format (``query``, ``choices``, ``gold``): the query is `context_tokens` tokens of
a val document (piece: see below), the gold choice the `continuation_tokens` tokens that follow it, and the other
`num_choices - 1` choices are spans of the same length from *other* val pieces of the same domain, so that the
choice needs the context and not the domain's style. ``TASKS/tasks.yaml`` lists the tasks for llm-foundry's
`icl_tasks`, and ``TASKS/manifest.json`` counts the items and the pieces skipped as too short.

Split points are word boundaries (the continuation's first token starts with a space), which keeps llm-foundry's
handling of a leading space from changing the text it scores. A domain with too few of them for `min_items` items
(text without spaces: CSV, hashes, Chinese) is split at any token instead, and the manifest says so (`split: any`);
llm-foundry then puts a space before every choice of a tokenizer that expects one, the same for all choices.
The val split stores documents joined with EOS, cut into rows written in a random order (`drpruning-prepare`), so a
"document" here is a piece of one: a row cut at its EOS tokens. Items come from pieces, and a distractor from another
piece; two pieces can belong to one long document (a distractor then shares its gold's source and style, which makes
the choice harder, not easier). A window never spans two rows, so `context_tokens + continuation_tokens` must fit in
the rows' `max_seq_len`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from drpruning_composer.atomic import atomic_directory

TASKS_YAML = 'tasks.yaml'
MANIFEST = 'manifest.json'


class TaskError(ValueError):
    """Bad input to task building; the message names the culprit."""


@dataclass(frozen=True)
class TaskShape:
    """Tokens of context and of each choice, and the number of choices per item."""

    context_tokens: int = 128
    continuation_tokens: int = 32
    num_choices: int = 4

    def __post_init__(self) -> None:
        if self.context_tokens < 1 or self.continuation_tokens < 1:
            raise TaskError(f'context and continuation need at least 1 token, got {self}')
        if self.num_choices < 2:
            raise TaskError(f'a multiple-choice item needs at least 2 choices, got {self.num_choices}')


def document_pieces(rows: np.ndarray, eos_token_id: int) -> list[np.ndarray]:
    """The runs of text between EOS tokens within each row of a split, [rows, seq] -> list of 1-D arrays (EOS and
    empty pieces dropped). Rows are never joined: consecutive rows need not continue one document."""
    pieces = []
    for row in rows:
        cuts = np.flatnonzero(row == eos_token_id)
        pieces += [p[1:] if len(p) and p[0] == eos_token_id else p for p in np.split(row, cuts)]
    return [p for p in pieces if len(p)]


def build_items(documents: Sequence[np.ndarray], starts_word: Callable[[int], bool], shape: TaskShape,
                seed: int, max_items: int | None = None) -> tuple[list[dict], int]:
    """Multiple-choice items as token lists, and the number of documents too short for one item.

    Each item is {'context': [...], 'choices': [[...], ...], 'gold': i}. Windows are non-overlapping spans of context
    + continuation in each document, each split at a word boundary (`starts_word(token_id)`). An item's distractors
    are the continuations of windows of other documents, each from a different document and none equal to the gold
    span: gold and distractors are drawn from the same population of spans (same positions in their documents, each
    document weighted by its windows), so a score that ignores the context cannot prefer the gold. Deterministic
    for a seed.
    """
    n, m, k = shape.context_tokens, shape.continuation_tokens, shape.num_choices
    rng = np.random.default_rng(seed)
    usable = [j for j, d in enumerate(documents) if len(d) >= n + m]
    skipped = len(documents) - len(usable)
    windows = []  # (document, start of the continuation)
    for j in usable:
        doc = documents[j]
        pos = n
        while pos + m <= len(doc):
            if starts_word(int(doc[pos])):
                windows.append((j, pos))
                pos += n + m
            else:
                pos += 1
    if len({j for j, _ in windows}) < k:
        return [], skipped
    items = []
    for j, pos in windows:
        gold = documents[j][pos:pos + m]
        choices, used = [], {j}
        for w in rng.permutation(len(windows)):
            o, start = windows[w]
            span = documents[o][start:start + m]
            if o not in used and not np.array_equal(span, gold):
                choices.append(span)
                used.add(o)
                if len(choices) == k - 1:
                    break
        if len(choices) < k - 1:
            continue
        g = int(rng.integers(k))
        choices.insert(g, gold)
        items.append({'context': documents[j][pos - n:pos].tolist(), 'choices': [c.tolist() for c in choices],
                      'gold': g})
    if max_items is not None and len(items) > max_items:
        keep = np.sort(rng.choice(len(items), size=max_items, replace=False))
        items = [items[i] for i in keep]
    return items, skipped


def task_config(domain: str, path: Path, shape: TaskShape) -> dict:
    """One `icl_tasks` entry: zero-shot multiple choice, text scored exactly as written."""
    return {'label': f'{domain}_continuation', 'dataset_uri': str(path), 'num_fewshot': [0],
            'icl_task_type': 'multiple_choice', 'continuation_delimiter': '', 'strip_dataset': False,
            'max_seq_len': shape.context_tokens + 2 * shape.continuation_tokens}


def make_tasks(data: Path, tokenizer_path: str, out: Path, shape: TaskShape = TaskShape(), seed: int = 17,
               max_items: int | None = 500, domains: Sequence[str] | None = None,
               min_items: int = 10, overwrite: bool = False) -> dict:
    """Write every domain's task under `out` (atomically; an existing `out` only with `overwrite`); returns the
    manifest."""
    from omegaconf import OmegaConf as om
    from transformers import AutoTokenizer

    from drpruning_composer.evaluate import read_split

    manifest_path = Path(data) / 'manifest.json'
    if not manifest_path.is_file():
        raise TaskError(f'--data {data}: no manifest.json (not a folder written by drpruning-prepare)')
    prepared = json.loads(manifest_path.read_text())
    domains = list(domains or prepared['domains'])
    missing = [d for d in domains if d not in prepared['domains']]
    if missing:
        raise TaskError(f'--domains {missing} are not in {manifest_path} ({list(prepared["domains"])})')
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    if len(tokenizer) != prepared['vocab_size'] or tokenizer.eos_token_id != prepared['eos_token_id']:
        raise TaskError(f'--tokenizer {tokenizer_path} is not the one {data} was prepared with (vocabulary '
                        f'{len(tokenizer)} vs {prepared["vocab_size"]}, EOS {tokenizer.eos_token_id} vs '
                        f'{prepared["eos_token_id"]})')
    starts_word = _word_start_table(tokenizer, prepared['vocab_size'])
    written = {'shape': vars(shape), 'seed': seed, 'data': str(data), 'tokenizer': str(tokenizer_path),
               'domains': {}}
    tasks = []
    with atomic_directory(Path(out), overwrite=overwrite) as tmp:
        for i, domain in enumerate(domains):
            docs = document_pieces(read_split(data, domain, 'val'), prepared['eos_token_id'])
            split = 'word'
            items, skipped = build_items(docs, lambda t: starts_word[t], shape, seed + i, max_items)
            if len(items) < min_items:
                split = 'any'
                items, skipped = build_items(docs, lambda t: True, shape, seed + i, max_items)
            if len(items) < min_items:
                raise TaskError(f'domain {domain!r}: {len(items)} items from {len(docs)} val document pieces '
                                f'({skipped} shorter than {shape.context_tokens + shape.continuation_tokens} '
                                f'tokens; a piece has at most max_seq_len={prepared["max_seq_len"]}); '
                                f'needs at least {min_items} items and {shape.num_choices} usable documents')
            with open(tmp / f'{domain}.jsonl', 'w') as f:
                for item in items:
                    f.write(json.dumps({'query': tokenizer.decode(item['context']),
                                        'choices': [tokenizer.decode(c) for c in item['choices']],
                                        'gold': item['gold']}) + '\n')
            tasks.append(task_config(domain, Path(out).resolve() / f'{domain}.jsonl', shape))
            written['domains'][domain] = {'items': len(items), 'documents': len(docs), 'skipped_short': skipped,
                                          'split': split}
        om.save(om.create({'icl_tasks': tasks}), tmp / TASKS_YAML)
        (tmp / MANIFEST).write_text(json.dumps(written, indent=2) + '\n')
    return written


def _word_start_table(tokenizer, vocab_size: int) -> np.ndarray:
    """For every token id: does its text start with a space (so a split before it is a word boundary)?"""
    pieces = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
    table = np.zeros(vocab_size, dtype=bool)
    for i, piece in enumerate(pieces):
        table[i] = piece is not None and piece[:1] in ('Ġ', '▁', ' ')
    return table


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog='drpruning-make-tasks', description=__doc__.split('\n')[0])
    p.add_argument('--data', type=Path, required=True, help='folder written by drpruning-prepare')
    p.add_argument('--tokenizer', required=True, help='the tokenizer the data was prepared with (local folder)')
    p.add_argument('--out', type=Path, required=True)
    p.add_argument('--context-tokens', type=int, default=TaskShape.context_tokens)
    p.add_argument('--continuation-tokens', type=int, default=TaskShape.continuation_tokens)
    p.add_argument('--choices', type=int, default=TaskShape.num_choices)
    p.add_argument('--max-items', type=int, default=500, help='items per domain at most (default 500)')
    p.add_argument('--seed', type=int, default=17)
    p.add_argument('--domains', nargs='*', default=None)
    args = p.parse_args(argv)
    try:
        shape = TaskShape(args.context_tokens, args.continuation_tokens, args.choices)
        written = make_tasks(args.data, args.tokenizer, args.out, shape, args.seed, args.max_items, args.domains)
    except (TaskError, FileExistsError) as e:
        print(f'drpruning-make-tasks: error: {e}', file=sys.stderr)
        return 2
    for domain, counts in written['domains'].items():
        print(f'{domain:>12}: {counts["items"]:>4} items from {counts["documents"]} val document pieces '
              f'({counts["skipped_short"]} too short), split at {counts["split"]} boundaries')
    print(f'wrote {args.out}/{{domain}}.jsonl and {args.out / TASKS_YAML}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
