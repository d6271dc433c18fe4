"""Instruction data: the loss mask is exactly the responses, bad input fails naming the culprit, the mixture over
tasks resumes exactly and agrees across ranks, and `llmfoundry train` tunes with DRO and one eval loss per task."""

import csv
import json
import os
import re
import subprocess

import numpy as np
import pytest
import torch

from conftest import REPO
from drpruning_composer.data.instruct import (ResponseCollator, pack_examples, prepare_instruct, read_examples,
                                              segments_of, tokenize_segments)
from drpruning_composer.data.mixture import DynamicMixtureSampler, build_dynamic_mixture_dataloader
from drpruning_composer.data.prepare import PrepareError
from drpruning_composer.data.cli import main as prepare_main

TASKS = {'add': 30, 'chat': 12, 'echo': 20}


def write_tasks(root, sizes=TASKS):
    """`add` and `echo` as prompt/response, `chat` as two-turn messages; every response is unique."""
    for task, n in sizes.items():
        (root / task).mkdir(parents=True)
        with open(root / task / 'part.jsonl', 'w') as f:
            for i in range(n):
                if task == 'chat':
                    record = {'messages': [{'role': 'system', 'content': 'be brief'},
                                           {'role': 'user', 'content': f'name {i}?'},
                                           {'role': 'assistant', 'content': f'item {i}'},
                                           {'role': 'user', 'content': 'and twice?'},
                                           {'role': 'assistant', 'content': f'item {2 * i} twice'}]}
                else:
                    record = {'prompt': f'{task} {i} and {i + 1} =', 'response': f' {i * 7 + 1} {task}'}
                f.write(json.dumps(record) + '\n')
    return root


def expected_responses(task, i, eos):
    if task == 'chat':
        return f'item {i}{eos}item {2 * i} twice{eos}'
    return f' {i * 7 + 1} {task}{eos}'


@pytest.fixture(scope='module')
def prepared(tiny_demo, tmp_path_factory):
    root = tmp_path_factory.mktemp('instruct')
    sources = write_tasks(root / 'src')
    prepare_instruct({t: sources / t for t in TASKS}, tiny_demo / 'tokenizer', root / 'data', max_seq_len=64,
                     val_fraction=0.2, seed=3)
    return root / 'data'


def _tokenizer(tiny_demo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_demo / 'tokenizer'))


def test_loss_mask_is_exactly_the_responses(prepared, tiny_demo):
    tok = _tokenizer(tiny_demo)
    manifest = json.loads((prepared / 'manifest.json').read_text())
    for task, n in TASKS.items():
        decoded = []
        for split in ('train', 'val'):
            rows = read_examples(prepared, task, split)
            assert len(rows) == manifest['domains'][task][split]['examples']
            for tokens, mask in rows:
                assert len(tokens) == len(mask) <= 64 and mask.any() and not mask.all()
                decoded.append(tok.decode(tokens[mask.astype(bool)]))
        assert sorted(decoded) == sorted(expected_responses(task, i, tok.eos_token) for i in range(n))


def test_chat_template_responses_are_what_the_template_adds(tiny_demo, tmp_path):
    tok = _tokenizer(tiny_demo)
    tok.chat_template = ('{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}'
                         '{% if add_generation_prompt %}<assistant>{% endif %}')
    tok.save_pretrained(str(tmp_path / 'tok'))
    sources = write_tasks(tmp_path / 'src', {'chat': 4})
    prepare_instruct({'chat': sources / 'chat'}, tmp_path / 'tok', tmp_path / 'data', max_seq_len=64, seed=3)
    rows = read_examples(tmp_path / 'data', 'chat', 'train') + read_examples(tmp_path / 'data', 'chat', 'val')
    tok = _tokenizer(tiny_demo)
    assert sorted(tok.decode(t[m.astype(bool)]) for t, m in rows) == sorted(
        f'item {i}\nitem {2 * i} twice\n' for i in range(4))
    assert all(tok.decode(t).startswith('<system>be brief\n<user>name') for t, _ in rows)


