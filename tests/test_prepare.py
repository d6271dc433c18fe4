"""Data preparation: round trip, determinism, and every bad-input case."""

import json
from pathlib import Path

import numpy as np
import pytest

from drpruning_composer.data.cli import main
from drpruning_composer.data.prepare import (PrepareError, encode_text, pack_tokens, prepare, shuffle_rows,
                                            split_documents)
from drpruning_composer.evaluate import read_split


def _write_domain(root: Path, name: str, docs: list[str]) -> Path:
    (root / name).mkdir(parents=True)
    with open(root / name / 'a.jsonl', 'w') as f:
        for d in docs:
            f.write(json.dumps({'text': d}) + '\n')
    return root / name


def _docs(seed: int, n: int = 40) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ['alpha', 'beta', 'gamma', 'delta', 'def', 'return', '(x)', '{', '}', '\n']
    return [' '.join(rng.choice(words, size=rng.integers(5, 60))) for _ in range(n)]


@pytest.fixture
def sources(tmp_path):
    return {'code': _write_domain(tmp_path / 'in', 'code', _docs(0)),
            'text': _write_domain(tmp_path / 'in', 'text', _docs(1))}


def _all_rows(out: Path, domain: str, split: str) -> np.ndarray:
    return read_split(out, domain, split, max_samples=10**9)


def test_round_trip_decodes_to_input(tiny_demo, sources, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_demo / 'tokenizer'))
    out = tmp_path / 'out'
    assert main(['--input', str(tmp_path / 'in'), '--tokenizer', str(tiny_demo / 'tokenizer'), '--out', str(out),
                 '--max-seq-len', '32', '--val-fraction', '0.2']) == 0
    manifest = json.loads((out / 'manifest.json').read_text())
    for domain, src in sources.items():
        docs = [json.loads(line)['text'] for line in open(src / 'a.jsonl')]
        entry = manifest['domains'][domain]
        assert entry['train']['documents'] + entry['val']['documents'] == len(docs)
        for split in ('train', 'val'):
            rows = _all_rows(out, domain, split)
            assert rows.shape == (entry[split]['samples'], 32) and rows.size == entry[split]['tokens']
        train_text = tok.decode(_all_rows(out, domain, 'train').reshape(-1).tolist())
        pieces = train_text.split(tok.eos_token)
        # Every complete piece is one whole input document; only the tail is cut by the fixed length.
        assert all(p in docs for p in pieces[:-1]) and len(set(pieces[:-1])) == len(pieces) - 1
        assert any(d.startswith(pieces[-1]) for d in docs)
        # The val rows are the packed val documents (held out by document: none is in train), in a random order.
        _, val_docs = split_documents(docs, 0.2, 17)
        assert not set(val_docs) & set(pieces[:-1])
        packed = pack_tokens(encode_text(tok, val_docs), tok.eos_token_id, 32)
        np.testing.assert_array_equal(_all_rows(out, domain, 'val'), shuffle_rows(packed, 17))


def test_same_seed_gives_identical_shards(tiny_demo, sources, tmp_path):
    outs = []
    for i, seed in enumerate((3, 3, 4)):
        outs.append(tmp_path / f'out{i}')
        prepare(sources, tiny_demo / 'tokenizer', outs[-1], max_seq_len=16, val_fraction=0.25, seed=seed)
    shards = lambda o: {p.relative_to(o): p.read_bytes() for p in sorted(o.rglob('*.mds'))}  # noqa: E731
    assert shards(outs[0]) == shards(outs[1])
    assert shards(outs[0]) != shards(outs[2])


