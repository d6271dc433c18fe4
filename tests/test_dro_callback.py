"""DROReweightCallback: config errors before training, and a 2-process llm-foundry run with exact resume.

The end-to-end test launches this file with `composer -n 2` (gloo on CPU); run as a script it is the
training worker: it registers the components in llm-foundry's registries and calls `train_from_yaml`.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')

DOMAINS = ['noise', 'count', 'repeat']
VOCAB = 64
SEQ_LEN = 16


def _rows(domain: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Token rows of clearly different difficulty per domain."""
    if domain == 'noise':
        return rng.integers(3, VOCAB, size=(n, SEQ_LEN))
    if domain == 'count':
        return 3 + (rng.integers(0, VOCAB - 3, size=(n, 1)) + np.arange(SEQ_LEN)) % (VOCAB - 3)
    return np.repeat(rng.integers(3, VOCAB, size=(n, 1)), SEQ_LEN, axis=1)


def write_fixture(root: Path) -> dict[str, str]:
    """MDS data ({root}/data/{domain}/{train,val}), a word-level tokenizer and a tiny Llama config."""
    from streaming import MDSWriter
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    rng = np.random.default_rng(0)
    for domain in DOMAINS:
        for split, n in (('train', 64), ('val', 8)):
            with MDSWriter(out=str(root / 'data' / domain / split), columns={'tokens': 'ndarray:int32'}) as w:
                for row in _rows(domain, n, rng):
                    w.write({'tokens': row.astype(np.int32)})
    vocab = {'<pad>': 0, '<eos>': 1, '<unk>': 2, **{f't{i}': i for i in range(3, VOCAB)}}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token='<unk>')),
        pad_token='<pad>', eos_token='<eos>', unk_token='<unk>', model_max_length=SEQ_LEN,
    )
    tokenizer.save_pretrained(str(root / 'tokenizer'))
    LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=SEQ_LEN, pad_token_id=0, eos_token_id=1, bos_token_id=1,
    ).save_pretrained(str(root / 'model'))
    return {'data': str(root / 'data'), 'tokenizer': str(root / 'tokenizer'), 'model': str(root / 'model')}


def write_yaml(root: Path, paths: dict[str, str], dro: dict) -> Path:
    eval_loaders = [
        {
            'label': d, 'name': 'text', 'drop_last': False, 'num_workers': 0, 'prefetch_factor': None,
            'persistent_workers': False,
            'dataset': {'local': f'{paths["data"]}/{d}', 'split': 'val', 'max_seq_len': SEQ_LEN, 'shuffle': False},
        } for d in DOMAINS
    ]
    config = {
        'run_name': 'dro-test',
        'seed': 1,
        'max_seq_len': SEQ_LEN,
        'model': {'name': 'hf_causal_lm', 'pretrained_model_name_or_path': paths['model'], 'pretrained': False},
        'tokenizer': {'name': paths['tokenizer'], 'kwargs': {'model_max_length': SEQ_LEN}},
        'train_loader': {
            'name': 'dynamic_mixture', 'drop_last': True, 'num_workers': 0,
            'dataset': {
                'local': paths['data'], 'domains': DOMAINS, 'proportions': [1, 1, 1], 'max_seq_len': SEQ_LEN,
                'seed': 5,
            },
        },
        'eval_loaders': eval_loaders,
        'optimizer': {'name': 'decoupled_adamw', 'lr': 3e-3, 'betas': [0.9, 0.95], 'weight_decay': 0.0},
        'scheduler': {'name': 'constant_with_warmup', 't_warmup': '0ba'},
        'global_train_batch_size': 8,
        'device_train_microbatch_size': 4,
        'device_eval_batch_size': 4,
        'max_duration': '6ba',
        'eval_interval': '1ba',
        'eval_subset_num_batches': 1,
        'precision': 'fp32',
        'progress_bar': False,
        'log_to_console': False,
        'python_log_level': None,
        'save_folder': str(root / 'checkpoints'),
        'save_interval': '4ba',
        'callbacks': {'dro_reweight': dro, 'record_mixture': {'out': str(root / 'full')}},
    }
    path = root / 'train.yaml'
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def _dro_options(tmp_path: Path) -> dict:
    """The `dro_reweight` options of the two-rank llm-foundry runs: reweighting and ratio drift within 8 batches."""
    return {
        'domains': DOMAINS, 'update': 'dro', 'rho': 0.1, 'min_prob': 0.2, 'reference_loss': 'dynamic',
        'reference_ratio': 'dynamic', 'ratio_delta': 0.2, 'ratio_band': 1.5, 'min_fit_points': 4,
        'history_folder': str(tmp_path / 'dro'),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_llmfoundry_two_ranks_agree_reweight_and_resume_exactly(tmp_path):
    """Uninterrupted 6-batch run with a checkpoint at batch 4, then a run resumed from it, in the same 2 processes."""
    paths = write_fixture(tmp_path)
    dro = _dro_options(tmp_path)
    yaml_path = write_yaml(tmp_path, paths, dro)
    cmd = [
        'composer', '-n', '2', '--master_port', str(_free_port()), '--stdout', str(tmp_path / 'stdout{rank}.txt'),
        '--stderr', str(tmp_path / 'stderr{rank}.txt'), __file__, str(yaml_path), str(tmp_path),
    ]
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get('PYTHONPATH', '')])}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-4000:] + result.stdout[-2000:]

    runs = {phase: [json.loads((tmp_path / phase / f'rank{r}.json').read_text()) for r in (0, 1)]
            for phase in ('full', 'resumed')}
    rank0, rank1 = runs['full']
    # Both ranks hold the same weights and weight history; updates happened and stayed on the simplex.
    assert rank0['history'] == rank1['history'] and rank0['weights'] == rank1['weights']
    assert len(rank0['history']) >= 3
    for _, weights in rank0['history']:
        assert min(weights) >= 0 and sum(weights) == pytest.approx(1.0)
    assert max(abs(w - 1 / 3) for w in rank0['weights']) > 0.01

    # Every global sample index has the domain the replayed schedule gives it; ranks take alternate indices.
    from drpruning_composer.data.mixture import MixtureSchedule

    schedule = MixtureSchedule([64] * 3, [1, 1, 1], seed=5)
    schedule.load_state_dict({'seed': 5, 'domain_sizes': [64] * 3, 'history': rank0['history']})
    expected = schedule.domains(0, 6 * 8)
    for rank, run in enumerate(runs['full']):
        domains = [d for batch in run['batches'] for d in batch['domain_idx']]
        assert domains == expected[rank::2].tolist()

    # The resumed run sees exactly batches 5-6 of the uninterrupted run and ends with the same weights.
    for rank in (0, 1):
        after = [b for b in runs['full'][rank]['batches'] if b['batch'] >= 4]
        assert runs['resumed'][rank]['batches'] == after
        assert runs['resumed'][rank]['history'] == runs['full'][rank]['history']
        np.testing.assert_allclose(runs['resumed'][rank]['weights'], runs['full'][rank]['weights'], rtol=1e-6)
    # One CSV row per evaluation; the resumed run restored the callback's rows and rewrote the same file.
    assert (tmp_path / 'dro' / 'history.csv').read_text().count('\n') == 1 + 6
    assert (tmp_path / 'dro' / 'history.png').stat().st_size > 0


