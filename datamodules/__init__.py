"""Datamodules: task sequences for continual learning, client streams for federated learning, and the data
sources both cut their data from."""

from plan.datamodules.continual import TaskLayout, TaskSequenceDataModule
from plan.datamodules.encoding import InstructionFormat
from plan.datamodules.federated import FederatedDataModule
from plan.datamodules.sources import (
    DatasetSequence,
    DataSource,
    ElectionTweets,
    Examples,
    FriendsSpeakers,
    HuggingFaceSource,
    InstructionSource,
    Reuters,
    SlovenianComments,
    SyntheticSource,
    TwentyNewsgroups,
)

__all__ = [
    "DataSource",
    "DatasetSequence",
    "ElectionTweets",
    "Examples",
    "FederatedDataModule",
    "FriendsSpeakers",
    "HuggingFaceSource",
    "InstructionFormat",
    "InstructionSource",
    "Reuters",
    "SlovenianComments",
    "SyntheticSource",
    "TaskLayout",
    "TaskSequenceDataModule",
    "TwentyNewsgroups",
]
