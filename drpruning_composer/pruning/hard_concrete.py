"""Hard-concrete L0 gate maths (Louizos et al., 2018), as used by Sheared-LLaMA / DRPruning.

A gate z in [0, 1] is a stretched, clamped binary concrete variable with location `log_alpha`:
u ~ U(eps, 1 - eps), s = sigmoid((log u - log(1 - u) + log_alpha) / T), z = clamp(s * (r - l) + l, 0, 1).
"""

import math
from collections.abc import Sequence

import numpy as np
import torch

LEFT = -0.1
RIGHT = 1.1
TEMPERATURE = 2.0 / 3.0
EPS = 1e-6


def keyed_generator(key: Sequence[int], device: torch.device | str) -> torch.Generator:
    """A torch generator on `device` whose stream is a pure function of the integers in `key`.

    Noise keyed by (seed, rank, step, ...) replays exactly after a resume, whatever else consumed the global RNG.
    """
    words = np.random.SeedSequence([int(k) for k in key]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed((int(words[0]) << 31) ^ int(words[1]))


def sample_gates(log_alpha: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one hard-concrete sample per entry of `log_alpha` (differentiable w.r.t. `log_alpha`), in fp32.

    The uniform noise comes from `generator` (the global RNG if None).
    """
    u = torch.rand(log_alpha.shape, generator=generator, device=log_alpha.device, dtype=torch.float32)
    u = u.clamp(EPS, 1.0 - EPS)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha.float()) / TEMPERATURE)
    return (s * (RIGHT - LEFT) + LEFT).clamp(0.0, 1.0)


def keep_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z != 0) for each gate: the expected L0 norm contribution of that gate."""
    return torch.sigmoid(log_alpha - TEMPERATURE * math.log(-LEFT / RIGHT))


def soft_gates(log_alpha: torch.Tensor) -> torch.Tensor:
    """Noise-free gate value (the test-time estimator of Louizos et al.)."""
    return (torch.sigmoid(log_alpha) * (RIGHT - LEFT) + LEFT).clamp(0.0, 1.0)


def top_k_gates(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Binary gates keeping exactly the `k` highest scores along the last dim (ties: lower index wins)."""
    order = torch.argsort(scores.detach(), dim=-1, descending=True, stable=True)
    gates = torch.zeros_like(scores)
    return gates.scatter(-1, order[..., :k], 1.0)
