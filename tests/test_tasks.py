"""Per-domain continuation tasks: what the builder writes, that llm-foundry reads it, and that the accuracy computed
by `evaluate` is llm-foundry's own."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO


def _starts_word(token: int) -> bool:
    return token % 2 == 0


def _documents():
    rng = np.random.default_rng(0)
    return [rng.integers(1, 200, size=n) for n in (300, 250, 40, 500, 200, 120)]


def _find(doc: np.ndarray, span: list[int]) -> list[int]:
    n = len(span)
    return [i for i in range(len(doc) - n + 1) if doc[i:i + n].tolist() == span]


def test_items_continue_their_context_with_distractors_that_are_continuations_of_other_documents():
    from drpruning_composer.data.tasks import TaskShape, build_items

    docs, shape = _documents(), TaskShape(context_tokens=48, continuation_tokens=16, num_choices=4)
    items, skipped = build_items(docs, _starts_word, shape, seed=3)
    assert skipped == 1  # the 40-token document is shorter than 48 + 16
    assert len(items) >= 15  # (300 + 250 + 500 + 200 + 120) // 64 windows, fewer where no word starts
    for item in items:
        gold = item['choices'][item['gold']]
        assert len(item['context']) == 48 and all(len(c) == 16 for c in item['choices'])
        assert len(item['choices']) == 4 and _starts_word(gold[0])
        [home] = [j for j, d in enumerate(docs) if _find(d, item['context'] + gold)]  # gold follows the context
        for i, choice in enumerate(item['choices']):
            if i != item['gold']:
                assert choice != gold and _starts_word(choice[0])
                assert not _find(docs[home], choice)
                # the continuation of another window: after a full context, as the gold is (exchangeable with it)
                assert any(p >= 48 for j, d in enumerate(docs) if j != home for p in _find(d, choice))
        donors = [next(j for j, d in enumerate(docs) if _find(d, c)) for c in item['choices']]
        assert len(set(donors)) == 4  # each choice from a different document
    assert len({item['gold'] for item in items}) == 4
    again, _ = build_items(docs, _starts_word, shape, seed=3)
    assert again == items
    other, _ = build_items(docs, _starts_word, shape, seed=4)
    assert [i['gold'] for i in other] != [i['gold'] for i in items]
    capped, _ = build_items(docs, _starts_word, shape, seed=3, max_items=10)
    assert len(capped) == 10 and all(item in items for item in capped)


def test_document_pieces_never_join_rows():
    """Val rows are written in a random order: a piece ends at an EOS or at its row's end, never runs into the next
    row."""
    from drpruning_composer.data.tasks import document_pieces

    rows = np.array([[5, 6, 0, 7], [8, 9, 0, 0], [3, 4, 4, 4]])
    assert [d.tolist() for d in document_pieces(rows, eos_token_id=0)] == [[5, 6], [7], [8, 9], [3, 4, 4, 4]]


@pytest.fixture(scope='module')
def tasks(tiny_demo, tmp_path_factory):
    from drpruning_composer.data.tasks import TaskShape, make_tasks

    out = tmp_path_factory.mktemp('tasks') / 'tasks'
    written = make_tasks(tiny_demo / 'data', str(tiny_demo / 'tokenizer'), out, TaskShape(24, 8, 2),
                         domains=['c_headers', 'records'], max_items=40)
    return out, written


def test_make_tasks_is_deterministic_and_gold_text_follows_the_query(tiny_demo, tasks, tmp_path):
    from drpruning_composer.data.tasks import TaskShape, make_tasks

    out, written = tasks
    assert written['domains']['records']['items'] == 40
    again = tmp_path / 'again'
    make_tasks(tiny_demo / 'data', str(tiny_demo / 'tokenizer'), again, TaskShape(24, 8, 2),
               domains=['c_headers', 'records'], max_items=40)
    for domain in ('c_headers', 'records'):
        assert (again / f'{domain}.jsonl').read_bytes() == (out / f'{domain}.jsonl').read_bytes()
    corpus = ''.join(json.loads(line)['text'] for f in (tiny_demo / 'corpus' / 'records').glob('*.jsonl')
                     for line in f.read_text().splitlines())
    for line in (out / 'records.jsonl').read_text().splitlines():
        item = json.loads(line)
        assert item['query'] + item['choices'][item['gold']] in corpus
    assert written['domains']['records']['split'] == 'any'  # RECORD lines have too few spaces: any token
    assert written['domains']['c_headers']['split'] == 'word'
    for line in (out / 'c_headers.jsonl').read_text().splitlines():
        item = json.loads(line)
        assert item['choices'][item['gold']].startswith(' ')


def test_too_few_documents_and_a_foreign_tokenizer_are_errors(tiny_demo, tmp_path):
    """A window longer than the prepared rows fits in no piece (pieces never span rows): an error naming the rows'
    length, before anything is written."""
    from drpruning_composer.data.tasks import TaskError, TaskShape, make_tasks

    with pytest.raises(TaskError, match=r"domain '\w+': 0 items from \d+ val document pieces \(\d+ shorter than 68 "
                                        r"tokens; a piece has at most max_seq_len=64\); needs at least 10 items"):
        make_tasks(tiny_demo / 'data', str(tiny_demo / 'tokenizer'), tmp_path / 'a', TaskShape(60, 8, 2))
    assert not (tmp_path / 'a').exists()
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({'a': 0, '<unk>': 1}, unk_token='<unk>')),
                            eos_token='a').save_pretrained(tmp_path / 'foreign')
    with pytest.raises(TaskError, match='is not the one'):
        make_tasks(tiny_demo / 'data', str(tmp_path / 'foreign'), tmp_path / 'b')
    proc = subprocess.run([sys.executable, '-m', 'drpruning_composer.data.tasks', '--data', str(tiny_demo / 'data'),
                           '--tokenizer', str(tiny_demo / 'tokenizer'), '--out', str(tmp_path / 'c'),
                           '--choices', '1'], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and 'at least 2 choices' in proc.stderr and 'Traceback' not in proc.stderr


def test_choose_breaks_ties_like_llmfoundry():
    from drpruning_composer.evaluate import choose

    assert choose([2.0, 1.0, 3.0]) == 1
    assert choose([1.0, 1.0, 1.0]) == 0
    assert choose([3.0, 1.0, 1.0]) == 1


def _llmfoundry_accuracy(model, tokenizer, task: dict) -> float:
    """The accuracy llm-foundry's in-training ICL evaluator reports for `task` (an `icl_tasks` entry)."""
    from llmfoundry.eval.datasets.in_context_learning_evaluation import get_icl_task_dataloader
    from llmfoundry.eval.metrics import InContextLearningMultipleChoiceAccuracy

    kwargs = {k: v for k, v in task.items() if k not in ('label', 'dataset_uri', 'icl_task_type')}
    kwargs.update(num_fewshot=0, pad_tok_id=tokenizer.pad_token_id, prompt_string='', fewshot_random_seed=1)
    spec = get_icl_task_dataloader('multiple_choice', task['dataset_uri'], tokenizer, batch_size=4,
                                   destination_path=task['dataset_uri'] + '.copy', kwargs=kwargs)
    metric = InContextLearningMultipleChoiceAccuracy()
    with torch.no_grad():
        for batch in spec.dataloader:
            logits = model(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).logits
            labels = batch['labels'].clone()
            labels[:, :-1] = labels[:, 1:].clone()  # as Composer's HuggingFaceModel shifts them for ICL
            labels[:, -1] = -100
            metric.update(batch, logits, labels)
    return float(metric.compute())


