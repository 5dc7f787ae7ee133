"""Training loops and checkpoints."""

from .rl import RLTrainer, TrainingError, train

__all__ = ["RLTrainer", "TrainingError", "train"]
