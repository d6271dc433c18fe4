"""The benchmarks' smoke modes on the tiny fixture: every run, seed and domain reported; exports of the target shape."""

import json
import subprocess
import sys

import pytest
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from conftest import DOMAINS, REPO

TINY_TARGET = {'num_hidden_layers': 1, 'hidden_size': 48, 'num_attention_heads': 2, 'num_key_value_heads': 1,
               'intermediate_size': 64}


def test_method_quality_quick_reports_every_rule_seed_and_domain(tiny_demo, tmp_path):
    source = tmp_path / 'source'
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_demo / 'tiny_llama')).save_pretrained(source)
    AutoTokenizer.from_pretrained(tiny_demo / 'tiny_llama').save_pretrained(source)
    out = tmp_path / 'out'
    overrides = ['variables.max_seq_len=64', *(f'algorithms.l0_mask.target.{k}={v}' for k, v in TINY_TARGET.items())]
    cmd = [sys.executable, 'bench/method_quality.py', '--quick', '--data', str(tiny_demo / 'data'), '--source',
           str(source), '--out', str(out), '--rules', 'constant', 'dro', '--seeds', '1', '2',
           '--variant', 'dro-source=callbacks.dro_reweight.reference_loss=source eval_first=true',
           *(f'--override={o}' for o in overrides)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / 'results.json').read_text())
    assert set(result['runs']) == {'constant', 'dro', 'dro-source'} and (out / 'results.png').stat().st_size > 0
    assert result['trade_off_correlation'] is None or -1 <= result['trade_off_correlation'] <= 1
    for rule, seeds in result['runs'].items():
        assert set(seeds) == {'1', '2'}
        for run in seeds.values():
            assert set(run['loss']) == set(DOMAINS)
            config = AutoConfig.from_pretrained(run['model'])
            assert {k: getattr(config, k) for k in TINY_TARGET} == TINY_TARGET
    minus_constant = result['summary']['dro']['minus']['constant']
    assert set(minus_constant) == {'seeds', 'other_machine', 'mean_loss', 'worst_loss', 'worst_degradation', 'loss'}
    assert minus_constant['seeds'] == [1, 2] and set(minus_constant['loss']) == set(DOMAINS)
    # Every run records the machine it trained on; here all trained on this one, so no pair is flagged.
    machines = [run['machine'] for seeds in result['runs'].values() for run in seeds.values()]
    assert all(m == machines[0] for m in machines) and machines[0]['threads'] >= 1
    assert minus_constant['other_machine'] == [] and 'different machines' not in proc.stdout
    assert set(result['summary']['dro-source']['minus']) == {'constant', 'dro'}
    for seed in ('1', '2'):  # the variant measured its reference at batch 0, before any update
        rows = result['runs']['dro-source'][seed]['history']
        assert rows[0]['batch'] == 0 and rows[0]['update'] == 0
        assert all(r[f'ref_loss/{d}'] == rows[0][f'loss/{d}'] for r in rows for d in DOMAINS)
    assert 'paired by seed' in proc.stdout
    # The rows the running evaluations read (--quick: 1 batch of device_eval_batch_size), scored on every export and
    # the source: the prefix's degradation error is (L_prefix / L_source,prefix) - (L_whole / L_source,whole).
    (rows, source_prefix), = result['source_prefix_loss'].items()
    assert int(rows) == 16 and 'what the running evaluations read' in proc.stdout
    for seeds in result['runs'].values():
        for run in seeds.values():
            assert run['prefix'] == 16 and run['prefix_loss']['rows'] == 16
            for d in DOMAINS:
                assert run['prefix_error'][d] == pytest.approx(
                    run['prefix_loss'][d] / source_prefix[d] - run['loss'][d] / result['source_loss'][d], abs=1e-12)
    assert 0 <= result['summary']['dro']['prefix_names_worst'] <= 2
    # Where the paired difference was made: the running gap to constant. The first evaluation (batch 2; no eval_first)
    # follows batches trained on the same mixture stream (weights chosen at an evaluation apply only later), so 0.
    gaps = [line for line in proc.stdout.splitlines() if line.startswith('running eval, dro - constant, seed ')]
    assert len(gaps) == 2 and all(' 2:+0.000' in line or ' 2:-0.000' in line for line in gaps), gaps
    assert (out / 'results_trade_off.png').stat().st_size > 0
    # --summary-only trains nothing: of the rules and seeds named, it summarises those finished under --out.
    summary_only = subprocess.run([*cmd[:cmd.index('--rules')], '--rules', 'constant', 'uniform', 'dro', '--seeds', '1',
                                   '3', '--summary-only'], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert summary_only.returncode == 0, summary_only.stdout[-3000:] + summary_only.stderr[-3000:]
    again = json.loads((out / 'results.json').read_text())
    assert {rule: set(seeds) for rule, seeds in again['runs'].items()} == {'constant': {'1'}, 'dro': {'1'}}
    assert again['runs']['dro']['1']['loss'] == result['runs']['dro']['1']['loss']
    assert not (out / 'uniform-seed1').exists() and not (out / 'dro-seed3').exists()
    nothing = subprocess.run([*cmd[:cmd.index('--rules')], '--rules', 'uniform', '--summary-only'], cwd=REPO,
                             capture_output=True, text=True, timeout=600)
    assert nothing.returncode == 2 and '--summary-only: no finished run' in nothing.stderr


def test_distill_overhead_prints_both_steps_and_the_teacher(tmp_path):
    """bench/distill_overhead.py at a toy size: a time and a peak memory per step for both trainers, and the
    resident teacher's weights (fp32 on CPU: 4 bytes per parameter of the benchmark's Llama)."""
    import re

    from transformers import LlamaConfig, LlamaForCausalLM

    cmd = [sys.executable, 'bench/distill_overhead.py', '--hidden', '64', '--layers', '1', '--vocab', '256',
           '--seq-len', '32', '--batch', '2', '--steps', '3', '--warmup-steps', '1', '--device', 'cpu']
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {m.group(1).strip(): m.groups()[1:] for m in
            re.finditer(r'^([^|\n]+)\| ([0-9.]+)\s*\| ([0-9.]+)\s*\| ([0-9.]*)', proc.stdout, re.M)}
    plain, kd, ratio = (float(v) for v in rows['train step (cpu s/batch)'])
    assert plain > 0 and kd > 0 and ratio == pytest.approx(kd / plain, rel=0.03)  # the printed figures are rounded
    assert float(rows['step peak memory above its start (MiB)'][1]) > 0
    params = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=1, num_attention_heads=1,
                                          num_key_value_heads=1, intermediate_size=192)).num_parameters()
    assert float(rows['resident teacher weights (MiB)'][1]) == pytest.approx(4 * params / 2 ** 20, abs=0.05)


