"""A preempted `composer train.py` run resumes exactly: killed with SIGKILL (once while a checkpoint is being written)
and rerun with the same command, it exports the same bits and the same DRO history as an uninterrupted run."""

import csv
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import NO_WEIGHTS_REFERENCE, REPO, tiny_prune_overrides
from drpruning_composer.config_check import ConfigError, check_resume, load_and_check
from drpruning_composer.resume import INTERRUPTED, LATEST, prepare_resume

PRUNE = str(REPO / 'yamls' / 'demo' / 'prune.yaml')
NUM_BATCHES = 10


def _command(demo: Path, save: Path) -> list[str]:
    """The demo's pruning recipe with DRO on the tiny fixture: 2 microbatches a batch, a checkpoint every 2 batches,
    an evaluation (and, from the 4th, a DRO update) after every batch."""
    return ['composer', 'train.py', PRUNE, *tiny_prune_overrides(demo, save), f'max_duration={NUM_BATCHES}ba',
            'device_train_microbatch_size=2', 'eval_interval=1ba', 'save_interval=2ba', 'save_overwrite=false',
            'autoresume=true', 'console_log_interval=1ba', 'algorithms.l0_mask.lagrangian_warmup=4ba',
            'callbacks.dro_reweight.min_fit_points=4']


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'PYTHONUNBUFFERED': '1'}
    with open(log, 'w') as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


# Safety nets against hangs only, far above any machine's run time: no assertion here depends on speed.
HANG_TIMEOUT = 1800


def _kill_when(proc: subprocess.Popen, ready, timeout: float = HANG_TIMEOUT) -> None:
    """SIGKILL the whole process group (launcher and trainer) as soon as `ready()` holds."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, 'the run ended before the kill point'
        assert time.monotonic() < deadline, 'the kill point never came'
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _points_to(link: Path, target: str) -> bool:
    """Whether symlink `link` names `target`; False while Composer replaces it (it removes the old link first)."""
    try:
        return os.readlink(link) == target
    except FileNotFoundError:
        return False


def _run_to_end(cmd: list[str], log: Path) -> str:
    proc = _start(cmd, log)
    assert proc.wait(timeout=HANG_TIMEOUT) == 0, log.read_text()[-4000:]
    return log.read_text()


def _history(save: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(save / 'dro' / 'history.csv')))


@pytest.fixture
def remove_leaked_shared_memory():
    """SIGKILLed runs leave mosaicml-streaming's shared memory in /dev/shm; remove what appeared during the test."""
    shm = Path('/dev/shm')
    before = set(os.listdir(shm)) if shm.is_dir() else set()
    yield
    for name in set(os.listdir(shm) if shm.is_dir() else ()) - before:
        if re.match(r'^\d{6}_', name):
            (shm / name).unlink(missing_ok=True)


