"""The demo's recipes, rewritten for any prepared data folder, and run as users run them (`composer train.py`).

Shared by the benchmarks: a data folder written by `drpruning-prepare` (any domains) and a source Hugging Face folder
go in; the YAML under `yamls/demo` gets that folder's domains, one eval loader per domain, and the given overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path
from typing import Sequence

from omegaconf import OmegaConf as om

REPO = Path(__file__).resolve().parents[1]


def domains_of(data: Path) -> list[str]:
    return list(json.loads((data / 'manifest.json').read_text())['domains'])


def recipe(yaml: str, data: Path, source: Path, save_folder: Path, overrides: Sequence[str] = ()) -> Path:
    """Write `yamls/demo/<yaml>` adapted to `data`'s domains (natural mixture) to `save_folder/<yaml>`."""
    cfg = om.load(REPO / 'yamls' / 'demo' / yaml)
    domains = domains_of(data)
    cfg.variables.update(data=str(data), source_model=str(source), save_folder=str(save_folder), domains=domains)
    template = om.to_container(cfg.eval_loader[0])
    cfg.eval_loader = [{**template, 'label': d, 'dataset': {**template['dataset'], 'local': f'{data}/{d}'}}
                       for d in domains]
    cfg = om.merge(cfg, om.from_dotlist(list(overrides)))
    save_folder.mkdir(parents=True, exist_ok=True)
    path = save_folder / yaml
    om.save(cfg, path)
    return path


def train(yaml: Path, log: Path) -> None:
    """`composer train.py YAML` with its output in `log`; raises with the log's tail on failure."""
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'PYTHONUNBUFFERED': '1'}
    with open(log, 'w') as out:
        code = subprocess.run(['composer', str(REPO / 'train.py'), str(yaml)], cwd=REPO, env=env, stdout=out,
                              stderr=subprocess.STDOUT).returncode
    if code:
        raise RuntimeError(f'{yaml} failed ({code}):\n' + log.read_text()[-3000:])


def ensure_demo(demo: Path) -> tuple[Path, Path]:
    """The demo's data and pretrained source model under `demo`, built by `make demo`'s first two stages if absent."""
    data, source = demo / 'data', demo / 'runs' / 'source' / 'huggingface' / 'model'
    if not (source / 'config.json').is_file():
        subprocess.run(['python', '-m', 'drpruning_composer.demo', '--out', str(demo), '--stages', 'data', 'pretrain'],
                       cwd=REPO, check=True, env={**os.environ, 'HF_HUB_OFFLINE': '1'})
    return data, source


def ensure_demo_instruct(demo: Path) -> Path:
    """The demo's instruction data under `demo` (`demo_instruct.build_instruct` with the demo's tokenizer), built if
    absent; the demo's data stage must have run (`ensure_demo`)."""
    data = demo / 'instruct_data'
    if not (data / 'manifest.json').is_file():
        from drpruning_composer.data.demo_instruct import build_instruct

        build_instruct(demo, demo / 'tokenizer')
    return data


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """--data and --source (any prepared folder and source model), or --demo (the demo's, built if absent)."""
    parser.add_argument('--demo', type=Path, default=Path('runs/bench_demo'),
                        help='demo folder whose data and pretrained source are used (built if absent)')
    parser.add_argument('--data', type=Path, help="prepared data folder (default: the demo's)")
    parser.add_argument('--source', type=Path, help="source Hugging Face folder (default: the demo's pretrained one)")


def data_and_source(args: argparse.Namespace) -> tuple[Path, Path]:
    if args.data and args.source:
        return args.data.resolve(), args.source.resolve()
    return ensure_demo(args.demo.resolve())
