"""SD-LoRA: the layer against a plain-torch formula, what trains and what does not, the magnitudes' restart at
every task, and whole runs (classifier, language model, resume, export) through ``plan fit``."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from conftest import TINY_BERT, TinyRun, task_trainer
from lightning.pytorch.callbacks import Callback
from torch import nn
from transformers import AutoConfig, AutoModel

from plan.callbacks import SDLoRA, TaskCallback, TaskSequencer
from plan.callbacks.sdlora import PARAMETER, unit_up_projection
from plan.cli import run_cli
from plan.datamodules import SyntheticSource, TaskSequenceDataModule
from plan.errors import ConfigError
from plan.lora import LoRAConfig, LoRALinear
from plan.module import ContinualClassifier

SDLORA = [
    {"class_path": "plan.callbacks.TaskSequencer"},
    {"class_path": "plan.callbacks.ForgettingLogger", "init_args": {"heatmap": False}},
    {"class_path": "plan.callbacks.SDLoRA"},
]

# -- the layer on hand-made tensors ---------------------------------------------------------------------------


def holder(layers: dict[str, LoRALinear]) -> SimpleNamespace:
    """What SDLoRA reads of a plan module: its LoRA layers and a way to add a trained parameter."""
    parameters: dict[str, nn.Parameter] = {}

    def add(name: str, value: torch.Tensor) -> nn.Parameter:
        parameters[name] = nn.Parameter(value)
        return parameters[name]

    return SimpleNamespace(lora_layers=layers, add_method_parameter=add, parameters=parameters)


def finish_task(method: SDLoRA, module, task: int, slots: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """One task as the stacked sequencer runs it, with the slots set to given values instead of trained."""
    method.on_task_start(None, module, task)  # type: ignore[arg-type]
    with torch.no_grad():
        for name, (a, b) in slots.items():
            module.lora_layers[name].lora_A.copy_(a)
            module.lora_layers[name].lora_B.copy_(b)
    method.on_task_end(None, module, task)  # type: ignore[arg-type]
    for layer in module.lora_layers.values():
        layer.freeze_slot()
        layer.reset_slot()


def sdlora_reference(x, weight, bias, past: list[tuple], magnitudes: list[float], current: tuple, m_current: float):
    """The official code's forward: ``W x + b + sum_k m_k B_k A_k x / (||B_k|| ||A_k||) + m_t B_t A_t x``."""
    y = x @ weight.T + bias
    for (a, b), m in zip(past, magnitudes):
        y = y + m * (x @ a.T @ b.T) / (torch.linalg.norm(b) * torch.linalg.norm(a))
    a, b = current
    return y + m_current * (x @ a.T @ b.T)


def hand_made(per_layer: bool = False):
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    layers = {name: LoRALinear(nn.Linear(6, 5).double(), rank=2, alpha=8.0) for name in ("q", "v")}
    module = holder(layers)
    method = SDLoRA(per_layer=per_layer)
    method.attach(module, num_tasks=4)  # type: ignore[arg-type]
    past = {name: [(rand(2, 6), rand(5, 2)), (rand(2, 6), 3.0 * rand(5, 2))] for name in layers}
    for task in range(2):
        finish_task(method, module, task, {name: past[name][task] for name in layers})
    method.on_task_start(None, module, 2)  # type: ignore[arg-type]
    current = {name: (rand(2, 6), rand(5, 2)) for name in layers}
    with torch.no_grad():
        for name, (a, b) in current.items():
            layers[name].lora_A.copy_(a)
            layers[name].lora_B.copy_(b)
    return method, module, past, current, rand


@pytest.mark.parametrize("per_layer", [False, True], ids=["shared", "per-layer"])
def test_layer_output_equals_the_official_formula(per_layer: bool) -> None:
    _, module, past, current, rand = hand_made(per_layer)
    magnitudes = module.parameters[PARAMETER]
    assert magnitudes.shape == (4, 2 if per_layer else 1)
    assert torch.all(magnitudes == 0.8)  # restarted at task 2's start
    with torch.no_grad():
        magnitudes.copy_(torch.tensor([[0.3, -1.2], [2.0, 0.5], [0.7, 1.9], [5.0, 5.0]])[:, : magnitudes.shape[1]])
    x = rand(3, 6)
    for index, (name, layer) in enumerate(module.lora_layers.items()):
        m = magnitudes[:, index if per_layer else 0].tolist()
        expected = sdlora_reference(
            x, layer.base_layer.weight, layer.base_layer.bias, past[name], m[:2], current[name], m[2]
        )
        torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_past_directions_get_no_gradient_and_every_magnitude_of_a_seen_task_does() -> None:
    method, module, _, _, rand = hand_made()
    magnitudes = module.parameters[PARAMETER]
    loss = sum(layer(rand(3, 6)).square().sum() for layer in module.lora_layers.values())
    loss.backward()
    assert magnitudes.grad is not None
    assert torch.all(magnitudes.grad[:3] != 0)  # tasks 0, 1 (past) and 2 (current)
    assert torch.all(magnitudes.grad[3:] == 0)  # a task not reached yet
    for name, layer in module.lora_layers.items():
        assert not layer.past_A.requires_grad and not layer.past_B.requires_grad
        assert not method.units[name].requires_grad
        assert layer.lora_A.grad is not None and layer.lora_B.grad is not None


