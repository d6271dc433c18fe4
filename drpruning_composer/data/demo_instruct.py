"""The demo's multi-task instruction set, built offline from the Python installation (like the demo corpus).

Four tasks of clearly different difficulty and size, each written as ``{task}/part-00000.jsonl`` with `prompt` and
`response` fields and prepared by :func:`drpruning_composer.data.instruct.prepare_instruct`:

- ``module_path`` (easy, large): the file of a standard-library module from its dotted name (`json.decoder` ->
  `json/decoder.py`): a copy with a fixed substitution.
- ``macro``: the definition of a C macro from the CPython and torch headers, given its name and header.
- ``function_body`` (hard): the body of a standard-library function, given its signature and docstring.
- ``package_summary`` (small): the one-line summary of an installed package, given the start of its description.

Sources are visited in sorted order, so the set is deterministic for a given installation; each task is capped at
`limit` examples (times `scale`).
"""

from __future__ import annotations

import ast
import email
import json
import re
import sysconfig
from pathlib import Path
from typing import Iterator

from drpruning_composer.data.demo_corpus import _files, _read, _site_packages

TASKS = ('function_body', 'macro', 'module_path', 'package_summary')
LIMITS = {'function_body': 1500, 'macro': 3000, 'module_path': 2000, 'package_summary': 400}
_DEFINE = re.compile(r'^#\s*define\s+([A-Za-z_]\w*)[ \t]+(\S[^\n]{0,80})$', re.MULTILINE)


def _stdlib_modules() -> Iterator[tuple[str, Path]]:
    stdlib = Path(sysconfig.get_paths()['stdlib'])
    for p in _files(stdlib, '*.py'):
        rel = p.relative_to(stdlib)
        if rel.parts[0] in ('site-packages', 'test', 'idlelib') or 'tests' in rel.parts or not rel.stem.isidentifier():
            continue
        yield rel.as_posix(), p


def module_path() -> Iterator[dict]:
    for rel, _ in _stdlib_modules():
        name = rel[:-3].replace('/', '.').removesuffix('.__init__')
        yield {'prompt': f'Which file holds the Python module {name}?\nFile: ', 'response': rel}


def function_body() -> Iterator[dict]:
    for _, path in _stdlib_modules():
        if (source := _read(path, 200_000)) is None:
            continue
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or not (doc := ast.get_docstring(node)) or len(node.body) < 2:
                continue
            body = '\n'.join(ast.get_source_segment(source, s) or '' for s in node.body[1:])
            if 0 < len(body) <= 600 and len(doc) <= 400:
                prompt = f'Write the body of this function.\ndef {node.name}({ast.unparse(node.args)}):\n    """{doc}"""\n'
                yield {'prompt': prompt, 'response': body}


def macro() -> Iterator[dict]:
    roots = [Path(sysconfig.get_paths()['include']), _site_packages() / 'torch' / 'include']
    for root in roots:
        for p in _files(root, '*.h'):
            if (text := _read(p, 200_000)) is None:
                continue
            for name, value in _DEFINE.findall(text):
                if not value.startswith(('/*', '//', '\\')):
                    yield {'prompt': f'In {p.name}, the C macro {name} is defined as: ', 'response': value.strip()}


def package_summary() -> Iterator[dict]:
    for p in _files(_site_packages(), 'METADATA'):
        if (raw := _read(p, 200_000)) is None:
            continue
        meta = email.message_from_string(raw)
        body, summary = meta.get_payload(), (meta.get('Summary') or '').strip()
        if isinstance(body, str) and len(body.strip()) > 200 and summary and summary != 'UNKNOWN':
            description = ' '.join(body.split())[:200]
            yield {'prompt': f'Package {meta.get("Name")}: {description}\nOne-line summary: ', 'response': summary}


SOURCES = {'function_body': function_body, 'macro': macro, 'module_path': module_path,
           'package_summary': package_summary}


def write_instruct_corpus(out: Path, scale: float = 1.0) -> dict[str, int]:
    """Write ``out/{task}/part-00000.jsonl`` (distinct examples, at most LIMITS times `scale`); return the counts."""
    counts = {}
    for task in TASKS:
        seen, limit = set(), max(2, int(LIMITS[task] * scale))
        (out / task).mkdir(parents=True, exist_ok=True)
        with open(out / task / 'part-00000.jsonl', 'w', encoding='utf-8') as f:
            for example in SOURCES[task]():
                if example['prompt'] in seen:
                    continue
                seen.add(example['prompt'])
                f.write(json.dumps(example) + '\n')
                if len(seen) >= limit:
                    break
        counts[task] = len(seen)
    return counts


def build_instruct(out: str | Path, tokenizer: str | Path, scale: float = 1.0, max_seq_len: int = 256,
                   seed: int = 17) -> dict:
    """The instruction corpus under ``out/instruct_corpus`` and its prepared shards under ``out/instruct_data``
    (10% of each task's examples held out); returns the manifest."""
    from drpruning_composer.data.instruct import prepare_instruct

    out = Path(out)
    write_instruct_corpus(out / 'instruct_corpus', scale)
    return prepare_instruct({t: out / 'instruct_corpus' / t for t in TASKS}, tokenizer, out / 'instruct_data',
                            max_seq_len=max_seq_len, val_fraction=0.1, seed=seed, overwrite=True)
