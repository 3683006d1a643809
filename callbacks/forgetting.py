"""Fills the accuracy matrix at every task end and shows it: TensorBoard curves, a heatmap, a printed table."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from plan.metrics import ContinualSummary


class ForgettingLogger(Callback):
    """Records ``R[i, j]`` (accuracy on task j after training task i) from each epoch's validation.

    TensorBoard gets, with the number of tasks trained as the step:

    * ``cl/acc/task_j``: one curve per task, its accuracy over the sequence;
    * ``cl/avg_acc``, ``cl/avg_inc_acc``, ``cl/forgetting``, ``cl/bwt``: the summaries of ``plan.metrics``
      computed on the tasks trained so far;
    * ``cl/accuracy_matrix``: the matrix as an annotated heatmap image.

    With a datamodule that validates on all tasks (``eval_tasks: all``) the upper triangle is measured too,
    and the accuracy of the untrained model on each task is measured once before the first task, so
    ``cl/fwt`` (forward transfer) is logged as well.

    The end of a run prints the matrix and the summaries. The matrix is part of the callback state, so a
    resumed run ends with the whole matrix.
    """

    def __init__(self, heatmap: bool = True) -> None:
        self.heatmap = heatmap
        self.matrix: torch.Tensor | None = None
        self.baseline: torch.Tensor | None = None

    @property
    def accuracy_matrix(self) -> torch.Tensor:
        """``matrix``: set at setup, or by a checkpoint."""
        if self.matrix is None:
            raise RuntimeError("ForgettingLogger has no accuracy matrix before setup or a checkpoint load")
        return self.matrix

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.matrix is None:
            tasks = trainer.datamodule.num_tasks
            self.matrix = torch.full((tasks, tasks), math.nan, dtype=torch.float64)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.baseline is None and getattr(trainer.datamodule, "eval_tasks", "seen") == "all":
            accuracy = pl_module.untrained_accuracy()
            self.baseline = torch.tensor([accuracy[t] for t in range(len(accuracy))], dtype=torch.float64)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        row = trainer.datamodule.seen_now() - 1
        for task, accuracy in pl_module.task_accuracy.items():
            self.accuracy_matrix[row, task] = accuracy
        summary = self.summary(row + 1)
        if trainer.is_global_zero:
            self._log(trainer, row, summary)

    def summary(self, tasks: int | None = None) -> ContinualSummary:
        """Summaries of the block of the first ``tasks`` tasks (default: every row measured so far)."""
        if tasks is None:
            measured = (~torch.isnan(self.accuracy_matrix)).any(dim=1).nonzero()
            tasks = int(measured.max()) + 1 if len(measured) else 0
        baseline = None if self.baseline is None else self.baseline[:tasks]
        return ContinualSummary.of(self.accuracy_matrix[:tasks, :tasks], baseline)

    def _log(self, trainer: pl.Trainer, row: int, summary: ContinualSummary) -> None:
        matrix = self.accuracy_matrix
        metrics = {f"cl/acc/task_{j}": matrix[row, j].item() for j in range(row + 1)}
        metrics.update({f"cl/{k}": v for k, v in summary.as_dict().items() if not math.isnan(v)})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=row + 1)
            if self.heatmap and isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure("cl/accuracy_matrix", heatmap_figure(matrix), global_step=row + 1)
                logger.experiment.add_text(
                    "cl/accuracy_matrix_table", format_matrix(matrix, markdown=True), global_step=row + 1
                )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        summary = self.summary()
        lines = [
            "accuracy matrix R[i, j] (row i: after training task i; column j: evaluated task)",
            format_matrix(self.accuracy_matrix),
        ]
        lines += [f"{k:>12}: {v:.4f}" if not math.isnan(v) else f"{k:>12}: n/a" for k, v in summary.as_dict().items()]
        if self.baseline is not None:
            lines.append("untrained accuracy per task: " + " ".join(f"{v:.3f}" for v in self.baseline.tolist()))
        rank_zero_info("\n".join(lines))

    def state_dict(self) -> dict:
        return {"matrix": self.matrix, "baseline": self.baseline}

    def load_state_dict(self, state_dict: dict) -> None:
        self.matrix, self.baseline = state_dict["matrix"], state_dict["baseline"]


def format_matrix(matrix: torch.Tensor, markdown: bool = False) -> str:
    """The matrix as text, unmeasured entries blank; markdown for TensorBoard's text tab."""
    tasks = len(matrix)
    cell = lambda v: "" if math.isnan(v) else f"{v:.3f}"
    if markdown:
        rows = ["| after \\ on | " + " | ".join(f"task {j}" for j in range(tasks)) + " |", "|---" * (tasks + 1) + "|"]
        rows += [f"| task {i} | " + " | ".join(cell(v) for v in matrix[i].tolist()) + " |" for i in range(tasks)]
    else:
        rows = ["        " + "".join(f"{f'task {j}':>9}" for j in range(tasks))]
        rows += [f"task {i:<3}" + "".join(f"{cell(v):>9}" for v in matrix[i].tolist()) for i in range(tasks)]
    return "\n".join(rows)


def heatmap_figure(matrix: torch.Tensor):
    """An annotated heatmap of the accuracy matrix (matplotlib figure, drawn off-screen)."""
    from matplotlib.figure import Figure

    tasks = len(matrix)
    figure = Figure(figsize=(1.2 + 0.6 * tasks, 1.0 + 0.6 * tasks))
    axes = figure.subplots()
    image = axes.imshow(matrix.numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
    for i in range(tasks):
        for j in range(tasks):
            value = matrix[i, j].item()
            if not math.isnan(value):
                axes.text(
                    j,
                    i,
                    f"{100 * value:.0f}",
                    ha="center",
                    va="center",
                    color="white" if value < 0.6 else "black",
                    fontsize=8,
                )
    axes.set_xlabel("evaluated task j")
    axes.set_ylabel("after training task i")
    axes.set_xticks(range(tasks))
    axes.set_yticks(range(tasks))
    figure.colorbar(image, ax=axes, fraction=0.046)
    figure.tight_layout()
    return figure
