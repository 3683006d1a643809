"""A progress bar that names the task or round being trained instead of Lightning's "Epoch k"."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar


class StageProgressBar(TQDMProgressBar):
    """Lightning's bar with the stage as its title ("task 2/5", "round 3/10"): one epoch is one task or round,
    so "Epoch 1" would say less. The ``plan`` command uses it unless the progress bar is switched off."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        stage_name = getattr(trainer.datamodule, "stage_name", None)
        if stage_name is not None:
            self.train_progress_bar.set_description(stage_name(trainer.current_epoch))