def test_the_frozen_stack_holds_the_magnitudes_folded_in_after_a_step() -> None:
    """After an optimizer step (``fold``) the layer's own state (stack ``B`` and slot scale) computes what the
    magnitudes do, so merging, freezing and export see the trained model."""
    method, module, _, _, rand = hand_made()
    magnitudes = module.parameters[PARAMETER]
    with torch.no_grad():
        magnitudes.copy_(torch.tensor([[0.3], [2.0], [0.7], [1.0]]))
    x = rand(3, 6)
    expected = {name: layer(x).detach() for name, layer in module.lora_layers.items()}
    method.fold()
    for name, layer in module.lora_layers.items():
        layer.up_projections = None  # the layer alone
        torch.testing.assert_close(layer(x), expected[name], rtol=1e-12, atol=1e-12)
        assert layer.scale == pytest.approx(0.7)


def test_unit_direction_divides_by_the_product_of_the_norms_and_leaves_a_zero_adapter_zero() -> None:
    a, b = torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0], [0.0], [0.0]])
    torch.testing.assert_close(unit_up_projection(a, b), b / 5.0)
    assert torch.equal(unit_up_projection(a, torch.zeros(3, 1)), torch.zeros(3, 1))


def test_settings_a_run_cannot_train_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"SDLoRA init must be > 0"):
        SDLoRA(init=0.0)
    layers = {"q": LoRALinear(nn.Linear(4, 4), 2, 4.0)}
    layers["q"].kernel = "triton"  # as set on a GPU machine (construction checks for one)
    with pytest.raises(ConfigError, match=r"lora.kernel='triton'"):
        SDLoRA().attach(holder(layers), num_tasks=2)  # type: ignore[arg-type]


# -- runs on the tiny BERT -------------------------------------------------------------------------------------


class MagnitudeProbe(TaskCallback):
    """Records the magnitudes at every task start (after SDLoRA's, which comes earlier in the list) and end."""

    def __init__(self) -> None:
        self.starts: list[torch.Tensor] = []
        self.ends: list[torch.Tensor] = []

    def on_task_start(self, trainer, pl_module, task):
        self.starts.append(pl_module.method_parameters[PARAMETER].detach().clone())

    def on_task_end(self, trainer, pl_module, task):
        self.ends.append(pl_module.method_parameters[PARAMETER].detach().clone())


class FoldProbe(Callback):
    """Features of one fixed batch as the task's validation saw them (SD-LoRA's forward) and after the
    sequencer froze the task (the layers alone, magnitudes folded into the stack)."""

    def __init__(self) -> None:
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    @torch.no_grad()
    def features(self, trainer, pl_module) -> torch.Tensor:
        batch = next(iter(trainer.datamodule.task_eval_loaders(1)[0]))
        was_training = pl_module.training
        pl_module.eval()
        out = pl_module.features(batch)
        pl_module.train(was_training)
        return out

    def on_validation_end(self, trainer, pl_module):
        self.seen = self.features(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module):  # after TaskSequencer's freeze (it comes first)
        self.pairs.append((self.seen, self.features(trainer, pl_module)))


def fit_tiny(tmp_path, *callbacks, tasks: int = 3) -> ContinualClassifier:
    pl.seed_everything(0, verbose=False)
    data = TaskSequenceDataModule(SyntheticSource(num_classes=2 * tasks), classes_per_task=2, batch_size=8)
    model = ContinualClassifier(backbone_config=TINY_BERT, lora=LoRAConfig(rank=4, alpha=8), lr=0.01)
    trainer = task_trainer(tmp_path, [TaskSequencer(seed=0), *callbacks])
    trainer.fit(model, datamodule=data)
    return model


def test_magnitudes_restart_at_every_task_and_train_within_it(tmp_path) -> None:
    probe = MagnitudeProbe()
    model = fit_tiny(tmp_path, SDLoRA(), probe)
    assert len(probe.starts) == len(probe.ends) == 3
    for task, (start, end) in enumerate(zip(probe.starts, probe.ends)):
        assert torch.all(start == 0.8), task
        assert torch.all(end[: task + 1] != 0.8), task  # the past tasks' and the current one's moved
        assert torch.all(end[task + 1 :] == 0.8), task  # later tasks' did not
    optimizer_parameters = {id(p) for p in model.configure_optimizers().param_groups[0]["params"]}
    assert id(model.method_parameters[PARAMETER]) in optimizer_parameters


