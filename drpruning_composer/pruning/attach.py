"""Attach `L0Masks` to an unmodified Hugging Face Llama-family causal LM with hooks.

Where each gate acts (so that binary gates make the model equal to its sub-set copy):
- hidden: embeddings output, o_proj and down_proj outputs, final norm output; every RMSNorm takes its statistics
  over kept hidden dims only (the norm instances get a masked subclass, so state_dict keys are unchanged);
- head / query_head: per-head attention output, just before o_proj;
- intermediate: the input of down_proj;
- layer, attention, mlp: the sublayers' residual contributions (o_proj / down_proj outputs).
"""

import torch
from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, PreTrainedModel, Qwen2ForCausalLM

from drpruning_composer.pruning.masks import L0Masks
from drpruning_composer.pruning.structure import BiasLayout

SUPPORTED_MODELS = (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)


def check_supported(hf_model: nn.Module) -> None:
    """Raise a clear error for an architecture the hooks do not know."""
    if not isinstance(hf_model, SUPPORTED_MODELS):
        names = ', '.join(cls.__name__ for cls in SUPPORTED_MODELS)
        raise ValueError(f'l0_mask: unsupported architecture {type(hf_model).__name__}; supported: {names}')
    if getattr(hf_model.config, 'use_sliding_window', False):
        raise ValueError('l0_mask: Qwen2 with use_sliding_window=true is not supported (per-layer windows would '
                         'change when layers are removed)')


def bias_layout(hf_model: PreTrainedModel) -> BiasLayout:
    """Which linear layers of the first decoder layer carry a bias."""
    layer = hf_model.model.layers[0]
    return BiasLayout(qkv=layer.self_attn.q_proj.bias is not None, o=layer.self_attn.o_proj.bias is not None,
                      mlp=layer.mlp.down_proj.bias is not None)


def _product(*gates: torch.Tensor | None) -> torch.Tensor | None:
    present = [g for g in gates if g is not None]
    if not present:
        return None
    out = present[0]
    for g in present[1:]:
        out = out * g
    return out


def _scale(x: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    return x if gate is None else x * gate.to(x.dtype)


def _at(gate: torch.Tensor | None, index: int) -> torch.Tensor | None:
    return None if gate is None else gate[index]


def _masked_rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """RMSNorm whose mean square runs over kept hidden dims only."""
    gate = self._l0_masks.gate('hidden')
    if gate is None:
        return super(type(self), self).forward(hidden_states)
    kept = (gate != 0).to(torch.float32)
    x = hidden_states.to(torch.float32)
    variance = (x.pow(2) * kept).sum(-1, keepdim=True) / kept.sum().clamp_min(1.0)
    x = x * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * x.to(hidden_states.dtype)


_MASKED_NORM_CLASSES: dict[type, type] = {}


def _mask_norm(norm: nn.Module, masks: L0Masks) -> None:
    cls = type(norm)
    if cls not in _MASKED_NORM_CLASSES:
        _MASKED_NORM_CLASSES[cls] = type(f'HiddenMasked{cls.__name__}', (cls,), {'forward': _masked_rms_norm_forward})
    norm.__class__ = _MASKED_NORM_CLASSES[cls]
    object.__setattr__(norm, '_l0_masks', masks)  # a plain reference, not a submodule: state_dict keys stay


def _draw_gates(hf_model: PreTrainedModel, args: tuple) -> None:
    hf_model.l0_masks()


def attach_masks(hf_model: PreTrainedModel, masks: L0Masks) -> None:
    """Register `masks` as `hf_model.l0_masks` and install the hooks that apply its gates."""
    check_supported(hf_model)
    hf_model.l0_masks = masks
    hf_model.register_forward_pre_hook(_draw_gates)
    base = hf_model.model
    n_kv, group, head_dim = masks.source.num_key_value_heads, masks.source.group_size, masks.source.head_dim

    base.embed_tokens.register_forward_hook(lambda m, args, out: _scale(out, masks.gate('hidden')))
    _mask_norm(base.norm, masks)
    base.norm.register_forward_hook(lambda m, args, out: _scale(out, masks.gate('hidden')))

    for index, layer in enumerate(base.layers):

        def mask_heads(module, args, index=index):
            groups, queries = _at(masks.gate('head'), index), _at(masks.gate('query_head'), index)
            scale = _product(None if groups is None else groups[:, None], queries)  # [n_kv, 1 or group]
            if scale is None:
                return None
            x = args[0].unflatten(-1, (n_kv, group, head_dim)) * scale[..., None].to(args[0].dtype)
            return (x.flatten(-3), *args[1:])

        def mask_attention_output(module, args, out, index=index):
            return _scale(out, _product(masks.gate('hidden'), _at(masks.gate('layer'), index),
                                        _at(masks.gate('attention'), index)))

        def mask_intermediate(module, args, index=index):
            gate = _at(masks.gate('intermediate'), index)
            return None if gate is None else (_scale(args[0], gate), *args[1:])

        def mask_mlp_output(module, args, out, index=index):
            return _scale(out, _product(masks.gate('hidden'), _at(masks.gate('layer'), index),
                                        _at(masks.gate('mlp'), index)))

        layer.self_attn.o_proj.register_forward_pre_hook(mask_heads)
        layer.self_attn.o_proj.register_forward_hook(mask_attention_output)
        layer.mlp.down_proj.register_forward_pre_hook(mask_intermediate)
        layer.mlp.down_proj.register_forward_hook(mask_mlp_output)
        _mask_norm(layer.input_layernorm, masks)
        _mask_norm(layer.post_attention_layernorm, masks)