# ---------------------------------------------------------------- bad input, before training

def _bad_callback_cases():
    return [
        (dict(update='adam'), 'update'),
        (dict(reference_loss=[1.0, 2.0]), 'reference_loss'),
        (dict(reference_loss=[1.0, -2.0, 1.0]), 'reference_loss'),
        (dict(reference_loss='learned'), 'reference_loss'),
        (dict(reference_loss='source', use_train_loss_ema=True), 'use_train_loss_ema'),
        (dict(reference_loss='teacher', use_train_loss_ema=True), 'use_train_loss_ema'),
        (dict(reference_ratio=[0.5, 0.5]), 'reference_ratio'),
        (dict(reference_ratio=[0.5, -0.5, 1.0]), 'reference_ratio'),
        (dict(domains=['noise', 'noise', 'repeat']), 'distinct'),
        (dict(rho=-0.1), 'rho'),
        (dict(ratio_band=0.5), 'ratio_band'),
        (dict(update_after=1.0), 'update_after'),
        (dict(excess_smoothing=1.0), 'excess_smoothing'),
        (dict(excess='ratio'), 'excess'),
        (dict(dro_step='adam'), r'^`dro_step` must be one of'),
        (dict(mirror_lr=-1.0), r'^`mirror_lr` must be a finite number >= 0'),
        (dict(mirror_scale='gap'), r'^`mirror_scale` must be one of'),
        (dict(ema_decay=1.0), 'ema_decay'),
        # every option error names its option (issue 20, item 11: the pre-flight check reports these by key)
        (dict(min_fit_points=3), r'^`min_fit_points` must be an integer >= 4'),
        (dict(history_folder='{run}/dro'), r'^`history_folder` may hold only the placeholder \{run_name\}'),
        (dict(final_num_params=-5), r'^`final_num_params` must be a positive'),
        # a domain with reference ratio 0 could never gain weight under `dro` (issue 20, item 5)
        (dict(reference_ratio=[0.5, 0.5, 0.0]), r"^callbacks.dro_reweight.reference_ratio: \['repeat'\] start at "
                                                r'proportion 0, .* can never gain weight'),
    ]


@pytest.mark.parametrize('kwargs, message', _bad_callback_cases())
def test_bad_callback_config_raises(kwargs, message):
    from drpruning_composer.dro.callback import DROReweightCallback

    with pytest.raises(ValueError, match=message):
        DROReweightCallback(**{'domains': DOMAINS, **kwargs})


def test_reference_ratio_not_summing_to_one_is_normalised():
    from drpruning_composer.dro.callback import DROReweightCallback

    with pytest.warns(UserWarning, match='normalising'):
        callback = DROReweightCallback(domains=DOMAINS, reference_ratio=[2, 1, 1])
    np.testing.assert_allclose(callback.static_ratio, [0.5, 0.25, 0.25])


class _FakeEvaluator:
    def __init__(self, label):
        self.label = label


class _FakeMetric:
    def __init__(self, value):
        self.value = value

    def compute(self):
        import torch

        return torch.tensor(self.value)


