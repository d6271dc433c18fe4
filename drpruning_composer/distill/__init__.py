"""Knowledge distillation from the source model: the KD loss (`kd.py`) and its Composer algorithm (`algorithm.py`)."""
