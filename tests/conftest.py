"""Shared fixtures: a small copy of the embedded demo (corpus, tokenizer, MDS data, tiny Llama config)."""

import os
from pathlib import Path

import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ('c_headers', 'prose', 'python', 'records')
TINY_MODEL = {'hidden_size': 64, 'intermediate_size': 128, 'num_hidden_layers': 2, 'num_attention_heads': 4,
              'num_key_value_heads': 2, 'head_dim': 16}


@pytest.fixture(scope='session')
def tiny_demo(tmp_path_factory) -> Path:
    """`demo_corpus.build` at a small size: the same layout `make demo` makes, in seconds."""
    from drpruning_composer.data.demo_corpus import build

    out = tmp_path_factory.mktemp('demo')
    build(out, chars_per_domain=200_000, vocab_size=512, max_seq_len=64, model_overrides=TINY_MODEL)
    return out
