"""The task sequencer: turns epoch boundaries into task boundaries and tells the method callbacks."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info

from plan.seeding import reseed, step_seed

ADAPTER_MODES = ("stacked", "shared")
STEP_STREAM = 1  # keeps the per-step seeds apart from the task-start seeds, which share (seed, task)


def run_seed(seed: int | None = None) -> int:
    """``seed`` if given, else the run's ``seed_everything`` value (0 if none was set): the default base seed
    of the drivers and methods, so that changing the run's seed changes all of their draws."""
    return seed if seed is not None else int(os.environ.get("PL_GLOBAL_SEED", "0"))


def bind_epochs_to_stages(trainer: pl.Trainer, driver: Callback, needs: str, unit: str, example: str) -> None:
    """Check that the trainer runs one epoch per stage (task or round) of its datamodule, and default
    ``max_epochs`` to the number of stages. ``needs`` is an attribute only the right datamodule has."""
    name = type(driver).__name__
    datamodule = trainer.datamodule
    if datamodule is None or not hasattr(datamodule, needs):
        raise ValueError(f"{name} needs a datamodule such as {example}")
    if trainer.reload_dataloaders_every_n_epochs != 1:
        raise ValueError(
            f"{name} needs trainer.reload_dataloaders_every_n_epochs=1 (one epoch = one {unit}), "
            f"got {trainer.reload_dataloaders_every_n_epochs}"
        )
    stages = datamodule.num_stages
    if trainer.max_epochs in (None, -1):
        trainer.fit_loop.max_epochs = stages
    elif trainer.max_epochs > stages:
        raise ValueError(
            f"trainer.max_epochs={trainer.max_epochs} exceeds the {stages} {unit}s; use at most {stages} (or -1 for all)"
        )


class TaskCallback(Callback):
    """A method callback: besides Lightning's hooks it hears the task events of :class:`TaskSequencer`."""

    def on_task_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task: int) -> None:
        """Called before the first batch of ``task``, after the optimizer state was cleared."""

    def on_task_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task: int) -> None:
        """Called after the last batch of ``task`` (and its validation), before its adapter is frozen."""

    def on_task_resume(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task: int) -> None:
        """Called instead of ``on_task_start`` when a run resumes inside ``task`` from a mid-task checkpoint:
        restore what ``on_task_start`` set up that a checkpoint does not hold (hooks, frozen flags)."""


class TaskSequencer(Callback):
    """Runs one task per epoch.

    At a task start it reseeds every RNG from (seed, task), clears the optimizer state and fires
    ``on_task_start``; at a task end it fires ``on_task_end`` and then, with ``adapters='stacked'``, moves
    each LoRA slot into its layer's frozen stack and re-initialises the slot (stacked per-task LoRA). With
    ``adapters='shared'`` one adapter keeps training across tasks (sequential LoRA). A run resumed inside a
    task fires ``on_task_resume`` instead of ``on_task_start``.

    Every training step reseeds the RNGs from (seed, task, batch), so dropout masks depend only on the step's
    place in the sequence: a run resumed from any checkpoint, at a task end or mid-task, draws exactly what the
    uninterrupted run drew.

    Args:
        adapters: ``stacked`` (a new adapter per task, past ones frozen) or ``shared``.
        seed: base seed; by default the run's ``seed_everything`` value.
    """

    def __init__(self, adapters: str = "stacked", seed: int | None = None) -> None:
        if adapters not in ADAPTER_MODES:
            raise ValueError(f"adapters must be one of {ADAPTER_MODES}, got {adapters!r}")
        self.adapters = adapters
        self.seed = seed
        self.tasks_started = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.seed = run_seed(self.seed)
        if stage == "fit":
            bind_epochs_to_stages(trainer, self, "tasks_seen", "task", "plan.datamodules.TaskSequenceDataModule")
            if isinstance(trainer.strategy, DDPStrategy):
                # Methods freeze slot factors at task starts (InfLoRA's and PLAN's A), after DDP has registered
                # them as trainable: DDP must look for parameters without a gradient instead of waiting for them.
                # Set here, before the strategy wraps the model.
                trainer.strategy._ddp_kwargs["find_unused_parameters"] = True

    def _task_callbacks(self, trainer: pl.Trainer) -> list[TaskCallback]:
        return [cb for cb in trainer.callbacks if isinstance(cb, TaskCallback)]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        task = trainer.current_epoch
        if task < self.tasks_started:  # resumed inside a task: its start already happened
            for callback in self._task_callbacks(trainer):
                callback.on_task_resume(trainer, pl_module, task)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        task = trainer.current_epoch
        if task < self.tasks_started:  # resumed inside a task: its start already happened
            return
        assert self.seed is not None  # set at setup
        reseed(step_seed(self.seed, task))
        rank_zero_info(f"plan: {trainer.datamodule.describe_stage(task)}")
        for optimizer in trainer.optimizers:
            optimizer.state.clear()
        for callback in self._task_callbacks(trainer):
            callback.on_task_start(trainer, pl_module, task)
        self.tasks_started = task + 1

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        assert self.seed is not None  # set at setup
        reseed(step_seed(self.seed, trainer.current_epoch, batch_idx, STEP_STREAM))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        task = trainer.current_epoch
        for callback in self._task_callbacks(trainer):
            callback.on_task_end(trainer, pl_module, task)
        if self.adapters == "stacked":
            assert self.seed is not None  # set at setup
            generator = torch.Generator().manual_seed(self.seed * 1009 + task + 1)
            for layer in pl_module.lora_layers.values():
                layer.freeze_slot()
                layer.reset_slot(generator)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self.state_key not in checkpoint.get("callbacks", {}):
            found = sorted(checkpoint.get("callbacks", {}))
            raise ValueError(
                f"checkpoint was not written by a continual-learning run (its callbacks: {found}); resume it with the scenario that wrote it"
            )

    def state_dict(self) -> dict:
        return {"adapters": self.adapters, "seed": self.seed, "tasks_started": self.tasks_started}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict["adapters"] != self.adapters:
            raise ValueError(
                f"checkpoint was trained with adapters={state_dict['adapters']!r}, this run asks for {self.adapters!r}"
            )
        self.seed, self.tasks_started = state_dict["seed"], state_dict["tasks_started"]