def test_accuracy_is_llmfoundrys_and_ties_give_the_chance_rate(tiny_demo, tasks):
    """Scored by `evaluate` and by llm-foundry's evaluator on the same jsonl: the same accuracy, for a random model
    and for one whose scores tie on every choice (then both pick the first, i.e. the chance rate of the file)."""
    from omegaconf import OmegaConf as om
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from drpruning_composer.evaluate import read_tasks, task_accuracy

    out, _ = tasks
    tokenizer = AutoTokenizer.from_pretrained(tiny_demo / 'tokenizer')
    flat = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_demo / 'tiny_llama')).eval()
    torch.nn.init.zeros_(flat.lm_head.weight)
    task = {t['label']: t for t in om.to_container(om.load(out / 'tasks.yaml'))['icl_tasks']}['c_headers_continuation']
    items, max_seq_len = read_tasks(out)['c_headers']
    chance = float(np.mean([item['gold'] == 0 for item in items]))
    assert task_accuracy(flat, tokenizer, items, max_seq_len) == chance
    assert _llmfoundry_accuracy(flat, tokenizer, task) == pytest.approx(chance, abs=1e-6)  # llm-foundry's is fp32
    accuracies = []
    for seed in (1, 2):  # two random models: a single one can match the chance rate by coincidence
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_demo / 'tiny_llama')).eval()
        accuracies.append(task_accuracy(model, tokenizer, items, max_seq_len))
        assert accuracies[-1] == pytest.approx(_llmfoundry_accuracy(model, tokenizer, task), abs=1e-6)
    assert any(a != chance for a in accuracies)


