"""Dynamic domain mixture: a dataloader whose domain weights may change at any step.

Every global sample index g (counted over all ranks) gets a domain drawn with the weights in effect
for g, from a uniform number that depends only on (seed, g). The j-th sample drawn from domain d is
element j mod n_d of a per-(domain, epoch) permutation, epoch = j // n_d, so a domain never repeats a
sample before it is exhausted. The weight history [(first_global_index, weights), ...] makes the
whole sequence a pure function of (seed, history): every rank computes the same sequence and keeps
indices g with g % world_size == rank, and a resumed run replays the history to get exactly the same
batches. The selection runs in the sampler in the main process (workers only fetch by key), so new
weights reach loaders with `num_workers > 0`.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from composer.core import DataSpec
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from drpruning_composer.data.instruct import ResponseCollator, as_tensors, pad_token_id

_BLOCK = 4096  # uniforms are generated in blocks of this many global indices
_UNIFORM_STREAM = 0
_PERMUTATION_STREAM = 1


NATURAL = 'natural'


def normalize_proportions(proportions: Sequence[float], num_domains: int, key: str = 'proportions') -> np.ndarray:
    """Validate domain proportions (length, sign, finiteness) and normalise them to sum to 1 (warning if needed)."""
    p = np.asarray(proportions, dtype=np.float64)
    if p.ndim != 1 or p.size != num_domains:
        raise ValueError(f'`{key}` must have one entry per domain ({num_domains}), got {list(proportions)}')
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError(f'`{key}` must be finite and non-negative, got {list(proportions)}')
    total = float(p.sum())
    if total <= 0:
        raise ValueError(f'`{key}` must have a positive sum, got {list(proportions)}')
    if abs(total - 1.0) > 1e-6:
        warnings.warn(f'`{key}` sum to {total}, not 1; normalising them.')
    return p / total


class MixtureSchedule:
    """The global sample sequence of a dynamic mixture: which domain and which sample each global index reads.

    Stateful only through the draw position (`next_index`, the first global index not drawn yet, with the
    per-domain draw counts there) and the weight history, both in `state_dict`.
    """

    def __init__(self, domain_sizes: Sequence[int], weights: Sequence[float], seed: int, shuffle: bool = True):
        self.domain_sizes = [int(n) for n in domain_sizes]
        if any(n <= 0 for n in self.domain_sizes):
            raise ValueError(f'every domain needs at least one sample, got sizes {self.domain_sizes}')
        self.seed = int(seed)
        self.shuffle = shuffle
        self.history: list[tuple[int, np.ndarray]] = [(0, normalize_proportions(weights, len(self.domain_sizes)))]
        self._cumulative = [np.cumsum(self.history[0][1])]
        self.next_index = 0
        self.drawn = np.zeros(len(self.domain_sizes), dtype=np.int64)
        self._block: tuple[int, np.ndarray] | None = None
        self._permutations: dict[int, tuple[int, np.ndarray]] = {}
        self._counts_cache: tuple[int, np.ndarray] | None = None

    @property
    def num_domains(self) -> int:
        return len(self.domain_sizes)

    @property
    def weights(self) -> np.ndarray:
        """The most recently set weights."""
        return self.history[-1][1].copy()

    def set_weights(self, weights: Sequence[float], first_index: int | None = None) -> int:
        """Use `weights` from global index `first_index` on (default: the first index not drawn yet).

        `first_index` may lie ahead of the draw position (ranks agree on the largest position among them),
        never behind it. Returns the index recorded in the history.
        """
        w = normalize_proportions(weights, self.num_domains, key='weights')
        start = self.next_index if first_index is None else int(first_index)
        if start < self.next_index:
            raise ValueError(f'cannot change weights from index {start}: indices up to {self.next_index} are drawn')
        last_start = self.history[-1][0]
        if start <= last_start:
            # A pending change that has not taken effect yet is superseded.
            start = last_start
            self.history.pop()
            self._cumulative.pop()
        self.history.append((start, w))
        self._cumulative.append(np.cumsum(w))
        if self._counts_cache is not None and self._counts_cache[0] > start:
            self._counts_cache = None
        return start

    def _uniforms(self, block: int) -> np.ndarray:
        if self._block is None or self._block[0] != block:
            rng = np.random.default_rng([self.seed, _UNIFORM_STREAM, block])
            self._block = (block, rng.random(_BLOCK))
        return self._block[1]

    def _segment_of(self, index: int) -> int:
        segment = len(self.history) - 1
        while self.history[segment][0] > index:
            segment -= 1
        return segment

    def _domains_in_segment(self, segment: int, uniforms: np.ndarray) -> np.ndarray:
        cumulative = self._cumulative[segment]
        return np.minimum(np.searchsorted(cumulative, uniforms * cumulative[-1], side='right'), self.num_domains - 1)

    def domains(self, start: int, stop: int) -> np.ndarray:
        """Domain ids of global indices [start, stop) under the current history (vectorised)."""
        out = np.empty(max(stop - start, 0), dtype=np.int64)
        if stop <= start:
            return out
        for block in range(start // _BLOCK, (stop - 1) // _BLOCK + 1):
            lo, hi = max(start, block * _BLOCK), min(stop, (block + 1) * _BLOCK)
            uniforms = self._uniforms(block)[lo - block * _BLOCK:hi - block * _BLOCK]
            for segment, (seg_start, _) in enumerate(self.history):
                seg_stop = self.history[segment + 1][0] if segment + 1 < len(self.history) else hi
                a, b = max(lo, seg_start), min(hi, seg_stop)
                if a < b:
                    out[a - start:b - start] = self._domains_in_segment(segment, uniforms[a - lo:b - lo])
        return out

    def counts(self, stop: int) -> np.ndarray:
        """Number of samples of each domain among global indices [0, stop).

        Extends the previous answer when `stop` grows (the callback asks once per evaluation).
        """
        begin, counts = 0, np.zeros(self.num_domains, dtype=np.int64)
        if self._counts_cache is not None and self._counts_cache[0] <= stop:
            begin, counts = self._counts_cache[0], self._counts_cache[1].copy()
        chunk = 64 * _BLOCK
        for start in range(begin, stop, chunk):
            counts += np.bincount(self.domains(start, min(stop, start + chunk)), minlength=self.num_domains)
        self._counts_cache = (stop, counts.copy())
        return counts

    def _permutation(self, domain: int, epoch: int) -> np.ndarray:
        cached = self._permutations.get(domain)
        if cached is None or cached[0] != epoch:
            size = self.domain_sizes[domain]
            if self.shuffle:
                order = np.random.default_rng([self.seed, _PERMUTATION_STREAM, domain, epoch]).permutation(size)
            else:
                order = np.arange(size)
            cached = (epoch, order)
            self._permutations[domain] = cached
        return cached[1]

    def draw(self) -> tuple[int, int, int]:
        """Draw the next global index: returns (global index, domain, sample index within the domain)."""
        g = self.next_index
        uniforms = self._uniforms(g // _BLOCK)[g % _BLOCK:g % _BLOCK + 1]
        domain = int(self._domains_in_segment(self._segment_of(g), uniforms)[0])
        occurrence = int(self.drawn[domain])
        size = self.domain_sizes[domain]
        sample = int(self._permutation(domain, occurrence // size)[occurrence % size])
        self.drawn[domain] += 1
        self.next_index = g + 1
        return g, domain, sample

    def seek(self, index: int) -> None:
        """Move the draw position to global index `index` (e.g. the number of samples consumed at a checkpoint)."""
        self.next_index = int(index)
        self.drawn = self.counts(self.next_index)

    def state_dict(self) -> dict[str, Any]:
        return {
            'seed': self.seed,
            'domain_sizes': list(self.domain_sizes),
            'history': [[start, [float(x) for x in w]] for start, w in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the weight history; the seed and the domain sizes must match, or the replay would differ."""
        if int(state['seed']) != self.seed:
            raise ValueError(f'checkpoint mixture seed {state["seed"]} differs from the configured seed {self.seed}')
        if [int(n) for n in state['domain_sizes']] != self.domain_sizes:
            raise ValueError(
                f'checkpoint mixture domain sizes {state["domain_sizes"]} differ from the data\'s {self.domain_sizes}',
            )
        history = [(int(start), np.asarray(w, dtype=np.float64)) for start, w in state['history']]
        self.history = history
        self._cumulative = [np.cumsum(w) for _, w in history]
        self._counts_cache = None


