"""Turn one text source per domain into per-domain MDS shards of fixed-length token samples.

Output layout (what the `text` and `dynamic_mixture` loaders read)::

    OUT/{domain}/train/   MDS shards, column `tokens` (int32, length max_seq_len)
    OUT/{domain}/val/
    OUT/manifest.json     documents, tokens and samples per domain and split

Documents are split between train and val *by document* (seeded shuffle), kept in that shuffled order, joined with
EOS and cut into `max_seq_len` samples; the tail that does not fill a sample is dropped. The val rows are then
written in a seeded random order, so the first rows, all that a capped evaluation reads, are a uniform sample of the
split's rows. Documents are tokenized with special-token parsing off, so a document quoting a special token's string
(``<|endoftext|>``) keeps it as text. Everything is written into a temporary folder beside OUT and renamed at the
end, so a failure never leaves a half-written OUT.

CLI (:mod:`drpruning_composer.data.cli`): ``drpruning-prepare --input ROOT --tokenizer TOK --out OUT`` (each
sub-folder of ROOT is a domain) or ``--domain NAME=PATH`` (repeatable). With ``--instruct`` the sources are
instruction tasks (prompt/response or chat messages) and the output has a loss mask: see
:mod:`drpruning_composer.data.instruct`.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence, TypeVar

import numpy as np

from drpruning_composer.atomic import atomic_directory

log = logging.getLogger(__name__)

JSONL_SUFFIXES = ('.jsonl', '.json')
MANIFEST = 'manifest.json'
T = TypeVar('T')


class PrepareError(ValueError):
    """Bad input to data preparation; the message names the culprit."""


@dataclass
class SourceStats:
    """What reading one domain's source found: files read and skipped, JSON lines skipped, a few examples of each."""

    files_read: int = 0
    files_skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    lines_skipped: int = 0
    skipped_line_examples: list[str] = field(default_factory=list)

    def skip(self, path: Path, why: str) -> None:
        """Count a whole file that yields no document (`why`: the reason, for the warning)."""
        self.files_skipped += 1
        if len(self.skipped_examples) < 5:
            self.skipped_examples.append(f'{path} ({why})')

    def skip_line(self, path: Path, line_number: int, why: str) -> None:
        """Count one unusable line of a JSON lines file whose other lines are read."""
        self.lines_skipped += 1
        if len(self.skipped_line_examples) < 5:
            self.skipped_line_examples.append(f'{path}:{line_number} ({why})')


def decode_text(raw: bytes) -> str:
    """UTF-8 text of a file's bytes, without a leading byte-order mark (editors on Windows write one).

    Raises UnicodeDecodeError for bytes that are not UTF-8.
    """
    return raw.decode('utf-8-sig')


def _read_text_file(path: Path, stats: SourceStats) -> str | None:
    try:
        raw = path.read_bytes()
    except OSError as e:
        stats.skip(path, f'unreadable: {e.strerror}')
        return None
    if b'\x00' in raw:
        stats.skip(path, 'binary')
        return None
    try:
        return decode_text(raw)
    except UnicodeDecodeError:
        stats.skip(path, 'not UTF-8')
        return None


def parse_json_lines(text: str, text_field: str) -> tuple[list[str], list[tuple[int, str]]]:
    """The documents of a JSON lines text, and the (1-based line number, reason) of every line that is not usable.

    A usable line is a JSON object whose `text_field` is a string; empty strings are no document and no error.
    Blank lines are ignored.
    """
    docs: list[str] = []
    bad: list[tuple[int, str]] = []
    for line_number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            bad.append((line_number, f'not JSON: {e.msg}'))
            continue
        if not isinstance(record, dict) or text_field not in record:
            bad.append((line_number, f'no "{text_field}" field'))
        elif not isinstance(record[text_field], str):
            bad.append((line_number, f'"{text_field}" is not a string'))
        elif record[text_field]:
            docs.append(record[text_field])
    return docs, bad


def iter_documents(source: Path, text_field: str, stats: SourceStats) -> Iterator[str]:
    """Yield the documents of one domain: each line of a .jsonl file, or each other file as a whole.

    Files are visited in sorted order so the result is deterministic. Unreadable, binary or non-UTF-8 files, and
    JSON lines files with no usable line, are skipped and counted in `stats`; in a JSON lines file with some usable
    lines, each unusable line is skipped and counted (`stats.lines_skipped`, with file and line number). A UTF-8
    byte-order mark is ignored.
    """
    files = [source] if source.is_file() else sorted(p for p in source.rglob('*') if p.is_file())
    for path in files:
        text = _read_text_file(path, stats)
        if text is None:
            continue
        if path.suffix in JSONL_SUFFIXES:
            docs, bad = parse_json_lines(text, text_field)
            if bad and len(bad) == sum(1 for line in text.splitlines() if line.strip()):
                stats.skip(path, f'not JSON lines with a "{text_field}" field: line {bad[0][0]}: {bad[0][1]}')
                continue
            for line_number, why in bad:
                stats.skip_line(path, line_number, why)
            stats.files_read += 1
            yield from docs
        else:
            stats.files_read += 1
            if text:
                yield text


