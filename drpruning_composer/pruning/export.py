"""Fold the final binary masks into the weights and write a physically smaller Hugging Face model folder.

Final masks are binary with exactly the target count per layer, so export is pure sub-setting of weight rows and
columns. CLI: `drpruning-export CKPT OUT` reads a monolithic Composer checkpoint of a run with `L0MaskAlgorithm`.

An export carries what the source folder carries for generation and tokenization: its `generation_config.json`
(derived from the config, as Hugging Face does, when the source has none), its tokenizer files verbatim (special
tokens, chat template, any extra file), and it is written in the source's dtype (its config's `torch_dtype`, e.g.
bfloat16, not the float32 master weights of training) unless another dtype is asked for.
"""

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import AutoConfig

from drpruning_composer.atomic import atomic_directory
from drpruning_composer.pruning.masks import target_gates
from drpruning_composer.pruning.structure import SUPPORTED_MODEL_TYPES, ModelShape, resolve_target

MASK_PREFIX = 'l0_masks.'
EXPORT_DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
SOURCE = 'source'
GENERATION_CONFIG = 'generation_config.json'
# Files of a Hugging Face tokenizer folder, copied verbatim from the source (whichever of them it has).
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'added_tokens.json',
                   'tokenizer.model', 'spiece.model', 'sentencepiece.bpe.model', 'vocab.json', 'merges.txt',
                   'vocab.txt', 'chat_template.jinja', 'chat_template.json')
LOG_ALPHA_PREFIX = MASK_PREFIX + 'log_alpha.'

# Which index sub-sets each dim of a parameter: 'hidden', 'query' (q rows / o_proj columns), 'kv', 'intermediate'
# or None (kept whole).
_LAYER_PARAMS = {
    'self_attn.q_proj.weight': ('query', 'hidden'),
    'self_attn.q_proj.bias': ('query',),
    'self_attn.k_proj.weight': ('kv', 'hidden'),
    'self_attn.k_proj.bias': ('kv',),
    'self_attn.v_proj.weight': ('kv', 'hidden'),
    'self_attn.v_proj.bias': ('kv',),
    'self_attn.o_proj.weight': ('hidden', 'query'),
    'self_attn.o_proj.bias': ('hidden',),
    'mlp.gate_proj.weight': ('intermediate', 'hidden'),
    'mlp.gate_proj.bias': ('intermediate',),
    'mlp.up_proj.weight': ('intermediate', 'hidden'),
    'mlp.up_proj.bias': ('intermediate',),
    'mlp.down_proj.weight': ('hidden', 'intermediate'),
    'mlp.down_proj.bias': ('hidden',),
    'input_layernorm.weight': ('hidden',),
    'post_attention_layernorm.weight': ('hidden',),
}
_GLOBAL_PARAMS = {
    'model.embed_tokens.weight': (None, 'hidden'),
    'model.norm.weight': ('hidden',),
    'lm_head.weight': (None, 'hidden'),
}


@dataclass
class KeptIndices:
    """Sorted indices that survive: layers, hidden dims, and per kept layer the q/o and k/v rows and MLP channels."""

    layers: list[int]
    hidden: torch.Tensor
    query_rows: list[torch.Tensor]
    kv_rows: list[torch.Tensor]
    intermediate: list[torch.Tensor]