class DynamicMixtureDataset(Dataset):
    """Map-style dataset over one random-access source per domain, indexed by (domain, sample) keys.

    Holds the `MixtureSchedule` so that Composer's `state_dict(num_samples, from_beginning)` /
    `load_state_dict` of the train dataset checkpoint and restore the mixture.
    """

    def __init__(
        self,
        domains: Sequence[str],
        sources: Sequence[Any],
        proportions: Sequence[float],
        max_seq_len: int,
        seed: int,
        shuffle: bool = True,
        instruct: bool = False,
    ):
        if len(domains) != len(sources):
            raise ValueError('one source per domain is required')
        self.domains = list(domains)
        self.sources = list(sources)
        self.max_seq_len = int(max_seq_len)
        self.instruct = instruct
        self.schedule = MixtureSchedule([len(s) for s in self.sources], proportions, seed, shuffle)
        self.epoch_start = 0
        self._resumed_epoch = False

    def __len__(self) -> int:
        return sum(self.schedule.domain_sizes)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, int]:
        """(row, domain id) for a (domain, sample) key: the row is int64 tokens of length max_seq_len, or for
        instruction data (`instruct=True`) a dict of `tokens` and `loss_mask` of at most max_seq_len."""
        domain, index = key
        sample = self.sources[domain][index]
        where = f'sample {index} of domain {self.domains[domain]!r}'
        if self.instruct:
            return as_tensors(sample, self.max_seq_len, where), domain
        tokens = np.asarray(sample['tokens'])
        if tokens.shape[0] < self.max_seq_len:
            raise ValueError(f'{where} has {tokens.shape[0]} tokens, fewer than max_seq_len={self.max_seq_len}')
        return torch.from_numpy(tokens[:self.max_seq_len].astype(np.int64)), domain

    @property
    def weights(self) -> np.ndarray:
        return self.schedule.weights

    def set_weights(self, weights: Sequence[float], first_index: int | None = None) -> int:
        """New domain weights from the first global index not drawn yet (or `first_index`); see `MixtureSchedule`."""
        return self.schedule.set_weights(weights, first_index)

    def set_weights_on_all_ranks(self, weights: Sequence[float], first_index: int | None = None) -> np.ndarray:
        """Collective `set_weights`: every rank takes rank 0's weights from global index `first_index`, or, if None,
        from the largest draw position over ranks.

        Ranks compute identical updates from synced metrics; the broadcast guards against any drift, and the
        common first index keeps the global sample sequence identical on all ranks. A `first_index` that does not
        depend on prefetching (`dro_reweight`: samples consumed + a fixed lag) makes the sequence independent of
        `num_workers`; it must not lie behind what a rank's loader has already drawn (RuntimeError: the samples
        handed to workers have their domains). Returns the weights set.
        """
        from composer.utils import dist

        payload = [[float(x) for x in weights]]
        dist.broadcast_object_list(payload, src=0)
        drawn = max(int(i) for i in dist.all_gather_object(self.schedule.next_index))
        if first_index is not None and drawn > first_index:
            raise RuntimeError(f'dynamic_mixture: new weights are due from global sample {first_index}, but the loader '
                               f'has already drawn up to {drawn} (its workers prefetch further ahead than the lag '
                               'the run was started with); lower num_workers * prefetch_factor, or start the run '
                               'with a larger callbacks.dro_reweight.weight_lag_batches')
        self.schedule.set_weights(payload[0], drawn if first_index is None else first_index)
        return self.schedule.weights

    @property
    def next_index(self) -> int:
        return self.schedule.next_index

    def samples_per_domain(self, num_samples: int) -> np.ndarray:
        """Per-domain sample counts among the first `num_samples` global samples."""
        return self.schedule.counts(int(num_samples))

    def begin_iteration(self) -> None:
        """Called by the sampler when a dataloader iteration (a Composer epoch) starts drawing.

        Composer checkpoints the samples consumed *in the current epoch*, so the global index where the epoch
        began is remembered. After `load_state_dict` the restored epoch start is kept for the resumed epoch.
        """
        if self._resumed_epoch:
            self._resumed_epoch = False
        else:
            self.epoch_start = self.schedule.next_index

    def state_dict(self, num_samples: int, from_beginning: bool) -> dict[str, Any]:
        """Mixture state after `num_samples` samples (all ranks) of the current epoch (Composer: `from_beginning`)."""
        if not from_beginning:
            raise NotImplementedError('dynamic_mixture only supports state_dict(num_samples, from_beginning=True)')
        return {'epoch_start': self.epoch_start, 'num_samples': int(num_samples), **self.schedule.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state)
        self.schedule.seek(int(state['epoch_start']) + int(state['num_samples']))
        self.epoch_start = int(state['epoch_start'])
        self._resumed_epoch = True