def split_documents(docs: Sequence[T], val_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Seeded split by document: (train, val), val with round(val_fraction * n) documents, at least one.

    Both splits come in the seeded random order, not the source's (often sorted by length, date or topic), so that
    neither split's shards hold long sorted runs.
    """
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(val_fraction * len(docs)))
    return [docs[i] for i in order[n_val:]], [docs[i] for i in order[:n_val]]


def pack_tokens(token_lists: Sequence[Sequence[int]], eos_id: int, max_seq_len: int) -> np.ndarray:
    """Join documents with EOS after each and cut into rows of `max_seq_len` (the incomplete tail is dropped)."""
    total = sum(len(t) + 1 for t in token_lists)
    stream = np.empty(total, dtype=np.int32)
    pos = 0
    for toks in token_lists:
        stream[pos:pos + len(toks)] = toks
        stream[pos + len(toks)] = eos_id
        pos += len(toks) + 1
    n = total // max_seq_len
    return stream[:n * max_seq_len].reshape(n, max_seq_len)


def shuffle_rows(rows: np.ndarray, seed: int) -> np.ndarray:
    """The rows of a split [n, seq] in a seeded random order (a row's tokens untouched).

    Evaluation reads a split's rows in order and a run with `eval_subset_num_batches` scores only the first ones, so
    val rows are written in this order: any prefix is then a uniform sample of rows. Shuffling documents is not
    enough, as one long document fills many consecutive rows: on the demo corpus the first 128 rows of c_headers,
    in shuffled document order, sat 0.38 nats below the split's mean (random 128-row subsets: std 0.067), and in
    source order the first 128 of records misjudged its loss change by 0.108 nats, 5x a random subset's std
    (docs/dro_update.md).
    """
    return rows[np.random.default_rng(seed).permutation(len(rows))]


def load_tokenizer(path: str | os.PathLike):
    """Load a local Hugging Face tokenizer folder and check it has an EOS token."""
    from transformers import AutoTokenizer

    if not Path(path, 'tokenizer_config.json').is_file() and not Path(path, 'tokenizer.json').is_file():
        raise PrepareError(f'--tokenizer {path}: not a local Hugging Face tokenizer folder')
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.eos_token_id is None:
        raise PrepareError(f'--tokenizer {path}: the tokenizer has no EOS token (needed to join documents)')
    return tok


def encode_text(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of raw texts, with special-token parsing off: a document that quotes a special token's string
    (e.g. ``<|endoftext|>``) keeps it as text, so the only EOS in prepared data are the ones preparation adds.

    `tokenizer`: a Hugging Face tokenizer (fast or slow); no BOS/EOS is added.
    """
    return tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True, verbose=False)['input_ids']


def _tokenize(tokenizer: Any, docs: Sequence[str], desc: str) -> list[list[int]]:
    from tqdm.auto import tqdm

    out: list[list[int]] = []
    batch = 256
    for i in tqdm(range(0, len(docs), batch), desc=desc, unit='batch', leave=False, disable=None):
        out.extend(encode_text(tokenizer, docs[i:i + batch]))
    return out


def _write_mds(rows: np.ndarray, out_dir: Path, compression: str | None) -> None:
    from streaming import MDSWriter

    with MDSWriter(out=str(out_dir), columns={'tokens': 'ndarray:int32'}, compression=compression) as w:
        for row in rows:
            w.write({'tokens': row})


def check_inputs(sources: dict[str, Path], out: Path, max_seq_len: int, val_fraction: float, overwrite: bool,
                 kind: str) -> None:
    """The checks every preparation makes before reading anything (`kind`: what a source is, for the messages)."""
    if not sources:
        raise PrepareError(f'no {kind}s given')
    if max_seq_len < 2:
        raise PrepareError(f'--max-seq-len must be >= 2, got {max_seq_len}')
    if not 0 < val_fraction < 1:
        raise PrepareError(f'--val-fraction must be in (0, 1), got {val_fraction}')
    if out.exists() and not overwrite:
        raise PrepareError(f'--out {out} already exists (pass --overwrite to replace it)')
    for name, src in sources.items():
        if not src.exists():
            raise PrepareError(f'{kind} "{name}": source {src} does not exist')


def prepare(
    sources: dict[str, Path],
    tokenizer_path: str | os.PathLike,
    out: str | os.PathLike,
    max_seq_len: int = 256,
    val_fraction: float = 0.05,
    seed: int = 17,
    text_field: str = 'text',
    compression: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Tokenize every domain into `out` and return the manifest. Raises PrepareError on bad input."""
    out = Path(out)
    check_inputs(sources, out, max_seq_len, val_fraction, overwrite, 'domain')
    tokenizer = load_tokenizer(tokenizer_path)

    with atomic_directory(out, overwrite=overwrite) as tmp:
        manifest: dict = {
            'max_seq_len': max_seq_len, 'seed': seed, 'val_fraction': val_fraction,
            'eos_token_id': tokenizer.eos_token_id, 'vocab_size': len(tokenizer), 'domains': {},
        }
        for name in sorted(sources):
            stats = SourceStats()
            docs = list(iter_documents(sources[name], text_field, stats))
            if stats.files_skipped:
                log.warning('domain "%s": skipped %d unreadable/binary/malformed files, e.g. %s',
                            name, stats.files_skipped, stats.skipped_examples)
            if stats.lines_skipped:
                log.warning('domain "%s": skipped %d unusable lines of JSON lines files (their other lines are read), '
                            'e.g. %s', name, stats.lines_skipped, stats.skipped_line_examples)
            if len(docs) < 2:
                raise PrepareError(f'domain "{name}": source {sources[name]} has {len(docs)} usable documents; '
                                   'need at least 2 (one for train, one for val)')
            entry: dict = {'source': str(sources[name]), 'files_read': stats.files_read,
                           'files_skipped': stats.files_skipped, 'lines_skipped': stats.lines_skipped}
            for split, split_docs in zip(('train', 'val'), split_documents(docs, val_fraction, seed)):
                ids = _tokenize(tokenizer, split_docs, f'{name}/{split}')
                rows = pack_tokens(ids, tokenizer.eos_token_id, max_seq_len)
                if split == 'val':
                    rows = shuffle_rows(rows, seed)
                if len(rows) == 0:
                    raise PrepareError(
                        f'domain "{name}": the {split} split has {sum(len(t) + 1 for t in ids)} tokens, '
                        f'fewer than one sample of max_seq_len={max_seq_len}')
                _write_mds(rows, tmp / name / split, compression)
                entry[split] = {'documents': len(split_docs), 'tokens': int(rows.size), 'samples': int(len(rows))}
            manifest['domains'][name] = entry
            log.info('domain "%s": %s', name, entry)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + '\n')
    return manifest


def parse_sources(input_root: str | None, domain_args: Sequence[str]) -> dict[str, Path]:
    """Domains from `--input ROOT` (one sub-folder per domain) and `--domain NAME=PATH` flags."""
    sources: dict[str, Path] = {}
    if input_root is not None:
        root = Path(input_root)
        if not root.is_dir():
            raise PrepareError(f'--input {root} is not a folder')
        for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith('.')):
            sources[sub.name] = sub
        if not sources:
            raise PrepareError(f'--input {root} has no domain sub-folders')
    for arg in domain_args:
        name, sep, path = arg.partition('=')
        if not sep or not name or not path:
            raise PrepareError(f'--domain {arg!r}: expected NAME=PATH')
        if name in sources:
            raise PrepareError(f'--domain {name}: domain given twice')
        sources[name] = Path(path)
    return sources


def format_manifest(manifest: dict) -> str:
    """Documents (or examples) and tokens per domain (or task) and split, one line per domain."""
    lines = []
    if manifest.get('format') == 'instruct':
        for name, d in manifest['domains'].items():
            lines.append(f"{name:>12}: " + ' | '.join(
                f"{split} {d[split]['examples']:>6} examples {d[split]['tokens']:>9} tokens "
                f"({d[split]['response_tokens']} in the loss, {d[split]['truncated']} truncated, "
                f"{d[split].get('rejected', 0)} rejected by the chat template)"
                for split in ('train', 'val')))
        return '\n'.join(lines)
    for name, d in manifest['domains'].items():
        lines.append(f"{name:>12}: train {d['train']['documents']:>6} docs {d['train']['tokens']:>10} tokens | "
                     f"val {d['val']['documents']:>5} docs {d['val']['tokens']:>9} tokens | "
                     f"skipped files {d['files_skipped']}, lines {d.get('lines_skipped', 0)}")
    return '\n'.join(lines)