@pytest.fixture(scope='module')
def fake_state(tmp_path_factory):
    """Just enough of a Composer State for the callback: a dynamic_mixture train loader and eval labels."""
    from types import SimpleNamespace

    import torch
    from composer.core import Timestamp

    from drpruning_composer.data.mixture import DynamicMixtureDataset

    mixture = DynamicMixtureDataset(DOMAINS, [range(5)] * 3, [1, 1, 1], max_seq_len=4, seed=0)
    return SimpleNamespace(
        train_dataloader=torch.utils.data.DataLoader(mixture),
        evaluators=[_FakeEvaluator(f'eval/{d}') for d in DOMAINS],
        eval_metrics={}, algorithms=[], run_name='fake', dataloader_label=None,
        timestamp=Timestamp(batch=3, sample=12), max_duration=None, get_elapsed_duration=lambda: None,
    )


def _evaluate(callback, state, logger, losses):
    """One evaluation round as Composer runs it: EVAL_END per domain, then EVAL_AFTER_ALL."""
    from composer.core import Event

    state.eval_metrics = {f'eval/{d}': {'LanguageCrossEntropy': _FakeMetric(v)} for d, v in zip(DOMAINS, losses)}
    for d in DOMAINS:
        state.dataloader_label = f'eval/{d}'
        callback.run_event(Event.EVAL_END, state, logger)
    callback.run_event(Event.EVAL_AFTER_ALL, state, logger)


@pytest.mark.parametrize('change, message', [
    (dict(domains=['noise', 'count', 'other']), 'dataset.domains'),
    (dict(domains=['count', 'noise', 'repeat']), 'same order'),
    (dict(evaluators=['noise', 'count']), r"\['repeat'\] have no eval loader"),
    (dict(plain_loader=True), 'needs the `dynamic_mixture` train loader'),
])
def test_mismatch_with_loaders_raises_at_fit_start(fake_state, change, message):
    from types import SimpleNamespace

    import torch

    from composer.core import Event
    from composer.loggers import Logger

    from drpruning_composer.dro.callback import DROReweightCallback

    state = SimpleNamespace(**vars(fake_state))
    if change.get('plain_loader'):
        state.train_dataloader = torch.utils.data.DataLoader(list(range(8)))
    if 'evaluators' in change:
        state.evaluators = [_FakeEvaluator(f'eval/{d}') for d in change['evaluators']]
    callback = DROReweightCallback(domains=change.get('domains', DOMAINS), reference_loss=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=message):
        callback.run_event(Event.FIT_START, state, Logger(state, []))


@pytest.mark.parametrize('update, options, refused', [
    ('dro', {}, True),
    ('sheared', {'sheared_smoothing': 0.0}, True),
    ('sheared', {}, False),  # the uniform smoothing gives every domain weight
    ('constant', {}, False),  # weights never move: a domain at 0 is only evaluated
    ('dro', {'reference_ratio': [0.4, 0.3, 0.3]}, False),  # `dro` reads the fixed ratio, which is positive
    ('dro', {'reference_ratio': [0.4, 0.3, 0.3], 'dro_step': 'mirror', 'min_prob': 0.0}, True),  # from the weights
    ('dro', {'reference_ratio': [0.4, 0.3, 0.3], 'dro_step': 'mirror'}, False),  # the floor gives it p * min_prob
])
def test_domain_at_proportion_zero_is_refused_where_it_could_never_gain_weight(fake_state, update, options, refused):
    """Issue 20, item 5: `proportions: [.., 0.0]` with DRO left that domain at weight 0 for the whole run, whatever
    its excess loss; the callback refuses it at FIT_START (and the pre-flight check before the model loads)."""
    from types import SimpleNamespace

    from composer.core import Event
    from composer.loggers import Logger

    from drpruning_composer.data.mixture import DynamicMixtureDataset
    from drpruning_composer.dro.callback import DROReweightCallback

    import torch

    state = SimpleNamespace(**vars(fake_state))
    state.train_dataloader = torch.utils.data.DataLoader(
        DynamicMixtureDataset(DOMAINS, [range(5)] * 3, [0.6, 0.4, 0.0], max_seq_len=4, seed=0))
    callback = DROReweightCallback(domains=DOMAINS, update=update, reference_loss=[1.0, 1.0, 1.0], **options)
    if refused:
        with pytest.raises(ValueError, match=r"^train_loader.dataset.proportions: \['repeat'\] start at proportion 0"
                                             r'.* small positive proportion.* drop it from the domains'):
            callback.run_event(Event.FIT_START, state, Logger(state, []))
    else:
        callback.run_event(Event.FIT_START, state, Logger(state, []))


def test_weight_lag_is_fixed_at_the_first_start_and_a_deeper_prefetch_is_refused_on_restart(fake_state):
    """Issue 20, item 10: the lag between an evaluation and the first sample its weights reach is the prefetch depth
    of the run's first start (or `weight_lag_batches`), checkpointed; a restart may prefetch less, not more."""
    from types import SimpleNamespace

    import torch

    from composer.core import Event
    from composer.loggers import Logger

    from drpruning_composer.dro.callback import DROReweightCallback

    def start(callback, num_workers, checkpoint=None):
        state = SimpleNamespace(**vars(fake_state))
        mixture = fake_state.train_dataloader.dataset
        state.train_dataloader = torch.utils.data.DataLoader(
            mixture, batch_size=4, num_workers=num_workers, prefetch_factor=2 if num_workers else None)
        if checkpoint is not None:
            callback.load_state_dict(checkpoint)
        callback.run_event(Event.FIT_START, state, Logger(state, []))
        return callback

    def callback(**kwargs):
        return DROReweightCallback(domains=DOMAINS, reference_loss=[1.0, 1.0, 1.0], **kwargs)

    first = start(callback(), num_workers=2)
    assert first.weight_lag == 2 * 2 * 4 and first.state_dict()['weight_lag'] == 16
    assert start(callback(), 0, first.state_dict()).weight_lag == 16  # fewer workers: the same stream
    assert start(callback(weight_lag_batches=6), 2).weight_lag == 24
    no_workers = start(callback(), num_workers=0)
    assert no_workers.weight_lag == 0  # as before: the next batch
    with pytest.raises(ValueError, match=r'^callbacks.dro_reweight.weight_lag_batches: the train loader prefetches 4 '
                                         r'batches .* more than the lag of 0 batches'):
        start(callback(), 2, no_workers.state_dict())
    with pytest.raises(ValueError, match='prefetches 4 batches'):
        start(callback(weight_lag_batches=3), 2)