def test_split_order_is_random_not_the_sources():
    """Neither split keeps the source's document order (often sorted): over many seeds the position of a document
    in its split is uncorrelated with its position in the source (source order: 1.0)."""
    docs = list(range(200))
    corr = {'train': [], 'val': []}
    for seed in range(40):
        train, val = split_documents(docs, 0.25, seed)
        assert len(val) == 50 and sorted(train + val) == docs
        assert (train, val) == split_documents(docs, 0.25, seed)
        for split, part in (('train', train), ('val', val)):
            corr[split].append(np.corrcoef(np.arange(len(part)), part)[0, 1])
    for split, c in corr.items():
        assert abs(np.mean(c)) < 0.1, (split, np.mean(c))


def test_val_rows_are_a_uniform_order():
    """Any prefix of the val rows is a uniform sample: shuffle_rows keeps every row whole, is fixed by its seed, and
    over many seeds a row's new position is uncorrelated with its packed position (packed order: 1.0)."""
    rows = np.arange(300 * 4).reshape(300, 4)
    corr = []
    for seed in range(40):
        shuffled = shuffle_rows(rows, seed)
        np.testing.assert_array_equal(shuffled, shuffle_rows(rows, seed))
        assert sorted(map(tuple, shuffled)) == sorted(map(tuple, rows))
        corr.append(np.corrcoef(np.arange(len(rows)), shuffled[:, 0])[0, 1])
    assert abs(np.mean(corr)) < 0.05 and max(np.abs(corr)) < 0.3


def _assert_nothing_written(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f'.{out.name}.tmp-')]


def test_missing_and_empty_domain(tiny_demo, sources, tmp_path):
    out = tmp_path / 'out'
    with pytest.raises(PrepareError, match='domain "ghost": source .* does not exist'):
        prepare({**sources, 'ghost': tmp_path / 'nope'}, tiny_demo / 'tokenizer', out, max_seq_len=16)
    (tmp_path / 'in' / 'empty').mkdir()
    with pytest.raises(PrepareError, match='domain "empty".* 0 usable documents'):
        prepare({**sources, 'empty': tmp_path / 'in' / 'empty'}, tiny_demo / 'tokenizer', out, max_seq_len=16)
    _assert_nothing_written(tmp_path, out)


def test_domain_smaller_than_one_sample(tiny_demo, sources, tmp_path):
    out = tmp_path / 'out'
    small = _write_domain(tmp_path / 'in', 'small', ['a b', 'c d', 'e f'])
    with pytest.raises(PrepareError, match='domain "small": the train split has .* fewer than one sample'):
        prepare({**sources, 'small': small}, tiny_demo / 'tokenizer', out, max_seq_len=64)
    _assert_nothing_written(tmp_path, out)


def test_tokenizer_without_eos(tiny_demo, sources, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_demo / 'tokenizer'))
    tok.eos_token = None
    tok.save_pretrained(str(tmp_path / 'tok'))
    cfg = json.loads((tmp_path / 'tok' / 'tokenizer_config.json').read_text())
    cfg.pop('eos_token', None)
    (tmp_path / 'tok' / 'tokenizer_config.json').write_text(json.dumps(cfg))
    with pytest.raises(PrepareError, match='no EOS token'):
        prepare(sources, tmp_path / 'tok', tmp_path / 'out', max_seq_len=16)
    _assert_nothing_written(tmp_path, tmp_path / 'out')


def test_binary_and_unreadable_files_are_skipped_and_counted(tiny_demo, tmp_path, capsys):
    src = tmp_path / 'in' / 'mixed'
    src.mkdir(parents=True)
    for i, d in enumerate(_docs(2, 30)):
        (src / f'doc{i:02d}.txt').write_text(d)
    (src / 'blob.bin').write_bytes(b'\x00\x01\x02binary')
    (src / 'latin1.txt').write_bytes('caf\xe9'.encode('latin-1'))
    (src / 'broken.jsonl').write_text('not json at all\n{"x": 1}\n')  # no usable line: the file is skipped
    out = tmp_path / 'out'
    assert main(['--domain', f'mixed={src}', '--domain', f'copy={src}', '--tokenizer', str(tiny_demo / 'tokenizer'),
                 '--out', str(out), '--max-seq-len', '16']) == 0
    entry = json.loads((out / 'manifest.json').read_text())['domains']['mixed']
    assert entry['files_skipped'] == 3 and entry['files_read'] == 30 and entry['lines_skipped'] == 0
    assert 'skipped files 3, lines 0' in capsys.readouterr().out


