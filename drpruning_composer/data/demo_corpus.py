"""The embedded demo: a multi-domain corpus, a BPE tokenizer and a tiny Llama config, built offline.

The corpus comes only from files every installation of this package has (the Python installation and its
site-packages, where the pinned stack lives), so the demo needs no download. Four domains of clearly different
difficulty:

- ``python``: standard-library Python source (``lib/python3.X/**/*.py``, tests excluded).
- ``c_headers``: C/C++ headers of CPython (``include/python3.X``) and of the installed torch (``torch/include``).
- ``prose``: English documentation: ``pydoc_data`` topics and the long descriptions in packages' ``METADATA``.
- ``records``: structured data: ``RECORD`` CSV manifests and ``*.json`` files of installed packages.

Files are visited in sorted order and each domain is cut at a fixed character budget, so the corpus is
deterministic for a given installation. The budgets are skewed like real pretraining corpora (RedPajama:
CommonCrawl 67%, ArXiv 2.5%): about 60% of the tokens are ``records`` and 8% ``prose``, which is where uneven
degradation under pruning, and a data-mixing rule's effect on it, can show. Documents are written RedPajama-style as ``corpus/{domain}/*.jsonl``
and go through the same preparation path as user data (:mod:`drpruning_composer.data.prepare`).
"""

from __future__ import annotations

import argparse
import email
import json
import sys
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator

from drpruning_composer.data.prepare import format_manifest, prepare

DOMAINS = ('c_headers', 'prose', 'python', 'records')
EOS = '<|endoftext|>'
PAD = '<|pad|>'


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()['purelib'])


def _read(path: Path, max_chars: int) -> str | None:
    try:
        text = path.read_text(encoding='utf-8')
    except (OSError, UnicodeDecodeError):
        return None
    return text[:max_chars] if text.strip() else None


def _files(root: Path, pattern: str) -> list[Path]:
    """Sorted matching files, leaving out this package's own metadata (it embeds the README, which changes)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob(pattern) if p.is_file() and not any(
        part.startswith(('drpruning_composer', '__editable__')) for part in p.relative_to(root).parts))


def python_docs() -> Iterator[str]:
    stdlib = Path(sysconfig.get_paths()['stdlib'])
    for p in _files(stdlib, '*.py'):
        rel = p.relative_to(stdlib).parts
        if rel[0] in ('site-packages', 'test', 'idlelib') or 'tests' in rel:
            continue
        if (doc := _read(p, 20_000)) is not None:
            yield doc


def c_header_docs() -> Iterator[str]:
    roots = [Path(sysconfig.get_paths()['include']), _site_packages() / 'torch' / 'include']
    for root in roots:
        for p in _files(root, '*.h'):
            if (doc := _read(p, 20_000)) is not None:
                yield doc


def prose_docs() -> Iterator[str]:
    import pydoc_data.topics

    for name in sorted(pydoc_data.topics.topics):
        yield pydoc_data.topics.topics[name]
    for p in _files(_site_packages(), 'METADATA'):
        if (raw := _read(p, 200_000)) is None:
            continue
        body = email.message_from_string(raw).get_payload()
        if isinstance(body, str) and len(body) > 500:
            yield body[:20_000]


def record_docs() -> Iterator[str]:
    site = _site_packages()
    for p in _files(site, 'RECORD'):
        if (doc := _read(p, 20_000)) is not None:
            yield doc
    for p in _files(site, '*.json'):
        if (doc := _read(p, 20_000)) is not None:
            yield doc


SOURCES = {'c_headers': c_header_docs, 'prose': prose_docs, 'python': python_docs, 'records': record_docs}
# Characters per domain at scale 1 (skewed, see the module docstring).
CHAR_BUDGETS = {'c_headers': 1_500_000, 'prose': 600_000, 'python': 1_000_000, 'records': 3_000_000}


def take(docs: Iterable[str], char_budget: int) -> list[str]:
    """The first documents whose total length stays within `char_budget`."""
    out, used = [], 0
    for d in docs:
        if used + len(d) > char_budget:
            break
        out.append(d)
        used += len(d)
    return out


def write_corpus(out: Path, scale: float) -> dict[str, int]:
    """Write ``out/{domain}/part-00000.jsonl`` (``CHAR_BUDGETS`` times `scale`); return documents per domain."""
    counts = {}
    for name in DOMAINS:
        docs = take(SOURCES[name](), int(CHAR_BUDGETS[name] * scale))
        (out / name).mkdir(parents=True, exist_ok=True)
        with open(out / name / 'part-00000.jsonl', 'w', encoding='utf-8') as f:
            for d in docs:
                f.write(json.dumps({'text': d}) + '\n')
        counts[name] = len(docs)
    return counts


def train_tokenizer(corpus: Path, out: Path, vocab_size: int) -> None:
    """Train a byte-level BPE tokenizer on the corpus and save it as a Hugging Face tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def texts() -> Iterator[str]:
        for path in sorted(corpus.glob('*/*.jsonl')):
            with open(path, encoding='utf-8') as f:
                for line in f:
                    yield json.loads(line)['text']

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD,
                                   unk_token=None, model_max_length=4096,
                                   model_input_names=['input_ids', 'attention_mask'])
    fast.save_pretrained(str(out))