class DynamicMixtureSampler(DistributedSampler):
    """Infinite per-rank sampler yielding (domain, sample) keys from the dataset's schedule.

    A DistributedSampler only so that Composer accepts it for world_size > 1. It has no length (Composer then
    runs to max_duration without epoch ends) and ignores `set_epoch`: the global index runs on across epochs
    (which only occur with `train_subset_num_batches`).
    """

    def __init__(self, dataset: DynamicMixtureDataset, rank: int, world_size: int):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=False, drop_last=True)
        self.schedule = dataset.schedule

    def __iter__(self) -> Iterator[tuple[int, int]]:
        self.dataset.begin_iteration()
        while True:
            g, domain, sample = self.schedule.draw()
            if g % self.num_replicas == self.rank:
                yield domain, sample

    def __len__(self) -> int:
        raise TypeError('DynamicMixtureSampler is infinite')

    def set_epoch(self, epoch: int) -> None:
        del epoch


class DomainCollator:
    """Collates rows with a base collator (llm-foundry's text collator, or `ResponseCollator` for instruction data)
    and adds `domain_idx` (LongTensor, one per row)."""

    def __init__(self, base_collator: Any):
        self.base_collator = base_collator

    def __call__(self, examples: list[tuple[Any, int]]) -> dict[str, Any]:
        batch = self.base_collator([row for row, _ in examples])
        batch['domain_idx'] = torch.tensor([domain for _, domain in examples], dtype=torch.long)
        return batch


