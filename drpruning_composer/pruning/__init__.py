"""Learned structured pruning (hard-concrete L0 masks with Lagrangian constraints) for Llama-family models."""
