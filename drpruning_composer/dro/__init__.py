"""Distributionally robust data mixing: the DRO step, the reference-loss scaling law and the Composer callback."""
