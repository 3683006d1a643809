"""Writes what ``plan predict`` predicts to a CSV file: one row per example."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info


class PredictionWriter(BasePredictionWriter):
    """At the end of prediction, ``path`` gets one column per key of the model's ``predict_step`` output: for a
    classifier ``index`` (the example's position in the predicted split or file), ``label`` (its true class,
    empty for a file), ``predicted`` and ``score`` (the predicted class's probability among the classes trained
    so far); for a language model ``index``, ``label`` (the reference answer) and ``predicted`` (the generated
    one)."""

    def __init__(self, path: str) -> None:
        super().__init__(write_interval="epoch")
        self.path = Path(path)

    def write_on_epoch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        self.path.parent.mkdir(parents=True, exist_ok=True)
        columns = list(batches[0]) if batches else ["index", "label", "predicted"]
        with open(self.path, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(columns)
            rows = 0
            for batch in batches:
                for row in zip(*(batch[column] for column in columns)):
                    writer.writerow(row)
                    rows += 1
        rank_zero_info(f"plan: wrote {rows} predictions to {self.path}")
