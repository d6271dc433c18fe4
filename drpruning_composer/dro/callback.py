"""DROReweightCallback: after each evaluation, move the training mixture toward domains with excess loss."""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from composer.core import Callback, State, TimeUnit
from composer.loggers import Logger
from composer.utils import dist

from drpruning_composer.data.mixture import DynamicMixtureDataset, normalize_proportions
from drpruning_composer.dro.report import HISTORY_CSV, HISTORY_PNG, plot_history, write_history_csv
from drpruning_composer.dro.scaling_law import DomainReferenceLoss
from drpruning_composer.dro.teacher import teacher_reference_loss
from drpruning_composer.dro.train_loss import DomainTrainLoss
from drpruning_composer.dro.update import MIRROR_SCALES, drift_ratio, dro_mirror_step, dro_step, sheared_step, smooth

log = logging.getLogger(__name__)

UPDATE_RULES = ('dro', 'sheared', 'constant')
EXCESS_KINDS = ('absolute', 'relative')
DRO_STEPS = ('best_response', 'mirror')
DYNAMIC = 'dynamic'
SOURCE = 'source'
TEACHER = 'teacher'
REFERENCE_KINDS = (DYNAMIC, SOURCE, TEACHER)
EVAL_METRIC = 'LanguageCrossEntropy'


def pruning_num_params(state: State) -> tuple[float | None, float | None]:
    """(expected size now, target size) from the pruning algorithm; (None, None) without one or before a forward."""
    try:
        from drpruning_composer.pruning.algorithm import L0MaskAlgorithm
    except ImportError:
        return None, None
    for algorithm in state.algorithms:
        if isinstance(algorithm, L0MaskAlgorithm):
            return algorithm.expected_num_params(), algorithm.target_num_params()
    return None, None


def check_domains(domains: Sequence[str], mixture_domains: Sequence[str], eval_labels: Sequence[str],
                  use_train_loss_ema: bool) -> None:
    """Raise ValueError unless `domains` are the mixture's domains, in order, each with an eval loader of that label.

    Shared by the callback (at FIT_START) and `train.py`'s pre-flight check of the YAML.
    """
    if list(mixture_domains) != list(domains):
        raise ValueError(f'callbacks.dro_reweight.domains: {list(domains)} must equal train_loader.dataset.domains '
                         f'{list(mixture_domains)} (same names, same order)')
    missing = [d for d in domains if d not in set(eval_labels)]
    if missing and not use_train_loss_ema:
        raise ValueError(f'callbacks.dro_reweight.domains: {missing} have no eval loader; add an eval_loader with '
                         f'`label: <domain>` for each (found labels {sorted(eval_labels)})')


def zero_weight_is_final(update: str, sheared_smoothing: float) -> bool:
    """Whether a domain whose weight (for `dro`: reference ratio) is 0 keeps weight 0 under this update rule.

    `dro` moves within a chi-square ball around the reference ratio p: q_d = p_d * (q_d / p_d) is 0 where p_d is 0,
    and the dynamic ratio's band [p0_d / band, band * p0_d] around a zero start is {0}. `sheared` multiplies the
    weight by exp(lr * excess), which keeps 0 at 0 unless its uniform smoothing adds mass. `constant` never moves.
    """
    return update == 'dro' or (update == 'sheared' and sheared_smoothing <= 0)


def mixture_weights_bound_dro(update: str, fixed_reference_ratio: bool, dro_step: str, min_prob: float) -> bool:
    """Whether the mixture's starting proportions (not a fixed `reference_ratio`) limit which domains can gain weight.

    `dro` with a fixed reference_ratio moves within a ball around that ratio, except the mirror step without a floor
    (`min_prob: 0`), which starts from the mixture's weights and keeps a 0 at 0. Shared by the callback and
    `train.py`'s pre-flight check.
    """
    return not (update == 'dro' and fixed_reference_ratio) or (dro_step == 'mirror' and min_prob == 0)