def _nonzero(gates: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(gates, as_tuple=True)[0]


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def kept_indices(log_alpha: Mapping[str, torch.Tensor], source: ModelShape, target: ModelShape) -> KeptIndices:
    """Indices kept by the final (top-k binary) masks; inactive mask types keep everything."""
    gates = target_gates({k: v.detach().float().cpu() for k, v in log_alpha.items()}, target)
    n_layers, n_kv, group = source.num_hidden_layers, source.num_key_value_heads, source.group_size
    layer_gate = gates.get('layer', torch.ones(n_layers))
    head_gate = gates.get('head', torch.ones(n_layers, n_kv))
    query_gate = gates.get('query_head', torch.ones(n_layers, n_kv, group))
    channel_gate = gates.get('intermediate', torch.ones(n_layers, source.intermediate_size))
    layers = _nonzero(layer_gate).tolist()
    query_rows, kv_rows = [], []
    for layer in layers:
        groups = _nonzero(head_gate[layer])
        queries = (query_gate[layer] * head_gate[layer][:, None]).flatten()
        query_rows.append(_head_rows(_nonzero(queries), source.head_dim))
        kv_rows.append(_head_rows(groups, source.head_dim))
    return KeptIndices(
        layers=layers,
        hidden=_nonzero(gates.get('hidden', torch.ones(source.hidden_size))),
        query_rows=query_rows,
        kv_rows=kv_rows,
        intermediate=[_nonzero(channel_gate[layer]) for layer in layers],
    )


def _subset(tensor: torch.Tensor, dims: Sequence[str | None], index: Mapping[str, torch.Tensor]) -> torch.Tensor:
    for dim, kind in enumerate(dims):
        if kind is not None:
            tensor = tensor.index_select(dim, index[kind].to(tensor.device))
    return tensor.contiguous()


def compact_state_dict(state_dict: Mapping[str, torch.Tensor], kept: KeptIndices) -> dict[str, torch.Tensor]:
    """Sub-set a Hugging Face Llama-family state dict (mask entries are dropped) to the kept indices."""
    old_to_new = {old: new for new, old in enumerate(kept.layers)}
    out = {}
    for key, tensor in state_dict.items():
        if key.startswith(MASK_PREFIX):
            continue
        if key in _GLOBAL_PARAMS:
            out[key] = _subset(tensor, _GLOBAL_PARAMS[key], {'hidden': kept.hidden})
            continue
        parts = key.split('.', 3)
        if parts[:2] != ['model', 'layers'] or parts[3] not in _LAYER_PARAMS:
            raise ValueError(f'export: unexpected parameter {key!r} for a Llama-family model')
        layer = int(parts[2])
        if layer not in old_to_new:
            continue
        new = old_to_new[layer]
        index = {'hidden': kept.hidden, 'query': kept.query_rows[new], 'kv': kept.kv_rows[new],
                 'intermediate': kept.intermediate[new]}
        out[f'model.layers.{new}.{parts[3]}'] = _subset(tensor, _LAYER_PARAMS[parts[3]], index)
    return out


def export_dtype(name: str | None, key: str = 'export_dtype') -> torch.dtype | None:
    """`source` (or None) -> None (the source's dtype); `float32`, `bfloat16`, `float16` -> that torch dtype."""
    if name is None or name == SOURCE:
        return None
    if name not in EXPORT_DTYPES:
        raise ValueError(f'{key} must be {SOURCE!r} or one of {sorted(EXPORT_DTYPES)}, got {name!r}')
    return EXPORT_DTYPES[name]


def source_file(folder: str | os.PathLike | None, name: str) -> Path | None:
    """The file `name` of a source model: in a local folder, or in the local Hugging Face cache for a hub id."""
    if not folder:
        return None
    if os.path.isdir(folder):
        path = Path(folder) / name
        return path if path.is_file() else None
    try:
        from transformers.utils import cached_file

        found = cached_file(str(folder), name, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    except Exception:  # not a hub id, or not reachable: the source has no such file here
        return None
    return Path(found) if found else None


def source_torch_dtype(folder: str | os.PathLike | None) -> str | None:
    """`torch_dtype` of the source folder's own config.json (the loaded config says float32: the master weights)."""
    path = source_file(folder, 'config.json')
    if path is None:
        return None
    with open(path) as f:
        value = json.load(f).get('torch_dtype')
    return value if value in EXPORT_DTYPES else None


def source_generation_config(folder: str | os.PathLike | None, config: Any) -> dict[str, Any]:
    """The source's generation config as primitives: its `generation_config.json` as written, or, without one,
    the one Hugging Face derives from the model config (`GenerationConfig.from_model_config`)."""
    path = source_file(folder, GENERATION_CONFIG)
    if path is not None:
        with open(path) as f:
            return json.load(f)
    return derived_generation_config(config)


def derived_generation_config(config: Any) -> dict[str, Any]:
    """What `from_pretrained` uses for a folder without generation_config.json: derived from the model config."""
    from transformers import GenerationConfig

    if isinstance(config, Mapping):
        config = AutoConfig.for_model(config['model_type'], **{k: v for k, v in config.items() if k != 'model_type'})
    return json.loads(GenerationConfig.from_model_config(config).to_json_string(use_diff=True))


def has_tokenizer_files(folder: str | os.PathLike | None) -> bool:
    return any(source_file(folder, name) is not None for name in ('tokenizer.json', 'tokenizer_config.json'))


def read_tokenizer_files(folder: str | os.PathLike | None) -> dict[str, torch.Tensor]:
    """The tokenizer files of a source folder (local, or a hub id in the local cache), each as its bytes in a uint8
    tensor: a checkpoint that records them stays loadable with `torch.load(weights_only=True)`."""
    files = {}
    for name in TOKENIZER_FILES:
        path = source_file(folder, name)
        if path is not None:
            files[name] = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8).clone()
    return files


def write_tokenizer_files(files: Mapping[str, torch.Tensor | bytes], out: Path) -> None:
    for name, content in files.items():
        (out / name).write_bytes(bytes(content.numpy().tobytes()) if isinstance(content, torch.Tensor) else content)


def copy_tokenizer_files(folder: str | os.PathLike, out: Path) -> list[str]:
    """Copy the tokenizer files of `folder` (local, or a hub id in the local cache) into `out`, byte for byte."""
    copied = []
    for name in TOKENIZER_FILES:
        path = source_file(folder, name)
        if path is not None:
            shutil.copyfile(path, out / name)
            copied.append(name)
    return copied


def pruned_config(source_config: Mapping[str, Any], target: ModelShape, dtype: torch.dtype) -> Any:
    """The source config with the target shape and an explicit head_dim."""
    fields = dict(source_config)
    model_type = fields.pop('model_type', None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f'export: unsupported model_type {model_type!r}; supported: {sorted(SUPPORTED_MODEL_TYPES)}')
    fields.update({
        'num_hidden_layers': target.num_hidden_layers,
        'hidden_size': target.hidden_size,
        'num_attention_heads': target.num_attention_heads,
        'num_key_value_heads': target.num_key_value_heads,
        'intermediate_size': target.intermediate_size,
        'head_dim': target.head_dim,
        'architectures': [SUPPORTED_MODEL_TYPES[model_type]],
        'torch_dtype': str(dtype).removeprefix('torch.'),
    })
    fields.pop('_name_or_path', None)
    return AutoConfig.for_model(model_type, **fields)


def pruned_weights(state_dict: Mapping[str, torch.Tensor], source_config: Mapping[str, Any],
                   target: Mapping[str, int], dtype: torch.dtype | None = None) -> tuple[Any, dict[str, torch.Tensor]]:
    """The pruned model's config and weights, in memory, from a masked Hugging Face state dict.

    `state_dict` holds `l0_masks.log_alpha.*` (the units each mask keeps are read from it); `target` is the target
    shape in config names. `dtype`: of the weights and the config; None is the source's, `source_config['torch_dtype']`
    (the weights' own dtype if it names none). With tied embeddings, `lm_head.weight` is left out.
    """
    source = ModelShape.from_config(source_config)
    target_shape = resolve_target(source, target)
    log_alpha = {k[len(LOG_ALPHA_PREFIX):]: v for k, v in state_dict.items() if k.startswith(LOG_ALPHA_PREFIX)}
    compact = compact_state_dict(state_dict, kept_indices(log_alpha, source, target_shape))
    if dtype is None:
        dtype = EXPORT_DTYPES.get(str(source_config.get('torch_dtype')), compact['model.embed_tokens.weight'].dtype)
    compact = {k: v.to(dtype) if v.is_floating_point() else v for k, v in compact.items()}
    config = pruned_config(source_config, target_shape, dtype)
    if config.tie_word_embeddings:
        compact.pop('lm_head.weight', None)
    return config, compact


def export_pruned_model(state_dict: Mapping[str, torch.Tensor], source_config: Mapping[str, Any],
                        target: Mapping[str, int], out_dir: str | os.PathLike, tokenizer: Any = None,
                        overwrite: bool = False, generation_config: Mapping[str, Any] | None = None,
                        dtype: torch.dtype | None = None) -> Path:
    """Write the pruned model of a masked Hugging Face state dict to `out_dir`, atomically.

    `state_dict` uses the Hugging Face model's keys and holds `l0_masks.log_alpha.*`; `target` is the target shape in
    config names. `tokenizer`: a tokenizer folder (its files are copied verbatim), a dict of file name -> content
    (`read_tokenizer_files`, written verbatim), a tokenizer object (saved with `save_pretrained`) or None. `generation_config`: the source's generation config as a dict (written as
    `generation_config.json`); None derives it from the config, as Hugging Face does for a folder without one.
    `dtype`: of the written weights; None is the source's, `source_config['torch_dtype']` (the weights' own dtype
    if it names none). Everything is written to a temporary folder beside `out_dir` that is renamed at the end.
    """
    config, compact = pruned_weights(state_dict, source_config, target, dtype)
    generation = dict(generation_config) if generation_config is not None else derived_generation_config(config)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        config.save_pretrained(tmp)
        save_file({k: v.detach().cpu().contiguous() for k, v in compact.items()}, tmp / 'model.safetensors',
                  metadata={'format': 'pt'})
        with open(tmp / GENERATION_CONFIG, 'w', encoding='utf-8') as f:
            f.write(json.dumps(generation, indent=2, sort_keys=True) + '\n')
        if isinstance(tokenizer, Mapping):
            write_tokenizer_files(tokenizer, tmp)
        elif isinstance(tokenizer, (str, os.PathLike)):
            if not copy_tokenizer_files(tokenizer, tmp):
                raise ValueError(f'export: {tokenizer} holds no tokenizer files ({", ".join(TOKENIZER_FILES[:3])}, ..)')
        elif tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def _algorithm_state(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    for name, state in checkpoint['state'].get('algorithms', []):
        if name == 'L0MaskAlgorithm':
            return state
    raise ValueError('export: the checkpoint holds no L0MaskAlgorithm state')


def _tokenizer_source(path: str | None, algorithm: Mapping[str, Any], checkpoint: Mapping[str, Any],
                      scratch: str) -> Any:
    """The tokenizer files the export writes: `--tokenizer`'s, else the source folder's as the run recorded them at
    its start (what the FIT_END export writes), else the tokenizer Composer saved in the checkpoint."""
    if path is not None:
        return path
    if algorithm.get('tokenizer_files'):
        return algorithm['tokenizer_files']
    hf_state = checkpoint['state'].get('integrations', {}).get('huggingface')
    if hf_state and hf_state.get('tokenizer'):
        from composer.models import HuggingFaceModel
        HuggingFaceModel.load_huggingface_tokenizer_from_saved_state(hf_state, tokenizer_save_dir=scratch)
        return scratch
    return None


def export_checkpoint(checkpoint_path: str | os.PathLike, out_dir: str | os.PathLike, tokenizer: str | None = None,
                      overwrite: bool = False, dtype: str | None = None) -> Path:
    """Export the pruned model of a monolithic Composer checkpoint written by a run with `L0MaskAlgorithm`.

    `dtype`: `source`, `float32`, `bfloat16` or `float16`; None: the run's `export_dtype` (default `source`). The
    generation config is the one the run recorded from its source folder at the start (checkpoints written before
    it was recorded: derived from the config).
    """
    # Composer's own checkpoint entries (e.g. timedelta) need full unpickling: only export trusted checkpoints.
    checkpoint = torch.load(checkpoint_path, map_location='cpu', weights_only=False)
    algorithm = _algorithm_state(checkpoint)
    prefix = algorithm['model_prefix']
    state_dict = {k[len(prefix):]: v for k, v in checkpoint['state']['model'].items() if k.startswith(prefix)}
    torch_dtype = export_dtype(dtype if dtype is not None else algorithm['hparams'].get('export_dtype', SOURCE),
                               key='--dtype' if dtype is not None else 'l0_mask.export_dtype')
    with tempfile.TemporaryDirectory() as scratch:
        return export_pruned_model(state_dict, algorithm['source_config'], algorithm['hparams']['target'], out_dir,
                                   tokenizer=_tokenizer_source(tokenizer, algorithm, checkpoint, scratch),
                                   overwrite=overwrite, generation_config=algorithm.get('generation_config'),
                                   dtype=torch_dtype)


def main(argv: Sequence[str] | None = None) -> None:
    """`drpruning-export CKPT OUT`: write the pruned Hugging Face model of a pruning checkpoint."""
    parser = argparse.ArgumentParser(prog='drpruning-export', description=main.__doc__)
    parser.add_argument('checkpoint', help='Composer checkpoint (.pt) of a run with the l0_mask algorithm')
    parser.add_argument('out', help='output folder for the pruned Hugging Face model')
    parser.add_argument('--tokenizer', help='tokenizer folder to copy (default: the source folder\'s, if readable, '
                                            'else the one saved in the checkpoint)')
    parser.add_argument('--dtype', choices=[SOURCE, *EXPORT_DTYPES],
                        help="dtype of the written weights (default: the run's l0_mask.export_dtype, 'source': the "
                             "source config's torch_dtype)")
    parser.add_argument('--overwrite', action='store_true', help='replace OUT if it exists')
    args = parser.parse_args(argv)
    out = export_checkpoint(args.checkpoint, args.out, tokenizer=args.tokenizer, overwrite=args.overwrite,
                            dtype=args.dtype)
    print(json.dumps({'exported': str(out)}))


if __name__ == '__main__':
    main()
