"""drpruning-composer: DRPruning for Composer and llm-foundry.

Structured pruning of Hugging Face Llama-family models with hard-concrete L0 masks and Lagrangian size
constraints (`L0MaskAlgorithm`), combined with distributionally robust reweighting of the training-data mixture
(`DROReweightCallback`, with reference losses predicted online by `RefLossPredictor`).

The exports are imported on first use, so the data tools start without importing Composer.
"""

import importlib

__version__ = '0.1.0'

_EXPORTS = {
    'L0MaskAlgorithm': 'drpruning_composer.pruning.algorithm',
    'L0Masks': 'drpruning_composer.pruning.masks',
    'export_pruned_model': 'drpruning_composer.pruning.export',
    'DROReweightCallback': 'drpruning_composer.dro.callback',
    'RefLossPredictor': 'drpruning_composer.dro.scaling_law',
    'DynamicMixtureDataset': 'drpruning_composer.data.mixture',
    'build_dynamic_mixture_dataloader': 'drpruning_composer.data.mixture',
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
