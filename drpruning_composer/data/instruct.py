"""Instruction data: one prompt/response source per task, tokenized with a loss mask over the response tokens.

Input, one source (a `.jsonl` file or a folder of them) per task; each line is either

    {"prompt": "...", "response": "..."}                                        or
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]}

Every assistant message is a response (in the loss); everything else is prompt. Messages are rendered with the
tokenizer's chat template when it has one (each response is what the template adds for that assistant turn), else
as plain `role: content` lines. Prompt and response segments are tokenized separately and concatenated, so the mask
boundary is exact; an EOS ends each plain-rendered response (a chat template brings its own end-of-turn tokens).
What users wrote is tokenized with special-token parsing off: a prompt, response or message quoting ``<|im_end|>``
keeps it as text, while the EOS and the special tokens of the chat template's own markup stay special.

Output layout (read by `dynamic_mixture` for training and by the `instruct` loader for evaluation)::

    OUT/{task}/train/   MDS, columns `tokens` (int32) and `loss_mask` (uint8), each row at most max_seq_len long
    OUT/{task}/val/     one example per row, held out by example
    OUT/manifest.json   `format: instruct`; examples, rows, tokens, response tokens, truncated and dropped per split

With `pack`, train rows hold several consecutive examples (greedy, in order, never splitting one). The model then
attends across example boundaries within a row (Hugging Face Llama takes no per-document attention mask); the loss
stays on the response tokens only. Val rows are never packed, so the eval loss sees each example alone.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from streaming import StreamingDataset

from drpruning_composer.atomic import atomic_directory
from drpruning_composer.data.prepare import (JSONL_SUFFIXES, MANIFEST, PrepareError, check_inputs, load_tokenizer,
                                             split_documents)

log = logging.getLogger(__name__)

FORMAT = 'instruct'
OVERLONG = ('truncate', 'reject')
TEMPLATE_ERRORS = ('skip', 'error')
Segments = list[tuple[str, bool, bool]]  # (text, in the loss, literal: special-token strings are text)
Example = tuple[np.ndarray, np.ndarray]  # (int32 token ids, uint8 loss mask)


def read_records(source: Path) -> Iterator[tuple[str, dict]]:
    """Yield (where, record) for every non-empty line of a task's .jsonl file(s), in sorted file order.

    A UTF-8 byte-order mark at the start of a file is ignored; a line that is not JSON is a PrepareError naming it.
    """
    files = [source] if source.is_file() else sorted(p for p in source.rglob('*') if p.suffix in JSONL_SUFFIXES)
    for path in files:
        with open(path, encoding='utf-8-sig') as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f'{path}:{line_number}'
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PrepareError(f'{where}: not a JSON line ({e.msg})') from None
                yield where, record


class TemplateRejection(PrepareError):
    """The chat template cannot render one conversation (it raised, or its turns do not form growing prefixes); the
    message names the file and line, and gives the template's own message."""


def _plain(messages: list[dict], eos: str) -> Segments:
    segments: Segments = []
    for m in messages:
        if m['role'] == 'assistant':
            segments += [('assistant: ', False, True), (m['content'], True, True), (eos, True, False)]
        else:
            segments.append((f"{m['role']}: {m['content']}\n", False, True))
    return segments


def special_token_strings(tokenizer: Any) -> list[str]:
    """The strings of the tokenizer's special tokens (EOS, chat markers, ...), longest first."""
    strings = set(getattr(tokenizer, 'all_special_tokens', []) or [])
    strings |= {str(t) for t in (getattr(tokenizer, 'added_tokens_decoder', None) or {}).values()
                if getattr(t, 'special', False)}
    return sorted((s for s in strings if s), key=lambda s: (-len(s), s))