def test_llmfoundry_restart_with_other_num_workers_reads_the_same_stream(tmp_path):
    """Issue 20, item 10, end to end: a run with num_workers=1 (prefetch_factor 1) whose DRO weights change, and a
    restart of it from its batch-4 checkpoint with num_workers=0: the same batches and the same weight history."""
    paths = write_fixture(tmp_path)
    dro = _dro_options(tmp_path)
    yaml_path = write_yaml(tmp_path, paths, dro)
    config = json.loads(yaml_path.read_text())
    config['train_loader'].update(num_workers=1, prefetch_factor=1, persistent_workers=False)
    config['max_duration'] = '8ba'
    yaml_path.write_text(json.dumps(config))
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get('PYTHONPATH', '')])}
    result = subprocess.run([sys.executable, __file__, str(yaml_path), str(tmp_path), 'train_loader.num_workers=0',
                             'train_loader.prefetch_factor=null'], capture_output=True, text=True, timeout=1800,
                            env=env, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-4000:] + result.stdout[-2000:]
    full, resumed = (json.loads((tmp_path / phase / 'rank0.json').read_text()) for phase in ('full', 'resumed'))
    history = full['history']
    assert len(history) >= 3 and any(start < 8 * 8 for start, _ in history[1:])  # changes took effect in the run
    assert all((start - 8) % 8 == 0 for start, _ in history[1:])  # from the batch after the evaluation
    assert resumed['batches'] == [b for b in full['batches'] if b['batch'] >= 4]
    assert resumed['history'] == history


def test_non_finite_loss_skips_update(fake_state, tmp_path):
    from types import SimpleNamespace

    from composer.core import Event
    from composer.loggers import InMemoryLogger, Logger

    from drpruning_composer.dro.callback import DROReweightCallback

    state = SimpleNamespace(**vars(fake_state))
    callback = DROReweightCallback(
        domains=DOMAINS, reference_loss=[1.0, 1.0, 1.0], history_folder=str(tmp_path / '{run_name}'), plot_interval=0,
    )
    in_memory = InMemoryLogger()
    logger = Logger(state, [in_memory])
    in_memory.init(state, logger)
    callback.run_event(Event.FIT_START, state, logger)
    mixture = state.train_dataloader.dataset
    before = mixture.weights

    def evaluate(losses):
        _evaluate(callback, state, logger, losses)

    evaluate([2.0, float('nan'), 1.5])
    np.testing.assert_array_equal(mixture.weights, before)
    assert in_memory.most_recent_values['dro/skipped_nonfinite'] == 1
    evaluate([3.0, 1.2, 1.5])
    assert mixture.weights[0] > before[0]
    from drpruning_composer.dro.report import read_history_csv

    domains, rows = read_history_csv(str(tmp_path / 'fake' / 'history.csv'))
    assert domains == DOMAINS and len(rows) == 2
    assert rows[0]['loss/count'] != rows[0]['loss/count']  # NaN recorded for the skipped update
    assert [rows[1][f'weight/{d}'] for d in DOMAINS] == pytest.approx(mixture.weights.tolist())


def test_warmup_phases_gate_recording_updates_and_ratio_drift(fake_state, tmp_path):
    """Nothing is recorded before `record_after`, no update before `update_after`, no drift before `ratio_after`;
    the ratio then stays within a factor `ratio_band` of the start."""
    from types import SimpleNamespace

    from composer.core import Event, Timestamp
    from composer.loggers import Logger

    from drpruning_composer.dro.callback import DROReweightCallback

    state = SimpleNamespace(**vars(fake_state))
    callback = DROReweightCallback(
        domains=DOMAINS, reference_ratio='dynamic', ratio_delta=0.5, ratio_band=1.5, min_fit_points=4,
        record_after=0.2, update_after=0.5, ratio_after=0.7, history_folder=str(tmp_path / '{run_name}'),
        plot_interval=0,
    )
    logger = Logger(state, [])
    callback.run_event(Event.FIT_START, state, logger)
    mixture = state.train_dataloader.dataset
    start = mixture.weights
    for step in range(1, 10):
        progress = step / 10
        state.get_elapsed_duration = lambda: progress
        state.timestamp = Timestamp(batch=10 * step, sample=40 * step)
        _evaluate(callback, state, logger, [3.0 + 1.0 / step, 2.0 + 1.0 / step, 2.5 + 0.2 / step])
        recorded = len(callback.reference.predictors[0].losses)
        assert recorded == max(0, step - 1), progress  # from 0.2 on
        if progress < 0.5:
            np.testing.assert_array_equal(mixture.weights, start)
            assert callback.num_updates == 0
        else:
            assert not np.allclose(mixture.weights, start)
        if progress < 0.7:
            np.testing.assert_array_equal(callback.ratio, start)
        else:
            assert not np.allclose(callback.ratio, start)
        assert np.all(callback.ratio <= 1.5 * start + 1e-12) and np.all(callback.ratio >= start / 1.5 - 1e-12)