def test_evaluate_prints_one_accuracy_per_domain(tiny_demo, tasks, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    out, _ = tasks
    model = tmp_path / 'model'
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_demo / 'tiny_llama')).save_pretrained(model)
    proc = subprocess.run([sys.executable, '-m', 'drpruning_composer.evaluate', '--data', str(tiny_demo / 'data'),
                           '--tasks', str(out), '--domains', 'c_headers', 'records', '--json', str(tmp_path / 'r.json'),
                           str(model)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'per-domain task accuracy' in proc.stdout
    [row] = json.loads((tmp_path / 'r.json').read_text())
    assert set(row['accuracy']) == {'c_headers', 'records'} and 0 <= row['mean_accuracy'] <= 1


def test_pruning_run_logs_task_accuracy_per_domain_and_dro_reads_only_the_loss(tiny_demo, tasks, tmp_path):
    """`composer train.py yamls/demo/prune.yaml icl_tasks=TASKS/tasks.yaml`: llm-foundry's ICL evaluator logs each
    domain's accuracy next to its eval loss; the DRO history records the eval losses, not the accuracies."""
    from conftest import tiny_prune_overrides
    from drpruning_composer.config_check import ConfigError, load_and_check
    from drpruning_composer.dro.report import read_history_csv

    out, _ = tasks
    prune = str(REPO / 'yamls' / 'demo' / 'prune.yaml')
    overrides = [*tiny_prune_overrides(tiny_demo, tmp_path / 'run'), 'max_duration=4ba', 'console_log_interval=1ba',
                 f'icl_tasks={out}/tasks.yaml']
    with pytest.raises(ConfigError, match='^icl_tasks: .* does not exist'):
        load_and_check(prune, [*overrides, f'icl_tasks={tmp_path}/none.yaml'])
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'PYTHONUNBUFFERED': '1'}
    # llm-foundry copies each task file into the working directory: run where that litters nothing.
    proc = subprocess.run(['composer', str(REPO / 'train.py'), prune, *overrides], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1800)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    for domain in ('c_headers', 'records'):
        accuracies = [float(a) for a in re.findall(
            rf'metrics/{domain}_continuation/0-shot/InContextLearningMultipleChoiceAccuracy: ([0-9.]+)', log)]
        assert len(accuracies) == 2 and all(0 <= a <= 1 for a in accuracies)  # at batch 2 and 4
    domains, rows = read_history_csv(str(tmp_path / 'run' / 'dro' / 'history.csv'))
    losses = re.findall(r'metrics/eval/records/LanguageCrossEntropy: ([0-9.]+)', log)
    assert [round(r['loss/records'], 4) for r in rows] == [round(float(v), 4) for v in losses]


def test_a_model_trained_on_a_domain_scores_above_chance_there_and_not_elsewhere(tiny_demo, tmp_path):
    """Accuracy measures knowledge of the domain's text: a tiny model trained (80 steps) on the c_headers val
    documents picks their true continuations far above the 25% chance rate, and stays near chance on records, which
    it never saw. (The demo's models, trained on the train splits: README, "Evaluation".)"""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from drpruning_composer.data.tasks import TaskShape, make_tasks
    from drpruning_composer.evaluate import read_split, read_tasks, task_accuracy

    make_tasks(tiny_demo / 'data', str(tiny_demo / 'tokenizer'), tmp_path / 'tasks', TaskShape(16, 8, 4),
               domains=['c_headers', 'records'], max_items=200)
    items = read_tasks(tmp_path / 'tasks')
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(tiny_demo / 'tiny_llama'))
    rows = torch.from_numpy(read_split(tiny_demo / 'data', 'c_headers', 'val'))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(80):
        x = rows[torch.randint(len(rows), (16,))]
        optimizer.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
    tok = AutoTokenizer.from_pretrained(tiny_demo / 'tokenizer')
    accuracy = {d: task_accuracy(model.eval(), tok, *items[d]) for d in items}
    n = len(items['c_headers'][0])
    assert accuracy['c_headers'] > 0.25 + 4 * (0.25 * 0.75 / n) ** 0.5, accuracy  # 4 s.e. above chance
    assert accuracy['records'] < 0.4 < accuracy['c_headers'] - 0.2, accuracy
