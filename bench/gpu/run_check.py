"""One prepared GPU check of drpruning-composer: stages in order, each in its own process with its own time limit.

    python bench/gpu/run_check.py --out OUT                 # on the GPU machine (sizes: a random-init ~1B Llama)
    python bench/gpu/run_check.py --out OUT --dry-run       # the same code path at tiny sizes on CPU
    python bench/gpu/run_check.py --out OUT --real-model DIR --stages real_model

Stages (in order of value; `stages.py` has each one's code):
  imports             import the stack and this project, register its components; versions, GPU
  train_1b            `composer train.py` of a random-init Llama pruned with l0_mask + dro_reweight + dynamic_mixture
                      (GPU: ~1B, FSDP1 FULL_SHARD, use_orig_params, amp_bf16, activation checkpointing, 5 steps)
  step_timing         step time, tokens/s, MFU and step peak memory: plain vs masked vs distill
  export_equivalence  masked model under its final masks vs the exported model: max abs logit difference, fp32/bf16
  real_model          `--real-model DIR` pruned with DRO and with a constant mixture; per-domain export losses
                      (skipped without `--real-model`)

Writes OUT/gpu_check.json (rewritten after every stage, so that a run cut short still leaves the stages before it)
and OUT/gpu_check.log (every stage's output). A stage past its limit is killed with its whole process group and
marked `timeout`; the whole check stops starting stages once its budget is spent (`skipped`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# (name, limit on the GPU in seconds, limit in the dry run): the GPU limits add up to the 8-minute budget.
STAGE_LIMITS = {
    'imports': (45, 600),
    'train_1b': (165, 900),
    'step_timing': (135, 900),
    'export_equivalence': (75, 600),
    'real_model': (240, 900),
}
BUDGET_S = {'gpu': 480, 'dry-run': 3600}
PACKAGES = ('torch', 'mosaicml', 'llm-foundry', 'mosaicml-streaming', 'transformers', 'tokenizers', 'huggingface-hub',
            'numpy', 'safetensors', 'accelerate', 'torchmetrics', 'setuptools', 'datasets', 'omegaconf', 'triton')
KILL_GRACE_S = 10
TEST_HANG = 'GPU_CHECK_TEST_HANG'


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution (None when absent), read from metadata without importing it."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def nvidia_smi() -> str | None:
    """`nvidia-smi`'s name, memory and driver of each GPU, or None without one."""
    try:
        out = subprocess.run(['nvidia-smi', '--query-gpu=name,memory.total,driver_version', '--format=csv,noheader'],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def base_environment() -> dict[str, Any]:
    """What the parent process can tell without importing torch: Python, platform, packages, GPUs."""
    return {'python': sys.version.split()[0], 'platform': platform.platform(), 'packages': package_versions(),
            'nvidia_smi': nvidia_smi(), 'pythonpath': os.environ.get('PYTHONPATH')}


def child_env() -> dict[str, str]:
    """Environment of a stage: the repo on PYTHONPATH, offline Hugging Face, unbuffered output."""
    return {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')])),
            'HF_HUB_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1', 'PYTHONUNBUFFERED': '1',
            'TOKENIZERS_PARALLELISM': 'false'}


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group of `proc` (a stage and everything it started), SIGKILL after a grace period."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_child(name: str, args: argparse.Namespace, work: Path, log: Path, limit: float) -> tuple[str, float, dict]:
    """Run stage `name` in its own process group with a time limit; (status, wall seconds, its result file)."""
    result_path = work / f'{name}.json'
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), '--child', name, '--work', str(work), '--log', str(log)]
    if args.dry_run:
        cmd.append('--dry-run')
    if args.real_model:
        cmd += ['--real-model', str(args.real_model)]
    start = time.perf_counter()
    with open(log, 'a') as out:
        out.write(f'\n===== stage {name} (limit {limit:.0f} s) {now()}\n')
        out.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=limit)
            status = 'ok' if code == 0 else 'failed'
        except subprocess.TimeoutExpired:
            kill_group(proc)
            status = 'timeout'
        wall = time.perf_counter() - start
        out.write(f'===== stage {name}: {status} after {wall:.1f} s\n')
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    if status == 'failed' and not result.get('error'):
        result['error'] = f'the stage process exited with code {proc.returncode} before writing its result'
    if status == 'timeout':
        result['error'] = f'killed after its limit of {limit:.0f} s (see gpu_check.log)'
    return status, wall, result