def tiny_llama_config(vocab_size: int, eos_id: int, pad_id: int, **overrides) -> dict:
    """A 4-layer Llama with grouped-query attention (8 query heads, 4 KV heads), ~3M non-embedding params."""
    return {**{
        'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'vocab_size': vocab_size,
        'hidden_size': 256, 'intermediate_size': 704, 'num_hidden_layers': 4, 'num_attention_heads': 8,
        'num_key_value_heads': 4, 'head_dim': 32, 'max_position_embeddings': 1024, 'rms_norm_eps': 1e-5,
        'rope_theta': 10000.0, 'hidden_act': 'silu', 'tie_word_embeddings': False, 'initializer_range': 0.02,
        'attention_bias': False, 'mlp_bias': False, 'bos_token_id': eos_id, 'eos_token_id': eos_id,
        'pad_token_id': pad_id, 'torch_dtype': 'float32',
    }, **overrides}


def build(out: str | Path, scale: float = 1.0, vocab_size: int = 4096, max_seq_len: int = 256,
          seed: int = 17, model_overrides: dict | None = None, val_fraction: float = 0.1) -> dict:
    """Build corpus, tokenizer, MDS data and tiny-model config under `out`; return the data manifest.

    `scale` multiplies every domain's character budget; `val_fraction` of each domain's documents go to val (10%,
    so that the smallest domain's val split still holds a few dozen sequences). Layout: ``corpus/`` (jsonl), ``tokenizer/``, ``data/`` (MDS + manifest.json), ``tiny_llama/`` (config.json and
    tokenizer files: the `pretrained_model_name_or_path` of the source model's random init).
    """
    out = Path(out)
    corpus = out / 'corpus'
    write_corpus(corpus, scale)
    train_tokenizer(corpus, out / 'tokenizer', vocab_size)
    manifest = prepare({d: corpus / d for d in DOMAINS}, out / 'tokenizer', out / 'data', max_seq_len=max_seq_len,
                       val_fraction=val_fraction, seed=seed, overwrite=True)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out / 'tokenizer'), local_files_only=True)
    (out / 'tiny_llama').mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out / 'tiny_llama'))
    cfg = tiny_llama_config(len(tok), tok.eos_token_id, tok.pad_token_id, **(model_overrides or {}))
    (out / 'tiny_llama' / 'config.json').write_text(json.dumps(cfg, indent=2) + '\n')
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog='python -m drpruning_composer.data.demo_corpus', description=__doc__.split('\n')[0])
    p.add_argument('--out', default='demo')
    p.add_argument('--scale', type=float, default=1.0, help='multiplies every domain\'s character budget')
    p.add_argument('--vocab-size', type=int, default=4096)
    p.add_argument('--max-seq-len', type=int, default=256)
    args = p.parse_args(argv)
    manifest = build(args.out, args.scale, args.vocab_size, args.max_seq_len)
    print(format_manifest(manifest))
    return 0


if __name__ == '__main__':
    sys.exit(main())