def test_byte_order_mark_and_bad_lines_do_not_lose_a_file(tiny_demo, tmp_path, caplog):
    """A .jsonl (or text) file saved with a UTF-8 byte-order mark is read whole, without the mark; one unparsable
    or field-less line is skipped and counted, with a warning naming its file and line; the file's other lines stay."""
    src = tmp_path / 'in' / 'bom'
    src.mkdir(parents=True)
    docs = _docs(3, 20)
    (src / 'a.jsonl').write_bytes(b'\xef\xbb\xbf' + ''.join(json.dumps({'text': d}) + '\n' for d in docs).encode())
    lines = [json.dumps({'text': d}) for d in docs[:10]]
    lines[3] = '{"text": "cut off'
    lines[6] = json.dumps({'title': 'no text field'})
    (src / 'b.jsonl').write_text('\n'.join(lines) + '\n')
    (src / 'c.txt').write_bytes(b'\xef\xbb\xbfplain text with a mark')
    out = tmp_path / 'out'
    with caplog.at_level('WARNING'):
        manifest = prepare({'bom': src, 'copy': src}, tiny_demo / 'tokenizer', out, max_seq_len=16, val_fraction=0.2)
    entry = manifest['domains']['bom']
    assert entry['files_read'] == 3 and entry['files_skipped'] == 0 and entry['lines_skipped'] == 2
    assert entry['train']['documents'] + entry['val']['documents'] == 20 + 8 + 1
    assert f'{src / "b.jsonl"}:4 (not JSON' in caplog.text and f'{src / "b.jsonl"}:7 (no "text" field)' in caplog.text
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_demo / 'tokenizer'))
    text = ''.join(tok.decode(_all_rows(out, 'bom', split).reshape(-1).tolist()) for split in ('train', 'val'))
    assert '\ufeff' not in text


