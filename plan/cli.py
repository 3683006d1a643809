"""The ``plan`` command: LightningCLI with the trainer defaults that make one epoch one task.

``plan fit --config run.yaml`` runs a whole scenario; ``validate``, ``test`` and ``--print_config`` work as in
any LightningCLI. The defaults reload dataloaders every epoch (the datamodule switches tasks), let the
datamodule shard batches itself, and save a checkpoint at every task end, after the task's adapters are frozen,
so ``--ckpt_path`` resumes at the next task.
"""

from __future__ import annotations

import sys

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from plan.errors import ConfigError

TRAINER_DEFAULTS = {
    "max_epochs": -1,  # TaskSequencer sets it to the number of tasks
    "reload_dataloaders_every_n_epochs": 1,
    "use_distributed_sampler": False,
    "num_sanity_val_steps": 0,
}


class PlanCLI(LightningCLI):
    """LightningCLI plus a ``checkpoint:`` section whose defaults save one checkpoint per task end."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.filename": "task-{epoch}",
                "checkpoint.save_on_train_epoch_end": True,
                "checkpoint.save_top_k": -1,
                "checkpoint.every_n_epochs": 1,
                "checkpoint.save_last": True,
                "checkpoint.enable_version_counter": False,  # a resumed run overwrites last.ckpt
            }
        )


def run_cli(args: list[str] | None = None, run: bool = True) -> PlanCLI:
    """Parse ``args`` (default ``sys.argv[1:]``), run the subcommand, and return the CLI with its trainer.
    With ``run=False`` the arguments carry no subcommand and the CLI only builds model, data and trainer."""
    return PlanCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main() -> None:
    """The ``plan`` console command: known user errors become one line on stderr and exit status 2."""
    try:
        run_cli()
    except ConfigError as err:
        print(f"plan: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
