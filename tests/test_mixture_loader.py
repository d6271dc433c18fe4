"""dynamic_mixture loader: per-domain permutations, exact resume across weight changes, workers, bad config."""

import os

import numpy as np
import pytest
import torch

os.environ.setdefault('HF_HUB_OFFLINE', '1')

from drpruning_composer.data.mixture import MixtureSchedule, build_dynamic_mixture_dataloader

DOMAINS = ['alpha', 'beta', 'gamma']
SIZES = [40, 25, 10]
SEQ_LEN = 8
BATCH = 4


def _token(domain: int, sample: int) -> int:
    return 10 + 1000 * domain + sample


def write_domains(root, sizes=SIZES, domains=DOMAINS, seq_len=SEQ_LEN):
    """MDS folders {root}/{domain}/train whose every token encodes (domain, sample index)."""
    from streaming import MDSWriter

    for d, (name, n) in enumerate(zip(domains, sizes)):
        with MDSWriter(out=str(root / name / 'train'), columns={'tokens': 'ndarray:int32'}) as writer:
            for i in range(n):
                writer.write({'tokens': np.full(seq_len, _token(d, i), dtype=np.int32)})
    return root


def tiny_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {'<pad>': 0, '<eos>': 1, '<unk>': 2}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token='<unk>')), pad_token='<pad>', eos_token='<eos>',
        unk_token='<unk>',
    )


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    return write_domains(tmp_path_factory.mktemp('mixture'))


def build(root, num_workers=0, **dataset):
    cfg = {'local': str(root), 'domains': DOMAINS, 'proportions': [0.5, 0.3, 0.2], 'max_seq_len': SEQ_LEN, 'seed': 3}
    cfg.update(dataset)
    return build_dynamic_mixture_dataloader(
        tiny_tokenizer(), BATCH, cfg, drop_last=True, num_workers=num_workers, prefetch_factor=2 if num_workers else None,
    ).dataloader


def decode(batch):
    """(domain, sample) of every row, checked against the batch's domain_idx and labels."""
    ids = batch['input_ids']
    domains = (ids[:, 0] - 10) // 1000
    assert torch.equal(domains, batch['domain_idx'])
    assert torch.equal(batch['labels'], ids)  # as the `text` loader: labels = input_ids, no padding
    return [(int(d), int(t) - 10 - 1000 * int(d)) for d, t in zip(domains, ids[:, 0])]


def test_domain_samples_are_permutations_and_history_replays():
    schedule = MixtureSchedule(SIZES, [0.2, 0.2, 0.6], seed=1)
    seen, draws = {d: [] for d in range(3)}, []
    for g in range(400):
        if g == 150:
            schedule.set_weights([0.6, 0.3, 0.1])
        draws.append(schedule.draw())
        index, domain, sample = draws[-1]
        assert index == g
        seen[domain].append(sample)
    for d, samples in seen.items():
        full = len(samples) // SIZES[d]
        assert full >= 1
        for epoch in range(full):  # every exhausted pass is a permutation, the next pass a fresh one
            assert sorted(samples[epoch * SIZES[d]:(epoch + 1) * SIZES[d]]) == list(range(SIZES[d]))
    assert seen[2][:10] != seen[2][10:20]
    replay = MixtureSchedule(SIZES, [0.2, 0.2, 0.6], seed=1)
    replay.load_state_dict(schedule.state_dict())
    replay.seek(237)
    np.testing.assert_array_equal(replay.drawn, np.bincount(schedule.domains(0, 237), minlength=3))
    assert [replay.draw() for _ in range(163)] == draws[237:]
    domains = schedule.domains(0, 400)
    assert domains.tolist() == [domain for _, domain, _ in draws]  # vectorised replay == sequential draws
    assert np.mean(domains[:150] == 2) > 0.45 and np.mean(domains[150:] == 0) > 0.45


@pytest.mark.parametrize('num_workers', [0, 2])
def test_exact_resume_across_weight_changes(data_root, num_workers):
    def run(loader, first_batch, stop, changes, checkpoint_at=None):
        dataset, batches, state = loader.dataset, {}, None
        for b, batch in zip(range(first_batch, stop), loader):
            batches[b] = decode(batch)
            if b + 1 in changes:
                dataset.set_weights(changes[b + 1])
            if b + 1 == checkpoint_at:
                state = dataset.state_dict((b + 1) * BATCH, True)
        return batches, state

    changes = {3: [0.05, 0.05, 0.9], 7: [0.8, 0.1, 0.1]}
    full, state = run(build(data_root, num_workers), 0, 12, changes, checkpoint_at=5)
    assert state['history'][1][0] >= 3 * BATCH and len(state['history']) == 2

    resumed_loader = build(data_root, num_workers)
    resumed_loader.dataset.load_state_dict(state)
    resumed, _ = run(resumed_loader, 5, 12, {7: changes[7]})
    assert resumed == {b: full[b] for b in range(5, 12)}
    domains = [d for b in range(9 if num_workers == 0 else 11, 12) for d, _ in full[b]]
    assert domains.count(0) >= len(domains) // 2  # the last change took effect