def test_method_quality_instruct_stage_judges_response_loss_per_task(tiny_demo, tmp_path):
    """`--stage instruct`: tuning runs per rule on instruction data, judged on each task's response-only loss."""
    from drpruning_composer.data.demo_instruct import TASKS, build_instruct
    from drpruning_composer.evaluate import evaluate

    source = tmp_path / 'source'
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_demo / 'tiny_llama')).save_pretrained(source)
    AutoTokenizer.from_pretrained(tiny_demo / 'tiny_llama').save_pretrained(source)
    build_instruct(tmp_path, tiny_demo / 'tokenizer', scale=0.05, max_seq_len=256)
    out = tmp_path / 'out'
    cmd = [sys.executable, 'bench/method_quality.py', '--quick', '--stage', 'instruct', '--data',
           str(tmp_path / 'instruct_data'), '--source', str(source), '--out', str(out), '--rules', 'constant', 'dro',
           '--seeds', '1']
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / 'results.json').read_text())
    assert result['stage'] == 'instruct' and set(result['source_loss']) == set(TASKS)
    run = result['runs']['dro']['1']
    assert run['loss'] == pytest.approx(evaluate([run['model']], str(tmp_path / 'instruct_data'))[0]['loss'])
    assert run['loss'] != pytest.approx(result['source_loss'])  # tuned: the model moved from its start


