"""bench/gpu/run_check.py --dry-run: the GPU check's whole code path at tiny sizes on CPU, before any GPU is seen."""

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / 'bench' / 'gpu'))
from stages import DRY, llama_config, param_counts, train_flops_per_token, write_word_tokenizer  # noqa: E402

STAGES = ['imports', 'train_1b', 'step_timing', 'export_equivalence', 'real_model']


def _numbers(tree) -> list[float]:
    """Every number (not bool) inside nested dicts and lists."""
    if isinstance(tree, bool):
        return []
    if isinstance(tree, (int, float)):
        return [float(tree)]
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _numbers(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in _numbers(v)]
    return []


@pytest.fixture(scope='module')
def dry_run(tmp_path_factory) -> dict:
    """One dry run of every stage; the real-model stage gets a tiny random Llama with a word-level tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    tmp = tmp_path_factory.mktemp('gpu_check')
    real = tmp / 'real_model'
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(**llama_config(DRY))).save_pretrained(real)
    write_word_tokenizer(real, DRY.vocab)
    out = tmp / 'out'
    cmd = [sys.executable, 'bench/gpu/run_check.py', '--dry-run', '--out', str(out), '--work', str(tmp / 'work'),
           '--real-model', str(real)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / 'gpu_check.log').stat().st_size > 0
    return json.loads((out / 'gpu_check.json').read_text())


def test_every_stage_runs_on_cpu_with_finite_figures(dry_run):
    assert dry_run['mode'] == 'dry-run' and dry_run['finished']
    assert list(dry_run['stages']) == STAGES
    for name, stage in dry_run['stages'].items():
        assert stage['status'] == 'ok', f"{name}: {stage.get('error')}"
        assert stage['figures'], name
        assert all(math.isfinite(x) for x in _numbers(stage['figures'])), name
    env = dry_run['environment']
    assert env['packages']['mosaicml'] and env['modules']['torch']['version'] and env['cuda_available'] is False


def test_figures_of_each_stage(dry_run):
    stages = {name: stage['figures'] for name, stage in dry_run['stages'].items()}
    train = stages['train_1b']
    assert train['export_shape_ok'] is True and train['dro_history_rows'] >= 1
    assert 0 < train['exported_params'] < train['params']
    timing = stages['step_timing']
    assert timing['peak_tflops'] == 989.0
    for run in ('plain', 'masked', 'distill'):
        assert timing[run]['step_s'] > 0 and timing[run]['tokens_per_s'] > 0 and 0 < timing[run]['mfu'] < 1
        assert timing[run]['step_peak_memory_gib'] >= 0
    assert timing['masked_over_plain']['step_time'] > 0 and timing['distill_over_plain']['step_time'] > 0
    export = stages['export_equivalence']
    assert export['fp32']['max_abs_diff'] <= 1e-4 and export['bf16']['max_abs_diff'] < 0.5
    real = stages['real_model']
    for update in ('dro', 'constant'):
        assert set(real[update]['export_loss']) == set(real['source_loss'])


def test_real_model_stage_is_skipped_without_a_model(tmp_path):
    """Without --real-model the stage is not started: 'skipped' with the reason, in a second."""
    out = tmp_path / 'out'
    proc = subprocess.run([sys.executable, 'bench/gpu/run_check.py', '--dry-run', '--out', str(out), '--stages',
                           'real_model'], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stage = json.loads((out / 'gpu_check.json').read_text())['stages']['real_model']
    assert stage['status'] == 'skipped' and 'real-model' in stage['error']


def test_a_stage_past_its_limit_is_killed_and_the_check_goes_on(tmp_path):
    """A hang cannot eat the budget: the stage is killed at its limit, reported 'timeout', and the next one runs."""
    import os

    out = tmp_path / 'out'
    proc = subprocess.run([sys.executable, 'bench/gpu/run_check.py', '--dry-run', '--out', str(out), '--stages',
                           'imports', 'export_equivalence', '--budget', '20'], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, 'GPU_CHECK_TEST_HANG': 'imports'})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / 'gpu_check.json').read_text())
    imports, export = report['stages']['imports'], report['stages']['export_equivalence']
    assert imports['status'] == 'timeout' and imports['limit_s'] <= 20 and 'limit' in imports['error']
    assert export['status'] == 'skipped' and 'budget' in export['error']  # the hang spent the whole budget
    assert report['finished']


def test_flop_and_parameter_counts_match_the_model():
    """6N counts every matmul parameter: the HF model's parameters less the input embedding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = llama_config(DRY)
    model = LlamaForCausalLM(LlamaConfig(**config))
    counts = param_counts(config)
    assert counts['total'] == model.num_parameters()
    assert counts['matmul'] == model.num_parameters() - model.model.embed_tokens.weight.numel()
    attention = 12 * config['num_hidden_layers'] * DRY.seq * config['num_attention_heads'] * config['head_dim']
    assert train_flops_per_token(config, DRY.seq) == 6 * counts['matmul'] + attention
