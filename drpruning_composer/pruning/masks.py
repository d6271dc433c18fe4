"""`L0Masks`: the mask logits and Lagrange multipliers of one pruning run, as a module of the pruned model.

It lives under the Hugging Face model so its parameters belong to that model's root FSDP unit. Calling it (from a
forward pre-hook of the Hugging Face model) draws the gates for that forward and, in training, the Lagrangian, so
everything that reads its parameters happens inside forward.
"""

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from drpruning_composer.pruning.hard_concrete import (keep_probability, keyed_generator, sample_gates, soft_gates,
                                                      top_k_gates)
from drpruning_composer.pruning.structure import (MASK_TYPES, BiasLayout, ModelShape, expected_non_embedding_params,
                                                  kept_per_row, mask_shapes, target_sparsities)

EVAL_MODES = ('soft', 'target')


class _ReverseGradient(torch.autograd.Function):
    """Identity forward, negated gradient: lets one optimizer step do gradient ascent on the multipliers."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return -grad


def target_gates(log_alpha: Mapping[str, torch.Tensor], target: ModelShape) -> dict[str, torch.Tensor]:
    """Binary gates of the target model: per row, the top-k scores with k from the target shape."""
    kept = kept_per_row(target)
    return {
        name: torch.ones_like(scores) if kept[name] is None else top_k_gates(scores, kept[name])
        for name, scores in log_alpha.items()
    }


def typical_params(keep: Mapping[str, torch.Tensor], source: ModelShape, bias: BiasLayout) -> torch.Tensor:
    """Non-embedding parameter count of the model that typically runs: each unit on iff its keep probability is at
    least 0.5. Unlike the expected count, units that are almost always off (as after `init: importance`) add nothing,
    so its gap to the target measures how much the exact target masks still have to cut."""
    return expected_non_embedding_params({name: (k >= 0.5).to(k.dtype) for name, k in keep.items()}, source, bias)


def lagrangian(row_sparsity: torch.Tensor, target: torch.Tensor | float, lambda_1: torch.Tensor,
               lambda_2: torch.Tensor) -> torch.Tensor:
    """lambda_1 mean(s_r - t) + lambda_2 mean((s_r - t)^2) over rows r, multipliers' gradient reversed (maximised).

    A row is what the final top-k acts on (a layer's heads or MLP channels, a KV group's query heads; the whole mask
    for layer and hidden masks). The quadratic term is zero exactly when every row meets the target, so it pushes
    each row to the count that the export keeps, not only their mean (as the reference implementation does).
    """
    gap = row_sparsity - target
    return (_ReverseGradient.apply(lambda_1) * gap.mean() + _ReverseGradient.apply(lambda_2) * (gap**2).mean()).view(1)


class L0Masks(nn.Module):
    """Hard-concrete gates for the active mask types plus one pair of Lagrange multipliers per type."""

    def __init__(self, source: ModelShape, target: ModelShape, active: Sequence[str], bias: BiasLayout,
                 init_log_alpha: float = 5.0, eval_mode: str = 'soft', device: torch.device | str | None = None,
                 per_row_constraint: bool = True):
        super().__init__()
        unknown = sorted(set(active) - set(MASK_TYPES))
        if unknown:
            raise ValueError(f'masks: unknown mask types {unknown}; choose from {MASK_TYPES}')
        if eval_mode not in EVAL_MODES:
            raise ValueError(f'eval_mode must be one of {EVAL_MODES}, got {eval_mode!r}')
        self.source, self.target, self.bias = source, target, bias
        self.active = [name for name in MASK_TYPES if name in active]
        self.init_log_alpha = init_log_alpha
        self.eval_mode = eval_mode
        self.per_row_constraint = per_row_constraint
        # Set by the algorithm: while True, every forward (train and eval) uses the exact target masks.
        self.hard = False
        self.final_sparsity = {name: target_sparsities(source, target)[name] for name in self.active}
        shapes = mask_shapes(source)
        self.log_alpha = nn.ParameterDict(
            {name: nn.Parameter(torch.empty(shapes[name], device=device)) for name in self.active})
        # Multipliers are 1-element vectors, not scalars: FSDP2's fully_shard rejects 0-d parameters.
        self.lambda_1 = nn.ParameterDict({name: nn.Parameter(torch.empty(1, device=device)) for name in self.active})
        self.lambda_2 = nn.ParameterDict({name: nn.Parameter(torch.empty(1, device=device)) for name in self.active})
        self.register_buffer('warmup_progress', torch.zeros((), device=device), persistent=False)
        self.reset_parameters()
        self.gates: dict[str, torch.Tensor] = {}
        self.noise_key: tuple[int, ...] | None = None
        self._keyed_forwards = 0
        self.lagrangian: torch.Tensor | None = None
        self.stats: dict[str, torch.Tensor] = {}

    def reset_parameters(self) -> None:
        """All gates start (almost surely) on; multipliers start at zero."""
        with torch.no_grad():
            for p in self.log_alpha.values():
                p.fill_(self.init_log_alpha)
            for p in (*self.lambda_1.values(), *self.lambda_2.values()):
                p.zero_()

    def gate(self, name: str) -> torch.Tensor | None:
        """The gates of `name` for the current forward, or None when that mask type is not active."""
        return self.gates.get(name)

    def key_noise(self, *key: int) -> None:
        """Draw the gate noise of the next training forwards from generators keyed by (key, forward number).

        The algorithm keys it by (seed, rank, batch) before each batch, so the n-th microbatch of a batch always gets
        the same noise: a resumed run repeats the uninterrupted one exactly (Composer does not restore the global
        RNG when the train loader resumes itself, as `dynamic_mixture` does). Without a key the global RNG is used.
        """
        self.noise_key = tuple(int(k) for k in key)
        self._keyed_forwards = 0

    def _noise_generator(self, device: torch.device) -> torch.Generator | None:
        if self.noise_key is None:
            return None
        self._keyed_forwards += 1
        return keyed_generator((*self.noise_key, self._keyed_forwards - 1), device)

    def current_target_sparsity(self, name: str) -> torch.Tensor:
        """Target sparsity after linear warm-up."""
        return self.warmup_progress * self.final_sparsity[name]

    def forward(self) -> dict[str, torch.Tensor]:
        """Draw this forward's gates; in training also build the Lagrangian. Returns the gates.

        While `hard`, the gates are the exact target masks (binary, not differentiable) and the Lagrangian is zero:
        the model trains and evaluates as the one that will be exported.
        """
        if self.hard or (not self.training and self.eval_mode == 'target'):
            self.gates = target_gates(dict(self.log_alpha.items()), self.target)
        elif self.training:
            generator = self._noise_generator(next(iter(self.log_alpha.values())).device) if self.active else None
            self.gates = {name: sample_gates(p, generator) for name, p in self.log_alpha.items()}
        else:
            self.gates = {name: soft_gates(p) for name, p in self.log_alpha.items()}
        keep = self.gates if self.hard else {name: keep_probability(p) for name, p in self.log_alpha.items()}
        sparsity = {name: 1.0 - k.mean() for name, k in keep.items()}
        self.lagrangian = None
        if self.training and self.hard:
            # A zero-weighted term keeps every parameter in the graph: DDP expects a gradient for each of them.
            # The algorithm freezes them with lr 0 (a zero gradient alone would still move them through Adam's momentum).
            self.lagrangian = 0.0 * torch.stack([p.sum() for p in self.parameters()]).sum().view(1)
        elif self.training:
            rows = {n: 1.0 - keep[n].mean(-1) if self.per_row_constraint else sparsity[n] for n in self.active}
            terms = [lagrangian(rows[n], self.current_target_sparsity(n), self.lambda_1[n], self.lambda_2[n])
                     for n in self.active]
            self.lagrangian = torch.cat(terms).sum() if terms else None
        self.record_sizes(keep)
        return self.gates

    @torch.no_grad()
    def record_sizes(self, keep: Mapping[str, torch.Tensor]) -> None:
        """Set `stats` (expected and typical non-embedding parameter counts, expected sparsity and remaining units
        per mask type) from keep probabilities shaped as the mask logits."""
        self.stats = {'expected_params': expected_non_embedding_params(keep, self.source, self.bias),
                      'typical_params': typical_params(keep, self.source, self.bias)}
        for name, k in keep.items():
            self.stats[f'expected_sparsity/{name}'] = 1.0 - k.mean()
            self.stats[f'expected_remaining/{name}'] = k.sum(-1).mean()

    def pop_lagrangian(self) -> torch.Tensor | None:
        """The Lagrangian of the last training forward; cleared so it is added to exactly one loss."""
        value, self.lagrangian = self.lagrangian, None
        return value

    def metrics(self) -> dict[str, float]:
        """Loggable values of the last forward: expected sizes and sparsities, and current targets."""
        out = {f'l0/{key}': float(value) for key, value in self.stats.items()}
        out.update({f'l0/target_sparsity/{name}': float(self.current_target_sparsity(name)) for name in self.active})
        out['l0/hard_finish'] = float(self.hard)
        return out