def test_rule_specs_pair_lm_and_distillation_runs_and_pass_preflight(tiny_demo, tmp_path):
    """`--reference dynamic teacher --distill`: dro once per reference, every rule also with distillation from the
    source, and each run's YAML (the demo recipe with the rule's overrides) passes the pre-flight check."""
    sys.path.insert(0, str(REPO / 'bench'))
    from method_quality import dynamic_rules, rule_overrides, rule_specs
    from recipes import recipe

    from drpruning_composer.config_check import load_and_check

    source = tmp_path / 'source'
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_demo / 'tiny_llama')).save_pretrained(source)
    AutoTokenizer.from_pretrained(tiny_demo / 'tiny_llama').save_pretrained(source)
    specs = rule_specs(['constant', 'dro'], {'dro-x': ['callbacks.dro_reweight.rho=0.2']}, ['dynamic', 'teacher'],
                       0.5, source)
    assert list(specs) == ['constant', 'dro', 'dro-teacher', 'dro-x', 'constant+kd', 'dro+kd', 'dro-teacher+kd',
                           'dro-x+kd']
    # The weight panels of the plot and the running gaps take the rules whose weights move, by base rule: the fixed
    # mixtures' distillation twins are not among them.
    both = rule_specs(['constant', 'uniform', 'sheared'], {}, ['dynamic'], 0.5, source)
    assert dynamic_rules(dict.fromkeys(both), both) == ['sheared', 'sheared+kd']
    assert specs['dro-teacher+kd'] == ('dro', ['callbacks.dro_reweight.reference_loss=teacher',
                                               'algorithms.distill.alpha=0.5', f'algorithms.distill.teacher={source}'])
    for rule in specs:
        overrides = rule_overrides(rule, [0.25] * 4, specs)
        cfg = load_and_check(str(recipe('prune.yaml', tiny_demo / 'data', source, tmp_path / rule, overrides)))
        assert cfg['callbacks']['dro_reweight']['update'] == ('constant' if rule.startswith('constant') else 'dro')
        assert ('distill' in cfg['algorithms']) == rule.endswith('+kd')


def test_summary_pairs_each_distillation_run_with_its_lm_twin_seed_by_seed():
    """`uniform+kd` is paired with `uniform` on the seeds both ran (the difference distillation makes under one
    mixing rule), not only with `constant`, in every metric and in each domain's loss; a rule without a twin gets no
    such pair."""
    sys.path.insert(0, str(REPO / 'bench'))
    from method_quality import summarise

    source = {'a': 2.0, 'b': 4.0}

    def run(a: float, b: float) -> dict:
        return {'loss': {'a': a, 'b': b}, 'mean_loss': (a + b) / 2, 'worst_loss': max(a, b)}

    runs = {'uniform': {17: run(3.0, 5.0), 18: run(3.2, 5.0)},
            'uniform+kd': {17: run(2.9, 4.6), 18: run(3.0, 4.8), 19: run(9.0, 9.0)},
            'sheared': {17: run(3.1, 5.1)}}
    specs = {'uniform': ('uniform', []), 'uniform+kd': ('uniform', ['algorithms.distill.alpha=0.5']),
             'sheared': ('sheared', [])}
    summary = summarise(runs, source, specs)
    twin = summary['uniform+kd']['minus']['uniform']
    # mean loss: seed 17 3.75 - 4.0, seed 18 3.9 - 4.1 (seed 19 has no LM twin); worst degradation (domain a):
    # seed 17 1.45 - 1.5, seed 18 1.5 - 1.6
    assert twin['mean_loss'] == pytest.approx((-0.225, 0.025))
    assert twin['worst_degradation'] == pytest.approx((-0.075, 0.025))
    # per domain: a -0.1, -0.2; b -0.4, -0.2 (where distillation gains, seed by seed)
    assert twin['loss']['a'] == pytest.approx((-0.15, 0.05)) and twin['loss']['b'] == pytest.approx((-0.3, 0.1))
    assert twin['seeds'] == [17, 18]
    # A dynamic rule against the fixed mixture of the same loss, on the one seed both ran; uniform has no baseline.
    assert 'minus' not in summary['uniform'] and list(summary['sheared']['minus']) == ['uniform']
    assert summary['sheared']['minus']['uniform']['seeds'] == [17]
    assert summary['sheared']['minus']['uniform']['mean_loss'][0] == pytest.approx(0.1)


