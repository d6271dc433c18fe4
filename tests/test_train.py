"""End to end through `composer train.py`, and config errors that must fail before training starts."""

import os
import re
import subprocess
import sys

import pytest

from conftest import DOMAINS, NO_WEIGHTS_REFERENCE, REPO, tiny_prune_overrides
from drpruning_composer.config_check import ConfigError, check_config, load_and_check

PRETRAIN = str(REPO / 'yamls' / 'demo' / 'pretrain.yaml')


def tiny_overrides(demo, run_dir) -> list[str]:
    """Shrink the demo pretraining YAML to a few seconds on the tiny fixture."""
    return [f'variables.demo={demo}', 'variables.max_seq_len=64', 'max_duration=4ba', 'eval_interval=2ba',
            'global_train_batch_size=4', 'device_train_microbatch_size=4', 'device_eval_batch_size=8',
            'eval_subset_num_batches=1', 'console_log_interval=1ba', f'callbacks.hf_checkpointer.save_folder={run_dir}']


def run_train(args: list[str], launcher: str = 'composer', launcher_args: tuple[str, ...] = (),
              env: dict[str, str] | None = None, timeout: int = 1800) -> subprocess.CompletedProcess:
    """`composer [launcher_args] train.py args` (or `python train.py args`) from the repo root."""
    cmd = ([launcher, *launcher_args] if launcher == 'composer' else [sys.executable]) + ['train.py', *args]
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'PYTHONUNBUFFERED': '1', **(env or {})}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_composer_train_logs_eval_loss_per_domain_and_saves_hf_model(tiny_demo, tmp_path):
    proc = run_train([PRETRAIN, *tiny_overrides(tiny_demo, tmp_path / 'run')])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for d in DOMAINS:
        losses = re.findall(rf'metrics/eval/{d}/LanguageCrossEntropy: ([0-9.]+)', out)
        assert len(losses) == 2, f'{d}: {losses}'  # evaluated at batch 2 and 4
        assert 0 < float(losses[-1]) < 7.0

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path / 'run' / 'huggingface' / 'model'
    assert (folder / 'model.safetensors').is_file()
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = model.generate(**tok('def f(x):', return_tensors='pt'), max_new_tokens=5, do_sample=False)
    assert ids.shape[1] > 3 and torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize('override, key', [
    ('callbacks.not_a_callback={}', 'callbacks.not_a_callback'),
    ('algorithms.gradient_clippin={}', 'algorithms.gradient_clippin'),
    ('train_loader.name=txt', 'train_loader.name'),
    ('train_loader.dataset.streams.prose.local=/nonexistent/prose', 'train_loader.dataset.streams.prose.local'),
    ('model.pretrained_model_name_or_path=/nonexistent/model', 'model.pretrained_model_name_or_path'),
    ('tokenizer.name=/tmp', 'tokenizer.name'),
])
def test_bad_config_names_the_key(tiny_demo, override, key):
    with pytest.raises(ConfigError, match=f'^{key}: '):
        load_and_check(PRETRAIN, [f'variables.demo={tiny_demo}', override])


def test_missing_eval_data_names_the_loader(tiny_demo):
    cfg = load_and_check(PRETRAIN, [f'variables.demo={tiny_demo}'])
    cfg.eval_loader[1].dataset.local = '/nonexistent/prose'
    with pytest.raises(ConfigError, match=r'^eval_loader\[1\].dataset.local: data folder /nonexistent/prose/val'):
        check_config(cfg)


PRUNE = str(REPO / 'yamls' / 'demo' / 'prune.yaml')


def test_dro_domain_mismatch_fails_before_training(tiny_demo):
    base = [f'variables.demo={tiny_demo}', f'variables.source_model={tiny_demo}/tiny_llama', NO_WEIGHTS_REFERENCE]
    with pytest.raises(ConfigError, match=r'^callbacks.dro_reweight.domains: .* must equal train_loader.dataset'):
        load_and_check(PRUNE, [*base, 'callbacks.dro_reweight.domains=[c_headers,prose,python,recs]'])
    with pytest.raises(ConfigError, match=r'^train_loader.dataset.local: data folder .*/data/code/train does not'):
        load_and_check(PRUNE, [*base, 'variables.domains=[c_headers,prose,python,code]'])
    with pytest.raises(ConfigError, match=r'^callbacks.dro_reweight.reference_loss: source .* eval_first: true'):
        load_and_check(PRUNE, [*base, 'callbacks.dro_reweight.reference_loss=source', 'eval_first=false'])
    cfg = load_and_check(PRUNE, base)
    del cfg.eval_loader[3]
    with pytest.raises(ConfigError, match=r"^callbacks.dro_reweight.domains: \['records'\] have no eval loader"):
        check_config(cfg)


