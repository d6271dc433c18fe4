"""Method quality: the same pruning job under each data-mixing rule, over several seeds, judged on the exports.

For every rule and seed it runs `composer train.py` on the demo's recipe of one stage, rewritten for the data
folder's domains (`--stage prune`: `yamls/demo/prune.yaml`; `continue`: that, then continued pretraining of the
export; `instruct`: instruction tuning of `--source` on instruction data, `yamls/demo/instruct.yaml`, where the
domains are tasks, losses are response-only and "degradation" is L / L_start, the tuned model against its starting
point) and evaluates the exported model on the **whole** val split of every domain. It prints, as mean +- standard
error over seeds: per-domain loss, mean loss, worst-domain loss, worst-domain degradation against the source (max
over domains of L_pruned / L_source) and wall time, and with `--tasks` each domain's multiple-choice continuation
accuracy (`drpruning-make-tasks`) and their average, as the paper's per-domain table; then the same metrics and each
domain's loss as per-seed differences (paired by seed, which removes the seed noise that dominates unpaired
comparisons): every rule against `constant`, a distillation run against its LM-loss twin and `constant+kd`, a
dynamic rule against every fixed mixture trained with the same loss, and `dro` and its variants against every other
rule trained with the same loss. Since the update steers by the running evaluations, it also prints how well those
read each domain: every export and the source are scored again on the first `eval_subset_num_batches` x
`device_eval_batch_size` val rows (the rows a capped evaluation reads), and the table gives that prefix's
degradation minus the whole split's, and how often it names the same worst domain. Each dynamic rule's running eval
loss minus the fixed mixture's, per seed and evaluation, shows where a paired difference was made (0 until the first
update). Each run records the machine it trained on (`machine()`), and a pair whose two runs of a seed trained on
different machines names that seed: runs repeat bit for bit on one machine, not across machines. It writes
`results.json`, `results.png` (per-domain bars with error bars, the trade-off and the weight
trajectories of the first seed) and `results_trade_off.png` (mean loss against worst-domain degradation, one point
per rule) under `--out`. `--summary-only` trains nothing and summarises the named rules' runs already finished
there.

Rules: `constant` (the reference ratio, fixed), `uniform` (equal weights, fixed), `sheared` (Sheared-LLaMA's dynamic
batch loading), `dro` (DRPruning: chi-square DRO step, dynamic reference loss and ratio). The reference ratio is the
data folder's natural token proportions unless `--proportions` gives it.

    python bench/method_quality.py                                   # the demo's data and source, 3 seeds
    python bench/method_quality.py --data DIR --source MODEL --rules constant dro --seeds 1 2 3 4
    python bench/method_quality.py --variant dro-dynamic=callbacks.dro_reweight.reference_loss=dynamic
    python bench/method_quality.py --stage instruct --rules constant dro   # the demo's instruction tasks
    python bench/method_quality.py --recipe prune_real.yaml --data demo_real/data --source demo_real/source

A `--variant NAME=KEY=VALUE[ KEY=VALUE...]` is one more rule: `dro` with those overrides, run on the same seeds and
paired against every other rule like `dro` (`--rules` with no names runs the variants alone). `--reference dynamic
teacher` runs `dro` with each reference loss, and `--distill [ALPHA]` runs every rule a second time with distillation
from the source model (`NAME+kd`):

    python bench/method_quality.py --rules constant dro --reference dynamic teacher --distill
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipes import add_data_arguments, data_and_source, domains_of, ensure_demo_instruct, recipe, train  # noqa: E402

RULES = ('constant', 'uniform', 'sheared', 'dro')
METRICS = ('mean_loss', 'worst_loss', 'worst_degradation', 'mean_accuracy', 'wall_s')
STAGES = ('prune', 'continue', 'instruct')
QUICK = ['max_duration=6ba', 'eval_interval=2ba', 'save_interval=6ba', 'eval_subset_num_batches=1',
         'global_train_batch_size=4', 'device_train_microbatch_size=4', 'callbacks.dro_reweight.min_fit_points=4']
QUICK_PRUNE = ['algorithms.l0_mask.lagrangian_warmup=2ba']


def split_samples(data: Path, split: str) -> dict[str, int]:
    """Rows per domain of a split (fixed-length token rows, or instruction examples), from the manifest."""
    manifest = json.loads((data / 'manifest.json').read_text())['domains']
    return {d: int(manifest[d][split]['samples']) for d in domains_of(data)}


def natural_proportions(data: Path) -> list[float]:
    """Each domain's share of the train rows: what the loaders' `proportions: natural` uses (for token data, the
    share of the tokens)."""
    rows = np.array(list(split_samples(data, 'train').values()), dtype=np.float64)
    return (rows / rows.sum()).tolist()


def rule_overrides(rule: str, proportions: list[float], specs: dict[str, tuple[str, list[str]]]) -> list[str]:
    """The YAML overrides of a named rule: its base rule's mixture and update, then the rule's own overrides."""
    base, extra = specs[rule]
    weights = [1.0 / len(proportions)] * len(proportions) if base == 'uniform' else proportions
    update = 'constant' if base == 'uniform' else base
    return [f'train_loader.dataset.proportions={json.dumps(weights)}', f'callbacks.dro_reweight.update={update}',
            *extra]


def rule_specs(rules: list[str], variants: dict[str, list[str]], references: list[str], distill_alpha: float | None,
               teacher: Path) -> dict[str, tuple[str, list[str]]]:
    """Every rule the benchmark runs, as name -> (base rule, extra overrides).

    `dro` runs once per reference loss (`dro` with `dynamic`, `dro-teacher` with the teacher's losses); variants are
    named `dro` runs; with `distill_alpha` every rule also runs with distillation from `teacher` (`NAME+kd`).
    """
    specs: dict[str, tuple[str, list[str]]] = {}
    for rule in rules:
        if rule != 'dro':
            specs[rule] = (rule, [])
            continue
        for reference in references:
            name = 'dro' if reference == 'dynamic' else f'dro-{reference}'
            specs[name] = ('dro', [f'callbacks.dro_reweight.reference_loss={reference}'])
    specs.update({name: ('dro', overrides) for name, overrides in variants.items()})
    if distill_alpha is not None:
        kd = [f'algorithms.distill.alpha={distill_alpha}', f'algorithms.distill.teacher={teacher}']
        specs.update({f'{name}+kd': (base, [*extra, *kd]) for name, (base, extra) in list(specs.items())})
    return specs


def parse_variants(specs: list[str]) -> dict[str, list[str]]:
    """`NAME=KEY=VALUE[ KEY=VALUE...]` -> {NAME: [KEY=VALUE, ...]}: named `dro` runs with extra overrides."""
    variants = {}
    for spec in specs:
        name, _, overrides = spec.partition('=')
        if not name or name in RULES or name in variants or '=' not in overrides:
            raise ValueError(f'--variant {spec!r}: expected NAME=KEY=VALUE[ KEY=VALUE...] with a new NAME')
        variants[name] = overrides.split()
    return variants


def run_one(rule: str, seed: int, args: argparse.Namespace, data: Path, source: Path, proportions: list[float],
            overrides: list[str]) -> dict:
    """Prune (and continue) under one rule and seed; returns the judged model's folder, its whole-split evaluation,
    wall time and weight history.

    With --reuse, a finished run is not repeated (nor re-evaluated) and reports what was recorded when it ran; a
    finished pruning run is continued without being repeated.
    """
    from drpruning_composer.dro.report import read_history_csv
    from drpruning_composer.evaluate import evaluate

    record = run_record(args.out.resolve(), rule, seed, 'prune')
    save = record.parent
    common = [*rule_overrides(rule, proportions, args.specs), f'variables.seed={seed}', 'save_overwrite=true',
              *overrides]
    first = 'instruct' if args.stage == 'instruct' else 'prune'
    yaml = args.recipe if first == 'prune' and args.recipe else f'{first}.yaml'
    if not (args.reuse and record.is_file()):
        start = time.perf_counter()
        extra = QUICK_PRUNE if args.quick and first == 'prune' else []
        train(recipe(yaml, data, source, save, [*common, *extra, f'run_name={rule}-seed{seed}']),
              save / f'{first}.log')
        model = save / 'pruned_hf' if first == 'prune' else save / 'huggingface' / 'model'
        record.write_text(json.dumps({'model': str(model), 'history': str(save / 'dro' / 'history.csv'),
                                      'recipe': str(save / yaml), 'wall_s': time.perf_counter() - start,
                                      'machine': machine()}))
    if args.stage == 'continue':  # judged: the continued model; its wall time includes the pruning run's
        pruned, record = json.loads(record.read_text()), run_record(args.out.resolve(), rule, seed, 'continue')
        cont = record.parent
        if not (args.reuse and record.is_file()):
            start = time.perf_counter()
            train(recipe('continue.yaml', data, Path(pruned['model']), cont,
                         [*common, f'run_name={rule}-seed{seed}-continue']), cont / 'continue.log')
            record.write_text(json.dumps({'model': str(cont / 'huggingface' / 'model'),
                                          'history': str(cont / 'dro' / 'history.csv'),
                                          'recipe': str(cont / 'continue.yaml'),
                                          'wall_s': pruned['wall_s'] + time.perf_counter() - start,
                                          'machine': machine()}))
    run = json.loads(record.read_text())
    if 'loss' not in run or (args.tasks and 'accuracy' not in run):
        run.update(evaluate([run['model']], str(data), max_samples=None, tasks=args.tasks)[0])
        record.write_text(json.dumps(run))
    run['prefix'] = evaluated_prefix(Path(run.get('recipe', save / yaml)))
    if run['prefix'] and run.get('prefix_loss', {}).get('rows') != run['prefix']:
        run['prefix_loss'] = {'rows': run['prefix'],
                              **evaluate([run['model']], str(data), max_samples=run['prefix'])[0]['loss']}
        record.write_text(json.dumps(run))
    _, run['history'] = read_history_csv(run['history'])
    return run


def machine() -> dict:
    """What a run's numbers depend on besides its recipe and seed: this boot of this machine (Linux's `boot_id`;
    None elsewhere), the CPU model, the kernels torch dispatches to (`get_cpu_capability`), torch's version and its
    intra-op threads. A run repeats bit for bit on one machine; across machines reruns have differed by up to 0.10
    nats per domain (docs/dro_update.md, "Uniform-then-dro with distillation"), so a pair of runs from two machines
    carries that noise."""
    import platform

    import torch

    def read(path: str, field: str | None = None) -> str | None:
        try:
            text = Path(path).read_text()
        except OSError:
            return None
        if field is None:
            return text.strip()
        return next((line.split(':', 1)[1].strip() for line in text.splitlines() if line.startswith(field)), None)

    return {'boot': read('/proc/sys/kernel/random/boot_id'),
            'cpu': read('/proc/cpuinfo', 'model name') or platform.processor(),
            'capability': torch.backends.cpu.get_cpu_capability(), 'torch': torch.__version__,
            'threads': torch.get_num_threads()}


def run_record(out: Path, rule: str, seed: int, stage: str) -> Path:
    """The file a run of `rule` and `seed` under `out` writes when it has trained to the end of `stage` (what
    --reuse keeps): `NAME-seedN/run.json`, or `NAME-seedN/continue/run.json` for the continued model."""
    save = out / f'{rule}-seed{seed}'
    return save / 'continue' / 'run.json' if stage == 'continue' else save / 'run.json'


def evaluated_prefix(yaml: Path) -> int | None:
    """Rows per val split that each running evaluation of a recipe reads: `eval_subset_num_batches` x
    `device_eval_batch_size` (None when evaluations read whole splits, or the recipe is gone)."""
    from omegaconf import OmegaConf as om

    if not yaml.is_file():
        return None
    cfg = om.load(yaml)
    batches = cfg.get('eval_subset_num_batches', -1)
    return None if batches is None or batches < 0 else int(batches) * int(cfg.device_eval_batch_size)


def source_evaluation(source: Path, data: Path, tasks: Path | None, out: Path, reuse: bool,
                      max_samples: int | None = None) -> dict:
    """The source model's evaluation on the whole val splits (or their first `max_samples` rows), kept in
    `out/source.json` (`source_first{N}.json`) and, with `reuse`, read back when it was made for the same source,
    data and tasks (a real model's takes minutes on CPU)."""
    from drpruning_composer.evaluate import evaluate

    key = {'source': str(source), 'data': str(data), 'tasks': str(tasks) if tasks else None}
    cache = out / ('source.json' if max_samples is None else f'source_first{max_samples}.json')
    if reuse and cache.is_file():
        saved = json.loads(cache.read_text())
        if saved['key'] == key:
            return saved['evaluation']
    evaluation = evaluate([str(source)], str(data), max_samples=max_samples, tasks=tasks)[0]
    partial = cache.with_suffix('.json.partial')  # written whole, then renamed: a crash leaves no half file
    partial.write_text(json.dumps({'key': key, 'evaluation': evaluation}))
    partial.replace(cache)
    return evaluation


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (nan with fewer than 2 values)."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float('nan')


def paired(runs: dict[str, dict[int, dict]], rule: str, baseline: str) -> dict:
    """Mean +- s.e. over the seeds both rules ran (listed under `seeds`; none: only that key) of the per-seed
    difference `rule - baseline`, per metric, and per domain under `loss` ({domain: (mean, s.e.)} of the export
    losses' differences: where a rule gains and pays). `other_machine` lists the seeds whose two runs recorded
    different `machine()`s (a record without one is not listed): their difference carries the machines' noise too."""
    seeds = [s for s in runs[rule] if s in runs[baseline]]
    rule_runs, base_runs = [runs[rule][s] for s in seeds], [runs[baseline][s] for s in seeds]
    if not seeds:
        return {'seeds': []}
    values: dict = {'seeds': seeds, 'other_machine': [
        s for s, r, b in zip(seeds, rule_runs, base_runs) if r.get('machine') and b.get('machine')
        and r['machine'] != b['machine']]}
    values |= {m: mean_se([r[m] - b[m] for r, b in zip(rule_runs, base_runs)])
               for m in METRICS if m != 'wall_s' and m in rule_runs[0] and m in base_runs[0]}
    if 'loss' in rule_runs[0] and 'loss' in base_runs[0]:
        values['loss'] = {d: mean_se([r['loss'][d] - b['loss'][d] for r, b in zip(rule_runs, base_runs)])
                          for d in rule_runs[0]['loss']}
    return values


def running_gap(runs: dict[str, dict[int, dict]], rule: str, baseline: str,
                domains: list[str]) -> dict[int, list[tuple[float, float]]]:
    """Per seed both rules ran: (batch, rule's running eval loss - baseline's), the losses averaged over `domains`
    with equal weights, at every evaluation both histories hold. Before the first update the two runs of a seed share
    one trajectory and the gap is 0; how fast it opens after that, against how large the final paired difference is,
    shows where that difference was made."""
    gaps = {}
    for seed in [s for s in runs[rule] if s in runs[baseline]]:
        base = {r['batch']: np.mean([r[f'loss/{d}'] for d in domains]) for r in runs[baseline][seed]['history']}
        gaps[seed] = [(r['batch'], float(np.mean([r[f'loss/{d}'] for d in domains]) - base[r['batch']]))
                      for r in runs[rule][seed]['history'] if r['batch'] in base]
    return gaps


def comparisons(rules: list[str], specs: dict[str, tuple[str, list[str]]]) -> dict[str, list[str]]:
    """The baselines each rule is paired against, seed by seed (`rule - baseline`): a distillation run `NAME+kd`
    against its LM-loss twin `NAME` (what distillation changes under one mixing rule); every rule against `constant`
    (and a distillation run against `constant+kd`); a dynamic rule (base `sheared` or `dro`: its weights move)
    against every fixed mixture (base `constant` or `uniform`) trained with the same loss (`+kd` or not); `dro` and
    its variants (the method) against every other rule trained with the same loss, a rule listed later minus one
    listed earlier. Each pair of rules appears once, in the first of these orders that names it."""
    pairs: list[tuple[str, str]] = []

    def add(rule: str, baseline: str) -> None:
        if baseline in rules and baseline != rule and (rule, baseline) not in pairs and (baseline, rule) not in pairs:
            pairs.append((rule, baseline))

    kd = {r: r.endswith('+kd') for r in rules}
    dynamic = dynamic_rules(rules, specs)
    for rule in rules:
        add(rule, rule.removesuffix('+kd'))
    for rule in rules:
        add(rule, 'constant')
        if kd[rule]:
            add(rule, 'constant+kd')
    for rule in dynamic:
        for other in rules:
            if other not in dynamic and kd[other] == kd[rule]:
                add(rule, other)
    for rule in reversed(rules):  # a variant minus the rules listed before it (the default, the peers)
        if specs[rule][0] == 'dro':
            for other in rules:
                if kd[other] == kd[rule]:
                    add(rule, other)
    baselines: dict[str, list[str]] = {}
    for rule, baseline in pairs:
        baselines.setdefault(rule, []).append(baseline)
    return baselines


def summarise(runs: dict[str, dict[int, dict]], source_loss: dict[str, float],
              specs: dict[str, tuple[str, list[str]]],
              source_prefix: dict[int, dict[str, float]] | None = None) -> dict:
    """Per rule: the seeds it ran, every metric's mean +- s.e. over them, and under `minus` its paired differences
    against the baselines `comparisons` names (on the seeds both ran). With
    `source_prefix` (the source's loss on the first N val rows, per N), also the prefix's error on each domain's
    degradation (L / L_source on the first rows, both models on the same rows, minus on the whole split; > 0: the
    running evaluations overstate it) and the number of runs whose prefix names the whole split's worst domain."""
    from drpruning_composer.evaluate import degradation

    for seeds in runs.values():
        for r in seeds.values():
            whole = degradation(r['loss'], source_loss)
            r['worst_degradation'] = max(whole.values())
            if source_prefix and r.get('prefix') in source_prefix:
                prefix = degradation(r['prefix_loss'], source_prefix[r['prefix']])
                r['prefix_error'] = {d: prefix[d] - whole[d] for d in whole}
                r['prefix_names_worst'] = max(prefix, key=prefix.get) == max(whole, key=whole.get)
    baselines = comparisons(list(runs), specs)
    summary = {}
    for rule, seeds in runs.items():
        entry = {'seeds': sorted(seeds)}
        entry.update({m: mean_se([r[m] for r in seeds.values()]) for m in METRICS if m in next(iter(seeds.values()))})
        for quantity in ('loss', 'accuracy'):
            if quantity in next(iter(seeds.values())):
                entry[quantity] = {d: mean_se([r[quantity][d] for r in seeds.values()]) for d in source_loss}
        if all('prefix_error' in r for r in seeds.values()):
            entry['prefix_error'] = {d: mean_se([r['prefix_error'][d] for r in seeds.values()]) for d in source_loss}
            entry['prefix_names_worst'] = sum(r['prefix_names_worst'] for r in seeds.values())
        if rule in baselines:
            entry['minus'] = {other: paired(runs, rule, other) for other in baselines[rule]}
        summary[rule] = entry
    return summary


def trade_off_correlation(summary: dict) -> float | None:
    """Pearson correlation, across rules, of the export's mean loss and its worst-domain degradation (each a rule's
    mean over its seeds); None with fewer than 3 rules or when either does not vary. Near +1: the rules that balance
    the domains best are also best on average, so there is little to trade between the two."""
    x = np.array([e['worst_degradation'][0] for e in summary.values()])
    y = np.array([e['mean_loss'][0] for e in summary.values()])
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def _pm(value: tuple[float, float], digits: int = 4) -> str:
    return f'{value[0]:.{digits}f}+-{value[1]:.{digits}f}'


def _percent(value: tuple[float, float]) -> tuple[float, float]:
    return 100 * value[0], 100 * value[1]


def print_summary(summary: dict, domains: list[str], samples: dict[str, int], prefix_rows: str = '',
                  correlation: float | None = None) -> None:
    """The tables: per rule (over the `n` seeds it ran) and per pair of rules (over the seeds both ran), with the
    rules' `trade_off_correlation` under the first when there is one."""
    w = max(9, *map(len, summary))
    print(f'\n== exported models, whole val splits ({", ".join(f"{d} {samples[d]}" for d in domains)} samples), '
          'mean +- s.e. over the n seeds each rule ran')
    head = f"{'rule':<{w}} {'n':>2} " + ' '.join(f'{d:>16}' for d in domains) + \
        f" {'mean loss':>16} {'worst loss':>16} {'worst degr.':>16} {'wall s':>10}"
    print(head + '\n' + '-' * len(head))
    for rule, e in summary.items():
        print(f'{rule:<{w}} {len(e["seeds"]):>2} ' + ' '.join(f'{_pm(e["loss"][d]):>16}' for d in domains)
              + f" {_pm(e['mean_loss']):>16} {_pm(e['worst_loss']):>16} {_pm(e['worst_degradation']):>16}"
              + f" {_pm(e['wall_s'], 0):>10}")
    if correlation is not None:
        print(f'trade-off: across the {len(summary)} rules, mean loss and worst degradation correlate at '
              f'{correlation:+.2f} (near +1: little to trade between the two)')
    if all('accuracy' in e for e in summary.values()):
        print('\n== per-domain continuation accuracy (%), mean +- s.e. over the n seeds each rule ran')
        head = f"{'rule':<{w}} {'n':>2} " + ' '.join(f'{d:>14}' for d in domains) + f" {'average':>14}"
        print(head + '\n' + '-' * len(head))
        for rule, e in summary.items():
            print(f'{rule:<{w}} {len(e["seeds"]):>2} '
                  + ' '.join(f'{_pm(_percent(e["accuracy"][d]), 2):>14}' for d in domains)
                  + f" {_pm(_percent(e['mean_accuracy']), 2):>14}")
    prefixes = {rule: e for rule, e in summary.items() if 'prefix_error' in e}
    if prefixes:
        print(f'\n== what the running evaluations read: degradation on the first {prefix_rows} val rows minus on the '
              f'whole split (mean +- s.e. over seeds), and the runs whose prefix names the whole split\'s worst domain')
        head = f"{'rule':<{w}} " + ' '.join(f'{d:>16}' for d in domains) + f" {'same worst':>11}"
        print(head + '\n' + '-' * len(head))
        for rule, e in prefixes.items():
            print(f'{rule:<{w}} ' + ' '.join(f'{_pm(e["prefix_error"][d]):>16}' for d in domains)
                  + f" {e['prefix_names_worst']:>6} of {len(e['seeds'])}")
    print('\n== paired by seed: rule - baseline (mean +- s.e. of the per-seed differences over the n seeds both ran; '
          '< 0 is better, except accuracy)')
    pairs = [(rule, baseline, v) for rule, e in summary.items() for baseline, v in e.get('minus', {}).items()
             if v['seeds']]
    wp = max([20] + [len(f'{r} - {b}') for r, b, _ in pairs])
    for rule, baseline, values in pairs:
        metrics = [f'{m} {_pm(v)}' for m, v in values.items() if m not in ('loss', 'seeds', 'other_machine')]
        per_domain = [f'{d} {_pm(v)}' for d, v in values.get('loss', {}).items()]
        apart = values.get('other_machine')
        print(f'{rule + " - " + baseline:<{wp}} n {len(values["seeds"])}  ' + '  '.join(metrics)
              + (f'  (seed{"s" * (len(apart) > 1)} {", ".join(map(str, apart))}: the two runs trained on different '
                 'machines)' if apart else '')
              + (f'\n{"":<{wp}} loss per domain: ' + '  '.join(per_domain) if per_domain else ''))


def dynamic_rules(rules: Iterable[str], specs: dict[str, tuple[str, list[str]]]) -> list[str]:
    """The rules among `rules` (names, or a dict keyed by them) whose weights move (base rule `sheared` or `dro`,
    with or without distillation)."""
    return [r for r in rules if specs[r][0] not in ('constant', 'uniform')]


def print_running_gaps(runs: dict[str, dict[int, dict]], specs: dict[str, tuple[str, list[str]]],
                       domains: list[str]) -> None:
    """Every dynamic rule's running eval loss (equal-weight mean over domains) minus its fixed-mixture twin's
    (`constant`, or `constant+kd` for a distillation run), per seed and evaluation."""
    lines = []
    for rule in dynamic_rules(runs, specs):
        baseline = 'constant+kd' if rule.endswith('+kd') else 'constant'
        if baseline not in runs:
            continue
        for seed, gap in running_gap(runs, rule, baseline, domains).items():
            if gap:
                lines.append(f'running eval, {rule} - {baseline}, seed {seed}: '
                             + ' '.join(f'{int(batch)}:{g:+.3f}' for batch, g in gap))
    if lines:
        print('\n== running evaluations (mean over domains, batch:gap), dynamic rule - fixed mixture\n'
              + '\n'.join(lines))


def trade_off(ax, summary: dict) -> None:
    """One point per rule: mean loss of the export against its worst-domain degradation, with s.e. bars both ways
    (lower left is better on both); squares for distillation runs."""
    import matplotlib

    colours = matplotlib.colormaps['tab20' if len(summary) > 10 else 'tab10']
    for i, (rule, e) in enumerate(summary.items()):
        (x, dx), (y, dy) = e['worst_degradation'], e['mean_loss']
        ax.errorbar(x, y, xerr=0 if math.isnan(dx) else dx, yerr=0 if math.isnan(dy) else dy,
                    fmt='s' if rule.endswith('+kd') else 'o', capsize=3, label=rule, color=colours(i))
        ax.annotate(rule, (x, y), textcoords='offset points', xytext=(4, 4), fontsize=8)
    ax.set_xlabel('worst-domain degradation (max L / L_source)')
    ax.set_ylabel('mean loss of the export')
    ax.set_title('trade-off (mean +- s.e. over seeds; lower left is better)')


def plot(path: Path, summary: dict, runs: dict, specs: dict[str, tuple[str, list[str]]], domains: list[str]) -> None:
    """`path`: per-domain bars, the trade-off and each dynamic rule's weights (first seed), four panels a row; and
    the trade-off alone, larger, beside it (`NAME_trade_off.png`)."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    dynamic = dynamic_rules(runs, specs)
    cols = min(4, 2 + len(dynamic))
    rows = math.ceil((2 + len(dynamic)) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.5 * rows), squeeze=False)
    axes = axes.ravel()
    trade_off(axes[1], summary)
    width = 0.8 / len(summary)
    for i, (rule, e) in enumerate(summary.items()):
        x = np.arange(len(domains)) + i * width
        axes[0].bar(x, [e['loss'][d][0] for d in domains], width, yerr=[e['loss'][d][1] for d in domains],
                    label=rule, capsize=3)
    axes[0].set_xticks(np.arange(len(domains)) + 0.4 - width / 2, domains)
    lows = [e['loss'][d][0] for e in summary.values() for d in domains]
    axes[0].set_ylim(min(lows) * 0.95, max(lows) * 1.03)
    axes[0].set_ylabel('val loss of the export')
    axes[0].legend(fontsize=7)
    for ax, rule in zip(axes[2:], dynamic):
        history = next(iter(runs[rule].values()))['history']
        for d in domains:
            ax.plot([r['batch'] for r in history], [r[f'weight/{d}'] for r in history], label=d)
        ax.set_title(f'{rule}: domain weights (first seed)')
        ax.set_xlabel('batch')
        ax.legend(fontsize=8)
    for ax in axes[2 + len(dynamic):]:
        ax.axis('off')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 6))
    trade_off(ax, summary)
    fig.tight_layout()
    fig.savefig(path.with_name(f'{path.stem}_trade_off.png'), dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_data_arguments(p)
    p.add_argument('--out', type=Path, default=Path('runs/method_quality'))
    p.add_argument('--rules', nargs='*', default=['constant', 'sheared', 'dro'], choices=RULES,
                   help='built-in rules to run (none: only the --variant rules)')
    p.add_argument('--seeds', nargs='+', type=int, default=[17, 18, 19])
    p.add_argument('--proportions', nargs='+', type=float, help='reference ratio (default: natural proportions)')
    p.add_argument('--stage', default='prune', choices=STAGES,
                   help='prune (judge the pruned export), continue (prune, continue pretraining, judge that), or '
                        'instruct (tune --source on instruction data: the demo\'s four tasks by default)')
    p.add_argument('--recipe', default=None, metavar='YAML',
                   help='pruning recipe under yamls/demo (default prune.yaml; prune_real.yaml: SmolLM2-135M, with '
                        '--data and --source from `python -m drpruning_composer.demo_real --stages source data`)')
    p.add_argument('--quick', action='store_true', help='a few batches per run: a smoke test, not a measurement')
    p.add_argument('--variant', action='append', default=[],
                   help='NAME=KEY=VALUE[ KEY=VALUE...]: one more rule, `dro` with these overrides (repeatable)')
    p.add_argument('--override', action='append', default=[], help='YAML override for every run (repeatable)')
    p.add_argument('--reuse', action='store_true',
                   help="keep finished runs and the source's evaluation under --out: a benchmark too long for one "
                        'sitting, or split over processes by --seeds and --rules, adds up across invocations')
    p.add_argument('--distill', nargs='?', type=float, const=0.5, default=None, metavar='ALPHA',
                   help='also run every rule with distillation from the source model (`NAME+kd`, alpha 0.5 unless '
                        'given), paired by seed with its LM-loss run')
    p.add_argument('--reference', nargs='+', default=['dynamic'], choices=['dynamic', 'teacher'],
                   help="dro's reference loss: dynamic (scaling-law prediction; `dro`) and/or teacher (the source's "
                        "per-domain loss, or the distillation teacher's; `dro-teacher`)")
    p.add_argument('--tasks', type=Path, default=None,
                   help='per-domain continuation tasks (drpruning-make-tasks) to score every model on; built from '
                        "--data with the source's tokenizer if the folder does not exist")
    p.add_argument('--summary-only', action='store_true',
                   help='train nothing: summarise the runs of the named rules and seeds already finished under --out '
                        '(implies --reuse; a table of everything so far while other runs go on)')
    args = p.parse_args(argv)
    args.reuse = args.reuse or args.summary_only
    try:
        args.variants = parse_variants(args.variant)
    except ValueError as e:
        p.error(str(e))
    if not args.rules and not args.variants:
        p.error('--rules: name at least one rule, or give a --variant')
    if args.stage == 'instruct' and args.tasks:
        p.error('--tasks scores continuation tasks of token data; it does not apply to --stage instruct')
    data, source = data_and_source(args)
    args.specs = rule_specs(args.rules, args.variants, args.reference, args.distill, source)
    rules = list(args.specs)
    if args.stage == 'instruct':
        data = args.data.resolve() if args.data else ensure_demo_instruct(args.demo.resolve())
    domains = domains_of(data)
    proportions = args.proportions or natural_proportions(data)
    if len(proportions) != len(domains):
        p.error(f'--proportions needs one value per domain {domains}')
    overrides = (QUICK if args.quick else []) + args.override
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tasks and not args.tasks.exists():
        from drpruning_composer.data.tasks import make_tasks

        make_tasks(data, str(source), args.tasks)
    runs: dict[str, dict[int, dict]] = {}
    for seed in args.seeds:  # seed-major: an interrupted benchmark has every rule for the seeds it finished
        for rule in rules:
            if args.summary_only and not run_record(args.out, rule, seed, args.stage).is_file():
                continue
            print(f'== {rule}, seed {seed}', flush=True)
            runs.setdefault(rule, {})[seed] = run_one(rule, seed, args, data, source, proportions, overrides)
    if not runs:
        p.error(f'--summary-only: no finished run of {rules} with seeds {args.seeds} under {args.out}')
    runs = {rule: runs[rule] for rule in rules if rule in runs}  # the rules' order, whichever seed ran them
    source_eval = source_evaluation(source, data, args.tasks, args.out, args.reuse)
    source_loss = source_eval['loss']
    prefix_sizes = sorted({r['prefix'] for seeds in runs.values() for r in seeds.values() if r['prefix']})
    source_prefix = {n: source_evaluation(source, data, None, args.out, args.reuse, max_samples=n)['loss']
                     for n in prefix_sizes}
    summary = summarise(runs, source_loss, args.specs, source_prefix)
    samples = split_samples(data, 'val')
    print(f'\nsource {source}: ' + ' '.join(f'{d} {source_loss[d]:.4f}' for d in domains))
    if args.tasks:
        print('source accuracy (%): ' + ' '.join(f'{d} {100 * source_eval["accuracy"][d]:.2f}' for d in domains)
              + f' average {100 * source_eval["mean_accuracy"]:.2f}')
    print(f'reference ratio: ' + ' '.join(f'{d} {w:.3f}' for d, w in zip(domains, proportions)))
    correlation = trade_off_correlation(summary)
    print_summary(summary, domains, samples, '/'.join(map(str, prefix_sizes)), correlation)
    print_running_gaps(runs, args.specs, domains)
    result = {'stage': args.stage, 'data': str(data), 'source': str(source), 'proportions': proportions,
              'seeds': args.seeds,
              'overrides': overrides, 'samples': samples, 'source_loss': source_loss,
              'source_accuracy': source_eval.get('accuracy'),
              'source_prefix_loss': {str(n): v for n, v in source_prefix.items()}, 'summary': summary,
              'trade_off_correlation': correlation,
              'runs': {rule: {str(s): r for s, r in seeds.items()} for rule, seeds in runs.items()}}
    (args.out / 'results.json').write_text(json.dumps(result, indent=2) + '\n')
    plot(args.out / 'results.png', summary, runs, args.specs, domains)
    print(f'\nwrote {args.out / "results.json"}, {args.out / "results.png"} and '
          f'{args.out / "results_trade_off.png"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
