"""Per-step seeds: every random draw of a training step follows from the run's seed and where the step is.

Reseeding at every step (rather than once per run) makes a step's dropout masks and perturbations depend only
on its position, (task, batch) or (round, client, local step), and not on how many random numbers were drawn
before it. A run resumed from any checkpoint, at a task end or in the middle of a task, therefore draws what
the uninterrupted run drew, whatever the resumed process did first (building dataloaders, loading weights).
"""

from __future__ import annotations

import random

import numpy as np
import torch


def step_seed(*keys: int) -> int:
    """A 63-bit seed that depends only on ``keys`` (well mixed: neighbouring keys give unrelated seeds)."""
    return int(np.random.SeedSequence([int(k) % 2**63 for k in keys]).generate_state(1, dtype=np.uint64)[0] >> 1)


def reseed(seed: int) -> None:
    """Seed torch (CPU and every CUDA device), Python's ``random`` and NumPy's global generator."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