def test_the_frozen_model_is_the_model_last_evaluated(tmp_path) -> None:
    fold = FoldProbe()
    fit_tiny(tmp_path, SDLoRA(), fold)
    assert len(fold.pairs) == 3
    for evaluated, frozen in fold.pairs:
        torch.testing.assert_close(frozen, evaluated, rtol=1e-5, atol=1e-5)


def test_sdlora_refuses_a_shared_adapter(tmp_path) -> None:
    pl.seed_everything(0, verbose=False)
    data = TaskSequenceDataModule(SyntheticSource(num_classes=4), classes_per_task=2, batch_size=8)
    model = ContinualClassifier(backbone_config=TINY_BERT, lora=LoRAConfig(rank=4, alpha=8), lr=0.01)
    trainer = task_trainer(tmp_path, [TaskSequencer(adapters="shared", seed=0), SDLoRA()])
    with pytest.raises(ConfigError, match="stacked"):
        trainer.fit(model, datamodule=data)


@pytest.mark.slow
def test_plan_fit_runs_sdlora_and_a_run_killed_mid_task_resumes_bit_identical(tmp_path) -> None:
    """``plan fit`` with every dropout on, killed 3 steps into task 1 and resumed from the step-9 checkpoint: the
    magnitudes, their optimizer state, the stack and SD-LoRA's unit directions end as in the uninterrupted run."""
    from test_resume import DROPOUT, assert_identical, kill_and_resume

    full, resumed, _ = kill_and_resume(
        TinyRun(tmp_path),
        kill_at=11,
        every=3,
        trainer__callbacks=SDLORA,
        trainer__logger__init_args__version=None,
        **DROPOUT,
    )
    assert_identical(resumed, full, ("SDLoRA", "ForgettingLogger"))
    matrix = full["callbacks"]["ForgettingLogger"]["matrix"]
    assert matrix.shape == (3, 3) and not torch.isnan(matrix.diagonal()).any()
    magnitudes = full["state_dict"][f"method_parameters.{PARAMETER}"]
    assert magnitudes.shape == (3, 1) and torch.all(magnitudes != 0.8)  # every task's moved in the last task
    assert all(block.shape[1] == 3 * 4 for block in full["callbacks"]["SDLoRA"]["units"].values())  # 3 tasks, rank 4


def test_plan_fit_runs_sdlora_on_the_language_model(tiny_lm) -> None:
    # two steps a task: the current magnitude's gradient is zero at a task's first step, where B_t is still 0
    config = tiny_lm.config(trainer__callbacks=SDLORA, data__init_args__passes_per_task=2)
    cli = run_cli(["fit", "--config", str(config)])
    assert tiny_lm.matrix().shape == (2, 2)
    magnitudes = cli.model.method_parameters[PARAMETER]
    assert magnitudes.shape == (2, 1) and torch.all(magnitudes[:2] != 0.8)
    assert all(layer.past_rank == 2 * layer.rank for layer in cli.model.lora_layers.values())


@pytest.fixture
def saved_backbone(tmp_path: Path) -> Path:
    """The tiny BERT with fixed random weights, saved as a pretrained folder (what export needs)."""
    torch.manual_seed(0)
    folder = tmp_path / "tiny-bert"
    fields = {k: v for k, v in TINY_BERT.items() if k != "model_type"}
    AutoModel.from_config(AutoConfig.for_model("bert", **fields)).save_pretrained(folder)
    return folder


def test_plan_export_of_an_sdlora_run_reproduces_its_model_in_peft(tiny, saved_backbone, tmp_path) -> None:
    import peft

    from plan.export import export_checkpoint

    model = {"backbone": str(saved_backbone), "lora": {"rank": 4, "alpha": 8, "target_modules": ["query", "value"]}}
    config = tiny.config(
        trainer__callbacks=SDLORA, model__init_args=model, data__init_args__tokenizer="embedded:all-MiniLM-L6-v2"
    )
    cli = run_cli(["fit", "--config", str(config)])
    out = export_checkpoint(tiny.checkpoints() / "last.ckpt", tmp_path / "export")
    assert (
        json.loads((out / "adapter_config.json").read_text())["r"] == 3 * 4 + 4
    )  # the stack of 3 tasks and the (reset) slot
    reloaded = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(saved_backbone), out).eval()
    batch = next(iter(cli.datamodule.task_eval_loaders(1)[0]))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    cli.model.eval()
    with torch.no_grad():
        expected = cli.model.backbone(**inputs).last_hidden_state
        torch.testing.assert_close(reloaded(**inputs).last_hidden_state, expected, rtol=1e-5, atol=1e-5)