@pytest.mark.parametrize('kind', ['absolute', 'relative'])
def test_excess_is_the_smoothed_gap_to_the_reference(fake_state, tmp_path, kind):
    from types import SimpleNamespace

    from composer.core import Event
    from composer.loggers import Logger

    from drpruning_composer.dro.callback import DROReweightCallback

    state = SimpleNamespace(**vars(fake_state))
    ref = np.array([2.0, 4.0, 1.0])
    callback = DROReweightCallback(domains=DOMAINS, reference_loss=ref.tolist(), excess=kind, excess_smoothing=0.5,
                                   history_folder=str(tmp_path / '{run_name}'), plot_interval=0)
    logger = Logger(state, [])
    callback.run_event(Event.FIT_START, state, logger)
    gap = (lambda x: x - ref) if kind == 'absolute' else (lambda x: np.log(x / ref))
    first, second = np.array([3.0, 5.0, 1.5]), np.array([2.5, 4.4, 1.2])
    _evaluate(callback, state, logger, first)
    np.testing.assert_allclose(callback.excess, gap(first))
    _evaluate(callback, state, logger, second)
    np.testing.assert_allclose(callback.excess, 0.5 * gap(first) + 0.5 * gap(second))


def test_source_reference_is_the_first_evaluation_and_survives_a_checkpoint(fake_state, tmp_path, caplog):
    """`reference_loss: source`: the batch-0 evaluation sets the reference and moves nothing; later, the weights go
    to the domain that degraded most *relatively*, though another has the larger absolute rise."""
    from types import SimpleNamespace

    from composer.core import Event, Timestamp
    from composer.loggers import Logger

    from drpruning_composer.dro.callback import DROReweightCallback

    import torch

    from drpruning_composer.data.mixture import DynamicMixtureDataset

    state = SimpleNamespace(**vars(fake_state))  # with a fresh, uniform mixture: other tests move the shared one
    state.train_dataloader = torch.utils.data.DataLoader(
        DynamicMixtureDataset(DOMAINS, [range(5)] * 3, [1, 1, 1], max_seq_len=4, seed=0))
    state.get_elapsed_duration = lambda: 0.0
    state.timestamp = Timestamp(batch=0, sample=0)
    kwargs = dict(domains=DOMAINS, reference_loss='source', excess='relative', excess_smoothing=0.0,
                  history_folder=str(tmp_path / '{run_name}'), plot_interval=0)
    callback = DROReweightCallback(**kwargs)
    logger = Logger(state, [])
    callback.run_event(Event.FIT_START, state, logger)
    mixture = state.train_dataloader.dataset
    start = mixture.weights
    source = np.array([4.0, 1.0, 2.0])
    _evaluate(callback, state, logger, source)
    np.testing.assert_array_equal(callback.ref_loss, source)
    np.testing.assert_array_equal(mixture.weights, start)
    assert callback.num_updates == 0

    state.get_elapsed_duration = lambda: 0.5
    state.timestamp = Timestamp(batch=10, sample=40)
    later = np.array([4.4, 1.2, 2.0])  # +0.4 (10%) on the first domain, +0.2 (20%) on the second
    _evaluate(callback, state, logger, later)
    np.testing.assert_allclose(callback.excess, np.log(later / source))
    np.testing.assert_array_equal(callback.ref_loss, source)  # measured once, never refitted
    assert mixture.weights[1] == mixture.weights.max() and mixture.weights[1] > start[1]

    restored = DROReweightCallback(**kwargs)
    restored.load_state_dict(callback.state_dict())
    np.testing.assert_array_equal(restored.ref_loss, source)

    late = DROReweightCallback(**kwargs)
    late.run_event(Event.FIT_START, state, logger)
    with caplog.at_level('WARNING'):
        _evaluate(late, state, logger, later)
    assert 'eval_first: true' in caplog.text
    np.testing.assert_array_equal(late.ref_loss, later)


def _tiny_model(folder: Path, seed: int):
    """A saved random tiny Llama (vocabulary VOCAB) and the model itself."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=SEQ_LEN))
    model.save_pretrained(folder)
    return model


def _eval_batches(seed: int) -> list[dict]:
    """Three batches of two sequences, in llm-foundry's format: unshifted labels, padded tails set to -100."""
    import torch

    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(3):
        ids = torch.randint(3, VOCAB, (2, SEQ_LEN), generator=g)
        mask = torch.ones_like(ids)
        mask[0, SEQ_LEN - 5:] = 0
        batches.append({'input_ids': ids, 'attention_mask': mask, 'labels': ids.masked_fill(mask == 0, -100)})
    return batches