def test_resume_inside_a_later_epoch(data_root):
    """Composer checkpoints samples consumed in the current epoch; epochs end with train_subset_num_batches."""
    loader = build(data_root)
    first_epoch = iter(loader)
    for _ in range(3):
        next(first_epoch)
    second_epoch = iter(loader)
    next(second_epoch)
    loader.dataset.set_weights([0.1, 0.1, 0.8])
    next(second_epoch)
    state = loader.dataset.state_dict(2 * BATCH, True)
    expected = [decode(next(second_epoch)) for _ in range(3)]

    resumed = build(data_root)
    resumed.dataset.load_state_dict(state)
    resumed_epoch = iter(resumed)
    assert [decode(next(resumed_epoch)) for _ in range(3)] == expected


def test_state_dict_is_weights_only_loadable(data_root, tmp_path):
    loader = build(data_root)
    next(iter(loader))
    loader.dataset.set_weights([1, 1, 2])
    torch.save(loader.dataset.state_dict(4, True), tmp_path / 's.pt')
    state = torch.load(tmp_path / 's.pt', weights_only=True)
    assert state['num_samples'] == 4 and state['epoch_start'] == 0
    assert state['history'][-1] == [4, [0.25, 0.25, 0.5]]


def test_num_workers_2_sees_weight_change(data_root):
    loader = build(data_root, num_workers=2)
    it = iter(loader)
    for _ in range(3):
        next(it)
    first_index = loader.dataset.set_weights([0.0, 0.0, 1.0])
    # Samples already handed to workers (prefetch: 2 workers x 2 batches) keep the old weights.
    assert 3 * BATCH <= first_index <= (3 + 2 * 2) * BATCH
    rows = [row for _ in range(8) for row in decode(next(it))]
    after = rows[first_index - 3 * BATCH:]
    assert len(after) >= 4 * BATCH and all(d == 2 for d, _ in after)
    assert any(d != 2 for d, _ in rows[:first_index - 3 * BATCH]) or first_index == 3 * BATCH


@pytest.mark.parametrize('dataset, message', [
    ({'domains': ['alpha', 'delta', 'gamma']}, "domain 'delta'"),
    ({'proportions': [0.5, 0.5]}, 'dataset.proportions'),
    ({'proportions': [0.5, -0.1, 0.6]}, 'dataset.proportions'),
    ({'domains': ['alpha', 'alpha', 'gamma']}, 'distinct'),
    ({'proportions': 'natrual'}, "'natural' or omitted"),
])
def test_bad_config_raises(data_root, dataset, message):
    with pytest.raises(ValueError, match=message):
        build(data_root, **dataset)


def test_natural_proportions_are_each_domains_share_of_samples(data_root):
    loader = build(data_root, proportions='natural')
    np.testing.assert_allclose(loader.dataset.weights, np.array(SIZES) / sum(SIZES))


def test_proportions_are_normalised_with_warning(data_root):
    with pytest.warns(UserWarning, match='normalising'):
        loader = build(data_root, proportions=[2, 1, 1])
    np.testing.assert_allclose(loader.dataset.weights, [0.5, 0.25, 0.25])


def steal_the_next_prefix(monkeypatch):
    """Force the race of two processes starting loaders at once: right after this process's scan finds the free
    shared-memory prefix N (once), "another process" registers N, before this one creates `N_locals`."""
    from streaming.base.constant import LOCALS
    from streaming.base.shared import SharedMemory
    from streaming.base.shared import prefix as streaming_prefix

    real = streaming_prefix._check_and_find_retrying
    stolen = []

    def racing(streams_local, streams_remote, shm_name, retry):
        n = real(streams_local, streams_remote, shm_name=shm_name, retry=retry)
        if shm_name == LOCALS and not stolen:
            data = streaming_prefix._pack_locals(['/another/run/data'], n)
            try:
                shm = SharedMemory(streaming_prefix._get_path(n, LOCALS), True, len(data))
                shm.buf[:len(data)] = data
            except FileExistsError:  # a real other process (tests running beside these) took N first: the same race
                shm = None
            stolen.append((n, shm))
        return n

    monkeypatch.setattr(streaming_prefix, '_check_and_find_retrying', racing)
    return stolen


def test_another_process_taking_the_same_shared_memory_prefix_is_survived(data_root, monkeypatch):
    """streaming 0.12.0 alone dies here with FileExistsError: [Errno 17] File exists: '/0000NN_locals'."""
    import streaming.base.dataset as streaming_dataset_module

    original = streaming_dataset_module.get_shm_prefix
    stolen = steal_the_next_prefix(monkeypatch)
    loader = build(data_root)
    assert stolen and streaming_dataset_module.get_shm_prefix is original  # restored after construction
    prefixes = [source._shm_prefix_int for source in loader.dataset.sources]
    assert len(set(prefixes)) == len(DOMAINS) and stolen[0][0] not in prefixes
    decode(next(iter(loader)))