def _turns(messages: list[dict], tokenizer: Any, where: str) -> list[tuple[str, bool]]:
    """(text, in the loss) pieces of a conversation rendered by the chat template: each assistant turn's response is
    the text the template adds between the generation prompt and the turn."""
    pieces: list[tuple[str, bool]] = []
    done = ''
    for i, m in enumerate(messages):
        if m['role'] != 'assistant':
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise TemplateRejection(f'{where}: the chat template does not render this conversation as a growing '
                                    'prefix, so its responses cannot be masked')
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return pieces


def split_at_specials(pieces: Sequence[tuple[str, bool]], specials: Sequence[str],
                      contents: dict[str, str] | None = None) -> Segments:
    """Segments of rendered template text: each special-token string in it is a special token, the text between is
    literal. `contents` maps placeholders in the text to message contents, filled in after the split so that a
    special-token string inside a message stays text."""
    pattern = re.compile('(' + '|'.join(re.escape(s) for s in specials) + ')') if specials else None
    segments: Segments = []
    for text, in_loss in pieces:
        parts = pattern.split(text) if pattern else [text]
        for k, part in enumerate(parts):
            if k % 2:
                segments.append((part, in_loss, False))
                continue
            for mark, content in (contents or {}).items():
                part = part.replace(mark, content)
            if part:
                segments.append((part, in_loss, True))
    return segments


def _templated(messages: list[dict], tokenizer: Any, where: str) -> Segments:
    """Segments of a conversation rendered by the chat template: the template's special tokens are special, every
    message's content is literal text (special-token strings in it stay text).

    The contents are replaced by placeholders for rendering, so that the template's own special tokens can be told
    from strings the user wrote; if the template changes contents (the placeholders do not give back the real
    rendering), a conversation without special-token strings is split at the specials of its real rendering, and one
    with them is a TemplateRejection. A template that raises (jinja2 TemplateError, e.g. Llama-2's "roles must
    alternate") is a TemplateRejection naming `where` and the template's message.
    """
    from jinja2.exceptions import TemplateError

    specials = special_token_strings(tokenizer)
    try:
        real = _turns(messages, tokenizer, where)
    except TemplateError as e:
        raise TemplateRejection(f'{where}: the chat template rejects this conversation: {e}') from None
    real_text = ''.join(text for text, _ in real)
    contents = {f'\ue000{i}\ue001': m['content'] for i, m in enumerate(messages)}
    if not any('\ue000' in m['content'] for m in messages):
        try:
            masked = _turns([dict(m, content=mark) for m, mark in zip(messages, contents)], tokenizer, where)
        except Exception:  # the template inspects contents: fall back to the real rendering
            masked = None
        if masked is not None:
            segments = split_at_specials(masked, specials, contents)
            if ''.join(text for text, _, _ in segments) == real_text:
                return segments
    quoted = sorted({s for m in messages for s in specials if s in m['content']})
    if quoted:
        raise TemplateRejection(f'{where}: a message contains the special token string(s) {quoted}, and the chat '
                                'template changes message contents, so they cannot be kept as text')
    return split_at_specials(real, specials)


def segments_of(record: Any, where: str, tokenizer: Any) -> Segments:
    """A record as (text, in the loss, literal) segments; raises PrepareError naming `where` for a malformed record,
    TemplateRejection for a conversation the chat template cannot render.

    Everything the user wrote is literal (special-token parsing off); the EOS ending a response and the special
    tokens a chat template adds are special.
    """
    eos = tokenizer.eos_token
    if isinstance(record, dict) and isinstance(record.get('prompt'), str) and isinstance(record.get('response'), str):
        if not record['response']:
            raise PrepareError(f'{where}: empty "response"')
        return [(record['prompt'], False, True), (record['response'], True, True), (eos, True, False)]
    messages = record.get('messages') if isinstance(record, dict) else None
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get('role'), str) and isinstance(m.get('content'), str)
            for m in messages):
        raise PrepareError(f'{where}: expected string fields "prompt" and "response", or "messages": a list of '
                           '{"role": ..., "content": ...}')
    if not any(m['role'] == 'assistant' and m['content'] for m in messages):
        raise PrepareError(f'{where}: "messages" has no non-empty assistant message (nothing to learn)')
    if getattr(tokenizer, 'chat_template', None):
        return _templated(messages, tokenizer, where)
    return _plain(messages, eos)


