"""Datamodules: task sequences for continual learning, client streams for federated learning, and the data
sources both cut their data from."""

from plan.datamodules.continual import TaskLayout, TaskSequenceDataModule
from plan.datamodules.federated import FederatedDataModule
from plan.datamodules.sources import DataSource, Examples, HuggingFaceSource, SyntheticSource, TwentyNewsgroups

__all__ = [
    "DataSource",
    "Examples",
    "FederatedDataModule",
    "HuggingFaceSource",
    "SyntheticSource",
    "TaskLayout",
    "TaskSequenceDataModule",
    "TwentyNewsgroups",
]
