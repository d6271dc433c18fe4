"""`L0MaskAlgorithm`: learned structured pruning of a Hugging Face Llama-family model to an exact target shape.

Composer side of the method: attaches `L0Masks` at INIT, adds their optimizer param groups, warms the target up,
adds the Lagrangian to the loss, logs the expected size, and exports the pruned model at FIT_END.
"""

import json
import logging
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from functools import partial
from typing import Any

import torch
from composer.core import Algorithm, Event, State, Time, TimeUnit
from composer.loggers import Logger
from composer.utils import dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.nn.parallel import DistributedDataParallel
from transformers import PreTrainedModel

from drpruning_composer.pruning.attach import attach_masks, bias_layout, check_supported
from drpruning_composer.pruning.export import SOURCE, export_pruned_model, read_tokenizer_files
from drpruning_composer.pruning.export import export_dtype as parse_export_dtype
from drpruning_composer.pruning.export import source_generation_config, source_torch_dtype
from drpruning_composer.pruning.hard_concrete import keep_probability
from drpruning_composer.pruning.importance import ImportanceCollector, importance_log_alpha
from drpruning_composer.pruning.masks import EVAL_MODES, L0Masks
from drpruning_composer.pruning.structure import (MASK_TYPES, SUPPORTED_MODEL_TYPES, ModelShape, check_target_fields,
                                                  expected_non_embedding_params, required_masks, resolve_target)


CONSTRAINTS = ('per_layer', 'global')
INITS = ('uniform', 'importance')
# The hard finish warns when the typical model is this far above the target size (relative): the cut would be abrupt.
SIZE_GAP_WARNING = 0.10

log = logging.getLogger(__name__)


def _parse_time(key: str, value: str) -> Time:
    try:
        return Time.from_timestring(value)
    except ValueError as e:
        raise ValueError(f'l0_mask.{key}: {e}') from e


