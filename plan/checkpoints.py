"""Checkpoints a run can trust: written atomically, checked on load, tied to the settings that wrote them.

* :class:`AtomicCheckpointIO` writes a checkpoint to a temporary file in the destination folder, flushes it to
  disk and renames it over the target, so a process killed while saving leaves the previous file whole (never
  a 0-byte ``last.ckpt``); it reads checkpoints with ``weights_only=True`` and turns an empty, truncated or
  foreign file into one :class:`~plan.errors.ConfigError` naming the file.
* :func:`run_settings` and :func:`settings_diff` describe what a resumed run must share with the run that
  wrote the checkpoint (model, data, method callbacks, seed), so ``plan fit --ckpt_path`` can list every
  difference instead of silently running with the checkpoint's values.
"""

from __future__ import annotations

import copy
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

from plan.errors import ConfigError

CHECKPOINT_KEYS = ("state_dict", "callbacks", "loops")  # what Lightning's training checkpoints always hold


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO with an atomic, durable save and a verified, weights-only load."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic_save(checkpoint, Path(path))

    def load_checkpoint(
        self, path: Any, map_location: Callable | None = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return read_checkpoint(Path(path), map_location)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over ``path`` (POSIX-atomic in one
    folder, unlike a temporary file elsewhere that must be copied across filesystems)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself reaches the disk
    finally:
        os.close(folder)


def read_checkpoint(path: Path, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Load a training checkpoint with ``weights_only=True`` (``mmap``: tensors stay on disk until read, for a
    look at its settings); any file that is not one raises a ConfigError that names it and what is wrong."""
    if not path.is_file():
        raise ConfigError(f"ckpt_path: checkpoint '{path}' does not exist")
    if path.stat().st_size == 0:
        raise ConfigError(
            f"ckpt_path: checkpoint '{path}' is empty (0 bytes), probably left by a process killed while saving; "
            "resume from another checkpoint of the run (task-epoch=N.ckpt)"
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"ckpt_path: '{path}' is not a readable plan checkpoint (truncated, corrupt, or another kind of file): "
            f"{reason}"
        ) from err
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        found = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ConfigError(
            f"ckpt_path: '{path}' is not a training checkpoint written by plan fit (it lacks {missing}; it holds "
            f"{found}); pass a task-epoch=N.ckpt, round-epoch=N.ckpt or last.ckpt of a plan run"
        )
    return checkpoint


# -- the settings a resumed run must share with its checkpoint ---------------------------------------------

# Settings that change how a run is executed, not what it computes: they may differ on resume.
EXECUTION_ONLY = tuple(
    f"data.init_args.{key}" for key in ("num_workers", "eval_batch_size", "predict_split", "predict_file")
)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict with dotted keys; lists and scalars are leaves."""
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat if flat or not prefix else {prefix: {}}


def is_plan_callback(callback: Any) -> bool:
    """A callback entry of the config (a dict with ``class_path``) that is one of plan's: a method or driver."""
    return isinstance(callback, dict) and str(callback.get("class_path", "")).startswith("plan.")


def settings_source(config: dict[str, Any]) -> dict[str, Any]:
    """The parts of a ``fit`` config (as a plain dict) that determine the training: the seed, the model, the
    data and plan's callbacks (other callbacks, the trainer's devices, loggers and ``max_epochs`` may change
    between a run and its resumption). A checkpoint keeps them to compare and, if asked, restore them."""
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    return {
        "seed_everything": config.get("seed_everything"),
        "model": config.get("model"),
        "data": config.get("data"),
        "callbacks": [cb for cb in callbacks if is_plan_callback(cb)],
    }


def run_settings(source: dict[str, Any]) -> dict[str, Any]:
    """:func:`settings_source`'s parts as flat ``key: value`` settings, without the execution-only ones."""
    settings = flatten({key: source[key] for key in ("seed_everything", "model", "data")})
    for callback in source["callbacks"]:
        name = f"callback {callback['class_path']}"
        settings[name] = "present"
        settings.update(flatten(callback.get("init_args") or {}, name))
    return {key: value for key, value in settings.items() if key not in EXECUTION_ONLY}


def checkpoint_settings(config: dict[str, Any], stored: dict[str, Any]) -> dict[str, Any]:
    """The fit config with the model, data, seed and plan callbacks of a checkpoint's ``stored`` source, keeping
    the requested values of what may differ on resume (other callbacks, the execution-only data settings)."""
    data = copy.deepcopy(stored["data"])
    for key in EXECUTION_ONLY:
        *path, leaf = key.split(".")[1:]
        requested, target = config["data"], data
        for part in path:
            requested, target = requested[part], target[part]
        target[leaf] = requested[leaf]
    others = [cb for cb in config["trainer"].get("callbacks") or [] if not is_plan_callback(cb)]
    return {
        "seed_everything": stored["seed_everything"],
        "model": stored["model"],
        "data": data,
        "trainer": {"callbacks": others + stored["callbacks"]},
    }


MISSING = "(not set)"


def settings_diff(stored: dict[str, Any], requested: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, checkpoint value, requested value)`` for every setting that differs, sorted by key."""
    keys = sorted(set(stored) | set(requested))
    return [
        (key, stored.get(key, MISSING), requested.get(key, MISSING))
        for key in keys
        if stored.get(key, MISSING) != requested.get(key, MISSING)
    ]


def format_diff(diff: list[tuple[str, Any, Any]]) -> str:
    return "\n".join(f"  {key}: checkpoint {old!r}, requested {new!r}" for key, old, new in diff)


# -- the callbacks the CLI adds -----------------------------------------------------------------------------


class MidTaskCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``every_n_train_steps`` training steps inside a task or round, so a killed run loses
    at most that many steps; resuming from it continues at the next batch (0 switches it off).

    It leaves out a task's last batch, where the task-end checkpoint follows once the task's end events have
    run, and federated runs on several processes, where each rank is in the middle of another client and a
    checkpoint holds one rank's model: those resume from the last round end."""

    def __init__(self, every_n_train_steps: int = 100, dirpath: str | None = None) -> None:
        if every_n_train_steps < 0:
            raise ConfigError(
                f"step_checkpoint.every_n_train_steps must be >= 0 (0: no mid-task checkpoints), got {every_n_train_steps}"
            )
        super().__init__(
            dirpath=dirpath,
            every_n_train_steps=every_n_train_steps,
            save_top_k=0,
            save_last=True,
            save_on_train_epoch_end=True,
            enable_version_counter=False,
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.sharded_clients = trainer.world_size > 1 and hasattr(trainer.datamodule, "sampled_clients")
        if self.sharded_clients and self._every_n_train_steps:
            rank_zero_warn(
                "step_checkpoint: a federated run on several processes is checkpointed at round ends only "
                "(each rank is in the middle of another client between them)"
            )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.sharded_clients or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Nothing: the last task-end checkpoint is the run's final state (ModelCheckpoint would write
        ``last.ckpt`` once more here, after the epoch counter has moved past the last task)."""


class RunSettings(Callback):
    """Stores the run's :func:`settings_source` in every checkpoint, for the comparison ``plan fit
    --ckpt_path`` makes before it resumes."""

    def __init__(self, source: dict[str, Any]) -> None:
        self.source = source

    def state_dict(self) -> dict[str, Any]:
        return {"source": self.source}


def checkpoint_folder(trainer: pl.Trainer) -> Path | None:
    """Where the trainer's ModelCheckpoint will write, resolved as Lightning resolves it (explicit ``dirpath``;
    else the first logger's ``save_dir/name/version/checkpoints``; else ``default_root_dir/checkpoints``)."""
    callback = trainer.checkpoint_callback
    if callback is None:
        return None
    if callback.dirpath:
        return Path(callback.dirpath)
    if trainer.loggers:
        logger = trainer.loggers[0]
        version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
        return Path(logger.save_dir or trainer.default_root_dir) / str(logger.name) / version / "checkpoints"
    return Path(trainer.default_root_dir) / "checkpoints"