def test_special_token_strings_written_by_users_stay_text(tiny_demo, tmp_path):
    """A prompt, response or message quoting a special token's string keeps it as text; the EOS ending a response and
    the special tokens of the chat template's markup are special; without such strings nothing changes."""
    tok = _tokenizer(tiny_demo)
    eos, pad = tok.eos_token, tok.pad_token
    ids, mask = tokenize_segments(segments_of({'prompt': f'why {eos} here?', 'response': f' because {pad} {eos}'},
                                              'x:1', tok), tok)
    assert ids.tolist().count(tok.eos_token_id) == 1 and ids[-1] == tok.eos_token_id and mask[-1] == 1
    assert tok.pad_token_id not in ids.tolist()

    tok.chat_template = ('{% for m in messages %}' + pad + '{{ m.role }}\n{{ m.content }}' + eos + '\n{% endfor %}'
                         '{% if add_generation_prompt %}' + pad + 'assistant\n{% endif %}')
    messages = [{'role': 'system', 'content': 'be brief'}, {'role': 'user', 'content': f'is {eos} the end?'},
                {'role': 'assistant', 'content': f'no, {pad} and {eos} are text here'}]
    ids, mask = tokenize_segments(segments_of({'messages': messages}, 'x:1', tok), tok)
    assert ids.tolist().count(tok.eos_token_id) == 3 and ids.tolist().count(tok.pad_token_id) == 3
    assert tok.decode(ids) == tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(ids[mask.astype(bool)]) == f'no, {pad} and {eos} are text here{eos}\n'
    plain = [dict(m, content=m['content'].replace(eos, 'x').replace(pad, 'y')) for m in messages]
    ids, _ = tokenize_segments(segments_of({'messages': plain}, 'x:1', tok), tok)
    assert ids.tolist() == tok(tok.apply_chat_template(plain, tokenize=False), add_special_tokens=False)['input_ids']


ALTERNATING = ("{% for m in messages %}{% if loop.index0 > 0 and m.role == messages[loop.index0 - 1].role %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
               "{% endif %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
               "{% if add_generation_prompt %}<assistant>{% endif %}")


def _two_user_turns(i):
    return {'messages': [{'role': 'user', 'content': f'hi {i}'}, {'role': 'user', 'content': 'again'},
                         {'role': 'assistant', 'content': f'ok {i}'}]}


def _alternating(i):
    return {'messages': [{'role': 'user', 'content': f'hi {i}'}, {'role': 'assistant', 'content': f'ok {i}'}]}


