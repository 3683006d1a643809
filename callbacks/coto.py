"""CoTo / CopRA (Zhuang, Wang et al.): progressive stochastic activation of LoRA layers."""

from __future__ import annotations

import re

import lightning.pytorch as pl
import torch

from plan.callbacks.sequencer import TaskCallback, run_seed
from plan.errors import require
from plan.seeding import step_seed


def activation_probability(step: int, total_steps: int, start: float, ramp: float) -> float:
    """CoTo's schedule: ``p = start + (1 - start) * step / (ramp * total_steps)``, clamped at 1."""
    if ramp <= 0 or total_steps <= 0:
        return 1.0
    return min(1.0, start + (1.0 - start) * step / (ramp * total_steps))


def layer_groups(names: list[str]) -> list[list[str]]:
    """LoRA layers grouped by the numbered block they sit in (``encoder.layer.3.…`` -> block 3), as CoTo
    drops every adapter of a block together; a layer outside numbered blocks is a group of its own."""
    groups: dict[str, list[str]] = {}
    for name in names:
        match = re.match(r"(.*?\.\d+)\.", name)
        groups.setdefault(match.group(1) if match else name, []).append(name)
    return list(groups.values())


class ProgressiveActivation(TaskCallback):
    """Each training step keeps a block's trainable slots active with probability ``p``, rising linearly from
    ``start`` to 1 over the first ``ramp`` share of each task's steps; at least one block stays active.
    Inactive slots add nothing to the forward pass (frozen past adapters always do). Draws come from a
    generator seeded per step (task, batch), so the rest of training sees the same random numbers as without
    CoTo, ``start=1`` is exactly plain training, and a run resumed mid-task draws what it would have drawn. Works with any adapter mode and beside any other method. ``seed``
    defaults to the run's ``seed_everything`` value.
    """

    def __init__(self, start: float = 0.1, ramp: float = 0.75, seed: int | None = None) -> None:
        require(0.0 <= start <= 1.0, f"ProgressiveActivation start must be a probability in [0, 1], got {start}")
        require(
            ramp >= 0.0, f"ProgressiveActivation ramp must be >= 0 (the share of a task's steps to reach 1), got {ramp}"
        )
        self.start, self.ramp, self.seed = start, ramp, seed
        self.generator = torch.Generator()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.groups = layer_groups(list(pl_module.lora_layers))

    def probability(self, trainer: pl.Trainer, batch_idx: int) -> float:
        return activation_probability(batch_idx, trainer.num_training_batches, self.start, self.ramp)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        p = self.probability(trainer, batch_idx)
        if p >= 1.0:
            return
        self.generator.manual_seed(step_seed(run_seed(self.seed), trainer.current_epoch, batch_idx))
        active = torch.rand(len(self.groups), generator=self.generator) < p
        if not active.any():
            active[torch.randint(len(self.groups), (1,), generator=self.generator)] = True
        for group, on in zip(self.groups, active.tolist()):
            for name in group:
                pl_module.lora_layers[name].slot_enabled = on

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        for layer in pl_module.lora_layers.values():
            layer.slot_enabled = True