def write_json(report: dict, path: Path) -> None:
    """Write atomically, so that a kill between stages never leaves half a file."""
    tmp = path.with_suffix('.json.tmp')
    tmp.write_text(json.dumps(report, indent=2, default=str) + '\n')
    os.replace(tmp, path)


def run_all(args: argparse.Namespace) -> dict:
    """Every selected stage in order; the report is rewritten to OUT/gpu_check.json after each one."""
    mode = 'dry-run' if args.dry_run else 'gpu'
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix='gpu_check_'))  # a temporary one is removed at the end
    work.mkdir(parents=True, exist_ok=True)
    log, path = args.out / 'gpu_check.log', args.out / 'gpu_check.json'
    log.write_text(f'gpu_check {mode} {now()} work={work}\n')
    budget = args.budget or BUDGET_S[mode]
    report: dict[str, Any] = {
        'check': 'drpruning-composer GPU check (bench/gpu/run_check.py)', 'mode': mode, 'started': now(),
        'finished': None, 'budget_s': budget, 'environment': base_environment(),
        'stages': {name: {'status': 'pending', 'limit_s': STAGE_LIMITS[name][0 if mode == 'gpu' else 1]}
                   for name in STAGE_LIMITS if name in args.stages},
    }
    write_json(report, path)
    start = time.perf_counter()
    for name, entry in report['stages'].items():
        left = budget - (time.perf_counter() - start)
        if name == 'real_model' and not args.real_model:
            entry.update(status='skipped', error='no --real-model folder given: the real model (SmolLM2-135M) does '
                                                 'not fit into one call of the GPU machine (bench/gpu/README.md)')
        elif left < 5:
            entry.update(status='skipped', error=f'the check\'s budget of {budget} s was spent')
        else:
            entry['limit_s'] = min(entry['limit_s'], int(left))
            entry['status'] = 'running'
            write_json(report, path)
            status, wall, result = run_child(name, args, work, log, entry['limit_s'])
            entry.update(status=status, wall_s=round(wall, 1), error=result.get('error'),
                         figures=result.get('figures', {}))
            if 'environment' in result:
                report['environment'].update(result['environment'])
        print(f'{name}: {entry["status"]}' + (f' ({entry["wall_s"]} s)' if 'wall_s' in entry else ''), flush=True)
        write_json(report, path)
    report['finished'] = now()
    report['wall_s'] = round(time.perf_counter() - start, 1)
    write_json(report, path)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', type=Path, help='folder for gpu_check.json and gpu_check.log')
    parser.add_argument('--dry-run', action='store_true', help='tiny sizes on CPU (fp32, no FSDP)')
    parser.add_argument('--real-model', type=Path, help='Hugging Face folder (with tokenizer) for stage real_model')
    parser.add_argument('--stages', nargs='+', choices=list(STAGE_LIMITS), default=list(STAGE_LIMITS),
                        help='run only these stages (default: all, in order)')
    parser.add_argument('--budget', type=int, help='seconds for the whole check (default: 480 on GPU)')
    parser.add_argument('--work', type=Path, help='scratch folder (default: a new temporary folder)')
    parser.add_argument('--child', choices=list(STAGE_LIMITS), help=argparse.SUPPRESS)
    parser.add_argument('--log', type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.child and not args.out:
        parser.error('--out is required')
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        if os.environ.get(TEST_HANG) == args.child:  # tests: a stage that hangs, to check it is killed at its limit
            time.sleep(24 * 3600)
        sys.path.insert(0, str(HERE))
        from stages import DRY, GPU, Context, run_stage

        ctx = Context(sizes=DRY if args.dry_run else GPU, work=args.work, log=args.log,
                      real_model=args.real_model.resolve() if args.real_model else None)
        return run_stage(args.child, ctx, args.work / f'{args.child}.json')
    report = run_all(args)
    print(json.dumps({name: entry['status'] for name, entry in report['stages'].items()}))
    return 0


if __name__ == '__main__':
    sys.exit(main())
