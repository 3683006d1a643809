"""O-LoRA (Wang et al., EMNLP Findings 2023): a new adapter per task, kept orthogonal to the old ones."""

from __future__ import annotations

import lightning.pytorch as pl
from torch import Tensor

from plan.callbacks.sequencer import TaskCallback, TaskSequencer
from plan.errors import require
from plan.subspace import orthogonality_penalty


class OLoRA(TaskCallback):
    """Adds ``lambda_orth * sum_layers penalty(A_old A_new^T) + lambda_l2 * sum (||A_new|| + ||B_new||)``.

    ``A_old`` is the layer's frozen stack of past down-projections, ``A_new`` the trainable slot's. The penalty
    is the sum of absolute entries (``form='abs'``, the official code) or of squared entries
    (``form='squared'``, the paper). Past adapters stay frozen and all of them are active at inference, which
    is what ``TaskSequencer(adapters='stacked')`` does; a shared adapter is refused.

    ``past_dropout=True`` also applies LoRA dropout (a mask of its own) to the past adapters' input, as the
    official code does; the default applies it to the new adapter only, as plan's other methods do.
    """

    def __init__(
        self, lambda_orth: float = 0.5, lambda_l2: float = 0.0, form: str = "abs", past_dropout: bool = False
    ) -> None:
        require(form in ("abs", "squared"), f"O-LoRA form must be 'abs' or 'squared', got {form!r}")
        for key, value in (("lambda_orth", lambda_orth), ("lambda_l2", lambda_l2)):
            require(
                value >= 0,
                f"O-LoRA {key} must be >= 0 (a negative weight rewards what it should penalise), got {value}",
            )
        self.lambda_orth = lambda_orth
        self.lambda_l2 = lambda_l2
        self.form = form
        self.past_dropout = past_dropout

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        sequencers = [cb for cb in trainer.callbacks if isinstance(cb, TaskSequencer)]
        require(
            stage != "fit" or (bool(sequencers) and sequencers[0].adapters == "stacked"),
            "O-LoRA needs TaskSequencer(adapters='stacked'): one frozen adapter per past task, got "
            + (f"adapters={sequencers[0].adapters!r}" if sequencers else "no TaskSequencer"),
        )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Register the terms once: they read the layers' current stack and slot at every step, so they hold
        for every task, including one a run resumes in the middle of."""
        layers = list(pl_module.lora_layers.values())
        for layer in layers:
            layer.past_dropout = self.past_dropout

        def orthogonality() -> Tensor:
            return self.lambda_orth * sum(  # type: ignore[return-value]  # typeshed: an empty sum is int 0
                orthogonality_penalty(layer.past_A, layer.lora_A, self.form) for layer in layers
            )

        def l2() -> Tensor:
            return self.lambda_l2 * sum(layer.lora_A.norm() + layer.lora_B.norm() for layer in layers)

        pl_module.register_loss_term("olora_orth", orthogonality)
        if self.lambda_l2:
            pl_module.register_loss_term("olora_l2", l2)
