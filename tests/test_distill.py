"""Distillation: the chunked KD loss equals the one-piece computation, the teacher stays frozen, `alpha: 0` changes
nothing in a real pruning run, and bad options fail before training."""

import os
import re
import subprocess

import pytest
import torch

from conftest import REPO, tiny_prune_overrides
from test_resume import remove_leaked_shared_memory  # noqa: F401 (fixture)


def _logits(seed: int, shape=(3, 7, 50), dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 3


@pytest.mark.parametrize('chunk_size', [1, 4, 5, 1000])
def test_chunked_kd_equals_one_piece_in_value_and_gradient(chunk_size):
    from drpruning_composer.distill.kd import kd_loss, next_token_mask

    labels = torch.randint(0, 50, (3, 7))
    labels[0, 5:] = -100
    labels[2, :3] = -100
    mask = next_token_mask(labels)
    assert mask.sum() == (labels[:, 1:] != -100).sum() and not mask[:, -1].any()
    teacher = _logits(1)
    student_a, student_b = _logits(2).requires_grad_(), _logits(2).requires_grad_()
    whole = kd_loss(student_a, teacher, mask, temperature=2.0, chunk_size=None)
    chunked = kd_loss(student_b, teacher, mask, temperature=2.0, chunk_size=chunk_size)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    whole.backward()
    chunked.backward()
    torch.testing.assert_close(student_b.grad, student_a.grad, rtol=0, atol=1e-6)
    # By hand: T^2 * mean over masked positions of sum_v p_t (log p_t - log p_s).
    log_t, log_s = torch.log_softmax(teacher / 2, -1), torch.log_softmax(_logits(2) / 2, -1)
    by_hand = 4 * ((log_t.exp() * (log_t - log_s)).sum(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(whole.detach(), by_hand, rtol=0, atol=1e-6)
    assert float(kd_loss(teacher, teacher, mask)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize('kwargs, message', [
    (dict(alpha=1.5), 'alpha'), (dict(alpha=-0.1), 'alpha'), (dict(temperature=0.0), 'temperature'),
    (dict(teacher='/nonexistent/teacher'), 'teacher'), (dict(teacher_dtype='int8'), 'teacher_dtype'),
    (dict(teacher_sharding='tp'), 'teacher_sharding'),
])
def test_bad_options_name_the_key(kwargs, message):
    from drpruning_composer.distill.algorithm import DistillationAlgorithm

    with pytest.raises(ValueError, match=rf'^algorithms\.distill\.{message}'):
        DistillationAlgorithm(**kwargs)


@pytest.fixture(scope='module')
def source(tiny_demo, tmp_path_factory):
    """A saved random-init source model of the tiny fixture (the default teacher of a pruning run)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp('source')
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_demo / 'tiny_llama')).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_demo / 'tiny_llama').save_pretrained(folder)
    return folder


def test_teacher_is_frozen_and_the_loss_mixes_kd_and_lm(source):
    """One training step by hand: no gradient reaches the teacher, and total = alpha*kd + (1-alpha)*lm + the rest."""
    from types import SimpleNamespace

    from composer.core import Event
    from transformers import AutoModelForCausalLM

    from drpruning_composer.distill.algorithm import DistillationAlgorithm

    student = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    state = SimpleNamespace(model=SimpleNamespace(model=student))
    algorithm = DistillationAlgorithm(alpha=0.3, temperature=2.0, chunk_size=8)
    algorithm.apply(Event.INIT, state, None)
    before = {k: v.clone() for k, v in algorithm.teacher.state_dict().items()}
    input_ids = torch.randint(2, 500, (2, 16))
    state.batch = {'input_ids': input_ids, 'labels': input_ids.clone()}
    state.outputs = student(input_ids=input_ids, labels=input_ids)
    lagrangian = torch.tensor(0.5, requires_grad=True)
    lm = state.outputs.loss
    state.loss = {'lm': lm, 'lagrangian': lagrangian, 'total': lm + lagrangian}
    algorithm.apply(Event.AFTER_LOSS, state, None)
    loss = state.loss
    torch.testing.assert_close(loss['total'], 0.3 * loss['kd'] + 0.7 * lm + lagrangian)
    assert loss['kd'] > 0 and loss['lm'] is lm
    loss['total'].backward()
    assert all(p.grad is None and not p.requires_grad for p in algorithm.teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in algorithm.teacher.state_dict().items())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def _prune(demo, source, save, *extra):
    overrides = [*tiny_prune_overrides(demo, save), f'variables.source_model={source}', 'model.pretrained=true',
                 'max_duration=4ba', *extra]
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'PYTHONUNBUFFERED': '1'}
    return subprocess.run(['composer', str(REPO / 'train.py'), str(REPO / 'yamls' / 'demo' / 'prune.yaml'),
                           *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)


def test_alpha_zero_prunes_bit_identically_and_kd_is_logged(tiny_demo, source, tmp_path):
    """`composer train.py` with `distill` (alpha 0, teacher = the source) beside `l0_mask` and `dro_reweight`: the
    export equals the run without it to the bit; with alpha 0.5 the KD and LM terms are logged and the export
    differs."""
    from safetensors.torch import load_file

    plain = _prune(tiny_demo, source, tmp_path / 'plain')
    assert plain.returncode == 0, (plain.stdout + plain.stderr)[-4000:]
    zero = _prune(tiny_demo, source, tmp_path / 'zero', 'algorithms.distill.alpha=0.0', 'console_log_interval=1ba')
    log = zero.stdout + zero.stderr
    assert zero.returncode == 0, log[-4000:]
    assert 'loss/train/kd' in log and 'loss/train/lm' in log
    a, b = (load_file(tmp_path / run / 'pruned_hf' / 'model.safetensors') for run in ('plain', 'zero'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    half = _prune(tiny_demo, source, tmp_path / 'half', 'algorithms.distill.alpha=0.5')
    assert half.returncode == 0, (half.stdout + half.stderr)[-4000:]
    c = load_file(tmp_path / 'half' / 'pruned_hf' / 'model.safetensors')
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_teacher_with_another_vocabulary_fails_before_training(tiny_demo, source, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    config.vocab_size += 8
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / 'other')
    proc = _prune(tiny_demo, source, tmp_path / 'run', f'algorithms.distill.teacher={tmp_path / "other"}')
    assert proc.returncode != 0
    assert 'algorithms.distill.teacher' in proc.stderr + proc.stdout and 'vocabulary' in proc.stderr + proc.stdout
    assert not (tmp_path / 'run' / 'ep0-ba1-rank0.pt').exists()


def test_teacher_reference_in_a_distillation_run(tiny_demo, source, tmp_path):
    """`composer train.py` with `distill` and `dro_reweight reference_loss: teacher`: the teacher's loss is in every row
    of the DRO history, unchanged, and equals the first evaluation of the student (the source itself at batch 0)."""
    import math

    from conftest import DOMAINS
    from drpruning_composer.dro.report import read_history_csv

    proc = _prune(tiny_demo, source, tmp_path / 'run', 'algorithms.distill.alpha=0.5',
                  'callbacks.dro_reweight.reference_loss=teacher', 'eval_first=true')
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    _, rows = read_history_csv(str(tmp_path / 'run' / 'dro' / 'history.csv'))
    references = [[row[f'ref_loss/{d}'] for d in DOMAINS] for row in rows]
    assert len(rows) == 3 and all(math.isfinite(v) for v in references[0])  # batches 0, 2 and 4
    assert references == [references[0]] * 3
    assert [rows[0][f'loss/{d}'] for d in DOMAINS] == pytest.approx(references[0], rel=1e-5)


@pytest.mark.usefixtures('remove_leaked_shared_memory')
def test_killed_distillation_run_resumes_bit_identically_with_its_teacher_reference(tiny_demo, source, tmp_path):
    """`distill` + `reference_loss: teacher`, SIGKILLed after its batch-4 checkpoint and rerun: the same export to the
    bit and the same DRO history (teacher reference included) as the uninterrupted run."""
    from safetensors.torch import load_file

    from test_resume import _command, _history, _kill_when, _points_to, _run_to_end, _start

    def command(save):
        return [*_command(tiny_demo, save), f'variables.source_model={source}', 'model.pretrained=true',
                'max_duration=6ba', 'algorithms.distill.alpha=0.5', 'callbacks.dro_reweight.reference_loss=teacher']

    full, killed = tmp_path / 'full', tmp_path / 'killed'
    _run_to_end(command(full), tmp_path / 'full.log')
    proc = _start(command(killed), tmp_path / 'killed.log')
    _kill_when(proc, lambda: (killed / 'ep0-ba4-rank0.pt').exists()
               and _points_to(killed / 'latest-rank0.pt', 'ep0-ba4-rank0.pt'))
    out = _run_to_end(command(killed), tmp_path / 'resumed.log')
    assert re.search(r'resuming from .*ep0-ba4-rank0\.pt', out)
    a, b = (load_file(run / 'pruned_hf' / 'model.safetensors') for run in (full, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _history(killed) == _history(full) and len(_history(full)) == 6


def _sharded_forward(rank: int, world: int, port: int, folder: str, out: str) -> None:
    import torch.distributed as td

    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    td.init_process_group('gloo', rank=rank, world_size=world)
    from transformers import AutoModelForCausalLM

    from drpruning_composer.distill.algorithm import load_teacher

    student = AutoModelForCausalLM.from_pretrained(folder)
    teacher = load_teacher(folder, student, torch.float32, 'algorithms.distill.teacher', sharded=True)
    local = sum(p.to_local().numel() for p in teacher.parameters())
    ids = torch.arange(24).view(2, 12) % student.config.vocab_size
    with torch.no_grad():
        logits = teacher(input_ids=ids).logits
    torch.save({'local': local, 'full': student.num_parameters(), 'logits': logits,
                'expected': student(input_ids=ids).logits.detach()}, f'{out}/rank{rank}.pt')
    td.destroy_process_group()


def test_sharded_teacher_holds_half_the_weights_per_rank_and_computes_the_same_logits(source, tmp_path):
    """`teacher_sharding: fsdp` on 2 ranks (gloo): each rank keeps about half the teacher's weights, and the teacher's
    logits equal the unsharded model's."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    mp.spawn(_sharded_forward, args=(2, port, str(source), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        r = torch.load(tmp_path / f'rank{rank}.pt')
        assert r['local'] <= r['full'] // 2 + 64 and r['local'] >= r['full'] // 2 - 64
        torch.testing.assert_close(r['logits'], r['expected'], rtol=1e-5, atol=1e-5)
