"""Lightning callbacks: the task sequencer, the forgetting logger, and one continual-learning method per file."""

from plan.callbacks.forgetting import ForgettingLogger
from plan.callbacks.sequencer import TaskCallback, TaskSequencer

__all__ = ["ForgettingLogger", "TaskCallback", "TaskSequencer"]
