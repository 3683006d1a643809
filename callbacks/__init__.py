"""Lightning callbacks: the task sequencer, the forgetting logger, and one continual-learning method per file."""

from plan.callbacks.coto import ProgressiveActivation
from plan.callbacks.forgetting import ForgettingLogger
from plan.callbacks.inflora import InfLoRA
from plan.callbacks.olora import OLoRA
from plan.callbacks.plan_allocation import PLAN
from plan.callbacks.sequencer import TaskCallback, TaskSequencer
from plan.callbacks.subspace_memory import GradientProjection, SubspaceMemory

__all__ = [
    "PLAN",
    "ForgettingLogger",
    "GradientProjection",
    "InfLoRA",
    "OLoRA",
    "ProgressiveActivation",
    "SubspaceMemory",
    "TaskCallback",
    "TaskSequencer",
]