def test_pairs_name_the_seeds_whose_two_runs_trained_on_different_machines(capsys):
    """A seed whose two runs recorded different machines is listed under `other_machine` and printed beside the
    pair; equal machines, or a run recorded without one (before runs carried it), are not listed."""
    sys.path.insert(0, str(REPO / 'bench'))
    from method_quality import machine, print_summary, summarise

    here = machine()
    there = {**here, 'boot': 'another boot'}

    def run(a: float, where: dict | None) -> dict:
        return {'loss': {'a': a}, 'mean_loss': a, 'worst_loss': a, 'wall_s': 1.0,
                **({'machine': where} if where else {})}

    runs = {'constant': {1: run(3.0, here), 2: run(3.0, here), 3: run(3.0, here)},
            'uniform': {1: run(2.9, here), 2: run(2.8, there), 3: run(2.7, None)}}
    specs = {'constant': ('constant', []), 'uniform': ('uniform', [])}
    summary = summarise(runs, {'a': 2.0}, specs)
    assert summary['uniform']['minus']['constant']['other_machine'] == [2]
    print_summary(summary, ['a'], {'a': 10})
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith('uniform - constant'))
    assert line.endswith('(seed 2: the two runs trained on different machines)')


def test_trade_off_correlation_is_pearson_across_rules_and_none_without_spread():
    """The correlation of the rules' mean loss with their worst degradation (their means over seeds): exact on a
    line, its sign follows the slope, and it is None for fewer than 3 rules or a quantity that does not vary."""
    sys.path.insert(0, str(REPO / 'bench'))
    from method_quality import trade_off_correlation

    def summary(points: list[tuple[float, float]]) -> dict:
        return {f'r{i}': {'worst_degradation': (x, 0.01), 'mean_loss': (y, 0.02)} for i, (x, y) in enumerate(points)}

    assert trade_off_correlation(summary([(1.6, 3.5), (1.7, 3.7), (1.8, 3.9)])) == pytest.approx(1.0)
    assert trade_off_correlation(summary([(1.6, 3.9), (1.7, 3.7), (1.8, 3.5)])) == pytest.approx(-1.0)
    # x = 0, 1, 2, 3 and y = 0, 1, 1, 0: no linear relation
    assert trade_off_correlation(summary([(0, 0), (1, 1), (2, 1), (3, 0)])) == pytest.approx(0.0, abs=1e-12)
    assert trade_off_correlation(summary([(1.6, 3.5), (1.8, 3.9)])) is None
    assert trade_off_correlation(summary([(1.6, 3.5), (1.6, 3.7), (1.6, 3.9)])) is None


def test_comparisons_pair_every_dynamic_rule_with_the_fixed_mixtures_of_its_loss_and_the_method_with_all():
    """Which differences the benchmark prints: every rule against constant, `+kd` against its twin and constant+kd,
    sheared and dro against each fixed mixture with the same loss (sheared+kd - uniform+kd too), dro and its
    variants against every other rule with the same loss, each pair once (a later variant minus an earlier rule)."""
    sys.path.insert(0, str(REPO / 'bench'))
    from method_quality import comparisons, rule_specs

    specs = rule_specs(['constant', 'uniform', 'sheared', 'dro'], {'dro-x': ['callbacks.dro_reweight.rho=1']},
                       ['teacher'], 0.5, REPO)
    pairs = comparisons(list(specs), specs)
    assert pairs == {
        'uniform': ['constant'],
        'sheared': ['constant', 'uniform'],
        'dro-teacher': ['constant', 'uniform', 'sheared'],
        'dro-x': ['constant', 'uniform', 'sheared', 'dro-teacher'],
        'constant+kd': ['constant'],
        'uniform+kd': ['uniform', 'constant', 'constant+kd'],
        'sheared+kd': ['sheared', 'constant', 'constant+kd', 'uniform+kd'],
        'dro-teacher+kd': ['dro-teacher', 'constant', 'constant+kd', 'uniform+kd', 'sheared+kd'],
        'dro-x+kd': ['dro-x', 'constant', 'constant+kd', 'uniform+kd', 'sheared+kd', 'dro-teacher+kd'],
    }


