"""Datamodules: task sequences for continual learning and the data sources they cut tasks from."""

from plan.datamodules.continual import TaskLayout, TaskSequenceDataModule
from plan.datamodules.sources import DataSource, Examples, HuggingFaceSource, SyntheticSource, TwentyNewsgroups

__all__ = [
    "DataSource",
    "Examples",
    "HuggingFaceSource",
    "SyntheticSource",
    "TaskLayout",
    "TaskSequenceDataModule",
    "TwentyNewsgroups",
]
