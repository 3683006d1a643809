"""PEFT's OSF (orthogonal subspace fine-tuning, "Sculpting Subspaces", Nayak et al., ``peft.OSFConfig``) as an
external reference for ``benchmarks/continual_methods.py --methods osf``: PEFT itself trains the backbone, on the
runs' own task sequences, seeds and accuracy matrix (plan's datamodule, head, loss, ForgettingLogger).

OSF is full-rank: each target weight is split by SVD into a frozen top ``effective_rank`` ("high") subspace and a
trainable rest, whose gradients PEFT projects off the high subspace. As PEFT's continual-learning example does,
every task wraps the backbone in a fresh OSF adapter whose preserved rank grows from task to task (a fraction of
each weight's smaller dimension, linear from ``effective_rank_start`` at the first task to ``effective_rank_end``
at the last) and ends by merging it in, so the next task's SVD sees what was learned. The example unloads
(``unload()``) instead, which drops the task's training; merging is the method as the paper describes it.
"""

from __future__ import annotations

import lightning.pytorch as pl
from peft import OSFConfig, get_peft_model

from plan.callbacks import TaskCallback, TaskSequencer
from plan.errors import require


class PeftOSF(TaskCallback):
    """Replace plan's LoRA layers by PEFT's OSF on the same target modules, one adapter per task, merged at its end.

    The optimizer is the module's own (AdamW, ``model.lr`` for the backbone's trainable singular vectors and
    values, ``model.head_lr`` for the head), rebuilt at each task start over the new adapter's parameters."""

    def __init__(self, effective_rank_start: float = 0.3, effective_rank_end: float = 0.7) -> None:
        for key, value in (("effective_rank_start", effective_rank_start), ("effective_rank_end", effective_rank_end)):
            require(
                0 < value < 1,
                f"PeftOSF {key} must be in (0, 1) (the preserved fraction of each weight's smaller dimension), "
                f"got {value}",
            )
        self.start, self.end = effective_rank_start, effective_rank_end
        self.targets: list[str] = []
        self.num_tasks = 1

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        sequencer = next((cb for cb in trainer.callbacks if isinstance(cb, TaskSequencer)), None)
        require(
            sequencer is not None and sequencer.adapters == "shared",
            "PeftOSF needs TaskSequencer(adapters='shared'): OSF keeps no per-task adapters, got "
            + (f"adapters={sequencer.adapters!r}" if sequencer else "no TaskSequencer"),
        )
        self.num_tasks = trainer.datamodule.num_stages
        # Put the plain linear layers back where plan's LoRA layers are: OSF adapts the same modules.
        layers = pl_module.lora_layers
        self.targets = sorted(layers)
        for name, layer in layers.items():
            parent, _, child = name.rpartition(".")
            setattr(pl_module.backbone.get_submodule(parent) if parent else pl_module.backbone, child, layer.base_layer)
        layers.clear()  # the module's LoRA surface: no slots to train or checkpoint

    def effective_rank(self, task: int) -> float:
        """The preserved fraction at ``task``: linear from the start fraction to the end one."""
        return self.start + (self.end - self.start) * task / max(self.num_tasks - 1, 1)

    def on_task_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task: int) -> None:
        config = OSFConfig(
            target_modules=self.targets,
            effective_rank=self.effective_rank(task),
            task_type=pl_module.peft_task_type,
        )
        pl_module.backbone = get_peft_model(pl_module.backbone, config)
        optimizer = pl_module.configure_optimizers()  # the slots' group (now empty) and the head's
        optimizer.param_groups[0]["params"] = [p for p in pl_module.backbone.parameters() if p.requires_grad]
        trainer.strategy.optimizers = [optimizer]

    def on_task_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task: int) -> None:
        pl_module.backbone = pl_module.backbone.merge_and_unload()