# --- StreamingDataset construction without the shared-memory prefix race -----------------------------------------
#
# mosaicml-streaming 0.12.0 gives each StreamingDataset a number N that prefixes its shared memory (`/0000NN_locals`,
# ...): every rank scans the existing names for the first free N (`get_shm_prefix`), then the node's local leader
# creates `N_locals`. Two processes that scan at the same moment (two runs starting on one machine) choose the same
# N and the second create fails: `FileExistsError: [Errno 17] File exists: '/0000NN_locals'`. A non-leader rank
# whose scan runs while another process registers a prefix may also choose another N than its leader, and fail.
# Retrying the whole construction is not safe with several ranks (the others wait in streaming's barriers), so the
# allocation itself is replaced while this project builds a dataset: the leader scans and creates `N_locals`
# exclusively, scanning again when another process took N first; the node's other ranks take the leader's N from
# one all-gather instead of scanning, and an error of the leader reaches them through it (no rank left waiting).

PREFIX_ATTEMPTS = 200
_PREFIX_HOOK_LOCK = threading.RLock()


def _all_gather(obj: Any) -> list[Any]:
    """Every rank's `obj` (torch.distributed when initialised, else just this process's)."""
    import torch.distributed as torch_dist

    if torch_dist.is_available() and torch_dist.is_initialized():
        out: list[Any] = [None] * torch_dist.get_world_size()
        torch_dist.all_gather_object(out, obj)
        return out
    return [obj]


