"""A trained run as files other tools load: the adapters in PEFT's format, plus what the model was trained on.

``plan export --ckpt_path C --output D`` (or :func:`export_checkpoint`) writes to ``D``:

* ``adapter_config.json`` and ``adapter_model.safetensors``: every LoRA layer's frozen stack and slot as one
  PEFT LoRA adapter (:func:`plan.lora.export_peft`); ``PeftModel.from_pretrained(AutoModel.from_pretrained(base), D)``
  reproduces the adapted backbone, with ``base`` the ``base_model_name_or_path`` the config names (for a language
  model: ``AutoModelForCausalLM``, and the config's ``task_type`` is ``CAUSAL_LM``);

for a classifier (:class:`plan.module.ContinualClassifier`):

* ``head.safetensors``: the classification head (``weight``, ``bias``) over ``labels.json``'s classes;
* ``labels.json``: the class names in head order, the classes of each task, the scenario, how the features
  are pooled, and how many tasks the checkpoint had trained;

for a language model (:class:`plan.language_model.ContinualLM`), which has no head:

* ``tasks.json``: the task names, the metric each task's generated answers are scored by, the answers' class
  names and each task's classes, the scenario, and how many tasks the checkpoint had trained.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import save_file

from plan.errors import ConfigError
from plan.lora import export_peft

if TYPE_CHECKING:
    from plan.module import AdaptedModule

CLASSIFIER = "plan.module.ContinualClassifier"  # what a checkpoint without ``plan_model`` (older ones) holds


def model_class(checkpoint: dict[str, Any], ckpt_path: str | Path) -> type[AdaptedModule]:
    """The plan model class that wrote ``checkpoint`` (:meth:`plan.module.AdaptedModule.on_save_checkpoint`
    records it), so that an LM checkpoint is not loaded as a classifier."""
    from plan.module import AdaptedModule

    name = str(checkpoint.get("plan_model", CLASSIFIER))
    module_name, _, class_name = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"export of '{ckpt_path}': its model class {name!r} cannot be imported ({err})") from err
    if not (isinstance(cls, type) and issubclass(cls, AdaptedModule)):
        raise ConfigError(f"export of '{ckpt_path}': its model class {name!r} is not a plan model")
    return cls


def export_checkpoint(ckpt_path: str | Path, directory: str | Path) -> Path:
    """Load a checkpoint of ``plan fit`` (classifier or language model) and export it to ``directory`` (see the
    module docstring)."""
    from plan.checkpoints import read_checkpoint

    checkpoint = read_checkpoint(Path(ckpt_path))  # a clear error for a file that is not a plan checkpoint
    hparams = checkpoint.get("hyper_parameters", {})
    if hparams.get("backbone_config") is not None or not isinstance(hparams.get("backbone"), str):
        raise ConfigError(
            f"export of '{ckpt_path}': its backbone was built from backbone_config with random weights, which "
            "checkpoints do not store; export needs a run whose backbone is a model name or folder"
        )
    module = model_class(checkpoint, ckpt_path).load_from_checkpoint(ckpt_path, map_location="cpu")
    directory = Path(directory)
    export_peft(module, directory, task_type=module.peft_task_type)
    layout = module.layout
    tasks_trained = checkpoint.get("TaskSequenceDataModule", {}).get("tasks_trained", layout.num_tasks)
    description: dict[str, Any] = {
        "class_names": layout.class_names,
        "task_classes": layout.task_classes,
        "task_names": layout.task_names,
        "scenario": layout.scenario,
        "tasks_trained": tasks_trained,
    }
    head = module.head_parameters()
    if not head:  # a language model: its tasks' metrics instead of a head and its labels
        description["metrics"] = layout.metrics
        (directory / "tasks.json").write_text(json.dumps(description, indent=2))
        return directory
    save_file({name: p.detach().contiguous() for name, p in head.items()}, str(directory / "head.safetensors"))
    description["pooling"] = getattr(module, "pooling", None)
    (directory / "labels.json").write_text(json.dumps(description, indent=2))
    return directory


def main(argv: list[str]) -> None:
    """``plan export --ckpt_path C --output D``."""
    parser = argparse.ArgumentParser(prog="plan export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by plan fit")
    parser.add_argument("--output", required=True, help="the folder to write")
    args = parser.parse_args(argv)
    directory = export_checkpoint(args.ckpt_path, args.output)
    written = "head, labels" if (directory / "labels.json").is_file() else "tasks"
    print(f"plan: exported {args.ckpt_path} to {directory} (PEFT adapter, {written})", file=sys.stderr)
