"""The input-subspace memory that InfLoRA, PLAN and GPM-style gradient projection share.

:class:`SubspaceMemory` keeps, for every LoRA layer, an orthonormal basis ``M`` of the inputs that finished
tasks fed it (GPM's memory, grown with an energy threshold). Subclasses
decide what to do with it at a task start; all of them may keep the trainable down-projection's rows out of
a protected basis after every optimizer step, which is :class:`GradientProjection` on its own.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
import torch
from torch import Tensor

from plan.callbacks.sequencer import TaskCallback
from plan.errors import require
from plan.subspace import InputCovariance, expand_memory, project_rows_out, threshold_schedule, token_gram


class SubspaceMemory(TaskCallback):
    """Base class: per-layer memory of old tasks' input subspaces, updated at every task end.

    Args:
        threshold_start, threshold_end: GPM energy threshold, linear over the tasks (InfLoRA's schedule);
            1.0 keeps every direction old inputs use, which makes non-interference exact.
        max_examples: cap on the training examples a statistics pass reads, drawn at random with a fixed seed
            per task (None: the task's whole training set).
    """

    memory_rule = "gpm"  # how the memory grows (plan.subspace.expand_memory); InfLoRA follows its own code

    def __init__(
        self, threshold_start: float = 0.95, threshold_end: float = 1.0, max_examples: int | None = None
    ) -> None:
        for name, value in (("threshold_start", threshold_start), ("threshold_end", threshold_end)):
            require(0.0 < value <= 1.0, f"{name} must be in (0, 1] (the share of input energy kept), got {value}")
        self.threshold_start = threshold_start
        self.threshold_end = threshold_end
        require(
            max_examples is None or max_examples >= 1,
            f"max_examples must be a positive number of examples or None (all), got {max_examples}",
        )
        self.max_examples = max_examples
        self.bases: dict[str, Tensor] = {}

    # -- statistics ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def input_covariances(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task: int) -> dict[str, Tensor]:
        """``E[x x^T]`` of every LoRA layer's input over the tokens (padding left out) of ``task``'s training data
        (all of it, or a seeded random ``max_examples`` of it), summed over ranks. Layers that read the same
        inputs (query and value of one attention block) get one shared tensor, so what depends only on it is
        computed once per group."""
        layers = pl_module.lora_layers
        stats = {name: InputCovariance(layer.in_features) for name, layer in layers.items()}
        grams: dict[int, tuple[Tensor, Tensor, int]] = {}  # this batch: id of an input -> (input, Gram, tokens)
        padding: dict[str, Tensor | None] = {"mask": None}  # this batch's attention mask

        def record(stat: InputCovariance, x: Tensor) -> None:
            if id(x) not in grams:  # grams holds x, so its id stays unique until the batch ends
                grams[id(x)] = (x, *token_gram(x, padding["mask"]))
            stat.add(*grams[id(x)][1:])

        hooks = [
            layer.register_forward_pre_hook(lambda _, args, s=stats[name]: record(s, args[0]))
            for name, layer in layers.items()
        ]
        was_training = pl_module.training
        pl_module.eval()
        try:
            # a sharded strategy refuses a pass that some rank would sit out (the others would wait for it)
            loader = trainer.strategy.process_dataloader(trainer.datamodule.task_train_loader(task, self.max_examples))
            for loaded in loader:
                batch = pl_module.transfer_batch_to_device(loaded, pl_module.device, 0)
                padding["mask"] = batch.get("attention_mask")
                pl_module(batch)
                grams.clear()
        finally:
            for hook in hooks:
                hook.remove()
            pl_module.train(was_training)
        result: dict[str, Tensor] = {}
        seen: dict[tuple, Tensor] = {}  # a cheap fingerprint -> the first covariance with it; equal() confirms
        for name, stat in stats.items():
            total = trainer.strategy.reduce(stat.sum.to(pl_module.device), reduce_op="sum").cpu()
            count = trainer.strategy.reduce(
                torch.tensor(float(stat.count), device=pl_module.device), reduce_op="sum"
            ).item()
            covariance = total / max(count, 1.0)
            key = (covariance.shape, covariance.sum().item(), covariance.trace().item())
            if key not in seen or not torch.equal(seen[key], covariance):
                seen[key] = covariance
            result[name] = seen[key]
        return result

    def memory(self, name: str, dim: int) -> Tensor:
        """The stored basis of layer ``name`` (``dim x k``, possibly ``k = 0``)."""
        return self.bases.get(name, torch.zeros(dim, 0, dtype=torch.float64))

    # -- task events --------------------------------------------------------------------------------------

    def on_task_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task: int) -> None:
        """Add the finished task's input subspace (measured with its adapter trained) to the memory."""
        self.update_memory(self.input_covariances(trainer, pl_module, task), task, trainer.datamodule.num_tasks)

    def per_layer(
        self, covariances: dict[str, Tensor], compute: Callable[[Tensor, Tensor], Tensor]
    ) -> dict[str, Tensor]:
        """``compute(covariance, memory)`` for every layer, evaluated once for layers that share both tensors
        (query and value of one block), which then share the result."""
        results: dict[str, Tensor] = {}
        computed: dict[tuple[int, int], Tensor] = {}
        for name, covariance in covariances.items():
            key = (id(covariance), id(self.bases.get(name)))
            if key not in computed:
                computed[key] = compute(covariance, self.memory(name, len(covariance)))
            results[name] = computed[key]
        return results

    def update_memory(self, covariances: dict[str, Tensor], task: int, num_tasks: int) -> None:
        threshold = threshold_schedule(task, num_tasks, self.threshold_start, self.threshold_end)
        self.bases.update(
            self.per_layer(
                covariances,
                lambda covariance, memory: expand_memory(memory, covariance, threshold, self.memory_rule, task == 0),
            )
        )

    # -- keeping the trainable down-projection out of a protected subspace --------------------------------

    def protected_basis(self, name: str, dim: int) -> Tensor | None:
        """The basis the trainable ``A`` of layer ``name`` must stay orthogonal to (None: no constraint)."""
        return None

    @torch.no_grad()
    def keep_out_of_protected(self, pl_module: pl.LightningModule) -> None:
        for name, layer in pl_module.lora_layers.items():
            basis = self.protected_basis(name, layer.in_features)
            if basis is not None and basis.shape[1] and layer.lora_A.requires_grad:
                layer.lora_A.copy_(
                    project_rows_out(layer.lora_A.double(), basis.to(layer.lora_A.device)).to(layer.lora_A.dtype)
                )

    def on_task_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task: int) -> None:
        self.keep_out_of_protected(pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        # After the optimizer step: project the step's change of A (A was already outside the protected span).
        self.keep_out_of_protected(pl_module)

    # -- checkpoints --------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"bases": self.bases}

    def load_state_dict(self, state_dict: dict) -> None:
        self.bases = state_dict["bases"]


class GradientProjection(SubspaceMemory):
    """GPM for LoRA: the trainable down-projection ``A`` is kept orthogonal to old tasks' input subspaces, so
    the update ``B A`` leaves old inputs (up to the threshold's residual energy) unchanged; ``B`` is free.

    Use with ``TaskSequencer(adapters='stacked')`` or ``'shared'``; with a shared adapter, the old tasks' part
    of ``A`` must not move either, so prefer stacked.
    """

    def protected_basis(self, name: str, dim: int) -> Tensor | None:
        return self.memory(name, dim)
