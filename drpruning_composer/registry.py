"""Register the project's components with llm-foundry's registries.

An installed package is found through setup.py's entry points (`llmfoundry train x.yaml` needs nothing else);
`register_components()` does the same in-process, for running from a source checkout.
"""

from __future__ import annotations

COMPONENTS = {
    # registry name in llmfoundry.registry -> {component name: 'module:attribute'}
    'algorithms': {'l0_mask': 'drpruning_composer.pruning.algorithm:L0MaskAlgorithm',
                   'distill': 'drpruning_composer.distill.algorithm:DistillationAlgorithm'},
    'callbacks': {'dro_reweight': 'drpruning_composer.dro.callback:DROReweightCallback'},
    'dataloaders': {'dynamic_mixture': 'drpruning_composer.data.mixture:build_dynamic_mixture_dataloader',
                    'instruct': 'drpruning_composer.data.instruct:build_instruct_dataloader'},
}


def _load(target: str):
    import importlib

    module, _, attr = target.partition(':')
    return getattr(importlib.import_module(module), attr)


def register_components() -> None:
    """Register every component that llm-foundry cannot already resolve by name."""
    from llmfoundry import registry

    for registry_name, components in COMPONENTS.items():
        reg = getattr(registry, registry_name)
        for name, target in components.items():
            if name not in reg:
                reg.register(name, func=_load(target))
