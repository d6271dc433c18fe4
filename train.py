"""Train, prune or continue a model with drpruning-composer: ``composer train.py YAML [key=value ...]``.

The run is built by llm-foundry (`train_from_yaml`) with this project's components registered. Before that, the
YAML is checked so that a wrong component name, data folder or model path fails before any work starts, and a run
with `autoresume: true` gets its save_folder ready to resume from the newest complete checkpoint.

Option: --allow-no-autoresume runs a YAML that saves checkpoints without `autoresume: true`.
"""

import os
import sys

from drpruning_composer.config_check import ConfigError, check_resume, is_true, load_and_check
from drpruning_composer.registry import register_components
from drpruning_composer.resume import DEFAULT_SAVE_FILENAME, prepare_resume

ALLOW_NO_AUTORESUME = '--allow-no-autoresume'


def _prepare_resume(cfg) -> None:
    """Ready a local save_folder to resume from its newest complete checkpoint (names as llm-foundry sets them)."""
    save_folder = str(cfg.save_folder)
    if '://' in save_folder:
        return
    if (cfg.get('save_filename') or DEFAULT_SAVE_FILENAME) != DEFAULT_SAVE_FILENAME:
        print('train.py: warning: custom save_filename; the save_folder is not checked for unfinished checkpoints',
              file=sys.stderr)
        return
    sharded = (cfg.get('fsdp_config') or {}).get('state_dict_type', 'full') == 'sharded'
    latest = cfg.get('save_latest_filename') or ('latest-sharded-rank{rank}' if sharded else 'latest-rank{rank}.pt')
    run_name = cfg.get('run_name') or os.environ.get('RUN_NAME', '')
    resume_from = prepare_resume(save_folder.replace('{run_name}', run_name), latest.replace('{rank}', '0'))
    print(f'train.py: resuming from {resume_from}' if resume_from else 'train.py: no checkpoint to resume from',
          file=sys.stderr)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ('-h', '--help'):
        print(__doc__)
        return 0 if argv else 2
    allow_no_autoresume = ALLOW_NO_AUTORESUME in argv
    argv = [a for a in argv if a != ALLOW_NO_AUTORESUME]
    register_components()
    yaml_path, overrides = argv[0], argv[1:]
    try:
        cfg = load_and_check(yaml_path, overrides)
        warning = check_resume(cfg, allow_no_autoresume)
    except ConfigError as e:
        print(f'train.py: config error: {e}', file=sys.stderr)
        return 2
    if warning:
        print(f'train.py: warning: {warning}', file=sys.stderr)
    # One process per node repairs the folder; the others cannot pass distributed init before it is done.
    if is_true(cfg.get('autoresume')) and os.environ.get('LOCAL_RANK', '0') == '0':
        _prepare_resume(cfg)
    from llmfoundry.command_utils import train_from_yaml

    from drpruning_composer.data.mixture import race_free_prefixes

    # Every StreamingDataset of the run (llm-foundry's own eval loaders too) takes its shared-memory prefix without
    # racing other runs that start on the same machine at the same moment.
    with race_free_prefixes():
        train_from_yaml(yaml_path, overrides)
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
