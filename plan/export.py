"""A trained run as files other tools load: the adapters in PEFT's format, the head, and the label names.

``plan export --ckpt_path C --output D`` (or :func:`export_checkpoint`) writes to ``D``:

* ``adapter_config.json`` and ``adapter_model.safetensors``: every LoRA layer's frozen stack and slot as one
  PEFT LoRA adapter (:func:`plan.lora.export_peft`); ``PeftModel.from_pretrained(AutoModel.from_pretrained(base), D)`` reproduces the
  adapted backbone, with ``base`` the ``base_model_name_or_path`` the config names;
* ``head.safetensors``: the classification head (``weight``, ``bias``) over ``labels.json``'s classes;
* ``labels.json``: the class names in head order, the classes of each task, the scenario, how the features
  are pooled, and how many tasks the checkpoint had trained.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from plan.errors import ConfigError
from plan.lora import export_peft


def export_checkpoint(ckpt_path: str | Path, directory: str | Path) -> Path:
    """Load a classifier checkpoint of ``plan fit`` and export it to ``directory`` (see the module docstring)."""
    from plan.checkpoints import read_checkpoint
    from plan.module import ContinualClassifier

    checkpoint = read_checkpoint(Path(ckpt_path))  # a clear error for a file that is not a plan checkpoint
    hparams = checkpoint.get("hyper_parameters", {})
    if hparams.get("backbone_config") is not None or not isinstance(hparams.get("backbone"), str):
        raise ConfigError(
            f"export of '{ckpt_path}': its backbone was built from backbone_config with random weights, which "
            "checkpoints do not store; export needs a run whose backbone is a model name or folder"
        )
    module = ContinualClassifier.load_from_checkpoint(ckpt_path, map_location="cpu")
    directory = Path(directory)
    export_peft(module, directory)
    save_file(
        {name: p.detach().contiguous() for name, p in module.head.named_parameters()},
        str(directory / "head.safetensors"),
    )
    layout = module.layout
    tasks_trained = checkpoint.get("TaskSequenceDataModule", {}).get("tasks_trained", layout.num_tasks)
    labels = {
        "class_names": layout.class_names,
        "task_classes": layout.task_classes,
        "task_names": layout.task_names,
        "scenario": layout.scenario,
        "tasks_trained": tasks_trained,
        "pooling": module.pooling,
    }
    (directory / "labels.json").write_text(json.dumps(labels, indent=2))
    return directory


def main(argv: list[str]) -> None:
    """``plan export --ckpt_path C --output D``."""
    parser = argparse.ArgumentParser(prog="plan export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by plan fit")
    parser.add_argument("--output", required=True, help="the folder to write")
    args = parser.parse_args(argv)
    directory = export_checkpoint(args.ckpt_path, args.output)
    print(f"plan: exported {args.ckpt_path} to {directory} (PEFT adapter, head, labels)", file=sys.stderr)
