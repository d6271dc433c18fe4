"""Check the wheel pack here: run the dry run with only the GPU machine's packages and the pack's visible.

    python bench/gpu/hide_packages.py --view /tmp/gpu_view      # builds the view and prints the command to use
    PYTHONPATH=/tmp/gpu_view python bench/gpu/run_check.py --dry-run --out /tmp/out

It builds a copy of this interpreter's site-packages made of symbolic links, less every distribution that is neither
on the GPU machine (the package list of /work/.library/device/KINDS.md, or `--gpu-packages FILE`) nor in the wheel
pack (`.whl/`), and a `sitecustomize.py` that puts the view in place of site-packages. A missing run-time dependency
of the pack then fails the dry run with `No module named ...`, as it would on the GPU machine. Versions are this
machine's (Python 3.11, torch 2.7), not the GPU machine's: it checks which distributions are needed, not how they
behave there.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import shutil
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KINDS = Path('/work/.library/device/KINDS.md')
# Modules owned by a hidden distribution and by a visible one too (mlflow: mlflow and mlflow-skinny; NVIDIA's
# libraries and pynvml: the GPU machine has its own).
SHARED_MODULES = {'mlflow', 'nvidia', 'cusparselt', 'pynvml', 'pynvml_utils'}
SITECUSTOMIZE = '''import sys
sys.path[:] = [{view!r} if p.rstrip('/').endswith('site-packages') else p for p in sys.path]
'''


def normalize(name: str) -> str:
    return re.sub(r'[-_.]+', '-', name).lower()


def gpu_packages(text: str) -> set[str]:
    """The names after 'Packages: ' in KINDS.md (or one name a line in any other file)."""
    names = text.split('Packages: ')[-1] if 'Packages: ' in text else text
    return {normalize(n.strip().rstrip('.')) for n in re.split(r'[,\n]', names) if n.strip()}


def pack_packages(wheels: Path) -> set[str]:
    """Distribution names of the wheels in `wheels` (the part of each file name before the version)."""
    return {normalize(w.name.split('-')[0]) for w in wheels.glob('*.whl')}


def hidden_modules(visible: set[str]) -> tuple[set[str], set[str]]:
    """(top-level modules, distribution names) of every installed distribution not in `visible`; a namespace
    package's (google) modules are named one level down (google.auth)."""
    modules, dists = set(), set()
    for dist in md.distributions():
        name = normalize(dist.metadata['Name'])
        if name in visible or name == 'drpruning-composer':
            continue
        dists.add(name)
        for f in dist.files or []:
            parts = f.parts
            if not parts or parts[0] in ('..', '__pycache__', 'bin') or parts[0].endswith(
                    ('.dist-info', '.egg-info', '.data', '.pth', '.md')):
                continue
            top = parts[0].split('.')[0] if parts[0].endswith(('.py', '.so')) else parts[0]
            if top == 'google':
                if len(parts) > 2:
                    modules.add(f'google.{parts[1]}')
            elif top not in SHARED_MODULES:
                modules.add(top)
    return modules, dists


def build_view(site: Path, view: Path, modules: set[str], dists: set[str]) -> int:
    """Symbolic links to every entry of `site` but the hidden modules and distributions' metadata; entries made."""
    shutil.rmtree(view, ignore_errors=True)
    (view / 'site').mkdir(parents=True)
    made = 0
    for entry in sorted(site.iterdir()):
        name = entry.name
        if name.endswith(('.dist-info', '.egg-info')):
            if normalize(name.split('-')[0]) in dists:
                continue
        elif name == 'google':
            (view / 'site' / name).mkdir()
            for child in entry.iterdir():
                if f'google.{child.name.split(".")[0]}' not in modules:
                    (view / 'site' / name / child.name).symlink_to(child)
            continue
        elif name.split('.')[0] in modules:
            continue
        (view / 'site' / name).symlink_to(entry)
        made += 1
    (view / 'sitecustomize.py').write_text(SITECUSTOMIZE.format(view=str(view / 'site')))
    return made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--view', type=Path, required=True, help='folder for the view and its sitecustomize.py')
    parser.add_argument('--wheels', type=Path, default=REPO / '.whl', help='the wheel pack (pack_wheels.sh)')
    parser.add_argument('--gpu-packages', type=Path, default=KINDS, help="the GPU machine's package list")
    args = parser.parse_args(argv)
    visible = gpu_packages(args.gpu_packages.read_text()) | pack_packages(args.wheels)
    modules, dists = hidden_modules(visible)
    made = build_view(Path(sysconfig.get_paths()['purelib']), args.view.resolve(), modules, dists)
    print(f'{len(dists)} distributions hidden ({len(modules)} modules), {made} entries visible')
    print(f'PYTHONPATH={args.view.resolve()} python bench/gpu/run_check.py --dry-run --out OUT')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
