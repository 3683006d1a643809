"""Shared fixtures: a tiny random-weight continual run on synthetic data, as a YAML config for ``plan fit``."""

from __future__ import annotations

import copy
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

TINY_BERT = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 30522,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}

TINY_VIT = {
    "model_type": "vit",
    "image_size": 16,
    "patch_size": 4,
    "num_channels": 3,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}

TINY_RUN = {
    "seed_everything": 0,
    "trainer": {
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": None, "name": "tiny", "version": "v"},
        },
        "callbacks": [
            {"class_path": "plan.callbacks.TaskSequencer", "init_args": {"adapters": "stacked"}},
            {"class_path": "plan.callbacks.ForgettingLogger"},
        ],
    },
    "model": {
        "class_path": "plan.module.ContinualClassifier",
        "init_args": {
            "backbone_config": TINY_BERT,
            "lora": {"rank": 4, "alpha": 8, "target_modules": ["query", "value"]},
            "lr": 0.01,
        },
    },
    "data": {
        "class_path": "plan.datamodules.TaskSequenceDataModule",
        "init_args": {
            "source": {"class_path": "plan.datamodules.SyntheticSource", "init_args": {"num_classes": 6}},
            "classes_per_task": 2,
            "batch_size": 8,
            "passes_per_task": 2,
        },
    },
}


TINY_FEDERATED_RUN = {
    **TINY_RUN,
    "trainer": {
        **TINY_RUN["trainer"],
        "callbacks": [{"class_path": "plan.callbacks.FederatedRounds", "init_args": {"aggregation": "fedit"}}],
    },
    "checkpoint": {"filename": "round-{epoch}"},
    "data": {
        "class_path": "plan.datamodules.FederatedDataModule",
        "init_args": {
            "source": {"class_path": "plan.datamodules.SyntheticSource", "init_args": {"num_classes": 6}},
            "rounds": 3,
            "num_clients": 6,
            "clients_per_round": 4,
            "partition": "dirichlet",
            "alpha": 0.5,
            "batch_size": 8,
        },
    },
}


TINY_LLAMA_LM = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 49152,  # the embedded SmolLM2 tokenizer's, which the data is tokenised with
}

TINY_LM_SOURCE = {
    "class_path": "plan.datamodules.SyntheticSource",
    "init_args": {"num_classes": 4, "train_per_class": 4, "test_per_class": 2},
}

TINY_LM_RUN = {
    **TINY_RUN,
    "model": {
        "class_path": "plan.language_model.ContinualLM",
        "init_args": {"backbone_config": TINY_LLAMA_LM, "lora": {"rank": 4, "alpha": 8}, "lr": 0.01},
    },
    "data": {
        "class_path": "plan.datamodules.TaskSequenceDataModule",
        "init_args": {"source": TINY_LM_SOURCE, "classes_per_task": 2, "batch_size": 8},
    },
}

TINY_LM_FEDERATED_RUN = {
    **TINY_FEDERATED_RUN,
    "model": TINY_LM_RUN["model"],
    "data": {
        "class_path": "plan.datamodules.FederatedDataModule",
        "init_args": {
            "source": TINY_LM_SOURCE,
            "rounds": 2,
            "num_clients": 3,
            "clients_per_round": 2,
            "partition": "iid",
            "batch_size": 4,
        },
    },
}


class TinyRun:
    """Writes the tiny config (with nested overrides) under a folder and finds what a run left there."""

    def __init__(self, root: Path, base: dict = TINY_RUN) -> None:
        self.root = root
        self.base = base

    def config(self, name: str = "run", **overrides) -> Path:
        config = copy.deepcopy(self.base)
        config["trainer"]["logger"]["init_args"]["save_dir"] = str(self.root / name)
        for dotted, value in overrides.items():
            node, *path, leaf = [config, *dotted.split("__")]
            for key in path:
                node = node[key]
            node[leaf] = value
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def checkpoints(self, name: str = "run") -> Path:
        return self.root / name / "tiny" / "v" / "checkpoints"

    def last(self, name: str = "run") -> dict:
        return torch.load(self.checkpoints(name) / "last.ckpt", weights_only=False)

    def matrix(self, name: str = "run") -> torch.Tensor:
        return self.last(name)["callbacks"]["ForgettingLogger"]["matrix"]


@pytest.fixture
def tiny(tmp_path: Path) -> TinyRun:
    return TinyRun(tmp_path)


@pytest.fixture
def tiny_fed(tmp_path: Path) -> TinyRun:
    """The tiny run as a federation: 6 synthetic-data clients, 4 sampled per round, 3 rounds of FedIT."""
    return TinyRun(tmp_path, TINY_FEDERATED_RUN)


@pytest.fixture
def tiny_lm(tmp_path: Path) -> TinyRun:
    """The tiny run on a random 2-layer Llama trained on instructions: 2 tasks of 2 synthetic classes."""
    return TinyRun(tmp_path, TINY_LM_RUN)


@pytest.fixture
def tiny_lm_fed(tmp_path: Path) -> TinyRun:
    """The tiny language model as a federation: 3 clients, 2 sampled per round, 2 rounds of FedIT."""
    return TinyRun(tmp_path, TINY_LM_FEDERATED_RUN)


def task_trainer(root: Path, callbacks: list[Callback], max_epochs: int = -1) -> pl.Trainer:
    """A quiet CPU trainer with the one-epoch-one-task settings the CLI defaults to, for Python-API tests."""
    return pl.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        reload_dataloaders_every_n_epochs=1,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        default_root_dir=root,
        callbacks=callbacks,
    )


def plan_in_processes(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """The ``plan`` command in a child process (a DDP run launches its own workers), warnings silenced."""
    command = shutil.which("plan") or f"{sys.executable} -m plan.cli"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*command.split(), *args], capture_output=True, text=True, env=env, timeout=timeout)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fit_on_two_nodes(config) -> None:
    """``plan fit`` as two nodes of one process each, started as a cluster scheduler would start them."""
    command = shutil.which("plan") or f"{sys.executable} -m plan.cli"
    port = free_port()
    nodes = []
    for node in (0, 1):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
        env.update({"NODE_RANK": str(node), "LOCAL_RANK": "0", "PYTHONWARNINGS": "ignore"})
        arguments = ["fit", "--config", str(config), "--trainer.strategy", "ddp", "--trainer.devices", "1"]
        nodes.append(
            subprocess.Popen(
                [*command.split(), *arguments, "--trainer.num_nodes", "2"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        errors = [node.communicate(timeout=600)[1] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    if [node.returncode for node in nodes] != [0, 0]:
        raise RuntimeError(errors[0][-2000:] + errors[1][-2000:])
