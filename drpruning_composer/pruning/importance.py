"""Activation-based importance of every prunable unit, and mask logits initialised from it.

Scores, accumulated over calibration forwards (Minitron, Muralidharan et al. 2024, for widths; ShortGPT, Men et al.
2024, for depth):

- query head: mean over tokens of the L2 norm of the head's attention output (the input of o_proj);
- KV group: the sum of its query heads' scores;
- MLP channel: mean over tokens of |activation| at the input of down_proj;
- hidden dimension: mean over tokens of |x| at the output of every RMSNorm (each layer's two and the final one),
  summed over the norms;
- layer: block importance, mean over tokens of 1 - cos(h_in, h_out) of the decoder layer.

`importance_log_alpha` turns scores into mask logits: per row (what the export's top-k acts on), the units the
target keeps get `+level`, the others `-level`. Training starts at the target shape chosen by importance (one-shot
pruning) and the learned masks refine that choice; with a short budget there is no cut at the end.
"""

from __future__ import annotations

from collections.abc import Mapping

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

    Sums are kept in fp32 on the model's device; `scores()` divides by the token count. Hooks run first
    (`prepend=True`), so they see activations before the mask hooks of `attach_masks` scale them. Only training
forwards count. Under activation checkpointing a recomputed layer counts twice; that scales whole rows alike, and
only the order within a row matters.
    """

    def __init__(self, hf_model: nn.Module, shape: ModelShape):
        self.shape = shape
        device = next(hf_model.parameters()).device
        n_layers = shape.num_hidden_layers
        self.sums = {
            'query_head': torch.zeros(n_layers, shape.num_attention_heads, device=device),
            'intermediate': torch.zeros(n_layers, shape.intermediate_size, device=device),
            'hidden': torch.zeros(shape.hidden_size, device=device),
            'layer': torch.zeros(n_layers, device=device),
        }
        self.tokens = torch.zeros((), dtype=torch.float64, device=device)
        self._handles: list = []
        base = hf_model.model
        for index, layer in enumerate(base.layers):
            self._handles += [
                layer.register_forward_hook(self._layer_hook(index), with_kwargs=True, prepend=True),
                layer.self_attn.o_proj.register_forward_pre_hook(self._head_hook(index), prepend=True),
                layer.mlp.down_proj.register_forward_pre_hook(self._channel_hook(index), prepend=True),
                layer.input_layernorm.register_forward_hook(self._hidden_hook, prepend=True),
                layer.post_attention_layernorm.register_forward_hook(self._hidden_hook, prepend=True),
            ]
        self._handles.append(base.norm.register_forward_hook(self._final_norm_hook, prepend=True))

    def _layer_hook(self, index: int):
        def hook(module, args, kwargs, out):
            if not module.training:
                return None
            h_in = (args[0] if args else kwargs['hidden_states']).detach().float()
            h_out = (out[0] if isinstance(out, tuple) else out).detach().float()
            self.sums['layer'][index] += (1.0 - nn.functional.cosine_similarity(h_in, h_out, dim=-1)).sum()
        return hook

    def _head_hook(self, index: int):
        def hook(module, args):
            if not module.training:
                return None
            x = args[0].detach().float().unflatten(-1, (self.shape.num_attention_heads, self.shape.head_dim))
            self.sums['query_head'][index] += x.norm(dim=-1).flatten(0, -2).sum(0)
        return hook

    def _channel_hook(self, index: int):
        def hook(module, args):
            if not module.training:
                return None
            self.sums['intermediate'][index] += args[0].detach().float().abs().flatten(0, -2).sum(0)
        return hook

    def _hidden_hook(self, module, args, out):
        if not module.training:
            return None
        self.sums['hidden'] += out.detach().float().abs().flatten(0, -2).sum(0)

    def _final_norm_hook(self, module, args, out):
        if module.training:
            self.tokens += out.shape[:-1].numel()  # once per forward: the final norm is never recomputed
        return self._hidden_hook(module, args, out)

    def remove(self) -> None:
        """Remove every hook."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def scores(self) -> dict[str, torch.Tensor]:
        """Mean scores per token, 'query_head' shaped [L, n_kv, group] (call after summing over ranks)."""
        count = self.tokens.clamp_min(1.0).float()
        out = {name: s / count for name, s in self.sums.items()}
        out['query_head'] = out['query_head'].unflatten(-1, (self.shape.num_key_value_heads, self.shape.group_size))
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The running sums and token count (tensors only), for a checkpoint taken during calibration."""
        return {**{f'sum/{k}': v.detach().cpu().clone() for k, v in self.sums.items()},
                'tokens': self.tokens.detach().cpu().clone()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore the running sums and token count."""
        for name in self.sums:
            self.sums[name].copy_(state[f'sum/{name}'])
        self.tokens.copy_(state['tokens'])