def test_a_chat_template_that_raises_rejects_the_example_not_the_run(tiny_demo, tmp_path, caplog, capsys):
    """A template that raises on a conversation (Llama-2/Mistral: two user turns in a row) leaves that example out,
    counted and warned about with its file, line and the template's message; `--template-errors error`, or a task whose
    every example fails, stops preparation naming file and line, without a traceback from the CLI."""
    tok = _tokenizer(tiny_demo)
    tok.chat_template = ALTERNATING
    tok.save_pretrained(str(tmp_path / 'tok'))
    (tmp_path / 'mixed').mkdir()
    records = [_two_user_turns(i) if i in (2, 5) else _alternating(i) for i in range(10)]
    (tmp_path / 'mixed' / 'part.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
    with caplog.at_level('WARNING'):
        manifest = prepare_instruct({'mixed': tmp_path / 'mixed'}, tmp_path / 'tok', tmp_path / 'out', max_seq_len=64,
                                    val_fraction=0.2, seed=0)
    entry = manifest['domains']['mixed']
    assert sum(entry[s]['rejected'] for s in ('train', 'val')) == 2
    assert sum(entry[s]['examples'] for s in ('train', 'val')) == 8
    for line in (3, 6):
        assert re.search(rf'part\.jsonl:{line}: the chat template rejects this conversation: Conversation roles must '
                         'alternate', caplog.text)

    tok_args = ['--instruct', '--tokenizer', str(tmp_path / 'tok'), '--max-seq-len', '64']
    assert prepare_main(tok_args + ['--domain', f'mixed={tmp_path / "mixed"}', '--out', str(tmp_path / 'strict'),
                                    '--template-errors', 'error']) == 2
    err = capsys.readouterr().err
    assert re.search(r'part\.jsonl:[36]: the chat template rejects this conversation: Conversation roles', err)
    assert 'Traceback' not in err and not (tmp_path / 'strict').exists()

    (tmp_path / 'bad').mkdir()
    (tmp_path / 'bad' / 'part.jsonl').write_text(''.join(json.dumps(_two_user_turns(i)) + '\n' for i in range(4)))
    assert prepare_main(tok_args + ['--domain', f'bad={tmp_path / "bad"}', '--out', str(tmp_path / 'none')]) == 2
    err = capsys.readouterr().err
    assert re.search(r'task "bad": all \d+ \w+ examples were rejected by the chat template, e.g. .*part\.jsonl:\d: '
                     'the chat template rejects this conversation: Conversation roles must alternate', err)
    assert not (tmp_path / 'none').exists()


def test_prepare_is_deterministic_and_val_is_held_out_by_example(prepared, tiny_demo, tmp_path):
    again = tmp_path / 'again'
    prepare_instruct({t: prepared.parent / 'src' / t for t in TASKS}, tiny_demo / 'tokenizer', again,
                     max_seq_len=64, val_fraction=0.2, seed=3)
    for task in TASKS:
        for split in ('train', 'val'):
            a, b = read_examples(prepared, task, split), read_examples(again, task, split)
            assert [(x.tolist(), m.tolist()) for x, m in a] == [(x.tolist(), m.tolist()) for x, m in b]
        train = {tuple(x) for x, _ in read_examples(prepared, task, 'train')}
        assert not train & {tuple(x) for x, _ in read_examples(prepared, task, 'val')}


def test_packing_keeps_examples_whole_and_in_order():
    rng = np.random.default_rng(0)
    examples = [(rng.integers(0, 50, n).astype(np.int32), (rng.random(n) < 0.5).astype(np.uint8))
                for n in (5, 9, 3, 12, 1, 7, 16)]
    rows = pack_examples(examples, 16)
    assert all(len(t) <= 16 for t, _ in rows) and len(rows) < len(examples)
    for part in (0, 1):
        np.testing.assert_array_equal(np.concatenate([r[part] for r in rows]),
                                      np.concatenate([e[part] for e in examples]))


def test_collator_labels_only_response_tokens():
    rows = [{'tokens': torch.tensor([5, 6, 7, 8]), 'loss_mask': torch.tensor([0, 0, 1, 1])},
            {'tokens': torch.tensor([9, 10]), 'loss_mask': torch.tensor([0, 1])}]
    batch = ResponseCollator(pad_token_id=0)(rows)
    assert batch['input_ids'].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch['attention_mask'].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch['labels'].tolist() == [[-100, -100, 7, 8], [-100, 10, -100, -100]]


@pytest.mark.parametrize('records, message', [
    (['{"prompt": "a"}'], r'part.jsonl:1: expected string fields "prompt" and "response"'),
    (['{"prompt": "a", "response": "b"}', 'not json'], r'part.jsonl:2: not a JSON line'),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], r'part.jsonl:1: "messages" has no non-empty assistant'),
    (['{"prompt": "a", "response": ""}'], r'part.jsonl:1: empty "response"'),
    ([], r'task "bad": source .* has 0 examples'),
])
def test_bad_records_name_the_culprit(tiny_demo, tmp_path, records, message):
    (tmp_path / 'bad').mkdir()
    (tmp_path / 'bad' / 'part.jsonl').write_text('\n'.join(records + ['{"prompt": "x", "response": "y"}'] * 2)
                                                  if records else '')
    with pytest.raises(PrepareError, match=message):
        prepare_instruct({'bad': tmp_path / 'bad'}, tiny_demo / 'tokenizer', tmp_path / 'out')
    assert not (tmp_path / 'out').exists()


def test_a_byte_order_mark_is_not_an_error(tiny_demo, tmp_path):
    (tmp_path / 'bom').mkdir()
    lines = ''.join(json.dumps({'prompt': f'q{i}', 'response': f' a{i}'}) + '\n' for i in range(4))
    (tmp_path / 'bom' / 'part.jsonl').write_bytes(b'\xef\xbb\xbf' + lines.encode())
    manifest = prepare_instruct({'bom': tmp_path / 'bom'}, tiny_demo / 'tokenizer', tmp_path / 'out', max_seq_len=32)
    assert sum(manifest['domains']['bom'][s]['examples'] for s in ('train', 'val')) == 4