def check_no_zero_proportion(domains: Sequence[str], proportions: Sequence[float], key: str, update: str,
                             sheared_smoothing: float = 1e-4) -> None:
    """Refuse a domain at proportion 0 that the update rule could never give weight (see `zero_weight_is_final`).

    Shared by the callback (at FIT_START, with the mixture's initial weights) and `train.py`'s pre-flight check.
    """
    if not zero_weight_is_final(update, sheared_smoothing):
        return
    zero = [d for d, p in zip(domains, proportions) if float(p) <= 0]
    if zero:
        raise ValueError(
            f'{key}: {zero} start at proportion 0, and with update: {update} a domain at 0 can never gain weight '
            '(DRO reweights within a band around each domain\'s starting ratio, and the band around 0 is empty), '
            'however large its excess loss. Give it a small positive proportion (DRO can then raise it to a few '
            'times that, README: "A domain at proportion 0"), or drop it from the domains (and from '
            'callbacks.dro_reweight.domains and the eval loaders)')


def _check_vector(values: Any, n: int, key: str) -> list[float]:
    if not isinstance(values, (list, tuple)) or len(values) != n:
        raise ValueError(f'`{key}` must be a list with one number per domain ({n}), got {values!r}')
    out = [float(v) for v in values]
    if not all(math.isfinite(v) and v >= 0 for v in out):
        raise ValueError(f'`{key}` must be finite and non-negative, got {values!r}')
    return out


