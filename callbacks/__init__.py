"""Lightning callbacks: the task sequencer, the forgetting logger, one continual-learning method per file, and
the federated round driver."""

from plan.callbacks.coto import ProgressiveActivation
from plan.callbacks.federated import FederatedRounds
from plan.callbacks.forgetting import ForgettingLogger
from plan.callbacks.inflora import InfLoRA
from plan.callbacks.olora import OLoRA
from plan.callbacks.plan_allocation import PLAN
from plan.callbacks.predictions import PredictionWriter
from plan.callbacks.progress import StageProgressBar
from plan.callbacks.sdlora import SDLoRA
from plan.callbacks.sequencer import TaskCallback, TaskSequencer
from plan.callbacks.subspace_memory import GradientProjection, SubspaceMemory

__all__ = [
    "PLAN",
    "FederatedRounds",
    "ForgettingLogger",
    "GradientProjection",
    "InfLoRA",
    "OLoRA",
    "PredictionWriter",
    "ProgressiveActivation",
    "SDLoRA",
    "StageProgressBar",
    "SubspaceMemory",
    "TaskCallback",
    "TaskSequencer",
]