@pytest.mark.parametrize('with_distill', [False, True])
def test_teacher_reference_is_measured_once_and_survives_a_checkpoint(fake_state, tmp_path, monkeypatch,
                                                                      with_distill):
    """`reference_loss: teacher` at fit start: each domain's loss under the teacher (distill's, else the student's
    source folder) on the first `subset_num_batches` batches of its eval loader, equal to Hugging Face's own loss on
    those sequences; evaluations do not change it, and a restored callback keeps it without measuring again."""
    from types import SimpleNamespace

    import torch
    from composer.core import DataSpec, Event, Precision, Timestamp
    from composer.devices import DeviceCPU
    from composer.loggers import Logger

    from drpruning_composer.data.mixture import DynamicMixtureDataset
    from drpruning_composer.distill.algorithm import DistillationAlgorithm
    from drpruning_composer.dro import callback as callback_module
    from drpruning_composer.dro.callback import DROReweightCallback
    from drpruning_composer.dro.report import read_history_csv

    source = _tiny_model(tmp_path / 'source', seed=0)
    student = _tiny_model(tmp_path / 'student', seed=1)
    student.config._name_or_path = str(tmp_path / 'source')  # as loaded from the source: it is the default teacher
    algorithms = []
    teacher = source
    if with_distill:
        teacher = _tiny_model(tmp_path / 'teacher', seed=2)
        distill = DistillationAlgorithm(teacher=str(tmp_path / 'teacher'))
        algorithms = [distill]
    batches = {d: _eval_batches(i) for i, d in enumerate(DOMAINS)}
    state = SimpleNamespace(**vars(fake_state))
    state.train_dataloader = torch.utils.data.DataLoader(
        DynamicMixtureDataset(DOMAINS, [range(5)] * 3, [1, 1, 1], max_seq_len=4, seed=0))
    state.evaluators = [SimpleNamespace(label=f'eval/{d}', dataloader=DataSpec(batches[d]), subset_num_batches=2)
                        for d in DOMAINS]
    state.model = SimpleNamespace(model=student)
    state.algorithms = algorithms
    state.device, state.precision, state.precision_config = DeviceCPU(), Precision.FP32, None
    state.get_elapsed_duration = lambda: 0.5
    state.timestamp = Timestamp(batch=10, sample=40)
    logger = Logger(state, [])
    for algorithm in algorithms:
        algorithm.apply(Event.INIT, state, logger)
    kwargs = dict(domains=DOMAINS, reference_loss='teacher', update_after=0.0,
                  history_folder=str(tmp_path / '{run_name}'), plot_interval=0)
    callback = DROReweightCallback(**kwargs)
    callback.run_event(Event.FIT_START, state, logger)

    with torch.no_grad():  # Hugging Face's loss on the two batches read (token mean over labels != -100)
        expected = [float(teacher(**{k: torch.cat([b[k] for b in batches[d][:2]]) for k in batches[d][0]}).loss)
                    for d in DOMAINS]
        student_loss = float(student(**batches[DOMAINS[0]][0]).loss)
    np.testing.assert_allclose(callback.ref_loss, expected, rtol=1e-6)
    assert abs(callback.ref_loss[0] - student_loss) > 0.01  # the teacher's loss, not the student's

    measured = callback.ref_loss.copy()
    _evaluate(callback, state, logger, measured + [0.3, 0.1, 0.0])
    _evaluate(callback, state, logger, measured + [0.1, 0.2, 0.0])
    np.testing.assert_array_equal(callback.ref_loss, measured)
    assert callback.num_updates == 2 and callback.excess[0] > 0
    _, rows = read_history_csv(str(tmp_path / 'fake' / 'history.csv'))
    assert [[row[f'ref_loss/{d}'] for d in DOMAINS] for row in rows] == [pytest.approx(measured.tolist())] * 2

    def measure_again(*args):
        raise AssertionError('a restored teacher reference must not be measured again')

    monkeypatch.setattr(callback_module, 'teacher_reference_loss', measure_again)
    restored = DROReweightCallback(**kwargs)
    torch.save(callback.state_dict(), tmp_path / 'state.pt')
    restored.load_state_dict(torch.load(tmp_path / 'state.pt', weights_only=True))
    restored.run_event(Event.FIT_START, state, logger)
    np.testing.assert_array_equal(restored.ref_loss, measured)


def test_train_loss_ema_is_per_domain_token_mean(fake_state):
    from types import SimpleNamespace

    import torch
    from composer.core import Event
    from composer.devices import DeviceCPU
    from composer.loggers import Logger

    from drpruning_composer.dro.callback import DROReweightCallback

    callback = DROReweightCallback(domains=DOMAINS, reference_loss=[1.0, 1.0, 1.0], use_train_loss_ema=True,
                                   ema_decay=0.5)
    state = SimpleNamespace(**vars(fake_state), device=DeviceCPU())
    logger = Logger(state, [])
    torch.manual_seed(0)
    expected_sum, expected_count = np.zeros(3), np.zeros(3)
    for domains in ([0, 0, 2], [2, 0, 0]):  # two microbatches of one batch; domain 1 absent
        labels = torch.randint(0, 8, (3, 5))
        labels[0, 3] = -100
        logits = torch.randn(3, 5, 8)
        state.batch = {'labels': labels, 'domain_idx': torch.tensor(domains)}
        state.outputs = {'logits': logits}
        callback.run_event(Event.AFTER_LOSS, state, logger)
        for row, d in enumerate(domains):
            token_loss = torch.nn.functional.cross_entropy(logits[row, :-1], labels[row, 1:], ignore_index=-100,
                                                           reduction='sum')
            expected_sum[d] += float(token_loss)
            expected_count[d] += int((labels[row, 1:] != -100).sum())
    callback.run_event(Event.BATCH_END, state, logger)
    np.testing.assert_allclose(callback.train_loss.value[[0, 2]], (expected_sum / np.maximum(expected_count, 1))[[0, 2]])
    assert np.isnan(callback.train_loss.value[1])


