"""InfLoRA (Liang & Li, CVPR 2024): a down-projection designed to be interference-free, then frozen."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch

from plan.callbacks.subspace_memory import SubspaceMemory
from plan.errors import require
from plan.subspace import project_out, require_rule


class InfLoRA(SubspaceMemory):
    """Before each task, design every layer's down-projection ``A`` from the new task's inputs with the old
    tasks' input subspace projected out, freeze it, and train only ``B`` (and the head).

    ``A`` = the top-``r`` left singular vectors of ``(I - M M^T) C_t`` (``C_t`` the new task's input second
    moment, ``M`` the memory), scaled by ``a_scale`` (the official code's 1/sqrt(3)). Its rows are orthogonal
    to span(M), so ``dW x_old = B A x_old = 0`` for inputs in the memory. After the task, the memory grows with
    an energy threshold from ``threshold_start`` to ``threshold_end`` over the tasks (the code's
    ``lamb``/``lame``), by the official code's rule (``memory='inflora'``: energy = squared singular value of
    the covariance, candidates from ``(I - M M^T) C``; see :func:`plan.subspace.expand_memory`), or by GPM's
    rule on the covariance's eigenvalues (``memory='gpm'``, which keeps more directions). The official code
    keeps a DualGPM memory that switches to storing the complement once it passes half the dimension; here
    the memory always stores the old subspace itself.

    Use with ``TaskSequencer(adapters='stacked')``.
    """

    def __init__(
        self,
        threshold_start: float = 0.95,
        threshold_end: float = 1.0,
        a_scale: float = 1 / math.sqrt(3),
        max_examples: int | None = None,
        memory: str = "inflora",
    ) -> None:
        super().__init__(threshold_start, threshold_end, max_examples)
        require_rule(memory)
        self.memory_rule = memory
        require(
            a_scale > 0,
            f"InfLoRA a_scale must be > 0 (the official 1/sqrt(3) = 0.577), got {a_scale}: A = 0 trains nothing",
        )
        self.a_scale = a_scale

    @torch.no_grad()
    def on_task_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task: int) -> None:
        covariances = self.input_covariances(trainer, pl_module, task)
        directions = self.per_layer(
            covariances, lambda covariance, memory: torch.linalg.svd(project_out(covariance, memory))[0]
        )
        for name, layer in pl_module.lora_layers.items():
            layer.lora_A.copy_((self.a_scale * directions[name][:, : layer.rank].T).to(layer.lora_A))
            layer.lora_B.zero_()
            layer.lora_A.requires_grad_(False)

    def on_task_resume(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task: int) -> None:
        for layer in pl_module.lora_layers.values():
            layer.lora_A.requires_grad_(False)