@pytest.mark.usefixtures('remove_leaked_shared_memory')
def test_killed_run_resumes_bit_identically(tiny_demo, tmp_path):
    full, killed = tmp_path / 'full', tmp_path / 'killed'
    _run_to_end(_command(tiny_demo, full), tmp_path / 'full.log')

    cmd = _command(tiny_demo, killed)
    logs = [tmp_path / f'killed{i}.log' for i in range(4)]
    # Kill 1: the moment the batch-4 checkpoint appears. Then leave the folder exactly as a kill during that write
    # does (whether or not this kill landed mid-write): a partial file and `latest` still on batch 2.
    proc = _start(cmd, logs[0])
    ckpt4 = killed / 'ep0-ba4-rank0.pt'
    _kill_when(proc, ckpt4.exists)
    size = (killed / 'ep0-ba2-rank0.pt').stat().st_size
    with open(ckpt4, 'r+b') as f:
        f.truncate(min(ckpt4.stat().st_size, size // 2))
    (killed / LATEST).unlink(missing_ok=True)
    os.symlink('ep0-ba2-rank0.pt', killed / LATEST)
    # Kill 2: in the middle of batch 7 (after the batch-6 checkpoint).
    proc = _start(cmd, logs[1])
    _kill_when(proc, lambda: re.search(r'\[batch=7/', logs[1].read_text()) is not None)
    assert 'resuming from' in logs[1].read_text() and 'ep0-ba2-rank0.pt' in logs[1].read_text()
    # Kill 3: the moment the batch-8 checkpoint appears.
    proc = _start(cmd, logs[2])
    _kill_when(proc, (killed / 'ep0-ba8-rank0.pt').exists)
    assert re.search(r'resuming from .*ep0-ba6-rank0\.pt', logs[2].read_text())
    out = _run_to_end(cmd, logs[3])
    assert re.search(r'resuming from .*ep0-ba(6|8)-rank0\.pt', out)
    assert (killed / INTERRUPTED / 'ep0-ba4-rank0.pt').is_file()  # the partial checkpoint was set aside

    a = load_file(full / 'pruned_hf' / 'model.safetensors')
    b = load_file(killed / 'pruned_hf' / 'model.safetensors')
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    history_full, history_killed = _history(full), _history(killed)
    assert [int(r['batch']) for r in history_full] == list(range(1, NUM_BATCHES + 1))
    assert history_killed == history_full  # no evaluation row missing or repeated, every value the same
    assert any(r['weight/prose'] != history_full[0]['weight/prose'] for r in history_full)  # DRO moved the mixture


@pytest.mark.usefixtures('remove_leaked_shared_memory')
def test_run_killed_during_importance_calibration_resumes_bit_identically(tiny_demo, tmp_path):
    """`init: importance` (the real-model recipe's): killed after batch 3, inside the 4 calibration batches, and
    rerun, it resumes from the batch-2 checkpoint and exports the same bits and DRO history as an uninterrupted run."""
    importance = ['algorithms.l0_mask.init=importance', 'algorithms.l0_mask.importance_batches=4',
                  'algorithms.l0_mask.lagrangian_warmup=0ba']
    full, killed = tmp_path / 'full', tmp_path / 'killed'
    _run_to_end([*_command(tiny_demo, full), *importance], tmp_path / 'full.log')
    cmd = [*_command(tiny_demo, killed), *importance]
    log = tmp_path / 'killed0.log'
    proc = _start(cmd, log)
    _kill_when(proc, lambda: re.search(r'\[batch=3/', log.read_text()) is not None)
    out = _run_to_end(cmd, tmp_path / 'killed1.log')
    assert re.search(r'resuming from .*ep0-ba2-rank0\.pt', out)

    a = load_file(full / 'pruned_hf' / 'model.safetensors')
    b = load_file(killed / 'pruned_hf' / 'model.safetensors')
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _history(killed) == _history(full)


def _fake_checkpoint(path: Path, complete: bool = True) -> None:
    with zipfile.ZipFile(path, 'w') as z:
        z.writestr('data.pkl', b'x' * 1000)
    if not complete:
        with open(path, 'r+b') as f:
            f.truncate(500)


def test_prepare_resume_picks_newest_complete_checkpoint(tmp_path):
    for batch in (2, 4, 6):
        _fake_checkpoint(tmp_path / f'ep0-ba{batch}-rank0.pt')
    _fake_checkpoint(tmp_path / 'ep0-ba8-rank0.pt', complete=False)
    (tmp_path / 'ep0-ba8-rank1.pt').write_bytes(b'')
    os.symlink('ep0-ba4-rank0.pt', tmp_path / LATEST)  # killed after writing ba6, before moving the symlink
    assert prepare_resume(tmp_path) == tmp_path / 'ep0-ba6-rank0.pt'
    assert os.readlink(tmp_path / LATEST) == 'ep0-ba6-rank0.pt'
    assert sorted(p.name for p in (tmp_path / INTERRUPTED).iterdir()) == ['ep0-ba8-rank0.pt', 'ep0-ba8-rank1.pt']
    assert prepare_resume(tmp_path) == tmp_path / 'ep0-ba6-rank0.pt'  # idempotent


def test_prepare_resume_without_complete_checkpoint_starts_over(tmp_path):
    _fake_checkpoint(tmp_path / 'ep0-ba2-rank0.pt', complete=False)
    sharded = tmp_path / 'ep0-ba4'  # a sharded checkpoint folder without its .metadata
    sharded.mkdir()
    (sharded / '__0_0.distcp').write_bytes(b'')
    assert prepare_resume(tmp_path) is None
    assert not (tmp_path / LATEST).exists() and not any(tmp_path.glob('ep*'))


def test_save_folder_without_autoresume_fails_before_training(tiny_demo, tmp_path, monkeypatch):
    monkeypatch.delenv('RUN_NAME', raising=False)
    save = tmp_path / 'save'
    base = [f'variables.demo={tiny_demo}', f'variables.source_model={tiny_demo}/tiny_llama',
            f'variables.save_folder={save}', 'variables.max_seq_len=64', NO_WEIGHTS_REFERENCE]
    cfg = load_and_check(PRUNE, [*base, 'save_overwrite=false'])
    with pytest.raises(ConfigError, match=r'^autoresume: .* Set autoresume=true'):
        check_resume(cfg)
    assert 'FileExistsError' in check_resume(cfg, allow_no_autoresume=True)
    assert 'starts again at batch 0' in check_resume(load_and_check(PRUNE, base))  # the demo: save_overwrite
    assert check_resume(load_and_check(PRUNE, [*base, 'autoresume=true'])) is None
    with pytest.raises(ConfigError, match='needs a run_name'):
        check_resume(load_and_check(PRUNE, [*base, 'autoresume=true', 'run_name=null']))
    # "Before training" is shown by what happened, not by how long it took: the pre-flight error, and nothing
    # written to the save_folder (no checkpoint, no export, no DRO history).
    proc = subprocess.run([sys.executable, 'train.py', PRUNE, *base, 'save_overwrite=false'], cwd=REPO,
                          capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert proc.returncode == 2 and 'config error: autoresume:' in proc.stderr, proc.stderr[-2000:]
    assert not save.exists(), sorted(str(p) for p in save.rglob('*'))


def test_prepare_resume_leaves_unknown_layouts_alone(tmp_path):
    custom = tmp_path / 'custom'  # checkpoints under a custom save_filename: nothing to judge, nothing touched
    custom.mkdir()
    _fake_checkpoint(custom / 'step10.pt')
    os.symlink('step10.pt', custom / LATEST)
    assert prepare_resume(custom) is None and os.readlink(custom / LATEST) == 'step10.pt'
    regular = tmp_path / 'regular'  # `latest` as a plain file (e.g. downloaded): left as it is
    regular.mkdir()
    _fake_checkpoint(regular / 'ep0-ba2-rank0.pt')
    _fake_checkpoint(regular / LATEST)
    assert prepare_resume(regular) == regular / 'ep0-ba2-rank0.pt' and not (regular / LATEST).is_symlink()
    sharded = tmp_path / 'sharded'  # llm-foundry's sharded layout and symlink name
    (sharded / 'ep0-ba2').mkdir(parents=True)
    (sharded / 'ep0-ba2' / '.metadata').write_bytes(b'')
    assert prepare_resume(sharded, 'latest-sharded-rank0') == sharded / 'ep0-ba2'
    assert os.readlink(sharded / 'latest-sharded-rank0') == 'ep0-ba2'
