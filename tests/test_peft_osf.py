"""PEFT's OSF as the benchmark's external reference (``benchmarks/peft_osf.py``): the preserved top subspace that
PEFT documents, a task sequence through plan's trainer filling the accuracy matrix, and the refused settings."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import TINY_BERT, task_trainer
from peft import OSFConfig, get_peft_model
from torch import nn

from plan.callbacks import ForgettingLogger, TaskCallback, TaskSequencer
from plan.datamodules import SyntheticSource, TaskSequenceDataModule
from plan.errors import ConfigError
from plan.lora import LoRAConfig, LoRALinear
from plan.module import ContinualClassifier

_spec = importlib.util.spec_from_file_location(
    "peft_osf", Path(__file__).resolve().parent.parent / "benchmarks" / "peft_osf.py"
)
peft_osf = importlib.util.module_from_spec(_spec)
sys.modules["peft_osf"] = peft_osf  # the benchmark's class_path resolves to this module
_spec.loader.exec_module(peft_osf)
PeftOSF = peft_osf.PeftOSF


def train_osf(optimizer: type[torch.optim.Optimizer], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 10 x 12 weight before and after 5 steps of OSF preserving its top ``k`` directions."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10))
    before = model[0].weight.detach().clone()
    wrapped = get_peft_model(model, OSFConfig(target_modules=["0"], effective_rank=k))
    step = optimizer([p for p in wrapped.parameters() if p.requires_grad], lr=0.05)
    for _ in range(5):
        step.zero_grad()
        wrapped(torch.randn(16, 12)).sin().sum().backward()
        step.step()
    return before, wrapped.merge_and_unload()[0].weight.detach()


def test_osf_under_sgd_leaves_the_preserved_top_subspace_of_a_weight_unchanged() -> None:
    """PEFT projects the gradients of U_low and V_low off U_high and V_high, so with SGD the update has no
    component in the top-k left or right singular subspace of the weight it started from."""
    k = 4
    before, after = train_osf(torch.optim.SGD, k)
    delta = after - before
    u, _, vh = torch.linalg.svd(before, full_matrices=False)
    assert delta.norm() > 0.1 * before.norm()  # it trained
    assert (u[:, :k].T @ delta).norm() < 1e-5 * delta.norm()
    assert (delta @ vh[:k].T).norm() < 1e-5 * delta.norm()


def test_osf_under_adamw_moves_the_preserved_subspace() -> None:
    """PEFT projects gradients, not the optimizer's step: AdamW's per-coordinate scaling takes the update out of
    the projected subspace (measured: about 15% of it in the top-4 left subspace). The benchmark trains with
    AdamW, as PEFT's own example (Hugging Face's Trainer) does, so its OSF constraint is PEFT's as users run it."""
    k = 4
    before, after = train_osf(torch.optim.AdamW, k)
    delta = after - before
    u, _, _ = torch.linalg.svd(before, full_matrices=False)
    assert (u[:, :k].T @ delta).norm() > 0.05 * delta.norm()


class RankProbe(TaskCallback):
    """Each task's preserved rank, read from PEFT's OSF layers after PeftOSF wrapped the backbone."""

    def __init__(self) -> None:
        self.ranks: list[set[int]] = []

    def on_task_start(self, trainer, pl_module, task):
        self.ranks.append({r for m in pl_module.backbone.modules() for r in getattr(m, "effective_rank", {}).values()})


def test_osf_runs_a_task_sequence_through_plan_and_fills_the_accuracy_matrix(tmp_path) -> None:
    pl.seed_everything(0, verbose=False)
    data = TaskSequenceDataModule(SyntheticSource(num_classes=6), classes_per_task=2, batch_size=8)
    model = ContinualClassifier(
        backbone_config=TINY_BERT, lora=LoRAConfig(rank=4, alpha=8, target_modules=["query", "value"]), lr=0.01
    )
    targets = {f"backbone.{name}.weight" for name in model.lora_layers}
    before = {
        name.replace(".base_layer", ""): p.detach().clone()
        for name, p in model.named_parameters()
        if name.startswith("backbone.") and ".lora_" not in name
    }
    logger, probe = ForgettingLogger(heatmap=False), RankProbe()
    trainer = task_trainer(tmp_path, [TaskSequencer(adapters="shared", seed=0), logger, PeftOSF(), probe])
    trainer.fit(model, datamodule=data)

    matrix = logger.matrix
    assert matrix.shape == (3, 3) and torch.isfinite(matrix.tril()).all()
    assert probe.ranks == [{9}, {16}, {22}]  # 0.3, 0.5 and 0.7 of the 32-wide weights
    after = dict(model.backbone.named_parameters(prefix="backbone"))
    assert after.keys() == before.keys()  # merged back into a plain backbone: no LoRA, no OSF layers
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    for name, weight in before.items():
        moved = not torch.equal(after[name], weight)
        assert moved == (name in targets), name  # OSF trained the LoRA targets and nothing else


def test_osf_refuses_stacked_adapters_and_a_preserved_fraction_outside_0_1(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"effective_rank_end must be in \(0, 1\).*got 1.5"):
        PeftOSF(effective_rank_end=1.5)
    data = TaskSequenceDataModule(SyntheticSource(num_classes=4), classes_per_task=2, batch_size=8)
    model = ContinualClassifier(backbone_config=TINY_BERT, lora=LoRAConfig(rank=4, alpha=8), lr=0.01)
    trainer = task_trainer(tmp_path, [TaskSequencer(adapters="stacked", seed=0), PeftOSF()])
    with pytest.raises(ConfigError, match="adapters='shared'.*got adapters='stacked'"):
        trainer.fit(model, datamodule=data)