# ---------------------------------------------------------------- worker (run under `composer -n 2`)

def _worker(yaml_path: str, root: str, *resume_overrides: str) -> None:
    from composer.core import Callback, Event, State
    from composer.loggers import Logger
    from composer.utils import dist
    from llmfoundry import registry
    from llmfoundry.command_utils import train_from_yaml

    from drpruning_composer.registry import register_components

    class RecordMixture(Callback):
        """Records each training batch's domains and first tokens; dumps them with the mixture state at the end."""

        def __init__(self, out: str):
            self.out = out
            self.batches = []

        def run_event(self, event: Event, state: State, logger: Logger) -> None:
            if event == Event.AFTER_DATALOADER:
                self.batches.append({
                    'batch': int(state.timestamp.batch),
                    'domain_idx': state.batch['domain_idx'].tolist(),
                    'first_tokens': state.batch['input_ids'][:, 0].tolist(),
                })
            elif event == Event.FIT_END:
                mixture = state.train_dataloader.dataset
                record = {
                    'batches': self.batches,
                    'history': mixture.schedule.state_dict()['history'],
                    'weights': mixture.weights.tolist(),
                }
                os.makedirs(self.out, exist_ok=True)
                Path(self.out, f'rank{dist.get_global_rank()}.json').write_text(json.dumps(record))

    register_components()
    registry.callbacks.register('record_mixture', func=RecordMixture)
    train_from_yaml(yaml_path, [])
    train_from_yaml(yaml_path, [
        f'load_path={root}/checkpoints/ep0-ba4-rank0.pt', 'save_folder=null',
        f'callbacks.record_mixture.out={root}/resumed', *resume_overrides,
    ])


if __name__ == '__main__':
    _worker(*sys.argv[1:])


# A skewed mixture in closed loop: each domain's eval loss follows its own learning curve in the tokens the mixture
# gave it so far. The dominant domain (60%) starts furthest above its source (+0.8 nats at the first evaluation) and
# learns fast, so under the fixed mixture it ends below its source; the two small ones start 0.3 nats (+20%) above
# theirs and barely recover. In absolute terms the
# dominant one degrades most, relative to its source it is best off: the promise (worst-domain L / L_source) is
# decided on the small ones.
SKEWED = [0.6, 0.2, 0.2]
SKEWED_SOURCE = [3.0, 1.5, 1.5]


def _skewed_losses(tokens: np.ndarray) -> np.ndarray:
    t = tokens / 1000.0 + 1.0
    return np.array([2.4 + 2.0 * t[0] ** -0.5, 1.5 + 0.3 * t[1] ** -0.1, 1.5 + 0.3 * t[2] ** -0.1])