class DROReweightCallback(Callback):
    """Reweights a `dynamic_mixture` train loader after each evaluation (llm-foundry name: `dro_reweight`).

    Args:
        domains: domain names, in the order of the mixture's `dataset.domains`; each needs an eval loader
            labelled with its name (Composer label `eval/<domain>`) unless `use_train_loss_ema`.
        update: `dro` (chi-square-ball step around the reference ratio), `sheared` (Sheared-LLaMA's
            exponentiated update on excess loss) or `constant` (weights fixed, losses still logged).
        rho, min_prob: radius of the chi-square ball and floor on q/p for `dro`.
        dro_step: how `dro` moves the weights after an evaluation: `best_response` (the worst-case mixture in the
            ball for this evaluation's excess, `dro_step`; the paper's rule) or `mirror` (an exponentiated-gradient
            step of size `mirror_lr` from the current weights, kept in the same ball, `dro_mirror_step`: the weights
            accumulate evidence instead of jumping to each evaluation's worst case).
        mirror_lr: step size of `dro_step: mirror`: per update, before the floor and the ball, the domain with the
            largest excess gains a factor exp(mirror_lr) against the one with the smallest (the excess is scaled by
            its spread); per evaluation, so the rate per run grows with the number of evaluations.
        mirror_scale: what `mirror_lr` is relative to: `spread` (the gap between the largest and smallest excess:
            any gap moves the weights by a full step) or `level` (the largest absolute excess: the step is
            mirror_lr * gap / level and stops at balance).
        sheared_lr, sheared_smoothing: step size and uniform smoothing for `sheared`.
        reference_loss: one loss per domain; `dynamic` (per-domain scaling-law prediction at the end of training,
            at the target size while pruning; no update until every domain has a prediction); or `source` (each
            domain's loss at the first evaluation, which llm-foundry's `eval_first: true` makes the evaluation of
            the unchanged source model before the first batch: the excess is then each domain's degradation); or
            `teacher` (each domain's loss under the `distill` algorithm's teacher, or without it under the source
            model `model.pretrained_model_name_or_path`, loaded once and freed; measured on the same eval loaders
            at fit start, before the first update, identical on every rank, checkpointed and not re-measured on
            resume).
        reference_ratio: one proportion per domain, `dynamic` (starts at the mixture's initial proportions
            and drifts with `dro`'s updates: p <- (1-ratio_delta) p + ratio_delta q, within a factor `ratio_band`
            of the start), or None (the mixture's initial proportions, fixed). Only `dro` reads it.
        record_after, update_after, ratio_after: fractions of `max_duration` before which evaluations are not
            recorded for the reference-loss fit (the first steps are transient), the weights are not updated, and
            the reference ratio does not drift (the reference implementation's 2%, 10% and 20%).
        excess_smoothing: decay of an exponential moving average of the excess loss (loss - reference loss)
            that the update reads; it averages evaluation noise before the update's winner-take-most step.
            0 disables it. 0.5 halves the weights' jitter at a lag of about two updates (docs/dro_signal.md).
        excess: `absolute` (loss - reference loss, as in the paper) or `relative` (log(loss / reference loss):
            unit-free, comparable across domains whose losses differ in scale). `absolute` is the default for every
            reference, `teacher` included: it is in nats per token, the unit of the LM and KD losses whose
            per-domain sum the weights trade against each other; and the one measured run with `relative` against a
            fixed per-domain reference (docs/method_quality_demo_earlier.md: `source`, the teacher's loss
            when the teacher is the source) overshot, ending with a worse worst-domain degradation than the
            absolute default recipe (1.054 against 1.045, both seeds) and than the fixed mixture. With `teacher`
            (docs/distillation.md, 3 seeds, with and without distillation), `relative` gave the same worst-domain
            degradation as `absolute`, within the noise, at a higher mean loss (+0.009 to +0.014 nats).
            The shipped pruning YAMLs use `relative` with `reference_loss: teacher` and `dro_step: mirror`, which
            was measured better on the worst domain than this default and than a fixed mixture (docs/dro_update.md).
        use_train_loss_ema: use a per-domain EMA (decay `ema_decay`) of the training loss instead of eval loss.
        min_fit_points: evaluations needed before the scaling law is fitted.
        final_num_params: P at the end of training for the prediction (default: the pruning algorithm's target
            size, the loss being predicted for the model that will be exported; the current size without one).
        history_folder: where `history.csv` (rewritten at every update) and `history.png` go; `{run_name}`
            is substituted.
        plot_interval: redraw the PNG every this many evaluations and at the end of training; 0 disables it.
        weight_lag_batches: new weights apply to the training samples from this many batches after the evaluation
            that chose them (from global sample index: samples consumed + lag), so that the sample stream does not
            depend on how far the loader's workers prefetch. None: the prefetch depth of the run's first start,
            `num_workers * prefetch_factor` batches (0 without workers: the next batch). Recorded in the checkpoint:
            a restart keeps it, and may lower `num_workers` / `prefetch_factor` but not raise their product above
            it (refused at fit start). Set it to the largest product you will use to change them freely.
    """

    def __init__(
        self,
        domains: Sequence[str],
        update: str = 'dro',
        rho: float = 0.1,
        min_prob: float = 0.1,
        dro_step: str = 'best_response',
        mirror_lr: float = 0.5,
        mirror_scale: str = 'spread',
        sheared_lr: float = 1.0,
        sheared_smoothing: float = 1e-4,
        reference_loss: Sequence[float] | str = DYNAMIC,
        reference_ratio: Sequence[float] | str | None = None,
        ratio_delta: float = 0.1,
        ratio_band: float = 2.0,
        record_after: float = 0.02,
        update_after: float = 0.1,
        ratio_after: float = 0.2,
        excess_smoothing: float = 0.5,
        excess: str = 'absolute',
        use_train_loss_ema: bool = False,
        ema_decay: float = 0.9,
        min_fit_points: int = 5,
        final_num_params: float | None = None,
        history_folder: str = '{run_name}/dro',
        plot_interval: int = 10,
        weight_lag_batches: int | None = None,
    ) -> None:
        self.domains = list(domains) if isinstance(domains, (list, tuple)) else domains
        if not isinstance(self.domains, list) or not self.domains or len(set(self.domains)) != len(self.domains):
            raise ValueError(f'`domains` must be a non-empty list of distinct names, got {domains!r}')
        n = len(self.domains)
        if update not in UPDATE_RULES:
            raise ValueError(f'`update` must be one of {UPDATE_RULES}, got {update!r}')
        if rho < 0:
            raise ValueError(f'`rho` must be >= 0, got {rho}')
        if not 0 <= min_prob < 1:
            raise ValueError(f'`min_prob` must be in [0, 1), got {min_prob}')
        if dro_step not in DRO_STEPS:
            raise ValueError(f'`dro_step` must be one of {DRO_STEPS}, got {dro_step!r}')
        if not (math.isfinite(float(mirror_lr)) and mirror_lr >= 0):
            raise ValueError(f'`mirror_lr` must be a finite number >= 0, got {mirror_lr!r}')
        if mirror_scale not in MIRROR_SCALES:
            raise ValueError(f'`mirror_scale` must be one of {MIRROR_SCALES}, got {mirror_scale!r}')
        if not 0 <= ratio_delta <= 1:
            raise ValueError(f'`ratio_delta` must be in [0, 1], got {ratio_delta}')
        if ratio_band < 1:
            raise ValueError(f'`ratio_band` must be >= 1 (p0/band <= p <= band*p0), got {ratio_band}')
        for key, value in (('record_after', record_after), ('update_after', update_after),
                           ('ratio_after', ratio_after)):
            if not 0 <= value < 1:
                raise ValueError(f'`{key}` must be a fraction of the run in [0, 1), got {value}')
        if excess not in EXCESS_KINDS:
            raise ValueError(f'`excess` must be one of {EXCESS_KINDS}, got {excess!r}')
        if not 0 <= excess_smoothing < 1:
            raise ValueError(f'`excess_smoothing` must be in [0, 1), got {excess_smoothing}')
        if isinstance(reference_loss, str):
            if reference_loss not in REFERENCE_KINDS:
                raise ValueError(f'`reference_loss` must be a list or one of {REFERENCE_KINDS}, got {reference_loss!r}')
            if reference_loss in (SOURCE, TEACHER) and use_train_loss_ema:
                raise ValueError(f'`reference_loss: {reference_loss}` is measured on the eval loaders; it needs them, '
                                 'not `use_train_loss_ema`')
            self.static_ref_loss = None
        else:
            self.static_ref_loss = np.array(_check_vector(reference_loss, n, 'reference_loss'))
        self.dynamic_ratio = reference_ratio == DYNAMIC
        if isinstance(reference_ratio, str) and not self.dynamic_ratio:
            raise ValueError(f'`reference_ratio` must be a list, {DYNAMIC!r} or null, got {reference_ratio!r}')
        self.static_ratio = None
        if reference_ratio is not None and not self.dynamic_ratio:
            self.static_ratio = normalize_proportions(
                _check_vector(reference_ratio, n, 'reference_ratio'), n, key='reference_ratio',
            )
            if update == 'dro':
                check_no_zero_proportion(self.domains, self.static_ratio, 'callbacks.dro_reweight.reference_ratio',
                                         update, sheared_smoothing)
        self.reference_kind = reference_loss if isinstance(reference_loss, str) else 'static'
        self.update = update
        self.rho = float(rho)
        self.min_prob = float(min_prob)
        self.dro_step = dro_step
        self.mirror_lr = float(mirror_lr)
        self.mirror_scale = mirror_scale
        self.sheared_lr = float(sheared_lr)
        self.sheared_smoothing = float(sheared_smoothing)
        self.ratio_delta = float(ratio_delta)
        self.ratio_band = float(ratio_band)
        self.record_after = float(record_after)
        self.update_after = float(update_after)
        self.ratio_after = float(ratio_after)
        self.excess_smoothing = float(excess_smoothing)
        self.excess_kind = excess
        self.use_train_loss_ema = bool(use_train_loss_ema)
        if final_num_params is not None and not (math.isfinite(float(final_num_params)) and final_num_params > 0):
            raise ValueError(f'`final_num_params` must be a positive number of parameters, got {final_num_params!r}')
        self.final_num_params = None if final_num_params is None else float(final_num_params)
        try:
            history_folder.format(run_name='run')
        except (KeyError, IndexError, ValueError, AttributeError) as e:
            raise ValueError(f'`history_folder` may hold only the placeholder {{run_name}}, got {history_folder!r} '
                             f'({type(e).__name__}: {e})') from e
        self.history_folder = history_folder
        if plot_interval < 0:
            raise ValueError(f'`plot_interval` must be >= 0, got {plot_interval}')
        self.plot_interval = int(plot_interval)
        if isinstance(min_fit_points, bool) or not isinstance(min_fit_points, int) or min_fit_points < 4:
            raise ValueError(f'`min_fit_points` must be an integer >= 4 (the scaling law has 4 parameters), '
                             f'got {min_fit_points!r}')
        self.reference = DomainReferenceLoss(n, min_points=min_fit_points)
        if weight_lag_batches is not None and (isinstance(weight_lag_batches, bool) or not isinstance(
                weight_lag_batches, int) or weight_lag_batches < 0):
            raise ValueError(f'`weight_lag_batches` must be an integer >= 0 or null, got {weight_lag_batches!r}')
        self.weight_lag_batches = weight_lag_batches
        self.weight_lag: int | None = None  # in global samples; fixed at the first start, then from the checkpoint
        self.train_loss = DomainTrainLoss(n, float(ema_decay))

        # Filled at fit start from the mixture, or restored from a checkpoint.
        self.initial_ratio: np.ndarray | None = None
        self.ratio: np.ndarray | None = None
        self.ref_loss: np.ndarray | None = None if self.static_ref_loss is None else self.static_ref_loss.copy()
        self.excess: np.ndarray | None = None
        self.num_params: float | None = None
        self.num_updates = 0
        self.rows: list[dict[str, Any]] = []
        self._evaluated: set[str] = set()

    # ---------------------------------------------------------------- validation
    def _mixture(self, state: State) -> DynamicMixtureDataset:
        dataset = getattr(state.train_dataloader, 'dataset', None)
        if not isinstance(dataset, DynamicMixtureDataset):
            raise ValueError(
                'callbacks.dro_reweight needs the `dynamic_mixture` train loader, got '
                f'{type(dataset).__name__ if dataset is not None else "no train dataloader"}',
            )
        return dataset

    def _prepare(self, state: State) -> None:
        """Check the loaders, take the initial ratio and measure the teacher reference (each once, on every rank)."""
        mixture = self._mixture(state)
        labels = [e.label[len('eval/'):] for e in state.evaluators if e.label.startswith('eval/')]
        check_domains(self.domains, mixture.domains, labels, self.use_train_loss_ema)
        self._fix_weight_lag(state.train_dataloader)
        if self.initial_ratio is None:
            if mixture_weights_bound_dro(self.update, self.static_ratio is not None, self.dro_step, self.min_prob):
                check_no_zero_proportion(self.domains, mixture.weights, 'train_loader.dataset.proportions',
                                         self.update, self.sheared_smoothing)
            self.initial_ratio = mixture.weights
            self.ratio = self.static_ratio.copy() if self.static_ratio is not None else mixture.weights
        if self.reference_kind == TEACHER and self.ref_loss is None:
            self.ref_loss = teacher_reference_loss(state, self.domains)
            log.info('dro_reweight: teacher reference loss %s',
                     ', '.join(f'{d} {v:.4f}' for d, v in zip(self.domains, self.ref_loss)))

    def _fix_weight_lag(self, loader: Any) -> None:
        """Set the lag (global samples) at the first start; refuse a loader that prefetches beyond it."""
        batch = int(getattr(loader, 'batch_size', None) or 1) * dist.get_world_size()
        workers = int(getattr(loader, 'num_workers', 0) or 0)
        prefetch = workers * int(getattr(loader, 'prefetch_factor', None) or 2) if workers else 0
        if self.weight_lag is None:
            lag_batches = prefetch if self.weight_lag_batches is None else self.weight_lag_batches
            self.weight_lag = lag_batches * batch
        if prefetch * batch > self.weight_lag:
            raise ValueError(
                f'callbacks.dro_reweight.weight_lag_batches: the train loader prefetches {prefetch} batches '
                f'(num_workers={workers} x prefetch_factor), more than the lag of {self.weight_lag // batch} batches '
                'this run started with: new weights would reach samples already handed to the workers, and the '
                'sample stream would differ from an uninterrupted run. Restart with num_workers * prefetch_factor <= '
                f'{self.weight_lag // batch}, or start the run with weight_lag_batches >= {prefetch}')

    def fit_start(self, state: State, logger: Logger) -> None:
        # Loaders are attached to the state after Event.INIT, so this is the first point to read them; a resumed run
        # has its teacher reference from the checkpoint (loaded before FIT_START) and does not measure it again.
        self._prepare(state)

    # ---------------------------------------------------------------- train-loss EMA
    def after_loss(self, state: State, logger: Logger) -> None:
        if self.use_train_loss_ema:
            outputs = state.outputs
            logits = outputs['logits'] if isinstance(outputs, dict) else outputs.logits
            self.train_loss.accumulate(logits, state.batch['labels'], state.batch['domain_idx'])

    def batch_end(self, state: State, logger: Logger) -> None:
        if self.use_train_loss_ema:
            self.train_loss.end_batch(state.device)

    # ---------------------------------------------------------------- reweighting
    def eval_end(self, state: State, logger: Logger) -> None:
        self._evaluated.add(state.dataloader_label or '')

    def eval_after_all(self, state: State, logger: Logger) -> None:
        self._reweight(state, logger)

    def eval_standalone_end(self, state: State, logger: Logger) -> None:
        if state.train_dataloader is not None:
            self._prepare(state)
            self._reweight(state, logger)

    def _current_losses(self, state: State) -> np.ndarray | None:
        if self.use_train_loss_ema:
            return self.train_loss.value.copy()
        labels = [f'eval/{d}' for d in self.domains]
        missing = [label for label in labels if label not in self._evaluated]
        self._evaluated.clear()
        if missing:
            log.warning('dro_reweight: %s not evaluated in this round; weights unchanged', missing)
            return None
        return np.array([float(state.eval_metrics[label][EVAL_METRIC].compute()) for label in labels])

    def _remaining_samples(self, state: State, seq_len: int) -> float:
        """Global samples left until max_duration (0 if it cannot be expressed in samples)."""
        if state.max_duration is None:
            return 0.0
        ts = state.timestamp
        unit, value = state.max_duration.unit, state.max_duration.value
        samples_per_batch = ts.sample.value / max(ts.batch.value, 1)
        if unit == TimeUnit.SAMPLE:
            return max(value - ts.sample.value, 0)
        if unit == TimeUnit.TOKEN:
            return max(value - ts.token.value, 0) / seq_len
        if unit == TimeUnit.BATCH:
            return max(value - ts.batch.value, 0) * samples_per_batch
        return 0.0

    def _dynamic_reference(self, state: State, losses: np.ndarray, weights: np.ndarray) -> np.ndarray | None:
        mixture = self._mixture(state)
        seq_len = mixture.max_seq_len
        tokens = mixture.samples_per_domain(int(state.timestamp.sample)).astype(np.float64) * seq_len
        remaining_tokens = self._remaining_samples(state, seq_len) * seq_len
        p_now, p_target = pruning_num_params(state)
        if p_now is not None:
            self.num_params = p_now
        p_now = self.num_params if self.num_params is not None else 1.0
        p_end = self.final_num_params or p_target or p_now
        return self.reference.observe_and_predict(p_now, tokens, losses, p_end, tokens + remaining_tokens * weights)

    def _reweight(self, state: State, logger: Logger) -> None:
        mixture = self._mixture(state)
        weights = mixture.weights
        losses = self._current_losses(state)
        if losses is None:
            return
        row: dict[str, Any] = {'batch': int(state.timestamp.batch), 'sample': int(state.timestamp.sample)}
        if not np.all(np.isfinite(losses)):
            bad = [d for d, v in zip(self.domains, losses) if not math.isfinite(v)]
            log.warning('dro_reweight: non-finite loss for %s; update skipped, weights unchanged', bad)
            logger.log_metrics({'dro/skipped_nonfinite': 1})
            self._record(state, logger, row, weights, losses)
            return
        elapsed = state.get_elapsed_duration()
        progress = 1.0 if elapsed is None else float(elapsed)
        measuring_source = self.reference_kind == SOURCE and self.ref_loss is None
        if measuring_source:  # this evaluation is the reference: nothing to update against yet
            self._set_source_reference(state, losses)
        elif self.reference_kind == DYNAMIC and progress >= self.record_after:
            predicted = self._dynamic_reference(state, losses, weights)
            if predicted is not None:
                self.ref_loss = predicted
        new_weights = weights
        if self.ref_loss is not None and progress >= self.update_after and not measuring_source:
            gap = losses - self.ref_loss if self.excess_kind == 'absolute' else np.log(losses / self.ref_loss)
            self.excess = smooth(self.excess, gap, self.excess_smoothing)
            zero = np.zeros_like(self.excess)
            if self.update == 'dro' and self.dro_step == 'mirror':
                new_weights = dro_mirror_step(weights, self.excess, self.ratio, self.rho, self.min_prob,
                                              self.mirror_lr, self.mirror_scale)
            elif self.update == 'dro':
                new_weights = dro_step(self.excess, zero, self.ratio, self.rho, self.min_prob)
            elif self.update == 'sheared':
                new_weights = sheared_step(self.excess, zero, weights, self.sheared_lr, self.sheared_smoothing)
            if self.dynamic_ratio and self.update == 'dro' and progress >= self.ratio_after:
                self.ratio = drift_ratio(self.ratio, new_weights, self.ratio_delta, self.initial_ratio, self.ratio_band)
            if self.update != 'constant':
                # From a sample index that does not depend on prefetching: the stream is the same for any num_workers.
                consumed = mixture.epoch_start + int(state.timestamp.sample_in_epoch)
                new_weights = mixture.set_weights_on_all_ranks(new_weights, first_index=consumed + self.weight_lag)
            self.num_updates += 1
        row['update'] = self.num_updates
        self._record(state, logger, row, new_weights, losses)

    def _set_source_reference(self, state: State, losses: np.ndarray) -> None:
        batch = int(state.timestamp.batch)
        if batch > 0:
            log.warning('dro_reweight: reference_loss: source is taken from the first evaluation, at batch %d, not '
                        'from the unchanged source model; set eval_first: true', batch)
        self.ref_loss = losses.copy()
        log.info('dro_reweight: source reference loss %s',
                 ', '.join(f'{d} {v:.4f}' for d, v in zip(self.domains, self.ref_loss)))

    def _record(self, state: State, logger: Logger, row: dict[str, Any], weights: np.ndarray, losses: np.ndarray) -> None:
        metrics = {}
        for d, name in enumerate(self.domains):
            values = {
                'weight': float(weights[d]),
                'loss': float(losses[d]),
                'ref_loss': None if self.ref_loss is None else float(self.ref_loss[d]),
                'excess': None if self.excess is None else float(self.excess[d]),
                'ratio': None if self.ratio is None else float(self.ratio[d]),
            }
            for quantity, value in values.items():
                row[f'{quantity}/{name}'] = value
                if value is not None and math.isfinite(value):
                    metrics[f'dro/{quantity}/{name}'] = value
        logger.log_metrics(metrics)
        self.rows.append(row)
        if dist.get_global_rank() == 0:
            folder = self.history_dir(state)
            os.makedirs(folder, exist_ok=True)
            write_history_csv(os.path.join(folder, HISTORY_CSV), self.domains, self.rows)
            if self.plot_interval and len(self.rows) % self.plot_interval == 0:
                self._plot(state)

    def fit_end(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() == 0 and self.plot_interval and self.rows:
            self._plot(state)

    def history_dir(self, state: State) -> str:
        return self.history_folder.format(run_name=state.run_name)

    def _plot(self, state: State) -> None:
        try:
            plot_history(os.path.join(self.history_dir(state), HISTORY_PNG), self.domains, self.rows)
        except Exception as e:  # a plotting failure must never stop training
            warnings.warn(f'dro_reweight: could not plot the history: {e}')

    # ---------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        def as_list(a: np.ndarray | None) -> list[float] | None:
            return None if a is None else [float(x) for x in a]

        return {
            'initial_ratio': as_list(self.initial_ratio),
            'ratio': as_list(self.ratio),
            'ref_loss': as_list(self.ref_loss),
            'train_loss_ema': self.train_loss.state_dict(),
            'excess': as_list(self.excess),
            'num_params': self.num_params,
            'num_updates': self.num_updates,
            'predictors': self.reference.state_dict(),
            'rows': [dict(r) for r in self.rows],
            'weight_lag': self.weight_lag,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def as_array(v: list[float] | None) -> np.ndarray | None:
            return None if v is None else np.asarray(v, dtype=np.float64)

        if len(state['predictors']) != len(self.domains):
            raise ValueError(
                f'dro_reweight checkpoint has {len(state["predictors"])} domains, configured {len(self.domains)}',
            )
        self.initial_ratio = as_array(state['initial_ratio'])
        self.ratio = as_array(state['ratio'])
        self.ref_loss = as_array(state['ref_loss']) if self.static_ref_loss is None else self.static_ref_loss.copy()
        self.train_loss.load_state_dict(state['train_loss_ema'])
        self.excess = as_array(state.get('excess'))
        self.num_params = state['num_params']
        self.num_updates = int(state['num_updates'])
        self.reference.load_state_dict(state['predictors'])
        self.rows = [dict(r) for r in state['rows']]
        # Checkpoints written before the lag was recorded: fixed again at fit start from the loader's prefetch depth.
        self.weight_lag = None if state.get('weight_lag') is None else int(state['weight_lag'])
