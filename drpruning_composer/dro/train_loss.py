"""Per-domain training loss, for DRO without eval loaders: a token-mean per domain per batch, all-reduced, smoothed."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from composer.devices import Device
from composer.utils import dist


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: summed next-token cross entropy (fp64) of `logits` [b, s, v] and the number of targets.

    llm-foundry's convention: `labels` [b, s] are not shifted (position i predicts label i + 1) and -100 is ignored,
    so the sums over a loader divided by the counts are its `LanguageCrossEntropy`.
    """
    token_loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction='none',
    ).view(labels.shape[0], -1)
    return token_loss.sum(1).double(), (labels[:, 1:] != -100).sum(1).double()


class DomainTrainLoss:
    """Exponential moving average (decay `decay`) of each domain's token-mean training loss.

    `accumulate` adds one microbatch's summed token losses and token counts per domain; `end_batch` all-reduces the
    batch's totals over ranks (every rank then holds the same values) and folds the batch mean into the average.
    A domain absent from a batch keeps its value; one never seen is NaN.
    """

    def __init__(self, num_domains: int, decay: float) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f'`ema_decay` must be in [0, 1), got {decay}')
        self.decay = decay
        self.value = np.full(num_domains, np.nan)
        self._sum = np.zeros(num_domains)
        self._count = np.zeros(num_domains)

    def accumulate(self, logits: torch.Tensor, labels: torch.Tensor, domain_idx: torch.Tensor) -> None:
        """Add one microbatch: next-token cross-entropy of `logits` [b, s, v] against `labels` [b, s] (-100 ignored)."""
        loss, targets = next_token_loss(logits.detach(), labels)
        n = len(self.value)
        sums = torch.zeros(n, dtype=torch.float64, device=logits.device)
        counts = torch.zeros(n, dtype=torch.float64, device=logits.device)
        sums.index_add_(0, domain_idx.long(), loss)
        counts.index_add_(0, domain_idx.long(), targets)
        self._sum += sums.cpu().numpy()
        self._count += counts.cpu().numpy()

    def end_batch(self, device: Device) -> None:
        """All-reduce the batch's totals (collective) and update the average of every domain the batch held."""
        totals = device.tensor_to_device(torch.tensor(np.concatenate([self._sum, self._count]), dtype=torch.float64))
        dist.all_reduce(totals)
        totals = totals.cpu().numpy()
        n = len(self.value)
        for d in range(n):
            if totals[n + d] > 0:
                mean = totals[d] / totals[n + d]
                previous = self.value[d]
                self.value[d] = mean if np.isnan(previous) else self.decay * previous + (1 - self.decay) * mean
        self._sum[:] = 0
        self._count[:] = 0

    def state_dict(self) -> list[float]:
        return [float(x) for x in self.value]

    def load_state_dict(self, state: list[float]) -> None:
        self.value = np.asarray(state, dtype=np.float64)