def register_prefix(streams_local: list[str], streams_remote: list[str | None], retry: int = 100,
                    attempts: int = PREFIX_ATTEMPTS) -> tuple[int, Any]:
    """Local leader: the first free prefix N, with `N_locals` created exclusively and holding `streams_local`.

    When another process creates `N_locals` between the scan and the create (FileExistsError), scans again, up to
    `attempts` times with a short random pause. Returns (N, streaming SharedMemory). Raises ValueError for a local
    folder another running dataset downloads into (streaming's own check), FileExistsError after `attempts` losses.
    """
    from streaming.base.constant import LOCALS, SHM_TO_CLEAN
    from streaming.base.shared import SharedMemory
    from streaming.base.shared import prefix as streaming_prefix

    for _ in range(attempts):
        prefix_int = max(streaming_prefix._check_and_find_retrying(streams_local, streams_remote, shm_name=name,
                                                                   retry=retry) for name in SHM_TO_CLEAN)
        data = streaming_prefix._pack_locals(streams_local, prefix_int)
        try:
            shm = SharedMemory(streaming_prefix._get_path(prefix_int, LOCALS), True, len(data))
        except FileExistsError:  # another process registered prefix_int after our scan
            time.sleep(random.uniform(0.001, 0.05))
            continue
        shm.buf[:len(data)] = data
        return prefix_int, shm
    raise FileExistsError(f'mosaicml-streaming shared memory: lost the race for a free prefix {attempts} times in a '
                          'row (many datasets starting at once on this machine?)')


def allocate_prefix(streams_local: list[str], streams_remote: list[str | None], world: Any, retry: int = 100,
                    exchange: Callable[[Any], list[Any]] = _all_gather) -> tuple[int, Any]:
    """Drop-in for streaming's `get_shm_prefix(streams_local, streams_remote, world)`, without its races.

    `world`: streaming's World of this rank. Every rank calls it once per dataset (construction is collective):
    the local leader registers a prefix (`register_prefix`), then `exchange` (an all-gather over ranks) gives every
    rank its node leader's prefix or error; the other ranks attach to the leader's `N_locals` and check it. A leader's
    error is raised on the leader, and as RuntimeError on its node's other ranks. Returns (N, SharedMemory).
    """
    from streaming.base.constant import LOCALS
    from streaming.base.shared import SharedMemory
    from streaming.base.shared import prefix as streaming_prefix

    streaming_prefix._check_self(streams_local)
    prefix_int, shm, error = None, None, None
    if world.is_local_leader:
        try:
            prefix_int, shm = register_prefix(streams_local, streams_remote, retry)
        except Exception as e:  # noqa: BLE001 -- sent to the node's other ranks, then raised
            error = e
    entries = exchange((world.node, bool(world.is_local_leader), prefix_int,
                        None if error is None else f'{type(error).__name__}: {error}'))
    if error is not None:
        raise error
    if world.is_local_leader:
        return prefix_int, shm
    leader = [e for e in entries if e[0] == world.node and e[1]]
    if len(leader) != 1:
        raise RuntimeError(f'mosaicml-streaming shared memory: node {world.node} has {len(leader)} local leaders')
    _, _, prefix_int, leader_error = leader[0]
    if leader_error is not None:
        raise RuntimeError(f'mosaicml-streaming shared memory: the local leader failed to register a prefix: '
                           f'{leader_error}')
    shm = SharedMemory(streaming_prefix._get_path(prefix_int, LOCALS), False)
    their_locals, their_prefix = streaming_prefix._unpack_locals(bytes(shm.buf))
    if their_locals != streams_local or their_prefix != prefix_int:
        raise RuntimeError(f'mosaicml-streaming shared memory: prefix {prefix_int} of the local leader holds '
                           f'{their_locals}, not this rank\'s {streams_local} (different `local` on different ranks?)')
    return prefix_int, shm


