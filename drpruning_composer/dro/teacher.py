"""`reference_loss: teacher`: the teacher's per-domain loss on the eval loaders, measured once before training."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from composer.core import Precision, State
from composer.core.precision import get_precision_context
from composer.utils import dist

from drpruning_composer.distill.algorithm import DistillationAlgorithm, hf_model, load_teacher
from drpruning_composer.dro.train_loss import next_token_loss

KEY = 'callbacks.dro_reweight.reference_loss'
# The source model is loaded in the dtype the student computes in; other precisions load it in fp32.
SOURCE_DTYPES = {Precision.AMP_BF16: torch.bfloat16, Precision.AMP_FP8: torch.bfloat16,
                 Precision.AMP_FP16: torch.float16}


def eval_loss(model: torch.nn.Module, evaluators: Sequence[Any], state: State) -> np.ndarray:
    """Token-mean next-token loss of `model` on each evaluator's batches, all ranks together.

    Reads what Composer's evaluation of the student reads (each loader's first `subset_num_batches` batches, through
    its batch transforms, under the run's precision) and sums losses and target counts over ranks, so every rank
    returns the same values: the teacher's `LanguageCrossEntropy` (up to the samples a `DistributedSampler` pads).
    """
    totals = torch.zeros(2, len(evaluators), dtype=torch.float64)
    with torch.no_grad():
        for i, evaluator in enumerate(evaluators):
            spec, limit = evaluator.dataloader, evaluator.subset_num_batches
            batches = spec.dataloader if limit is None or limit < 0 else itertools.islice(spec.dataloader, limit)
            for batch in batches:
                batch = state.device.batch_to_device(spec.batch_transforms(batch))
                precision = get_precision_context(state.precision, state.precision_config, fp8_autocast_enabled=False)
                with precision:
                    logits = model(input_ids=batch['input_ids'], attention_mask=batch.get('attention_mask')).logits
                loss, targets = next_token_loss(logits, batch['labels'])
                totals[0, i] += loss.sum().cpu()
                totals[1, i] += targets.sum().cpu()
    totals = state.device.tensor_to_device(totals)
    dist.all_reduce(totals)
    sums, counts = totals.cpu().numpy()
    empty = [e.label for e, c in zip(evaluators, counts) if c == 0]
    if empty:
        raise ValueError(f'{KEY}: teacher: the eval loaders {empty} yielded no target tokens')
    return sums / counts


def teacher_reference_loss(state: State, domains: Sequence[str]) -> np.ndarray:
    """Each domain's teacher loss on its eval loader (label `eval/<domain>`).

    The teacher is the `distill` algorithm's when it runs; without it, the student's source folder
    (`model.pretrained_model_name_or_path`), loaded for this measurement and freed after it.
    """
    by_label = {e.label: e for e in state.evaluators}
    evaluators = [by_label[f'eval/{d}'] for d in domains]
    distill = next((a for a in state.algorithms if isinstance(a, DistillationAlgorithm)), None)
    if distill is not None:
        return eval_loss(distill.teacher, evaluators, state)
    dtype = SOURCE_DTYPES.get(state.precision, torch.float32)
    losses = eval_loss(load_teacher(None, hf_model(state), dtype, KEY), evaluators, state)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the source model is gone once eval_loss returns; give its memory back
    return losses