def tokenize_segments(segments: Segments, tokenizer: Any) -> Example:
    """Token ids and loss mask of concatenated, separately tokenized segments (literal ones with special-token
    parsing off)."""
    ids: list[int] = []
    mask: list[int] = []
    for text, in_loss, literal in segments:
        piece = tokenizer(text, add_special_tokens=False, split_special_tokens=literal)['input_ids'] if text else []
        ids += piece
        mask += [int(in_loss)] * len(piece)
    return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.uint8)


def pack_examples(examples: Sequence[Example], max_seq_len: int) -> list[Example]:
    """Consecutive examples joined greedily into rows of at most `max_seq_len` tokens (none is split)."""
    rows: list[Example] = []
    ids: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    length = 0
    for tokens, mask in examples:
        if ids and length + len(tokens) > max_seq_len:
            rows.append((np.concatenate(ids), np.concatenate(masks)))
            ids, masks, length = [], [], 0
        ids.append(tokens)
        masks.append(mask)
        length += len(tokens)
    if ids:
        rows.append((np.concatenate(ids), np.concatenate(masks)))
    return rows


def render_examples(part: Sequence[tuple[str, Any]], tokenizer: Any, template_errors: str, task: str,
                    split: str) -> tuple[list[Example], list[str], list[str]]:
    """Tokenized examples of (where, record) pairs, with their `where`, and the messages of those the chat template
    rejected (`template_errors='skip'`: each is logged as a warning, the first 10 one by one; `'error'`: the first
    raises PrepareError naming it). Malformed records raise PrepareError either way."""
    examples: list[Example] = []
    wheres: list[str] = []
    rejected: list[str] = []
    for where, record in part:
        try:
            segments = segments_of(record, where, tokenizer)
        except TemplateRejection as e:
            if template_errors == 'error':
                raise PrepareError(f'task "{task}": {e} (pass --template-errors skip to leave such examples out)'
                                   ) from None
            rejected.append(str(e))
            if len(rejected) <= 10:
                log.warning('task "%s": %s example left out: %s', task, split, e)
            continue
        examples.append(tokenize_segments(segments, tokenizer))
        wheres.append(where)
    if len(rejected) > 10:
        log.warning('task "%s": %d %s examples left out in all: the chat template rejected them', task, len(rejected),
                    split)
    return examples, wheres, rejected


def fit_length(examples: Sequence[Example], wheres: Sequence[str], max_seq_len: int, overlong: str,
               task: str) -> tuple[list[Example], int, int]:
    """Examples cut to `max_seq_len` (`truncate`; those left with no response token are dropped) or an error naming
    the first overlong one (`reject`). Returns (kept, truncated, dropped)."""
    kept, truncated, dropped = [], 0, 0
    for (tokens, mask), where in zip(examples, wheres):
        if len(tokens) > max_seq_len:
            if overlong == 'reject':
                raise PrepareError(f'task "{task}": {where} has {len(tokens)} tokens, more than max_seq_len='
                                   f'{max_seq_len} (pass --overlong truncate to cut such examples)')
            tokens, mask = tokens[:max_seq_len], mask[:max_seq_len]
            truncated += 1
            if not mask[1:].any():  # position 0 is never predicted
                dropped += 1
                continue
        kept.append((tokens, mask))
    return kept, truncated, dropped


def _write(rows: Sequence[Example], out_dir: Path, compression: str | None) -> None:
    from streaming import MDSWriter

    columns = {'tokens': 'ndarray:int32', 'loss_mask': 'ndarray:uint8'}
    with MDSWriter(out=str(out_dir), columns=columns, compression=compression) as w:
        for tokens, mask in rows:
            w.write({'tokens': tokens, 'loss_mask': mask})