@contextlib.contextmanager
def race_free_prefixes() -> Iterator[None]:
    """While open, StreamingDatasets built in this process allocate their shared-memory prefix with
    `allocate_prefix` (streaming's module attribute is swapped, then restored; nothing installed is changed)."""
    import streaming.base.dataset as streaming_dataset_module

    if not callable(getattr(streaming_dataset_module, 'get_shm_prefix', None)):
        raise RuntimeError('mosaicml-streaming changed: streaming.base.dataset.get_shm_prefix is gone (this project '
                           'pins mosaicml-streaming==0.12.0)')
    with _PREFIX_HOOK_LOCK:
        original = streaming_dataset_module.get_shm_prefix
        streaming_dataset_module.get_shm_prefix = allocate_prefix
        try:
            yield
        finally:
            streaming_dataset_module.get_shm_prefix = original


def streaming_dataset(cls: type | None = None, **kwargs: Any) -> Any:
    """`cls(**kwargs)` (default: streaming's StreamingDataset, or a subclass) built under `race_free_prefixes`.

    Collective like StreamingDataset itself: every rank builds the same datasets in the same order.
    """
    if cls is None:
        from streaming import StreamingDataset as cls
    with race_free_prefixes():
        return cls(**kwargs)


def _domain_split_path(root: str, domain: str, split: str | None) -> str:
    return os.path.join(root, domain, split) if split else os.path.join(root, domain)


def build_domain_sources(
    domains: Sequence[str],
    local: str,
    remote: str | None,
    split: str | None,
    batch_size: int,
    **streaming_kwargs: Any,
) -> list[Any]:
    """One StreamingDataset per domain over `{root}/{domain}/{split}` (collective: same order on every rank), each built
    with `streaming_dataset` (no shared-memory prefix race with other processes)."""
    sources = []
    for domain in domains:
        local_dir = _domain_split_path(local, domain, split)
        remote_dir = _domain_split_path(remote, domain, split) if remote else None
        if remote_dir is None and not os.path.isfile(os.path.join(local_dir, 'index.json')):
            raise ValueError(f'dataset.domains: no MDS data for domain {domain!r} at {local_dir!r} (missing index.json)')
        sources.append(
            streaming_dataset(local=local_dir, remote=remote_dir, shuffle=False, batch_size=batch_size,
                              **streaming_kwargs),
        )
    return sources


def instruction_columns(sources: Sequence[Any], domains: Sequence[str]) -> bool:
    """Whether the domains' shards are instruction data (a `loss_mask` column); all domains must agree."""
    kinds = {d: 'loss_mask' in s.shards[0].column_names for d, s in zip(domains, sources)}
    if len(set(kinds.values())) > 1:
        raise ValueError('dataset.domains mixes instruction data (tokens + loss_mask) with token shards: '
                         f'{[d for d, k in kinds.items() if k]} have a loss mask, the others not')
    return next(iter(kinds.values()))


