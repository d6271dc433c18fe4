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
    build(out, scale=0.1, vocab_size=512, max_seq_len=64, model_overrides=TINY_MODEL)
    return out
TINY_TARGET = {'num_hidden_layers': 1, 'hidden_size': 48, 'num_attention_heads': 2, 'num_key_value_heads': 1,
               'intermediate_size': 64}


# The tiny fixture's source is a config without weights (`model.pretrained=false`); the pruning YAMLs' DRO reference
# (`teacher`: the source's loss) needs weights, so runs on it measure the excess against the dynamic reference.
NO_WEIGHTS_REFERENCE = 'callbacks.dro_reweight.reference_loss=dynamic'


def tiny_prune_overrides(demo: Path, save_folder: Path) -> list[str]:
    """yamls/demo/prune.yaml shrunk to the tiny fixture (random-init source): a few seconds per batch at most."""
    return [f'variables.demo={demo}', 'variables.max_seq_len=64', f'variables.source_model={demo}/tiny_llama',
            'model.pretrained=false', NO_WEIGHTS_REFERENCE, f'variables.save_folder={save_folder}', 'global_train_batch_size=4',
            'eval_subset_num_batches=1', 'eval_interval=2ba', *(f'algorithms.l0_mask.target.{k}={v}'
                                                                for k, v in TINY_TARGET.items())]


@pytest.fixture(autouse=True)
def release_streaming_shared_memory():
    """mosaicml-streaming keeps each dataset's shared memory open until the process exits (atexit holds it), which
    over a whole session exceeds the open-file limit; a test's datasets are done when it ends, so release theirs."""
    yield
    import gc

    from streaming.base.shared.memory import SharedMemory

    for obj in gc.get_objects():
        if type(obj) is SharedMemory:  # type(), not isinstance: it touches no lazy module attribute
            obj.cleanup()
