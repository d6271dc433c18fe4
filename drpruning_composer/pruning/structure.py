"""Model shapes, target-shape validation, mask layouts and (expected) non-embedding parameter counts.

Shapes use Hugging Face config names so a target reads like the config of the pruned model.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

SHAPE_FIELDS = ('num_hidden_layers', 'hidden_size', 'num_attention_heads', 'num_key_value_heads', 'intermediate_size')
SUPPORTED_MODEL_TYPES = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM', 'qwen2': 'Qwen2ForCausalLM'}

# layer: whole decoder layers; attention / mlp: a whole sublayer of a layer; head: KV groups (one KV head with its
# query heads; a single head under multi-head attention); query_head: query heads inside a KV group;
# intermediate: MLP channels; hidden: the model dimension.
MASK_TYPES = ('layer', 'attention', 'mlp', 'head', 'query_head', 'intermediate', 'hidden')


@dataclass(frozen=True)
class ModelShape:
    """The prunable dimensions of a Llama-family decoder."""

    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    head_dim: int

    @classmethod
    def from_config(cls, config: Any) -> 'ModelShape':
        """Read the shape from a Hugging Face config object or its dict."""
        get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
        heads = get('num_attention_heads')
        head_dim = get('head_dim') or get('hidden_size') // heads
        return cls(
            num_hidden_layers=get('num_hidden_layers'),
            hidden_size=get('hidden_size'),
            num_attention_heads=heads,
            num_key_value_heads=get('num_key_value_heads') or heads,
            intermediate_size=get('intermediate_size'),
            head_dim=head_dim,
        )

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_attention_heads // self.num_key_value_heads


@dataclass(frozen=True)
class BiasLayout:
    """Which linear layers carry a bias (q/k/v, o_proj, MLP)."""

    qkv: bool = False
    o: bool = False
    mlp: bool = False


def check_target_fields(target: Mapping[str, Any]) -> None:
    """Checks that need no source model: known keys, positive integers, heads divisible by KV heads."""
    for key, value in target.items():
        if key not in SHAPE_FIELDS:
            raise ValueError(f'target: unknown field {key!r}; expected a subset of {SHAPE_FIELDS}')
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f'target.{key} must be a positive integer, got {value!r}')
    heads, kv_heads = target.get('num_attention_heads'), target.get('num_key_value_heads')
    if heads is not None and kv_heads is not None and heads % kv_heads:
        raise ValueError(f'target.num_attention_heads={heads} is not divisible by '
                         f'target.num_key_value_heads={kv_heads}')


def resolve_target(source: ModelShape, target: Mapping[str, Any]) -> ModelShape:
    """Validate `target` against `source` and fill unspecified fields.

    Missing fields keep the source value, except `num_key_value_heads`, which defaults to keeping the source's
    query heads per KV group.
    """
    check_target_fields(target)
    fields = {k: target.get(k, getattr(source, k)) for k in SHAPE_FIELDS}
    if 'num_key_value_heads' not in target:
        if fields['num_attention_heads'] % source.group_size:
            raise ValueError(f"target.num_attention_heads={fields['num_attention_heads']} is not a multiple of the "
                             f'source query heads per KV group ({source.group_size}); set target.num_key_value_heads')
        fields['num_key_value_heads'] = fields['num_attention_heads'] // source.group_size
    for key in SHAPE_FIELDS:
        if fields[key] > getattr(source, key):
            raise ValueError(f'target.{key}={fields[key]} is larger than the source model ({getattr(source, key)})')
    if fields['num_attention_heads'] % fields['num_key_value_heads']:
        raise ValueError(f"target.num_attention_heads={fields['num_attention_heads']} is not divisible by "
                         f"target.num_key_value_heads={fields['num_key_value_heads']}")
    group = fields['num_attention_heads'] // fields['num_key_value_heads']
    if group > source.group_size:
        raise ValueError(f'target.num_attention_heads: {group} query heads per KV group exceeds the '
                         f"source's {source.group_size}")
    return ModelShape(**fields, head_dim=source.head_dim)


def mask_shapes(source: ModelShape) -> dict[str, tuple[int, ...]]:
    """Shape of the gate tensor of every mask type; the last dim is the one top-k selects along."""
    n_layers, n_kv = source.num_hidden_layers, source.num_key_value_heads
    return {
        'layer': (n_layers,),
        'attention': (n_layers,),
        'mlp': (n_layers,),
        'head': (n_layers, n_kv),
        'query_head': (n_layers, n_kv, source.group_size),
        'intermediate': (n_layers, source.intermediate_size),
        'hidden': (source.hidden_size,),
    }


def kept_per_row(target: ModelShape) -> dict[str, int | None]:
    """How many gates of each mask type stay on along the last dim in the target model (None: all of them).

    Whole attention / MLP sublayers always stay on: a Hugging Face config describes uniform layers.
    """
    return {
        'layer': target.num_hidden_layers,
        'attention': None,
        'mlp': None,
        'head': target.num_key_value_heads,
        'query_head': target.group_size,
        'intermediate': target.intermediate_size,
        'hidden': target.hidden_size,
    }


def target_sparsities(source: ModelShape, target: ModelShape) -> dict[str, float]:
    """Fraction of gates of each mask type that the target model removes."""
    shapes, kept = mask_shapes(source), kept_per_row(target)
    return {name: 0.0 if kept[name] is None else 1.0 - kept[name] / shapes[name][-1] for name in MASK_TYPES}


def required_masks(source: ModelShape, target: ModelShape) -> list[str]:
    """Mask types that must be learned to reach `target`."""
    return [name for name, sparsity in target_sparsities(source, target).items() if sparsity > 0]


def expected_non_embedding_params(keep: Mapping[str, torch.Tensor], shape: ModelShape,
                                  bias: BiasLayout) -> torch.Tensor:
    """Expected parameter count outside the embeddings and LM head.

    `keep` maps mask types to keep probabilities P(z != 0) shaped as in `mask_shapes(shape)`; a missing type counts
    as all kept. Gates are independent, so the expectation of each product is the product of expectations; with
    binary `keep` this is exactly the parameter count of the sub-set model.
    """
    shapes = mask_shapes(shape)
    device = next((t.device for t in keep.values() if t is not None), None)
    p = {name: keep[name] if keep.get(name) is not None else torch.ones(shapes[name], device=device)
         for name in MASK_TYPES}
    hidden = p['hidden'].sum()
    head_dim = shape.head_dim
    per_query = 2 * hidden * head_dim + head_dim * bias.qkv  # q_proj rows and o_proj columns
    per_group = 2 * hidden * head_dim + 2 * head_dim * bias.qkv  # k_proj and v_proj rows
    queries = p['query_head'].sum(-1)
    attention = (p['head'] * (per_group + queries * per_query)).sum(-1) + hidden * bias.o
    mlp = (p['intermediate'] * (3 * hidden + 2 * bias.mlp)).sum(-1) + hidden * bias.mlp
    layers = p['layer'] * (p['attention'] * attention + p['mlp'] * mlp + 2 * hidden)
    return layers.sum() + hidden