def test_ranks_of_a_node_take_their_leaders_prefix_and_its_errors(tmp_path):
    """The node's other ranks get the leader's prefix from the all-gather, even when another process registered a
    prefix after the leader (their own scan would choose another); a leader's error reaches them (no rank waits)."""
    from streaming.base.world import World

    from drpruning_composer.data.mixture import allocate_prefix, register_prefix

    leader, other = World(1, 2, 1, 0), World(1, 2, 1, 1)
    local = [str(tmp_path / 'a' / 'train')]
    sent = []
    n, shm = allocate_prefix(local, [None], leader, exchange=lambda e: sent.append(e) or [e, (0, False, None, None)])
    elsewhere, _ = register_prefix([str(tmp_path / 'b' / 'train')], [None])
    assert elsewhere > n
    m, attached = allocate_prefix(local, [None], other, exchange=lambda e: [sent[0], e])
    assert m == n and bytes(attached.buf) == bytes(shm.buf)
    failed = (0, True, None, 'ValueError: Reused local directory')
    with pytest.raises(RuntimeError, match='the local leader failed to register a prefix: ValueError: Reused'):
        allocate_prefix(local, [None], other, exchange=lambda e: [failed, e])


TWO_RANKS = '''
import json, os, sys
import torch.distributed as dist
import torch.multiprocessing as mp


def run(rank, tests, root, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE='2', LOCAL_WORLD_SIZE='2', LOCAL_RANK=str(rank),
                      MASTER_ADDR='127.0.0.1', MASTER_PORT=port)
    dist.init_process_group('gloo', rank=rank, world_size=2)
    sys.path.insert(0, tests)
    import pytest
    from test_mixture_loader import DOMAINS, steal_the_next_prefix
    from drpruning_composer.data.mixture import build_domain_sources

    if rank == 0:  # the local leader loses the race once
        stolen = steal_the_next_prefix(pytest.MonkeyPatch())
    sources = build_domain_sources(DOMAINS, local=root, remote=None, split='train', batch_size=4)
    with open(os.path.join(out, f'rank{rank}.json'), 'w') as f:  # one file a rank: printed lines can interleave
        json.dump([[s._shm_prefix_int for s in sources], [len(s) for s in sources]], f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == '__main__':
    mp.spawn(run, args=tuple(sys.argv[1:]), nprocs=2)
'''


def test_two_ranks_build_the_same_datasets_when_the_leader_loses_the_race(data_root, tmp_path):
    """Construction stays collective: with 2 ranks on one node (gloo) and the local leader's first prefix taken by
    another process, both ranks finish (no barrier left waiting) with the same prefixes."""
    import json
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = str(s.getsockname()[1])
    (tmp_path / 'two_ranks.py').write_text(TWO_RANKS)
    proc = subprocess.run([sys.executable, str(tmp_path / 'two_ranks.py'), str(Path(__file__).parent), str(data_root),
                           port, str(tmp_path)], capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    ranks = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1], ranks
    assert len(ranks[0][0]) == len(DOMAINS) and len(set(ranks[0][0])) == len(DOMAINS), ranks  # distinct prefixes


def test_stream_does_not_depend_on_num_workers_when_weights_change_at_consumed_plus_lag(data_root):
    """Issue 20, item 10: new weights take effect at (samples consumed + a fixed lag), as `dro_reweight` sets them,
    not at the sampler's draw position (which runs ahead by the workers' prefetch): an uninterrupted run and runs
    restarted with another num_workers read the same stream, sample for sample."""
    lag = 2 * 2 * BATCH  # num_workers=2 x prefetch_factor=2 batches: the deepest prefetch used below
    changes = {3: [0.05, 0.05, 0.9], 4: [0.3, 0.3, 0.4], 7: [0.8, 0.1, 0.1]}

    def run(loader, first_batch, stop, checkpoint_at=None):
        dataset, batches, state = loader.dataset, {}, None
        for b, batch in zip(range(first_batch, stop), loader):
            batches[b] = decode(batch)
            consumed = (b + 1) * BATCH
            if b + 1 in changes:  # an evaluation after batch b: weights from `consumed + lag` on
                dataset.set_weights_on_all_ranks(changes[b + 1], first_index=consumed + lag)
            if b + 1 == checkpoint_at:
                state = dataset.state_dict(consumed, True)
        return batches, state

    streams, states = {}, {}
    for workers in (0, 2):
        streams[workers], states[workers] = run(build(data_root, workers), 0, 14, checkpoint_at=5)
    assert streams[0] == streams[2]
    assert [start for start, _ in states[0]['history']] == [0, 3 * BATCH + lag, 4 * BATCH + lag]
    for first, then in ((0, 2), (2, 0)):
        resumed = build(data_root, then)
        resumed.dataset.load_state_dict(states[first])
        assert run(resumed, 5, 14)[0] == {b: streams[0][b] for b in range(5, 14)}
    late = [d for b in range(12, 14) for d, _ in streams[0][b]]
    assert late.count(0) >= len(late) // 2  # the last change took effect

    # A change due before what the workers have already drawn cannot be exact: refused, not silently shifted.
    loader = build(data_root, 2)
    it = iter(loader)
    next(it)
    with pytest.raises(RuntimeError, match='already drawn up to .* lower num_workers'):
        loader.dataset.set_weights_on_all_ranks([0.2, 0.2, 0.6], first_index=BATCH)
