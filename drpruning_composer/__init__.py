"""drpruning-composer: DRPruning for Composer and llm-foundry.

Structured pruning of Hugging Face Llama-family models with hard-concrete L0 masks and Lagrangian size
constraints (`L0MaskAlgorithm`), combined with distributionally robust reweighting of the training-data mixture
(`DROReweightCallback`, with reference losses predicted online by `RefLossPredictor`).
"""

__version__ = '0.1.0'