def prepare_instruct(
    sources: dict[str, Path],
    tokenizer_path: str | os.PathLike,
    out: str | os.PathLike,
    max_seq_len: int = 256,
    val_fraction: float = 0.05,
    seed: int = 17,
    overlong: str = 'truncate',
    pack: bool = False,
    compression: str | None = None,
    overwrite: bool = False,
    template_errors: str = 'skip',
) -> dict:
    """Tokenize every task into `out` (atomically) and return the manifest. Raises PrepareError on bad input.

    `template_errors`: what a conversation the chat template cannot render does: `skip` (it is left out, counted as
    `rejected` in the manifest, with a warning naming its file and line and the template's message; a split left with
    no example is an error) or `error` (preparation stops, naming it).
    """
    out = Path(out)
    if overlong not in OVERLONG:
        raise PrepareError(f'--overlong must be one of {OVERLONG}, got {overlong!r}')
    if template_errors not in TEMPLATE_ERRORS:
        raise PrepareError(f'--template-errors must be one of {TEMPLATE_ERRORS}, got {template_errors!r}')
    check_inputs(sources, out, max_seq_len, val_fraction, overwrite, 'task')
    tokenizer = load_tokenizer(tokenizer_path)

    with atomic_directory(out, overwrite=overwrite) as tmp:
        manifest: dict = {'format': FORMAT, 'max_seq_len': max_seq_len, 'seed': seed, 'val_fraction': val_fraction,
                          'overlong': overlong, 'template_errors': template_errors, 'pack': pack,
                          'eos_token_id': tokenizer.eos_token_id,
                          'vocab_size': len(tokenizer), 'domains': {}}
        for name in sorted(sources):
            records = list(read_records(sources[name]))
            if len(records) < 2:
                raise PrepareError(f'task "{name}": source {sources[name]} has {len(records)} examples; need at least '
                                   '2 (one for train, one for val)')
            entry: dict = {'source': str(sources[name])}
            for split, part in zip(('train', 'val'), split_documents(records, val_fraction, seed)):
                examples, wheres, rejected = render_examples(part, tokenizer, template_errors, name, split)
                if not examples:
                    raise PrepareError(f'task "{name}": all {len(part)} {split} examples were rejected by the chat '
                                       f'template, e.g. {rejected[0]}')
                examples, truncated, dropped = fit_length(examples, wheres, max_seq_len, overlong, name)
                if not examples:
                    raise PrepareError(f'task "{name}": no {split} example keeps a response token within '
                                       f'max_seq_len={max_seq_len}')
                rows = pack_examples(examples, max_seq_len) if pack and split == 'train' else examples
                _write(rows, tmp / name / split, compression)
                entry[split] = {'examples': len(examples), 'samples': len(rows),
                                'tokens': int(sum(len(t) for t, _ in rows)),
                                'response_tokens': int(sum(int(m.sum()) for _, m in rows)),
                                'truncated': truncated, 'dropped': dropped, 'rejected': len(rejected)}
                if truncated:
                    log.warning('task "%s": %d %s examples longer than max_seq_len=%d were truncated (%d dropped: no '
                                'response token left)', name, truncated, split, max_seq_len, dropped)
            manifest['domains'][name] = entry
            log.info('task "%s": %s', name, entry)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + '\n')
    return manifest


def is_instruct(data: str | os.PathLike) -> bool:
    """Whether a prepared folder holds instruction data (`prepare_instruct`) rather than token shards."""
    return json.loads((Path(data) / MANIFEST).read_text()).get('format') == FORMAT


def read_examples(data: str | os.PathLike, task: str, split: str) -> list[Example]:
    """Every (tokens, loss_mask) row of one task's split (uncompressed MDS)."""
    from streaming.base.format import reader_from_json

    root = Path(data) / task / split
    rows = []
    for shard_info in json.loads((root / 'index.json').read_text())['shards']:
        shard = reader_from_json(str(root.parent), split, shard_info)
        rows += [(shard[i]['tokens'], shard[i]['loss_mask']) for i in range(shard.samples)]
    return rows


