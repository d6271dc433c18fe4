"""Importance of every prunable unit, and mask logits initialised from it.

Scores, accumulated over calibration batches:

- width units (Minitron, Muralidharan et al. 2024, weighted by what the unit writes): a query head scores the mean
  over tokens of the L2 norm of its contribution to the residual stream, ||W_o[:, h] z_h|| (z_h its attention
  output); an MLP channel |a_j| ||W_down[:, j]||; a KV group the sum of its query heads' scores. Without the output
  weights a head whose value vectors are large but whose W_o columns are small looks important;
- hidden dimension: mean over tokens of |x| at the output of every RMSNorm (each layer's two and the final one),
  summed over the norms;
- layer: the increase of the calibration batch's loss when that decoder layer alone is skipped (its input passed
  on as its output; Minitron's depth importance by LM loss). One extra evaluation forward per layer and batch.

On SmolLM2-135M, one-shot to 6 of 9 heads alone, the head score without W_o raised the mean loss of four domains by
3.17 nats and the one with it by 1.21; the loss-based layer score lost 1.51 where ShortGPT's block importance
(1 - cos(h_in, h_out)) lost 1.77 (docs/real_model.md).

`importance_log_alpha` turns scores into mask logits: per row (what the export's top-k acts on), the units the
target keeps get `+level`, the others `-level`. Training starts at the target shape chosen by importance (one-shot
pruning) and the learned masks refine that choice; with a short budget there is no cut at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from drpruning_composer.pruning.masks import target_gates
from drpruning_composer.pruning.structure import ModelShape

SCORE_NAMES = ('query_head', 'intermediate', 'hidden', 'layer')


def importance_log_alpha(scores: Mapping[str, torch.Tensor], active: list[str], target: ModelShape,
                         level: float) -> dict[str, torch.Tensor]:
    """Mask logits from unit scores: `+level` for the units the target keeps by score, `-level` for the others.

    `scores` holds 'query_head' [L, n_kv, group], 'intermediate' [L, I], 'hidden' [d] and 'layer' [L] (higher is more
    important). Returns one tensor per active mask type, shaped as `structure.mask_shapes`; 'head' (KV groups) is
    scored by the sum of its query heads, and whole attention / MLP sublayer masks (never removed by a target) get
    `+level`. Ties keep the lower index (as the export's top-k does).
    """
    derived = {**scores, 'head': scores['query_head'].sum(-1)}
    out = {}
    for name in active:
        if name in ('attention', 'mlp'):
            out[name] = torch.full_like(scores['layer'], level)
            continue
        kept = target_gates({name: derived[name].float()}, target)[name]
        out[name] = (2.0 * kept - 1.0) * level
    return out


class ImportanceCollector:
    """Forward hooks on a Hugging Face Llama-family model that accumulate the unit scores over calibration batches.

    Width and hidden scores come from the hooks on training forwards; layer scores from `measure_layer_ablation`,
    which the caller runs on each calibration batch (evaluation forwards with one layer skipped at a time).

    Hooks add this rank's activations to `pending` (fp32, on the activations' device, created on first use: at INIT
    the model may still be on the CPU or the meta device); `sync(all_reduce)` adds the pending sums of all ranks to
    `sums` once per batch, so every rank holds the same global sums and a checkpoint of rank 0 holds them all.
    `scores()` divides by the token count. Hooks run first (`prepend=True`), so they see activations before the mask
    hooks of `attach_masks` scale them. Only training forwards count. Under activation checkpointing a recomputed
    layer counts twice: whole rows of heads, channels and layers scale alike (only the order within a row matters),
    while hidden dims then weigh the layers' norms twice against the final norm.
    """

    def __init__(self, hf_model: nn.Module, shape: ModelShape):
        self.shape = shape
        n_layers = shape.num_hidden_layers
        self.shapes = {'query_head': (n_layers, shape.num_attention_heads),
                       'intermediate': (n_layers, shape.intermediate_size),
                       'hidden': (shape.hidden_size,), 'layer': (n_layers,), 'tokens': ()}
        self.sums = {name: torch.zeros(size, dtype=torch.float64) for name, size in self.shapes.items()}
        self.pending: dict[str, torch.Tensor] = {}
        self.skipped: int | None = None  # the decoder layer that forwards currently skip (layer ablation)
        self._handles: list = []
        base = hf_model.model
        for index, layer in enumerate(base.layers):
            self._handles += [
                layer.register_forward_hook(self._skip_hook(index), with_kwargs=True, prepend=True),
                layer.self_attn.o_proj.register_forward_pre_hook(self._head_hook(index), prepend=True),
                layer.mlp.down_proj.register_forward_pre_hook(self._channel_hook(index), prepend=True),
                layer.input_layernorm.register_forward_hook(self._hidden_hook, prepend=True),
                layer.post_attention_layernorm.register_forward_hook(self._hidden_hook, prepend=True),
            ]
        self._handles.append(base.norm.register_forward_hook(self._final_norm_hook, prepend=True))

    def _add(self, name: str, value: torch.Tensor, index: int | None = None) -> None:
        if name not in self.pending:
            self.pending[name] = torch.zeros(self.shapes[name], dtype=torch.float64, device=value.device)
        target = self.pending[name] if index is None else self.pending[name][index]
        target += value.to(torch.float64)

    def _skip_hook(self, index: int):
        def hook(module, args, kwargs, out):
            if self.skipped != index:
                return None
            h_in = args[0] if args else kwargs['hidden_states']
            return (h_in, *out[1:]) if isinstance(out, tuple) else h_in
        return hook

    def _head_hook(self, index: int):
        heads, head_dim = self.shape.num_attention_heads, self.shape.head_dim

        def hook(module, args):
            if not module.training:
                return None
            z = args[0].detach().float().unflatten(-1, (heads, head_dim)).flatten(0, -3)  # [tokens, H, D]
            w_o = module.weight.detach().float().unflatten(1, (heads, head_dim))  # [d, H, D]
            gram = torch.einsum('ehd,ehf->hdf', w_o, w_o)  # ||W_o,h z||^2 = z^T (W_o,h^T W_o,h) z
            squared = torch.einsum('nhd,hdf,nhf->nh', z, gram, z)
            self._add('query_head', squared.clamp_min(0.0).sqrt().sum(0), index)
        return hook

    def _channel_hook(self, index: int):
        def hook(module, args):
            if not module.training:
                return None
            column_norms = module.weight.detach().float().norm(dim=0)  # [I]
            self._add('intermediate', (args[0].detach().float().abs().flatten(0, -2) * column_norms).sum(0), index)
        return hook

    def _hidden_hook(self, module, args, out):
        if not module.training:
            return None
        self._add('hidden', out.detach().float().abs().flatten(0, -2).sum(0))

    def _final_norm_hook(self, module, args, out):
        if module.training:  # once per forward: the final norm is never recomputed
            self._add('tokens', torch.tensor(float(out.shape[:-1].numel()), device=out.device))
        return self._hidden_hook(module, args, out)

    @torch.no_grad()
    def measure_layer_ablation(self, loss: Callable[[], float]) -> None:
        """Add T x (loss with layer i skipped - loss) to the pending layer sums, for every layer i; call it after the
        training forwards of a calibration batch and before `sync`.

        `loss()` evaluates this rank's calibration batch (the caller puts the model in evaluation mode, with every
        gate on) and returns its mean next-token cross-entropy in nats; T is the number of tokens the training
        forwards of that batch counted on this rank, so that `scores()['layer']` is the token-weighted mean loss
        increase over all ranks and batches. Calls `loss` num_hidden_layers + 1 times; a collective when `loss` is.
        """
        tokens = float(self.pending['tokens']) if 'tokens' in self.pending else 0.0
        base = loss()
        for index in range(self.shape.num_hidden_layers):
            self.skipped = index
            try:
                increase = loss() - base
            finally:
                self.skipped = None
            self._add('layer', torch.tensor(increase * tokens), index)

    def sync(self, all_reduce: Callable[[torch.Tensor], None], device: torch.device | str) -> None:
        """Sum this batch's pending sums over ranks (`all_reduce` sums in place) into `sums`; a collective call:
        every rank calls it after every calibration batch, with tensors on `device` (the one its backend needs)."""
        for name, size in self.shapes.items():
            pending = self.pending.pop(name, None)
            pending = torch.zeros(size, dtype=torch.float64, device=device) if pending is None else pending.to(device)
            all_reduce(pending)
            self.sums[name] += pending.cpu()

    def remove(self) -> None:
        """Remove every hook."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def scores(self) -> dict[str, torch.Tensor]:
        """Mean scores per token over the synced sums (fp32, CPU), 'query_head' shaped [L, n_kv, group]."""
        count = self.sums['tokens'].clamp_min(1.0)
        out = {name: (s / count).float() for name, s in self.sums.items() if name != 'tokens'}
        out['query_head'] = out['query_head'].unflatten(-1, (self.shape.num_key_value_heads, self.shape.group_size))
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The synced sums (the same on every rank) and token count, for a checkpoint taken during calibration."""
        return {f'sum/{k}': v.clone() for k, v in self.sums.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore the synced sums (a checkpoint taken before this layout holds none: start over)."""
        for name in self.sums:
            if f'sum/{name}' in state:
                self.sums[name] = state[f'sum/{name}'].to(torch.float64).cpu().clone()
