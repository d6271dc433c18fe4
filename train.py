"""Train, prune or continue a model with drpruning-composer: ``composer train.py YAML [key=value ...]``.

The run is built by llm-foundry (`train_from_yaml`) with this project's components registered; the YAML is
checked first so that a wrong component name, data folder or model path fails before any work starts.
"""

import sys

from drpruning_composer.config_check import ConfigError, load_and_check
from drpruning_composer.registry import register_components


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ('-h', '--help'):
        print(__doc__)
        return 0 if argv else 2
    register_components()
    yaml_path, overrides = argv[0], argv[1:]
    try:
        load_and_check(yaml_path, overrides)
    except ConfigError as e:
        print(f'train.py: config error: {e}', file=sys.stderr)
        return 2
    from llmfoundry.command_utils import train_from_yaml

    train_from_yaml(yaml_path, overrides)
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