def test_overlong_examples_are_truncated_and_counted_or_rejected(tiny_demo, tmp_path):
    tok = _tokenizer(tiny_demo)
    (tmp_path / 'long').mkdir()
    long_prompt = {'prompt': 'word ' * 100, 'response': ' end'}  # nothing of the response fits: dropped
    long_response = {'prompt': 'q', 'response': ' answer' * 100}  # cut inside the response: kept
    lines = [long_prompt, long_response] + [{'prompt': f'q{i}', 'response': f' a{i}'} for i in range(8)]
    (tmp_path / 'long' / 'part.jsonl').write_text('\n'.join(json.dumps(r) for r in lines))
    manifest = prepare_instruct({'long': tmp_path / 'long'}, tiny_demo / 'tokenizer', tmp_path / 'cut',
                                max_seq_len=32, val_fraction=0.1, seed=0)
    counts = {k: sum(manifest['domains']['long'][s][k] for s in ('train', 'val'))
              for k in ('examples', 'truncated', 'dropped')}
    assert counts == {'examples': 9, 'truncated': 2, 'dropped': 1}
    rows = read_examples(tmp_path / 'cut', 'long', 'train') + read_examples(tmp_path / 'cut', 'long', 'val')
    assert max(len(t) for t, _ in rows) == 32 and len(tok(long_prompt['prompt'])['input_ids']) > 32
    with pytest.raises(PrepareError, match=r'task "long": .*part.jsonl:[12] has \d+ tokens, more than max_seq_len=32'):
        prepare_instruct({'long': tmp_path / 'long'}, tiny_demo / 'tokenizer', tmp_path / 'rej', max_seq_len=32,
                         overlong='reject')


def test_cli_writes_instruction_data(tiny_demo, tmp_path, capsys):
    sources = write_tasks(tmp_path / 'src', {'add': 6, 'echo': 4})
    code = prepare_main(['--instruct', '--input', str(sources), '--tokenizer', str(tiny_demo / 'tokenizer'),
                         '--out', str(tmp_path / 'out'), '--max-seq-len', '64', '--pack'])
    assert code == 0 and 'add: train' in capsys.readouterr().out
    manifest = json.loads((tmp_path / 'out' / 'manifest.json').read_text())
    assert manifest['format'] == 'instruct' and manifest['pack']
    assert manifest['domains']['add']['train']['samples'] < manifest['domains']['add']['train']['examples']


def _loader(prepared, tiny_demo, num_workers=0, **dataset):
    cfg = {'local': str(prepared), 'domains': list(TASKS), 'proportions': [0.5, 0.3, 0.2], 'max_seq_len': 64,
           'seed': 5, **dataset}
    return build_dynamic_mixture_dataloader(_tokenizer(tiny_demo), 4, cfg, num_workers=num_workers,
                                            prefetch_factor=2 if num_workers else None).dataloader


def _rows(batch):
    return [(int(d), ids[m.bool()].tolist(), lab[lab != -100].tolist())
            for d, ids, m, lab in zip(batch['domain_idx'], batch['input_ids'], batch['attention_mask'], batch['labels'])]


@pytest.mark.parametrize('num_workers', [0, 2])
def test_mixture_over_tasks_resumes_exactly_across_weight_changes(prepared, tiny_demo, num_workers):
    loader = _loader(prepared, tiny_demo, num_workers)
    batches, state = [], None
    for b, batch in zip(range(10), loader):
        batches.append(_rows(batch))
        if b == 2:
            loader.dataset.set_weights([0.1, 0.1, 0.8])
        if b == 4:
            state = loader.dataset.state_dict(5 * 4, True)
    resumed = _loader(prepared, tiny_demo, num_workers)
    resumed.dataset.load_state_dict(state)
    assert [_rows(batch) for _, batch in zip(range(5), resumed)] == batches[5:]
    first = next(iter(_loader(prepared, tiny_demo)))
    assert first['labels'].shape == first['input_ids'].shape and (first['labels'] == -100).any()
    assert set(first) >= {'input_ids', 'attention_mask', 'labels', 'domain_idx'}


def test_ranks_split_one_global_sequence_of_tasks(prepared, tiny_demo):
    dataset = _loader(prepared, tiny_demo).dataset
    single = [key for _, key in zip(range(24), iter(DynamicMixtureSampler(dataset, 0, 1)))]
    per_rank = []
    for rank in (0, 1):
        fresh = _loader(prepared, tiny_demo).dataset
        per_rank.append([key for _, key in zip(range(12), iter(DynamicMixtureSampler(fresh, rank, 2)))])
    assert per_rank[0] == single[0::2] and per_rank[1] == single[1::2]


def test_instruct_eval_loader_survives_another_process_taking_its_prefix(prepared, tiny_demo, monkeypatch):
    from test_mixture_loader import steal_the_next_prefix

    from drpruning_composer.data.instruct import build_instruct_dataloader

    stolen = steal_the_next_prefix(monkeypatch)
    spec = build_instruct_dataloader(_tokenizer(tiny_demo), 4, {'local': str(prepared / 'add'), 'split': 'val',
                                                                 'max_seq_len': 64})
    assert stolen and spec.dataloader.dataset._shm_prefix_int != stolen[0][0]
    assert next(iter(spec.dataloader))['labels'].shape[0] > 0