def _assign_parameters(model: torch.nn.Module, masks: L0Masks, values: Mapping[str, torch.Tensor]) -> None:
    """Copy full-size mask logits into `masks.log_alpha`, which FSDP may shard. FSDP1: through the full parameters
    of the one FSDP unit that owns the masks (not the whole model); FSDP2: each rank keeps its shard of the value."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor, distribute_tensor

    names = {id(module): name for name, module in model.named_modules()}
    mask_path = names[id(masks)]
    owners = [(name, m) for name, m in model.named_modules() if isinstance(m, FullyShardedDataParallel)
              and (not name or mask_path.startswith(name + '.'))]
    context = nullcontext()
    if owners:  # the innermost FSDP1 unit above the masks
        owner = max(owners, key=lambda item: len(item[0]))[1]
        context = FullyShardedDataParallel.summon_full_params(owner, recurse=False, writeback=True)
    with context, torch.no_grad():
        for name, value in values.items():
            param = masks.log_alpha[name]
            if isinstance(param, DTensor):
                param.copy_(distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements))
            else:
                param.copy_(value.to(param.device, param.dtype))


def _find_hf_model(model: torch.nn.Module) -> tuple[str, PreTrainedModel]:
    """The Hugging Face model inside a Composer model, with its state_dict key prefix."""
    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel):
            return (f'{name}.' if name else ''), module
    raise ValueError(f'l0_mask: no Hugging Face PreTrainedModel inside {type(model).__name__}')


class L0MaskAlgorithm(Algorithm):
    """Prune to `target` (Hugging Face config names) with hard-concrete masks and Lagrangian constraints.

    Args:
        target: target shape, a subset of num_hidden_layers, hidden_size, num_attention_heads,
            num_key_value_heads, intermediate_size; missing fields keep the source value.
        masks: mask types to learn (see `structure.MASK_TYPES`); default: those the target shape requires.
        lagrangian_warmup: Composer time string over which the target sparsity grows linearly from 0.
        mask_lr / lagrangian_lr: learning rates of the mask logits and of the Lagrange multipliers.
        eval_mode: 'soft' evaluates the current noise-free masks, 'target' the exact top-k target model.
        export_dir: if set, the pruned Hugging Face model is written there at FIT_END, with the source folder's
            generation config and tokenizer files (`model.pretrained_model_name_or_path`).
        export_dtype: dtype of the exported weights: 'source' (the source config's torch_dtype, e.g. bfloat16, as
            Hugging Face users expect a pruned model to be stored like its source), or float32, bfloat16, float16.
        init_log_alpha: initial mask logit (about +5: all gates on).
        hard_finish: Composer time string: for this last part of training (e.g. '60ba', or '0.2dur' of max_duration)
            every forward, train and eval, uses the exact target masks, frozen (masks and multipliers get lr 0).
            The weights adapt to the model that is exported, and the evaluations DRO reads measure that model.
            '0ba' turns it off (`bench/export_fidelity.py` measures the difference).
        constraint: 'per_layer' (the quadratic penalty averages (s - t)^2 over the rows the export's top-k acts on:
            each layer's heads and MLP channels, each KV group's query heads) or 'global' ((mean s - t)^2).
        init: 'uniform' (every mask logit starts at init_log_alpha; the Lagrangian shrinks the model gradually from
            the source size) or 'importance' (the first `importance_batches` training batches measure each unit's
            importance, masks frozen: `importance.py`; width units by the norm of what they write into the
            residual stream, layers by the loss increase when skipped, one extra evaluation forward per layer and
            batch when layers are pruned; then the units the target keeps by importance get +init_log_alpha
            and the others -init_log_alpha: training continues from the one-shot pruned model and the masks refine
            it; the target sparsity is then the final one, so lagrangian_warmup has no effect).
        importance_batches: calibration batches of 'importance' (they also train the weights as usual).
    """

    def __init__(self, target: dict[str, int], masks: Sequence[str] | None = None, lagrangian_warmup: str = '0ba',
                 mask_lr: float = 0.1, lagrangian_lr: float = 0.1, eval_mode: str = 'soft',
                 export_dir: str | None = None, init_log_alpha: float = 5.0, hard_finish: str = '0.2dur',
                 constraint: str = 'per_layer', export_dtype: str = SOURCE, init: str = 'uniform',
                 importance_batches: int = 8):
        check_target_fields(target)
        if masks is not None:
            unknown = sorted(set(masks) - set(MASK_TYPES))
            if unknown:
                raise ValueError(f'l0_mask.masks: unknown mask types {unknown}; choose from {MASK_TYPES}')
        if eval_mode not in EVAL_MODES:
            raise ValueError(f'l0_mask.eval_mode must be one of {EVAL_MODES}, got {eval_mode!r}')
        if constraint not in CONSTRAINTS:
            raise ValueError(f'l0_mask.constraint must be one of {CONSTRAINTS}, got {constraint!r}')
        parse_export_dtype(export_dtype, key='l0_mask.export_dtype')
        if init not in INITS:
            raise ValueError(f'l0_mask.init must be one of {INITS}, got {init!r}')
        if not isinstance(importance_batches, int) or isinstance(importance_batches, bool) or importance_batches < 1:
            raise ValueError(f'l0_mask.importance_batches must be a positive integer, got {importance_batches!r}')
        self.warmup = _parse_time('lagrangian_warmup', lagrangian_warmup)
        self.hard_finish = _parse_time('hard_finish', hard_finish)
        if self.hard_finish.unit not in (TimeUnit.BATCH, TimeUnit.SAMPLE, TimeUnit.TOKEN, TimeUnit.DURATION):
            raise ValueError(f'l0_mask.hard_finish must be in ba, sp, tok or dur, got {hard_finish!r}')
        if self.hard_finish.unit == TimeUnit.DURATION and self.hard_finish.value > 1:
            raise ValueError(f'l0_mask.hard_finish: at most 1dur, got {hard_finish!r}')
        self.hparams = {
            'target': dict(target), 'masks': None if masks is None else list(masks),
            'lagrangian_warmup': lagrangian_warmup, 'mask_lr': mask_lr, 'lagrangian_lr': lagrangian_lr,
            'eval_mode': eval_mode, 'export_dir': export_dir, 'init_log_alpha': init_log_alpha,
            'hard_finish': hard_finish, 'constraint': constraint, 'export_dtype': export_dtype, 'init': init,
            'importance_batches': importance_batches,
        }
        self.collector: ImportanceCollector | None = None
        self._hard_finish_announced = False
        self._mask_groups: tuple[int, int] | None = None
        self.masks: L0Masks | None = None
        self.source_config: dict[str, Any] | None = None
        self.source_folder: str | None = None
        self.generation_config: dict[str, Any] | None = None
        self.tokenizer_files: dict[str, torch.Tensor] = {}
        self.model_prefix: str | None = None

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.FIT_START, Event.BEFORE_TRAIN_BATCH, Event.AFTER_LOSS,
                         Event.AFTER_TRAIN_BATCH, Event.BATCH_END, Event.FIT_END)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self._attach(state)
        elif event == Event.FIT_START:
            # validates the schedule against max_duration and the loader before the first batch
            self.check_schedule(state.max_duration, endless_loader=state.dataloader_len is None)
        elif event == Event.BEFORE_TRAIN_BATCH:
            self.masks.warmup_progress.fill_(self._warmup_progress(state))
            self.masks.key_noise(state.rank_zero_seed, dist.get_global_rank(), int(state.timestamp.batch))
            hard = self._in_hard_finish(state)
            if hard and not self.masks.hard and not self._hard_finish_announced:
                self._check_size_before_cut(state, logger)
            self.masks.hard = hard
            if self.masks.hard or self.calibrating:  # freeze masks and multipliers (the scheduler resets lr)
                for index in self._mask_groups:
                    state.optimizers[0].param_groups[index]['lr'] = 0.0
        elif event == Event.AFTER_LOSS:
            self._add_lagrangian(state)
        elif event == Event.AFTER_TRAIN_BATCH:
            logger.log_metrics(self.masks.metrics())
        elif event == Event.BATCH_END and self.calibrating:  # timestamp.batch: the batches done, this one included
            if 'layer' in self.masks.active:
                self.collector.measure_layer_ablation(partial(self._calibration_loss, state))
            self.collector.sync(partial(dist.all_reduce, reduce_operation='SUM'), self._mask_device())
            if int(state.timestamp.batch) >= self.hparams['importance_batches']:
                self.finish_calibration(state, logger)  # before this batch's checkpoint, which then holds the result
        elif event == Event.FIT_END:
            if self.calibrating:  # a run no longer than its calibration: one-shot pruning by importance
                self.finish_calibration(state, logger)
            if self.hparams['export_dir']:
                self.export(state)

    def resolve(self, source_config: Any) -> tuple[ModelShape, ModelShape, list[str]]:
        """Validate against a source Hugging Face config (object or dict) without a model.

        Returns the source shape, the target shape and the active mask types; raises ValueError naming the field.
        """
        get = source_config.get if isinstance(source_config, Mapping) else partial(getattr, source_config)
        model_type = get('model_type', None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f'l0_mask: unsupported model_type {model_type!r}; supported: '
                             f'{sorted(SUPPORTED_MODEL_TYPES)}')
        source = ModelShape.from_config(source_config)
        target = resolve_target(source, self.hparams['target'])
        needed = required_masks(source, target)
        active = needed if self.hparams['masks'] is None else self.hparams['masks']
        missing = [name for name in needed if name not in active]
        if missing:
            raise ValueError(f'l0_mask.masks lacks {missing}, which the target shape needs')
        return source, target, list(active)

    def _attach(self, state: State) -> None:
        self.model_prefix, hf_model = _find_hf_model(state.model)
        check_supported(hf_model)
        source, target, active = self.resolve(hf_model.config)
        device = next(hf_model.parameters()).device
        self.masks = L0Masks(source, target, active, bias_layout(hf_model), self.hparams['init_log_alpha'],
                             self.hparams['eval_mode'], device=device,
                             per_row_constraint=self.hparams['constraint'] == 'per_layer')
        attach_masks(hf_model, self.masks)
        if self.hparams['init'] == 'importance':
            self.collector = ImportanceCollector(hf_model, source)
        self.source_config = json.loads(hf_model.config.to_json_string(use_diff=False))
        # What the export carries from the source folder, recorded now so that `drpruning-export` of a checkpoint
        # needs no source folder: its generation config, its tokenizer files, and its dtype (the loaded config says
        # float32, the dtype of the training master weights). A resumed run keeps what its first start recorded.
        self.source_folder = getattr(hf_model.config, '_name_or_path', None) or None
        self.generation_config = source_generation_config(self.source_folder, hf_model.config)
        self.tokenizer_files = read_tokenizer_files(self.source_folder)
        self.source_config['torch_dtype'] = source_torch_dtype(self.source_folder) or self.source_config.get(
            'torch_dtype')
        optimizer = state.optimizers[0]
        self._mask_groups = (len(optimizer.param_groups), len(optimizer.param_groups) + 1)
        optimizer.add_param_group({'params': list(self.masks.log_alpha.parameters()),
                                   'lr': self.hparams['mask_lr'], 'initial_lr': self.hparams['mask_lr'],
                                   'weight_decay': 0.0})
        optimizer.add_param_group({
            'params': [*self.masks.lambda_1.parameters(), *self.masks.lambda_2.parameters()],
            'lr': self.hparams['lagrangian_lr'], 'initial_lr': self.hparams['lagrangian_lr'], 'weight_decay': 0.0})

    @property
    def calibrating(self) -> bool:
        """True while `init: importance` is still measuring importance (its masks are frozen, all on)."""
        return self.collector is not None

    def finish_calibration(self, state: State, logger: Logger) -> None:
        """Set every mask logit from the importance summed over ranks (synced after each calibration batch), and
        reset the masks' optimizer state. Identical on every rank."""
        collector, self.collector = self.collector, None
        collector.remove()
        values = importance_log_alpha(collector.scores(), self.masks.active, self.masks.target,
                                      self.hparams['init_log_alpha'])
        _assign_parameters(state.model, self.masks, values)
        optimizer = state.optimizers[0]
        for index in self._mask_groups:
            for param in optimizer.param_groups[index]['params']:
                optimizer.state.pop(param, None)
        self.masks.record_sizes({name: keep_probability(value) for name, value in values.items()})
        tokens = int(collector.sums['tokens'])
        kept = {name: round(float((value > 0).float().mean()), 4) for name, value in values.items()}
        log.info('l0_mask: masks initialised from the importance of %d calibration tokens; kept fraction per mask '
                 'type: %s', tokens, kept)
        logger.log_metrics({'l0/importance_tokens': float(tokens)})

    @torch.no_grad()
    def _calibration_loss(self, state: State) -> float:
        """This rank's loss on the current batch, in evaluation mode with every gate on (soft gates at the initial
        logits are exactly 1), in microbatches of the training size."""
        model, masks = state.model, self.masks
        was_training, eval_mode = model.training, masks.eval_mode
        batch = state.batch
        rows = len(batch['input_ids'])
        step = state.device_train_microbatch_size if isinstance(state.device_train_microbatch_size, int) else rows
        model.eval()
        masks.eval_mode = 'soft'
        try:
            total = 0.0
            for start in range(0, rows, step):
                micro = {k: v[start:start + step] if torch.is_tensor(v) and v.dim() and len(v) == rows else v
                         for k, v in batch.items()}
                total += float(model.loss(model(micro), micro)) * len(micro['input_ids'])
        finally:
            model.train(was_training)
            masks.eval_mode = eval_mode
        return total / rows

    def _mask_device(self) -> torch.device:
        """Where the masks' parameters live once the model is placed (the device collectives need)."""
        return next(self.masks.parameters()).device

    def _check_size_before_cut(self, state: State, logger: Logger) -> None:
        """Warn when the hard finish starts far above the target size: its exact masks then cut the rest at once.

        The size compared is that of the model that typically runs (units on with probability >= 0.5): the expected
        size also counts units that are almost always off, which the cut hardly changes."""
        self._hard_finish_announced = True
        stats, target = self.masks.stats, self.target_num_params()
        if 'typical_params' not in stats or not target:
            return
        typical, expected = float(stats['typical_params']), float(stats['expected_params'])
        gap = typical / target - 1.0
        logger.log_metrics({'l0/size_gap_at_hard_finish': gap})
        if gap > SIZE_GAP_WARNING:
            log.warning(
                'l0_mask: the hard finish starts at batch %d with the typical model (units on with probability >= 0.5) '
                'at %.4gM non-embedding parameters (expected size %.4gM), %.0f%% above the target (%.4gM): its exact '
                'target masks cut the rest at once, which can wreck the model. The masks did not converge in time: '
                'use init: importance, or a longer run, a shorter lagrangian_warmup, or a higher mask_lr / '
                'lagrangian_lr.', int(state.timestamp.batch), typical / 1e6, expected / 1e6, 100 * gap, target / 1e6)

    def _warmup_progress(self, state: State) -> float:
        if self.calibrating:
            return 0.0
        if self.warmup.value == 0 or self.hparams['init'] == 'importance':
            return 1.0
        if self.warmup.unit == TimeUnit.DURATION:
            elapsed = state.get_elapsed_duration()
            done = 0.0 if elapsed is None else elapsed.value
        else:
            done = state.timestamp.get(self.warmup.unit).value
        return min(1.0, done / self.warmup.value)

    def check_schedule(self, max_duration: Time | None, endless_loader: bool = False) -> None:
        """Raise ValueError naming the option if `lagrangian_warmup` or `hard_finish` cannot work with this
        `max_duration`; `endless_loader`: the train loader has no length (`dynamic_mixture` without
        `train_subset_num_batches`), so no epoch ever ends. Called at FIT_START and by the pre-flight check."""
        if endless_loader and self.warmup.unit == TimeUnit.EPOCH and self.warmup.value > 0:
            raise ValueError(f"l0_mask.lagrangian_warmup={self.hparams['lagrangian_warmup']!r} is in epochs, but the "
                             'train loader has no epoch length (no epoch ever ends, so the target would never warm '
                             'up): give it in ba, sp, tok or dur')
        if self.warmup.unit == TimeUnit.DURATION and self.warmup.value > 1:
            raise ValueError(f"l0_mask.lagrangian_warmup={self.hparams['lagrangian_warmup']!r}: at most 1dur "
                             '(the target would never be reached)')
        self._hard_finish_start(max_duration)

    def check_calibration(self, max_duration: Time | None) -> None:
        """Raise ValueError naming the option if `init: importance` cannot finish its calibration before the hard
        finish of a run of `max_duration` (checked before training by the pre-flight; `Trainer.fit(duration=...)`
        may stop a run earlier on purpose, so it is not checked at FIT_START)."""
        if self.hparams['init'] != 'importance' or max_duration is None or max_duration.unit != TimeUnit.BATCH:
            return
        batches = self.hparams['importance_batches']
        if max_duration.value < batches:
            raise ValueError(f'l0_mask.importance_batches={batches} is longer than max_duration ({max_duration}): '
                             'the calibration would not end')
        start = self._hard_finish_start(max_duration)
        if start is not None and self.hard_finish.unit == TimeUnit.DURATION:
            start *= max_duration.value
        if start is not None and start < batches:
            raise ValueError(f"l0_mask.hard_finish={self.hparams['hard_finish']!r} starts at batch {start:g}, before "
                             f'the importance calibration ends (importance_batches={batches}): the exact masks would '
                             'be chosen before the importance is known')

    def _hard_finish_start(self, max_duration: Time | None) -> float | None:
        """Where the hard finish starts, in max_duration's unit (a fraction for 'dur'); None without one."""
        if self.hard_finish.value == 0:
            return None
        name = f"l0_mask.hard_finish={self.hparams['hard_finish']!r}"
        if max_duration is None or max_duration.unit == TimeUnit.EPOCH:
            raise ValueError(f'{name} needs max_duration in ba, sp or tok, got {max_duration}')
        if self.hard_finish.unit == TimeUnit.DURATION:
            return 1.0 - self.hard_finish.value
        if max_duration.unit != self.hard_finish.unit:
            raise ValueError(f'{name} must be in the unit of max_duration ({max_duration}), or in dur')
        if self.hard_finish.value > max_duration.value:
            raise ValueError(f'{name} is longer than max_duration ({max_duration}): the masks would never be learned')
        return max_duration.value - self.hard_finish.value

    def _in_hard_finish(self, state: State) -> bool:
        start = self._hard_finish_start(state.max_duration)
        if start is None:
            return False
        if self.hard_finish.unit == TimeUnit.DURATION:
            elapsed = state.get_elapsed_duration()
            return elapsed is not None and elapsed.value >= start
        return state.timestamp.get(self.hard_finish.unit).value >= start

    def _add_lagrangian(self, state: State) -> None:
        """Add the Lagrangian to the loss, as the `lagrangian` entry of a loss dict (0 in the hard finish)."""
        loss = state.loss
        total = (loss['total'] if 'total' in loss else sum(loss.values())) if isinstance(loss, dict) else loss
        lagrangian = self.masks.pop_lagrangian()
        lagrangian = torch.zeros((), device=total.device) if lagrangian is None else lagrangian.reshape(())
        if isinstance(loss, dict):
            state.loss = {**loss, 'total': total + lagrangian, 'lagrangian': lagrangian}
        else:
            state.loss = {'lm': loss, 'lagrangian': lagrangian, 'total': loss + lagrangian}

    def expected_num_params(self) -> float | None:
        """Expected remaining non-embedding parameter count from the most recent forward (None before one)."""
        if self.masks is None or 'expected_params' not in self.masks.stats:
            return None
        return float(self.masks.stats['expected_params'])

    def target_num_params(self) -> float | None:
        """Non-embedding parameter count of the target shape, the size of the export (None before attaching)."""
        if self.masks is None:
            return None
        return float(expected_non_embedding_params({}, self.masks.target, self.masks.bias))

    def export(self, state: State) -> None:
        """Write the pruned model to `export_dir` (collective: every rank gathers, rank 0 writes)."""
        model = state.model.module if isinstance(state.model, DistributedDataParallel) else state.model
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.get_global_rank() == 0:
            prefix = self.model_prefix
            hf_state = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
            tokenizer = self.tokenizer_files or getattr(model, 'tokenizer', None)
            export_pruned_model(hf_state, self.source_config, self.hparams['target'], self.hparams['export_dir'],
                                tokenizer=tokenizer, overwrite=True, generation_config=self.generation_config,
                                dtype=parse_export_dtype(self.hparams['export_dtype']))
        dist.barrier()

    def state_dict(self) -> dict[str, Any]:
        """Hyperparameters and source config (primitives only), enough for `drpruning-export` to run alone; during
        `init: importance` calibration also the running importance sums (tensors)."""
        return {'hparams': dict(self.hparams), 'source_config': self.source_config, 'model_prefix': self.model_prefix,
                'source_folder': self.source_folder, 'generation_config': self.generation_config,
                'tokenizer_files': dict(self.tokenizer_files),
                'importance': None if self.collector is None else self.collector.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check that the run resumes with the same target and schedule; mask state itself lives in the model."""
        # checkpoints written before these options
        defaults = {'hard_finish': '0ba', 'constraint': 'global', 'init': 'uniform', 'importance_batches': 8}
        for key in ('target', 'masks', 'hard_finish', 'constraint', 'init', 'importance_batches'):
            saved = state['hparams'].get(key, defaults.get(key))
            if saved != self.hparams[key]:
                raise ValueError(f'l0_mask.{key}={self.hparams[key]!r} differs from the checkpoint ({saved!r})')
        if state.get('generation_config') is not None:  # what the export carries: as recorded at the first start
            self.source_config['torch_dtype'] = state['source_config'].get('torch_dtype')
            self.source_folder = state.get('source_folder')
            self.generation_config = state['generation_config']
            self.tokenizer_files = dict(state.get('tokenizer_files') or {})
        if self.collector is not None:  # Composer loads checkpoints after INIT, which started a calibration
            if state.get('importance') is None:  # it had ended before this checkpoint: the masks hold its result
                self.collector.remove()
                self.collector = None
            else:
                self.collector.load_state_dict(state['importance'])
