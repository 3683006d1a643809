"""The LightningModule through the Python API: image and text encoders, masking, extra loss terms."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from conftest import TINY_BERT, TINY_VIT, task_trainer

from plan.callbacks import ForgettingLogger, TaskCallback, TaskSequencer
from plan.datamodules import SyntheticSource, TaskSequenceDataModule
from plan.lora import LoRAConfig
from plan.module import ContinualClassifier


def trainer(tmp_path, *callbacks, max_epochs: int = -1) -> pl.Trainer:
    return task_trainer(tmp_path, [TaskSequencer(seed=0), ForgettingLogger(heatmap=False), *callbacks], max_epochs)


def test_vit_learns_image_tasks(tmp_path):
    """A random-weight ViT with LoRA on q/v learns task-incremental synthetic image tasks."""
    pl.seed_everything(0, verbose=False)
    data = TaskSequenceDataModule(
        SyntheticSource(num_classes=4, modality="image", image_size=16),
        scenario="task_incremental",
        classes_per_task=2,
        batch_size=8,
        passes_per_task=3,
    )
    model = ContinualClassifier(
        backbone_config=TINY_VIT, lora=LoRAConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]), lr=0.01
    )
    logger = ForgettingLogger(heatmap=False)
    run = trainer(tmp_path)
    run.callbacks = [cb for cb in run.callbacks if not isinstance(cb, ForgettingLogger)] + [logger]
    run.fit(model, datamodule=data)
    assert run.current_epoch == 2, "max_epochs=-1 runs every task"
    assert logger.matrix.diagonal().min() > 0.75, logger.matrix
    assert all(layer.past_rank == 8 for layer in model.lora_layers.values())


def test_class_incremental_masks_unseen_classes(tmp_path):
    """After task 0, class-incremental evaluation ranks only task 0's classes; task-incremental only the
    evaluated task's; domain-incremental every class."""
    data = TaskSequenceDataModule(SyntheticSource(num_classes=6), classes_per_task=2, batch_size=8)
    model = ContinualClassifier(backbone_config=TINY_BERT, lora=LoRAConfig(rank=2))
    run = trainer(tmp_path, max_epochs=1)
    run.fit(model, datamodule=data)
    assert model.eval_mask(task=0, seen=1).nonzero().flatten().tolist() == [0, 1]
    assert model.eval_mask(task=1, seen=2).nonzero().flatten().tolist() == [0, 1, 2, 3]
    model.layout.scenario = "task_incremental"
    assert model.eval_mask(task=2, seen=3).nonzero().flatten().tolist() == [4, 5]


class SlotPenalty(TaskCallback):
    """A method-like callback: registers a large L2 penalty on every B at each task start."""

    def on_task_start(self, trainer, pl_module, task):
        pl_module.register_loss_term(
            "slot_l2", lambda: 100.0 * sum((layer.lora_B**2).sum() for layer in pl_module.lora_layers.values())
        )


def adapter_norm(model: ContinualClassifier) -> float:
    """Norm of what training put into the adapters (the finished task sits in the frozen stack)."""
    return sum(layer.past_B.norm().item() for layer in model.lora_layers.values())


def test_registered_loss_term_changes_training(tmp_path):
    """A loss term registered by a callback is added to the loss (and shrinks what it penalises)."""
    results = {}
    for name, extra in (("plain", []), ("penalised", [SlotPenalty()])):
        pl.seed_everything(0, verbose=False)
        data = TaskSequenceDataModule(SyntheticSource(num_classes=4), classes_per_task=2, batch_size=8)
        model = ContinualClassifier(backbone_config=TINY_BERT, lora=LoRAConfig(rank=4), lr=0.01)
        run = trainer(tmp_path / name, *extra, max_epochs=1)
        run.fit(model, datamodule=data)
        results[name] = (adapter_norm(model), run.callback_metrics)
    assert "train/slot_l2" in results["penalised"][1]
    assert results["penalised"][0] < 0.5 * results["plain"][0]


def test_trainable_parameters_are_slots_and_head(tmp_path):
    model = ContinualClassifier(backbone_config=TINY_BERT, lora=LoRAConfig(rank=2))
    data = TaskSequenceDataModule(SyntheticSource(num_classes=4), classes_per_task=2)
    run = trainer(tmp_path, max_epochs=1)
    run.fit(model, datamodule=data)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        n for n, _ in model.named_parameters() if n.endswith(("lora_A", "lora_B")) or n.startswith("head.")
    }


def test_unknown_pooling_is_refused():
    with pytest.raises(ValueError, match="pooling"):
        ContinualClassifier(backbone_config=TINY_BERT, pooling="max")


class HeadSnapshot(TaskCallback):
    def on_task_end(self, trainer, pl_module, task):
        if task == 0:
            self.rows = pl_module.head.weight.detach()[:2].clone()


def test_training_a_task_leaves_old_class_rows_alone(tmp_path):
    """With train_classes='current', task 1's training leaves the head rows of task 0's classes unchanged."""
    data = TaskSequenceDataModule(SyntheticSource(num_classes=4), classes_per_task=2, batch_size=8)
    model = ContinualClassifier(backbone_config=TINY_BERT, lora=LoRAConfig(rank=2), lr=0.01)
    snapshot = HeadSnapshot()
    trainer(tmp_path, snapshot).fit(model, datamodule=data)
    torch.testing.assert_close(model.head.weight.detach()[:2], snapshot.rows, rtol=0, atol=0)
    assert not torch.equal(model.head.weight.detach()[2:], torch.zeros_like(model.head.weight[2:]))