def _simulate_skewed_run(tmp_path: Path, options: dict, evaluations: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Drive the callback through `evaluations` rounds of 400 samples (4 tokens each) on the skewed mixture above;
    returns the final weights and the final losses."""
    from types import SimpleNamespace

    import torch
    from composer.core import Event, Timestamp
    from composer.loggers import Logger

    from drpruning_composer.data.mixture import DynamicMixtureDataset
    from drpruning_composer.dro.callback import DROReweightCallback

    mixture = DynamicMixtureDataset(DOMAINS, [range(50)] * 3, SKEWED, max_seq_len=4, seed=0)
    state = SimpleNamespace(
        train_dataloader=torch.utils.data.DataLoader(mixture),
        evaluators=[_FakeEvaluator(f'eval/{d}') for d in DOMAINS], eval_metrics={}, algorithms=[], run_name='skewed',
        dataloader_label=None, timestamp=Timestamp(), max_duration=None, get_elapsed_duration=lambda: 0.0,
    )
    callback = DROReweightCallback(domains=DOMAINS, history_folder=str(tmp_path / '{run_name}'), plot_interval=0,
                                   **options)
    logger = Logger(state, [])
    callback.run_event(Event.FIT_START, state, logger)
    for k in range(1, evaluations + 1):
        state.timestamp = Timestamp(batch=100 * k, sample=400 * k, sample_in_epoch=400 * k)
        state.get_elapsed_duration = lambda k=k: k / evaluations
        losses = _skewed_losses(mixture.samples_per_domain(400 * k).astype(np.float64) * 4)
        _evaluate(callback, state, logger, losses)
    return mixture.weights, losses


def _shipped_dro_options(yaml_path: Path) -> dict:
    """`callbacks.dro_reweight` of a shipped YAML, resolved, without its run-specific keys; a reference measured on
    the source model (`teacher`, `source`) is the simulation's source losses."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(yaml_path)
    options = {k: OmegaConf.to_container(cfg.callbacks.dro_reweight, resolve=True)[k]
               for k in cfg.callbacks.dro_reweight if k not in ('domains', 'history_folder')}
    if options.get('reference_loss') in ('teacher', 'source'):
        options['reference_loss'] = SKEWED_SOURCE
    return options


def _shipped_pruning_yamls() -> list[Path]:
    """Every shipped YAML that prunes (`l0_mask`) and mixes with `dro_reweight`."""
    from omegaconf import OmegaConf

    found = []
    for path in sorted((Path(__file__).parents[1] / 'yamls').rglob('*.yaml')):
        cfg = OmegaConf.load(path)
        if 'l0_mask' in (cfg.get('algorithms') or {}) and 'dro_reweight' in (cfg.get('callbacks') or {}):
            found.append(path)
    return found


@pytest.mark.parametrize('yaml_path', _shipped_pruning_yamls(), ids=lambda p: p.name)
def test_shipped_rule_does_not_feed_the_dominant_domain_that_is_best_off_against_its_source(tmp_path, yaml_path):
    """Issue 23, item 5: the shipped pruning rule must not move weight onto the dominant domain, which degrades most
    in nats but least against its source, while the small domains (the worst off against theirs) sit at their
    floors; the previous rule ended with the dominant domain at 0.95 of the mixture."""
    options = _shipped_dro_options(yaml_path)
    weights, losses = _simulate_skewed_run(tmp_path, options)
    assert weights[0] <= SKEWED[0] + 1e-9, weights
    assert np.all(weights[1:] >= np.array(SKEWED[1:]) - 1e-9), weights
    constant, constant_losses = _simulate_skewed_run(tmp_path, {**options, 'update': 'constant'})
    degradation = losses / np.array(SKEWED_SOURCE)
    assert degradation.max() < (constant_losses / np.array(SKEWED_SOURCE)).max()


@pytest.mark.parametrize('step', ['best_response', 'mirror'])
def test_excess_against_the_source_in_its_own_unit_lowers_the_worst_degradation(tmp_path, step):
    """Excess log(L / L_source) (`reference_loss` = the source's losses, `excess: relative`): weight goes to the small
    domains, and the worst domain's L / L_source ends below the fixed mixture's."""
    options = dict(update='dro', rho=0.1, min_prob=0.1, reference_loss=SKEWED_SOURCE, excess='relative',
                   reference_ratio='dynamic', dro_step=step)
    weights, losses = _simulate_skewed_run(tmp_path, options)
    constant, constant_losses = _simulate_skewed_run(tmp_path, {**options, 'update': 'constant'})
    np.testing.assert_allclose(constant, SKEWED)
    assert weights[0] < SKEWED[0] and np.all(weights[1:] > np.array(SKEWED[1:]))
    source = np.array(SKEWED_SOURCE)
    assert (losses / source).max() < (constant_losses / source).max() - 0.005


@pytest.mark.parametrize('scale', ['spread', 'level'])
def test_mirror_step_chains_from_the_current_weights_and_survives_a_checkpoint(fake_state, tmp_path, scale):
    """`dro_step: mirror`: two evaluations with the same excess are two chained `dro_mirror_step`s from the mixture's
    weights (not one best response), and a callback restored from its state dict, with the mixture, takes the same
    next step."""
    from types import SimpleNamespace

    import torch
    from composer.core import Event, Timestamp
    from composer.loggers import Logger

    from drpruning_composer.data.mixture import DynamicMixtureDataset
    from drpruning_composer.dro.callback import DROReweightCallback
    from drpruning_composer.dro.update import dro_mirror_step, dro_step

    def start(mixture):
        state = SimpleNamespace(**vars(fake_state))
        state.train_dataloader = torch.utils.data.DataLoader(mixture)
        state.timestamp = Timestamp(batch=3, sample=12, sample_in_epoch=12)
        callback = DROReweightCallback(domains=DOMAINS, reference_loss=[1.0, 1.0, 1.0], dro_step='mirror',
                                       mirror_lr=0.3, mirror_scale=scale, rho=10.0, min_prob=0.0,
                                       excess_smoothing=0.0,
                                       history_folder=str(tmp_path / '{run_name}'), plot_interval=0)
        logger = Logger(state, [])
        callback.run_event(Event.FIT_START, state, logger)
        return state, callback, logger

    p = np.array([0.5, 0.3, 0.2])
    losses = np.array([1.2, 1.5, 1.1])
    mixture = DynamicMixtureDataset(DOMAINS, [range(5)] * 3, p, max_seq_len=4, seed=0)
    state, callback, logger = start(mixture)
    expected = p
    for _ in range(2):
        _evaluate(callback, state, logger, losses)
        expected = dro_mirror_step(expected, losses - 1.0, p, 10.0, 0.0, 0.3, scale)
        np.testing.assert_allclose(mixture.weights, expected, rtol=1e-12)
    assert not np.allclose(mixture.weights, dro_step(losses, [1.0] * 3, p, 10.0, 0.0))
    saved_callback = callback.state_dict()
    saved_mixture = mixture.state_dict(int(state.timestamp.sample), True)
    _evaluate(callback, state, logger, losses)
    restored_mixture = DynamicMixtureDataset(DOMAINS, [range(5)] * 3, p, max_seq_len=4, seed=0)
    restored_mixture.load_state_dict(saved_mixture)
    state2, restored, logger2 = start(restored_mixture)
    restored.load_state_dict(saved_callback)
    _evaluate(restored, state2, logger2, losses)
    np.testing.assert_array_equal(restored_mixture.weights, mixture.weights)