def test_teacher_reference_without_a_teacher_fails_before_training(tiny_demo):
    """`reference_loss: teacher` needs eval loaders, and without `distill` a source folder with weights to evaluate."""
    base = [f'variables.demo={tiny_demo}', f'variables.source_model={tiny_demo}/tiny_llama',
            'callbacks.dro_reweight.reference_loss=teacher']
    key = r'^callbacks.dro_reweight.reference_loss: teacher'
    with pytest.raises(ConfigError, match=key + r' without algorithms.distill .* not a local folder with weights'):
        load_and_check(PRUNE, base)  # tiny_llama holds a config and no weights
    load_and_check(PRUNE, [*base, 'algorithms.distill.alpha=0.5'])  # distill's teacher
    with pytest.raises(ConfigError, match=key + ".* not use_train_loss_ema"):
        load_and_check(PRUNE, [*base, 'algorithms.distill.alpha=0.5', 'callbacks.dro_reweight.use_train_loss_ema=true'])
    cfg = load_and_check(PRUNE, [*base, 'algorithms.distill.alpha=0.5'])
    del cfg.eval_loader
    with pytest.raises(ConfigError, match=key + ".* needs one eval_loader per domain"):
        check_config(cfg)


def test_bad_model_id_offline(tiny_demo, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(ConfigError, match='^model.pretrained_model_name_or_path: .*HF_HUB_OFFLINE'):
        load_and_check(PRETRAIN, [f'variables.demo={tiny_demo}', 'model.pretrained_model_name_or_path=meta/llama'])


def test_train_py_stops_before_training_on_bad_config(tiny_demo):
    proc = run_train([PRETRAIN, f'variables.demo={tiny_demo}', 'callbacks.typo_monitor={}'], launcher='python',
                     timeout=1800)
    assert proc.returncode == 2
    assert 'config error: callbacks.typo_monitor: no callback named "typo_monitor"' in proc.stderr
    assert 'Starting training' not in proc.stdout + proc.stderr


def test_plain_llmfoundry_train_finds_components_by_entry_point(tiny_demo, tmp_path):
    """No train.py: llm-foundry's own CLI resolves l0_mask, dynamic_mixture and dro_reweight from entry points."""
    import csv

    save = tmp_path / 'prune'
    args = [str(REPO / 'yamls/demo/prune.yaml'), *tiny_prune_overrides(tiny_demo, save), 'max_duration=4ba',
            'device_train_microbatch_size=4', 'save_interval=4ba', 'console_log_interval=1ba',
            'callbacks.dro_reweight.reference_loss=[1.0,1.0,1.0,1.0]', 'callbacks.dro_reweight.reference_ratio=null']
    env = {**os.environ, 'HF_HUB_OFFLINE': '1'}
    proc = subprocess.run(['llmfoundry', 'train', *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=1800)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert 'loss/train/lagrangian' in out and (save / 'pruned_hf' / 'config.json').is_file()
    rows = list(csv.DictReader(open(save / 'dro' / 'history.csv')))
    weights = [[float(r[f'weight/{d}']) for d in DOMAINS] for r in rows]
    assert len(weights) == 2 and all(abs(sum(w) - 1) < 1e-6 for w in weights)
    assert weights[-1] != [0.25] * 4  # a static reference loss lets DRO move the mixture at once


def test_demo_report_before_any_model_says_so(tiny_demo, capsys):
    """`python -m drpruning_composer.demo --stages data` ends with a report that has no model to evaluate."""
    from drpruning_composer.demo import report

    result = report(tiny_demo, {'data': 1.0})
    assert result['losses'] == [] and 'no model to evaluate yet' in capsys.readouterr().out


def test_demo_report_prints_loss_degradation_and_accuracy_per_domain(tiny_demo, tmp_path, capsys):
    """The report of `make demo` on a demo folder with a source model and tasks: one accuracy per domain; and the
    per-task response loss of the instruction stage's models."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    from drpruning_composer.data.demo_instruct import TASKS as DEMO_TASKS, build_instruct
    from drpruning_composer.data.tasks import TaskShape, make_tasks
    from drpruning_composer.demo import report

    demo = tmp_path / 'demo'
    shutil.copytree(tiny_demo / 'data', demo / 'data')
    source = demo / 'runs' / 'source' / 'huggingface' / 'model'
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_demo / 'tiny_llama')).save_pretrained(source)
    make_tasks(demo / 'data', str(tiny_demo / 'tokenizer'), demo / 'tasks', TaskShape(16, 8, 2), max_items=12,
               domains=['c_headers', 'records'])
    for run in ('continue-dro', 'instruct-dro'):  # the instruction stage's start and one tuned model
        shutil.copytree(source, demo / 'runs' / run / 'huggingface' / 'model')
    build_instruct(demo, tiny_demo / 'tokenizer', scale=0.02, max_seq_len=256)
    result = report(demo, {'data': 1.0})
    out = capsys.readouterr().out
    assert 'per-domain continuation accuracy, %' in out and 'chance 50%' in out
    assert set(result['losses'][0]['accuracy']) == {'c_headers', 'records'}
    assert 'instruction tuning: per-task response loss' in out
    tuned = result['instruct_losses']
    assert [r['model'] for r in tuned] == ['continued (start)', 'instruct (dro)'] and tuned[0]['loss'] == tuned[1]['loss']
    assert set(tuned[0]['loss']) == set(DEMO_TASKS)
