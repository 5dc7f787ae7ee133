"""Training loops and checkpoints."""

from postrl.run.errors import TrainingError

from .rl import RLTrainer, train

__all__ = ["RLTrainer", "TrainingError", "train"]
