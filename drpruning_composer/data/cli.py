"""`drpruning-prepare`: token data (:mod:`drpruning_composer.data.prepare`) or, with ``--instruct``, instruction
data (:mod:`drpruning_composer.data.instruct`), one source per domain or task, into per-domain MDS shards."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from drpruning_composer.data.instruct import prepare_instruct
from drpruning_composer.data.prepare import PrepareError, format_manifest, parse_sources, prepare


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog='drpruning-prepare', description=__doc__.split('\n\n')[0])
    p.add_argument('--input', help='folder with one sub-folder per domain (.jsonl files with a text field, '
                                   'or plain text files)')
    p.add_argument('--domain', action='append', default=[], metavar='NAME=PATH',
                   help='a domain and its source folder or file (repeatable)')
    p.add_argument('--tokenizer', required=True, help='local Hugging Face tokenizer folder')
    p.add_argument('--out', required=True, help='output folder (created atomically)')
    p.add_argument('--max-seq-len', type=int, default=256)
    p.add_argument('--val-fraction', type=float, default=0.05)
    p.add_argument('--seed', type=int, default=17)
    p.add_argument('--text-field', default='text', help='JSON field holding the text in .jsonl files')
    p.add_argument('--compression', default=None, choices=[None, 'zstd'])
    p.add_argument('--instruct', action='store_true',
                   help='instruction data: .jsonl with prompt/response or messages, one source per task')
    p.add_argument('--overlong', default='truncate', choices=['truncate', 'reject'],
                   help='--instruct: an example longer than --max-seq-len is cut (and counted) or an error')
    p.add_argument('--template-errors', default='skip', choices=['skip', 'error'],
                   help='--instruct: a conversation the chat template cannot render (it raises, e.g. two user turns '
                        'in a row) is left out, counted and warned about with its file and line, or an error')
    p.add_argument('--pack', action='store_true', help='--instruct: pack consecutive train examples into rows')
    p.add_argument('--overwrite', action='store_true')
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')
    try:
        sources = parse_sources(args.input, args.domain)
        if args.instruct:
            manifest = prepare_instruct(sources, args.tokenizer, args.out, args.max_seq_len, args.val_fraction,
                                        args.seed, args.overlong, args.pack, args.compression, args.overwrite,
                                        template_errors=args.template_errors)
        else:
            manifest = prepare(sources, args.tokenizer, args.out, args.max_seq_len, args.val_fraction, args.seed,
                               args.text_field, args.compression, args.overwrite)
    except PrepareError as e:
        print(f'drpruning-prepare: error: {e}', file=sys.stderr)
        return 2
    print(format_manifest(manifest))
    return 0


if __name__ == '__main__':
    sys.exit(main())