def test_special_token_strings_in_documents_stay_text(tiny_demo, tmp_path):
    """A document quoting the EOS string keeps it as text: the packed rows hold exactly one EOS per document (the one
    preparation adds), not a false document boundary in the middle."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_demo / 'tokenizer'))
    docs = [f'doc {i}: the end marker is {tok.eos_token} in the middle, and {tok.pad_token} too ' + 'alpha ' * i
            for i in range(16)]
    src = _write_domain(tmp_path / 'in', 'quotes', docs)
    out = tmp_path / 'out'
    manifest = prepare({'quotes': src, 'copy': src}, tiny_demo / 'tokenizer', out, max_seq_len=16, val_fraction=0.25)
    for split in ('train', 'val'):
        rows = _all_rows(out, 'quotes', split)
        n_docs = manifest['domains']['quotes'][split]['documents']
        stream_tokens = sum(len(t) + 1 for t in tok([d for d in docs], add_special_tokens=False,
                                                    split_special_tokens=True)['input_ids']) // 16 * 16
        assert rows.size <= stream_tokens
        # The incomplete tail dropped by packing may hold the last document's EOS.
        assert n_docs - 1 <= int((rows == tok.eos_token_id).sum()) <= n_docs
        assert not (rows == tok.pad_token_id).any()
        assert tok.eos_token in tok.decode(rows.reshape(-1).tolist())


def test_max_seq_len_must_match_the_prepared_rows(tiny_demo, tmp_path):
    """The pre-flight check compares every loader's max_seq_len with the length the manifest records: dynamic_mixture
    and text loaders over token rows (shorter is an error, longer a warning), instruct and dynamic_mixture over
    instruction rows (shorter is an error), each naming the key, both lengths and how to fix it."""
    from omegaconf import OmegaConf as om

    from conftest import REPO, tiny_prune_overrides
    from drpruning_composer.config_check import ConfigError, check_sequence_lengths, load_and_check

    prune = str(REPO / 'yamls' / 'demo' / 'prune.yaml')
    overrides = tiny_prune_overrides(tiny_demo, tmp_path / 'run')  # the tiny demo's rows are 64 tokens
    load_and_check(prune, overrides)
    with pytest.raises(ConfigError, match=r'^train_loader\.dataset\.max_seq_len: 32 is shorter than the prepared '
                                          r'rows .*max_seq_len=64.*first 32 tokens of every 64-token row.*'
                                          r'Set train_loader\.dataset\.max_seq_len=64, or prepare the data '
                                          r'again with drpruning-prepare --max-seq-len 32'):
        load_and_check(prune, [*overrides, 'variables.max_seq_len=32'])
    with pytest.warns(UserWarning, match=r'^train_loader\.dataset\.max_seq_len: 128 is longer than the prepared rows'):
        load_and_check(prune, [*overrides, 'variables.max_seq_len=128'])

    cfg = load_and_check(prune, overrides)
    cfg.eval_loader[2].dataset.max_seq_len = 32  # an llm-foundry `text` eval loader
    with pytest.raises(ConfigError, match=r'^eval_loader\[2\]\.dataset\.max_seq_len: 32 is shorter .*first 32 '
                                          r'tokens of every 64-token row'):
        check_sequence_lengths(cfg)
    cfg = om.load(REPO / 'yamls' / 'demo' / 'pretrain.yaml')  # a `text` train loader over streams
    cfg.variables.demo, cfg.variables.max_seq_len = str(tiny_demo), 48
    om.resolve(cfg)
    with pytest.raises(ConfigError, match=r'^train_loader\.dataset\.max_seq_len: 48 is shorter'):
        check_sequence_lengths(cfg)

    from test_instruct import write_tasks

    from drpruning_composer.data.instruct import prepare_instruct

    data = tmp_path / 'instruct_data'
    prepare_instruct({t: write_tasks(tmp_path / 'src', {t: 6}) / t for t in ('add', 'echo')}, tiny_demo / 'tokenizer',
                     data, max_seq_len=64)
    cfg = om.load(REPO / 'yamls' / 'demo' / 'instruct.yaml')
    cfg.variables.data, cfg.variables.domains = str(data), ['add', 'echo']
    cfg.eval_loader = cfg.eval_loader[:2]
    cfg.eval_loader[0].dataset.local, cfg.eval_loader[1].dataset.local = str(data / 'add'), str(data / 'echo')
    for length, error in ((64, None), (128, None), (32, 'train_loader'), (48, 'train_loader')):
        cfg.variables.max_seq_len = length
        resolved = om.create(om.to_container(cfg, resolve=True))
        if error is None:
            check_sequence_lengths(resolved)
        else:
            with pytest.raises(ConfigError, match=rf'^{error}\.dataset\.max_seq_len: {length} is shorter .*rows of '
                                                  r'up to 64 tokens'):
                check_sequence_lengths(resolved)
    resolved.train_loader.dataset.max_seq_len = 64
    with pytest.raises(ConfigError, match=r'^eval_loader\[0\]\.dataset\.max_seq_len: 48 is shorter'):
        check_sequence_lengths(resolved)


def test_cli_reports_bad_input_without_traceback(tiny_demo, tmp_path, capsys):
    assert main(['--domain', 'x', '--tokenizer', str(tiny_demo / 'tokenizer'), '--out', str(tmp_path / 'o')]) == 2
    assert "--domain 'x': expected NAME=PATH" in capsys.readouterr().err
    (tmp_path / 'exists').mkdir()
    assert main(['--domain', f'x={tmp_path}', '--tokenizer', str(tiny_demo / 'tokenizer'),
                 '--out', str(tmp_path / 'exists')]) == 2
    assert 'already exists' in capsys.readouterr().err