def test_mixing_instruction_and_token_shards_is_an_error(prepared, tiny_demo, tmp_path):
    import shutil

    shutil.copytree(prepared, tmp_path / 'mixed')
    shutil.rmtree(tmp_path / 'mixed' / 'echo')
    shutil.copytree(tiny_demo / 'data' / 'prose', tmp_path / 'mixed' / 'echo')
    with pytest.raises(ValueError, match=r"mixes instruction data .* \['add', 'chat'\] have a loss mask"):
        _loader(tmp_path / 'mixed', tiny_demo)


def test_llmfoundry_train_tunes_with_dro_and_one_eval_loss_per_task(tiny_demo, tmp_path):
    """Plain `llmfoundry train` (entry points) on the demo's instruction YAML and the demo's four tasks."""
    from drpruning_composer.data.demo_instruct import TASKS as DEMO_TASKS, build_instruct

    build_instruct(tmp_path, tiny_demo / 'tokenizer', scale=0.05, max_seq_len=256)
    save = tmp_path / 'run'
    args = [str(REPO / 'yamls/demo/instruct.yaml'), f'variables.demo={tmp_path}', 'variables.max_seq_len=256',
            f'variables.source_model={tiny_demo}/tiny_llama', 'model.pretrained=false',
            f'variables.save_folder={save}', 'max_duration=4ba', 'eval_interval=2ba', 'global_train_batch_size=4',
            'device_train_microbatch_size=4', 'save_interval=4ba', 'console_log_interval=1ba',
            'callbacks.dro_reweight.reference_loss=[1.0,1.0,1.0,1.0]', 'callbacks.dro_reweight.reference_ratio=null']
    proc = subprocess.run(['llmfoundry', 'train', *args], cwd=tmp_path, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, 'HF_HUB_OFFLINE': '1'})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    logged = {t: re.findall(rf'metrics/eval/{t}/LanguageCrossEntropy: ([0-9.]+)', out) for t in DEMO_TASKS}
    assert all(len(v) == 2 for v in logged.values()), logged
    rows = list(csv.DictReader(open(save / 'dro' / 'history.csv')))
    weights = [[float(r[f'weight/{t}']) for t in DEMO_TASKS] for r in rows]
    natural = json.loads((tmp_path / 'instruct_data' / 'manifest.json').read_text())['domains']
    assert len(weights) == 2 and all(abs(sum(w) - 1) < 1e-6 for w in weights)
    assert weights[-1] != pytest.approx([natural[t]['train']['samples'] / sum(
        natural[u]['train']['samples'] for u in DEMO_TASKS) for t in DEMO_TASKS], abs=1e-3)
    from drpruning_composer.evaluate import evaluate

    exported = evaluate([str(save / 'huggingface' / 'model')], str(tmp_path / 'instruct_data'))[0]['loss']
    assert exported == pytest.approx({t: float(v[-1]) for t, v in logged.items()}, abs=2e-4)  # response-only both


def test_instruct_eval_loader_on_token_data_fails_before_training(tiny_demo):
    from drpruning_composer.config_check import ConfigError, load_and_check

    overrides = [f'variables.demo={tiny_demo}', f'variables.source_model={tiny_demo}/tiny_llama',
                 'model.pretrained=false', f'variables.data={tiny_demo}/data',
                 'variables.domains=[c_headers,prose,python,records]']
    with pytest.raises(ConfigError, match=r'^train_loader.dataset.local: .*function_body/train does not exist'):
        load_and_check(str(REPO / 'yamls/demo/instruct.yaml'), overrides[:3])
    eval_loader = ('eval_loader=[{name: instruct, label: prose, drop_last: false, dataset: {local: '
                   f"'{tiny_demo}/data/prose', split: val, max_seq_len: 256}}}}]")
    with pytest.raises(ConfigError, match=r'^eval_loader\[0\].dataset.local: .*prose/val is not instruction data'):
        load_and_check(str(REPO / 'yamls/demo/instruct.yaml'), [*overrides, eval_loader,
                                                                  'callbacks.dro_reweight.domains=[prose]',
                                                                  'train_loader.dataset.domains=[prose]'])