def build_dynamic_mixture_dataloader(
    tokenizer: Any,
    device_batch_size: int,
    dataset: dict[str, Any],
    drop_last: bool = True,
    num_workers: int = 0,
    pin_memory: bool = False,
    prefetch_factor: int | None = 2,
    persistent_workers: bool = False,
    timeout: float = 0,
) -> DataSpec:
    """llm-foundry dataloader `dynamic_mixture`.

    `dataset` keys: `local` (root holding `{domain}/{split}` MDS folders, column `tokens`), optional `remote`,
    `domains` (list of names), `proportions` (initial weights: a list, `natural` for each domain's share of the
    split's samples, i.e. of its tokens, or omitted for uniform), `split` (default `train`),
    `max_seq_len`, `seed` (default 17), `shuffle` (default true), optional `eos_token_id` / `bos_token_id`
    (as for the `text` loader: adds `sequence_id`); other keys go to each StreamingDataset. Batches are those of
    the `text` loader (input_ids, attention_mask, labels, token counts) plus `domain_idx`. Shards of instruction
    data (`drpruning-prepare --instruct`: a `loss_mask` column) give `ResponseCollator` batches instead: padded to
    the longest row, labels -100 on prompt tokens and padding; `natural` is then each task's share of the rows.
    """
    from composer.utils import dist
    from llmfoundry import registry
    from llmfoundry.utils.registry_utils import construct_from_registry

    config = dict(dataset)
    missing = [k for k in ('local', 'domains', 'max_seq_len') if k not in config]
    if missing:
        raise ValueError(f'dynamic_mixture: missing dataset keys {missing}')
    domains = list(config.pop('domains'))
    if not domains or len(set(domains)) != len(domains) or not all(isinstance(d, str) and d for d in domains):
        raise ValueError(f'dataset.domains must be a non-empty list of distinct names, got {domains}')
    proportions = config.pop('proportions', None)
    natural = proportions == NATURAL
    if isinstance(proportions, str) and not natural:
        raise ValueError(f'dataset.proportions must be a list, {NATURAL!r} or omitted, got {proportions!r}')
    weights = None if natural else normalize_proportions(
        [1.0] * len(domains) if proportions is None else list(proportions), len(domains), key='dataset.proportions',
    )
    if not drop_last:
        raise ValueError('dynamic_mixture requires drop_last: true (the sample stream is infinite)')
    if tokenizer is None:
        raise ValueError('dynamic_mixture needs a tokenizer (for the collator)')
    max_seq_len = int(config.pop('max_seq_len'))
    seed = int(config.pop('seed', 17))
    shuffle = bool(config.pop('shuffle', True))
    collator_keys = {k: config.pop(k) for k in ('eos_token_id', 'bos_token_id') if k in config}

    sources = build_domain_sources(
        domains,
        local=config.pop('local'),
        remote=config.pop('remote', None),
        split=config.pop('split', 'train'),
        batch_size=int(device_batch_size),
        **config,
    )
    if natural:
        sizes = np.array([len(s) for s in sources], dtype=np.float64)
        weights = normalize_proportions(sizes / sizes.sum(), len(domains), key='dataset.proportions')
    instruct = instruction_columns(sources, domains)
    mixture = DynamicMixtureDataset(domains, sources, weights, max_seq_len=max_seq_len, seed=seed, shuffle=shuffle,
                                    instruct=instruct)
    if instruct:
        if collator_keys:
            raise ValueError(f'dataset.{next(iter(collator_keys))}: not used with instruction data (its rows are '
                             'padded examples with a loss mask; see drpruning_composer.data.instruct)')
        base_collator = ResponseCollator(pad_token_id(tokenizer))
    else:
        base_collator, _ = construct_from_registry(
            name='text_collator',
            registry=registry.collators,
            partial_function=False,
            kwargs={
                'dataloader_cfg': {'dataset': dict(collator_keys)},
                'tokenizer': tokenizer,
                'dataset_batch_size': int(device_batch_size),
            },
        )
    loader = DataLoader(
        mixture,
        batch_size=int(device_batch_size),
        sampler=DynamicMixtureSampler(mixture, dist.get_global_rank(), dist.get_world_size()),
        collate_fn=DomainCollator(base_collator),
        drop_last=True,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        persistent_workers=persistent_workers and num_workers > 0,
        timeout=timeout,
    )
    return construct_from_registry(
        name='data_spec',
        registry=registry.data_specs,
        partial_function=False,
        kwargs={'dl': loader, 'dataset_cfg': dataset},
    )