class ResponseCollator:
    """Right-pads (tokens, loss_mask) rows to the longest in the batch: `input_ids`, `attention_mask`, and `labels`
    equal to the token on response positions and -100 on prompt tokens and padding (not shifted: the model shifts)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = int(pad_token_id)

    def __call__(self, rows: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        width = max(len(r['tokens']) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r['tokens'])
            input_ids[i, :n] = r['tokens']
            attention_mask[i, :n] = 1
            labels[i, :n] = torch.where(r['loss_mask'].bool(), r['tokens'], -100)
        return {'input_ids': input_ids, 'attention_mask': attention_mask, 'labels': labels}


def as_tensors(sample: dict[str, Any], max_seq_len: int, where: str) -> dict[str, torch.Tensor]:
    """An MDS instruction row as int64 tensors; a row longer than `max_seq_len` is an error (prepare with it)."""
    tokens = np.asarray(sample['tokens'])
    if tokens.shape[0] > max_seq_len:
        raise ValueError(f'{where} has {tokens.shape[0]} tokens, more than max_seq_len={max_seq_len}; prepare the '
                         'data with the same --max-seq-len')
    return {'tokens': torch.from_numpy(tokens.astype(np.int64)),
            'loss_mask': torch.from_numpy(np.asarray(sample['loss_mask']).astype(np.int64))}


class InstructRows(StreamingDataset):
    """A StreamingDataset of one task's split whose items are `as_tensors` rows."""

    def __init__(self, max_seq_len: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.max_seq_len = int(max_seq_len)
        self.where = f"{kwargs.get('local')}/{kwargs.get('split')}"

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return as_tensors(super().__getitem__(index), self.max_seq_len, f'sample {index} of {self.where}')


def pad_token_id(tokenizer: Any) -> int:
    """The id padded rows are filled with (masked out of attention and loss, so any id would do)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def build_instruct_dataloader(
    tokenizer: Any,
    device_batch_size: int,
    dataset: dict[str, Any],
    drop_last: bool = False,
    num_workers: int = 0,
    pin_memory: bool = False,
    prefetch_factor: int | None = 2,
    persistent_workers: bool = False,
    timeout: float = 0,
) -> Any:
    """llm-foundry dataloader `instruct`: one task's split of prepared instruction data, read once in order (an eval
    loader: one per task, labelled by task). `dataset` keys: `local` (the task's folder), `split`, `max_seq_len`;
    other keys go to the StreamingDataset. Batches: `ResponseCollator`'s, so the eval loss is response-only."""
    from llmfoundry import registry
    from llmfoundry.utils.registry_utils import construct_from_registry
    from torch.utils.data import DataLoader

    config = dict(dataset)
    missing = [k for k in ('local', 'max_seq_len') if k not in config]
    if missing:
        raise ValueError(f'instruct: missing dataset keys {missing}')
    if tokenizer is None:
        raise ValueError('instruct needs a tokenizer (for the padding token)')
    max_seq_len = int(config.pop('max_seq_len'))
    local, split = config.pop('local'), config.pop('split', 'val')
    config.setdefault('shuffle', False)

    from drpruning_composer.data.mixture import streaming_dataset  # no shared-memory prefix race

    rows = streaming_dataset(InstructRows, max_seq_len=max_seq_len, local=local, split=split,
                             batch_size=int(device_batch_size), **config)
    loader = DataLoader(rows, batch_size=int(device_batch_size), collate_fn=ResponseCollator(pad_token_id(tokenizer)),
                        drop_last=drop_last, num_workers=num_workers, pin_memory=pin_memory,
                        prefetch_factor=prefetch_factor if num_workers > 0 else None,
                        persistent_workers=persistent_workers and num_workers > 0, timeout=timeout)
    return construct_from_registry(name='data_spec', registry=registry.data_specs, partial_function=False,
                                   kwargs={'dl': loader, 'dataset_cfg': dataset})
