"""The ``plan`` command: LightningCLI with the trainer defaults that make one epoch one task.

``plan fit --config run.yaml`` runs a whole scenario; ``validate``, ``test`` and ``--print_config`` work as in
any LightningCLI. The defaults reload dataloaders every epoch (the datamodule switches tasks), let the
datamodule shard batches itself, and save a checkpoint at every task end, after the task's adapters are frozen,
so ``--ckpt_path`` resumes at the next task.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import yaml
from jsonargparse import Namespace
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from plan import export
from plan.callbacks.predictions import PredictionWriter
from plan.callbacks.progress import StageProgressBar
from plan.checkpoints import (
    AtomicCheckpointIO,
    MidTaskCheckpoint,
    RunSettings,
    checkpoint_folder,
    checkpoint_settings,
    format_diff,
    read_checkpoint,
    run_settings,
    settings_diff,
    settings_source,
)
from plan.errors import ConfigError
from plan.sharding import require_supported_strategy  # also registers trainer.strategy 'fsdp2'

TRAINER_DEFAULTS = {
    "max_epochs": -1,  # TaskSequencer sets it to the number of tasks
    "reload_dataloaders_every_n_epochs": 1,
    "use_distributed_sampler": False,
    "num_sanity_val_steps": 0,
}


PLAN_CLASSES = (
    "plan's classes: model plan.module.ContinualClassifier or plan.language_model.ContinualLM; data "
    "plan.datamodules.TaskSequenceDataModule or plan.datamodules.FederatedDataModule, with source "
    "plan.datamodules.TwentyNewsgroups, Reuters, ElectionTweets, FriendsSpeakers, SlovenianComments, DatasetSequence, "
    "HuggingFaceSource, InstructionSource or SyntheticSource; callbacks plan.callbacks.TaskSequencer, ForgettingLogger, OLoRA, InfLoRA, "
    "GradientProjection, PLAN, ProgressiveActivation, FederatedRounds; aggregation rules (FederatedRounds) "
    "fedit, ffa_lora, lora_fair, flexlora, flora. One class's arguments: --model.help CLASS, --data.help CLASS, "
    "--trainer.callbacks.help CLASS (e.g. --trainer.callbacks.help plan.callbacks.PLAN)."
)


class PlanCLI(LightningCLI):
    """LightningCLI plus checkpoints a run can trust.

    * ``checkpoint:`` saves one checkpoint per task (or round) end; ``step_checkpoint:`` refreshes ``last.ckpt``
      every N training steps inside a task, and resuming from it continues at the next batch.
    * Checkpoints are written atomically and read back verified (:mod:`plan.checkpoints`).
    * ``fit`` refuses to write into a folder that holds another run's checkpoints, and ``fit --ckpt_path``
      refuses settings that differ from the checkpoint's, listing each, unless ``--resume_settings
      checkpoint`` takes the checkpoint's values. A resumed run logs into the TensorBoard run it continues.
    * ``--callback NAME.KEY=VALUE`` sets one argument of a configured callback; a relative logger
      ``save_dir`` follows ``--trainer.default_root_dir``; the progress bar names the task or round;
      ``predict`` writes a CSV (:class:`plan.callbacks.PredictionWriter`).
    """

    config: Namespace  # the parsed settings, re-parsed after --callback and --resume_settings

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
        parser.add_lightning_class_args(MidTaskCheckpoint, "step_checkpoint")
        parser.add_argument(
            "--resume_settings",
            type=Literal["refuse", "checkpoint"],
            default="refuse",
            help="fit --ckpt_path with model, data or method settings that differ from the checkpoint's: refuse "
            "(list the differences and stop) or checkpoint (run with the checkpoint's values, listing them)",
        )
        parser.add_argument(
            "--callback",
            type=list[str],
            default=[],
            help="NAME.KEY=VALUE items: set an argument of the configured callback of class NAME, e.g. "
            "--callback '[PLAN.perturbation=none, TaskSequencer.adapters=shared]', or one at a time with "
            "--callback+=PLAN.perturbation=none",
        )
        parser.add_argument(
            "--predictions",
            type=str | None,
            default=None,
            help="predict: the CSV file to write (default: predictions-<split or file name>.csv in the run folder "
            "of --ckpt_path)",
        )

    # -- right after parsing: verify the checkpoint, compare settings, continue the TensorBoard run ---------

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then check ``ckpt_path`` before LightningCLI reads it: it would otherwise replace the model
        settings with the checkpoint's hyperparameters without a word (and fail on a bad file with a raw
        traceback)."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        self._override_callbacks(subcommand)
        config = self.config[subcommand] if subcommand else self.config
        under_root_dir(config)
        if not subcommand or not config.get("ckpt_path"):
            return
        checkpoint = read_checkpoint(Path(config.ckpt_path), mmap=True)
        if subcommand != "fit":
            return
        stored = checkpoint["callbacks"].get(RunSettings.__qualname__)
        if stored is None:
            rank_zero_warn(f"{config.ckpt_path} holds no record of its run's settings; they are not compared")
        else:
            self._match_settings(config, stored["source"])
        continue_log_version(config, Path(config.ckpt_path))

    def _override_callbacks(self, subcommand: str | None) -> None:
        """Apply ``--callback NAME.KEY=VALUE``: set an argument of the configured callback whose class is NAME
        (jsonargparse itself only reaches the last callback of the list)."""
        config = self.config[subcommand] if subcommand else self.config
        if not config.get("callback"):
            return
        callbacks = config.trainer.as_dict().get("callbacks") or []
        names = [str(cb.get("class_path", "")).rsplit(".", 1)[-1] for cb in callbacks]
        for item in config.callback:
            name, _, assignment = item.partition(".")
            key, equals, value = assignment.partition("=")
            if not (key and equals):
                raise ConfigError(f"--callback takes NAME.KEY=VALUE (e.g. PLAN.perturbation=none), got {item!r}")
            if name not in names:
                raise ConfigError(f"--callback {item}: no callback {name!r} in trainer.callbacks; they are {names}")
            callbacks[names.index(name)].setdefault("init_args", {})[key] = yaml.safe_load(value)
        trainer = {"trainer": {"callbacks": callbacks}, "callback": []}
        self.config = self.parser.parse_object({subcommand: trainer} if subcommand else trainer, self.config)

    def _match_settings(self, config: Namespace, stored: dict) -> None:
        diff = settings_diff(run_settings(stored), run_settings(settings_source(config.as_dict())))
        if not diff:
            return
        if config.resume_settings == "refuse":
            raise ConfigError(
                f"the settings differ from those checkpoint '{config.ckpt_path}' was trained with:\n{format_diff(diff)}\n"
                "Resume with the checkpoint's settings, or pass --resume_settings checkpoint to take its values."
            )
        rank_zero_warn(f"--resume_settings checkpoint: running with the checkpoint's values for\n{format_diff(diff)}")
        self.config = self.parser.parse_object({"fit": checkpoint_settings(config.as_dict(), stored)}, self.config)

    # -- the trainer: atomic checkpoints, the settings record ----------------------------------------------

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        config = self.config[self.subcommand] if self.subcommand else self.config
        require_supported_strategy(config.trainer.get("strategy"))  # before Lightning checks devices or launches
        if config.trainer.get("enable_progress_bar") is not False:  # a bar that names the task or round
            self.trainer_defaults: dict[str, Any] = {**self.trainer_defaults, "callbacks": [StageProgressBar()]}
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # a user's own plugin stays
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        trainer.callbacks.append(RunSettings(settings_source(config.as_dict())))
        if self.subcommand == "predict":
            trainer.callbacks.append(PredictionWriter(config.predictions or default_predictions_path(config)))
        return trainer

    def before_fit(self) -> None:
        require_node_environment(self.trainer)
        folder = checkpoint_folder(self.trainer)
        ckpt_path = self.config.fit.get("ckpt_path")
        if folder is not None and folder.is_dir():
            found = sorted(p.name for p in folder.glob("*.ckpt"))
            resuming_here = ckpt_path is not None and Path(ckpt_path).resolve().parent == folder.resolve()
            if found and not resuming_here:
                raise ConfigError(
                    f"run folder {folder} already holds checkpoints of another run ({', '.join(found[:4])}); "
                    f"resume that run with --ckpt_path {folder / 'last.ckpt'}, or start this one elsewhere "
                    "(another logger name, version or save_dir), or delete them"
                )
        self._announce("run folder")

    def after_fit(self) -> None:
        self._announce("finished; run folder")

    def _announce(self, what: str) -> None:
        logger = self.trainer.logger
        folder = checkpoint_folder(self.trainer)
        logs = f"logs {logger.log_dir}" if logger is not None and getattr(logger, "log_dir", None) else "no logger"
        rank_zero_info(f"plan: {what}: {logs}; checkpoints {folder if folder else 'off'}")


def require_node_environment(trainer: pl.Trainer) -> None:
    """Refuse ``num_nodes > 1`` outside a cluster launcher when nothing says which node this is: every process
    would take itself for node 0 and wait for the others forever."""
    environment = getattr(trainer.strategy, "cluster_environment", None)
    unnamed = not any(variable in os.environ for variable in ("NODE_RANK", "GROUP_RANK"))
    if trainer.num_nodes > 1 and isinstance(environment, LightningEnvironment) and unnamed:
        raise ConfigError(
            f"trainer.num_nodes={trainer.num_nodes} needs every node started with MASTER_ADDR, MASTER_PORT, "
            "WORLD_SIZE and NODE_RANK (0..num_nodes-1) set, or under SLURM or torchrun: see scripts/slurm.sbatch "
            "and scripts/torchrun.sh"
        )


def under_root_dir(config: Namespace) -> None:
    """Make a relative logger ``save_dir`` (the shipped configs' ``runs``) relative to
    ``trainer.default_root_dir`` when one is given, so that every output of a run follows it."""
    root, logger = config.trainer.get("default_root_dir"), config.trainer.get("logger")
    if not root or not isinstance(logger, Namespace) or not isinstance(logger.get("init_args"), Namespace):
        return
    save_dir = logger.init_args.get("save_dir")
    if save_dir and not Path(save_dir).is_absolute():
        logger.init_args.save_dir = str(Path(root) / save_dir)


def default_predictions_path(config: Namespace) -> str:
    """``predictions-<split or file stem>.csv`` in the run folder of ``ckpt_path`` (or the working folder)."""
    data = config.data.init_args
    what = Path(data.predict_file).stem if data.get("predict_file") else data.get("predict_split", "test")
    ckpt_path = config.get("ckpt_path")
    folder = Path(ckpt_path).resolve().parent.parent if ckpt_path else Path.cwd()
    return str(folder / f"predictions-{what}.csv")


def continue_log_version(config: Namespace, ckpt_path: Path) -> None:
    """If ``ckpt_path`` lies in ``<save_dir>/<name>/<version>/checkpoints`` of the configured logger and no
    version was asked for, log into that version: the resumed run continues the same TensorBoard run."""
    logger = config.trainer.get("logger")
    if not isinstance(logger, Namespace) or "init_args" not in logger or "version" not in logger.init_args:
        return
    arguments = logger.init_args
    if arguments.version is not None or not arguments.get("save_dir") or ckpt_path.parent.name != "checkpoints":
        return
    run = ckpt_path.resolve().parent.parent
    if run.parent == (Path(arguments.save_dir) / str(arguments.get("name") or "")).resolve():
        arguments.version = run.name


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
        parser_kwargs={command: {"epilog": PLAN_CLASSES} for command in ("fit", "validate", "test", "predict")},
        args=args,
        run=run,
    )


def main() -> None:
    """The ``plan`` console command (LightningCLI's subcommands, and ``export``): known user errors become one
    line on stderr and exit status 2."""
    try:
        if sys.argv[1:2] == ["export"]:
            export.main(sys.argv[2:])
        else:
            run_cli()
    except ValueError as err:
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__  # jsonargparse raises its own error with a constructor's ConfigError as cause
        if cause is None:
            raise
        print(f"plan: error: {cause}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