def test_source_evaluation_is_kept_for_reuse_and_redone_for_another_source(tmp_path, monkeypatch):
    """The source's evaluation is written under --out; with reuse it is read back for the same source, data and
    tasks, and made again for any other (a stale cache would judge every run against the wrong model)."""
    sys.path.insert(0, str(REPO / 'bench'))
    import drpruning_composer.evaluate as evaluate_module
    from method_quality import source_evaluation

    calls = []

    def fake_evaluate(models, data, max_samples=None, tasks=None):
        calls.append((models[0], data, max_samples))
        return [{'model': models[0], 'loss': {'a': float(len(calls))}}]

    monkeypatch.setattr(evaluate_module, 'evaluate', fake_evaluate)
    first = source_evaluation(tmp_path / 's1', tmp_path / 'data', None, tmp_path, reuse=True)
    assert source_evaluation(tmp_path / 's1', tmp_path / 'data', None, tmp_path, reuse=True) == first
    assert len(calls) == 1
    assert source_evaluation(tmp_path / 's2', tmp_path / 'data', None, tmp_path, reuse=True)['loss'] == {'a': 2.0}
    assert source_evaluation(tmp_path / 's2', tmp_path / 'data', None, tmp_path, reuse=False)['loss'] == {'a': 3.0}
    assert len(calls) == 3
    # The evaluated prefix (first N rows) is kept apart from the whole split's evaluation, per N.
    prefix = source_evaluation(tmp_path / 's2', tmp_path / 'data', None, tmp_path, reuse=True, max_samples=16)
    assert prefix['loss'] == {'a': 4.0} and calls[-1][2] == 16
    assert source_evaluation(tmp_path / 's2', tmp_path / 'data', None, tmp_path, reuse=True, max_samples=16) == prefix
    assert source_evaluation(tmp_path / 's2', tmp_path / 'data', None, tmp_path, reuse=True)['loss'] == {'a': 3.0}
    assert len(calls) == 4


def test_method_quality_runs_only_the_variants_when_no_rule_is_named(tmp_path, capsys, monkeypatch):
    """`--rules` with no names runs only the `--variant` rules (a variant on its own seed in a second process); with
    neither, the command stops before any work with an error naming `--rules`."""
    sys.path.insert(0, str(REPO / 'bench'))
    from method_quality import main, rule_specs

    specs = rule_specs([], {'dro-late': ['callbacks.dro_reweight.update_after=0.5']}, ['dynamic'], None, tmp_path)
    assert specs == {'dro-late': ('dro', ['callbacks.dro_reweight.update_after=0.5'])}
    import method_quality

    class ReachedTheData(Exception):
        pass

    def stop(args):
        raise ReachedTheData

    monkeypatch.setattr(method_quality, 'data_and_source', stop)  # the argument checks passed
    with pytest.raises(ReachedTheData):
        main(['--rules', '--variant', 'dro-late=callbacks.dro_reweight.update_after=0.5', '--out', str(tmp_path / 'v')])
    with pytest.raises(SystemExit) as exit_info:
        main(['--rules', '--out', str(tmp_path / 'out')])
    assert exit_info.value.code == 2
    assert '--rules: name at least one rule, or give a --variant' in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_forecast_excess_names_the_slow_domain_that_today_s_loss_misses(tmp_path):
    """Two domains on exact power laws L = 2 + A (T/40)^-beta: `a` starts far worse but falls fast, `b` falls slowly
    and ends worst. Today's excess names `a` at batches 30-40; the forecast from the same evaluations names `b` and
    predicts the last loss to within 0.05 nats. An evaluation with a non-finite loss is left out."""
    sys.path.insert(0, str(REPO / 'bench'))
    from forecast_excess import worst_domains

    from drpruning_composer.dro.report import write_history_csv

    (tmp_path / 'dro').mkdir()
    rows = []
    for batch in range(10, 101, 10):
        t = 4.0 * batch
        losses = {'a': 2 + 12 * (t / 40) ** -1.0, 'b': 2 + 3 * (t / 40) ** -0.2}
        rows.append({'batch': batch, 'sample': t, 'update': batch // 10,
                     **{f'{q}/{d}': v for d, loss in losses.items()
                        for q, v in (('weight', 0.5), ('loss', loss), ('ref_loss', 2.0))}})
    rows.insert(5, {**rows[4], 'batch': 55, 'loss/a': float('nan')})  # a non-finite evaluation is left out
    write_history_csv(str(tmp_path / 'dro' / 'history.csv'), ['a', 'b'], rows)
    end_worst, table = worst_domains(tmp_path, start=30)
    assert end_worst == 'b'
    assert [row[:3] for row in table[:2]] == [(30, 'a', 'b'), (40, 'a', 'b')]
    assert [row[0] for row in table] == list(range(30, 100, 10))  # the last evaluation is the answer, not a row
    assert all(row[3] < 0.05 for row in table)
