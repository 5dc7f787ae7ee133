"""The error a run raises when it cannot go on."""


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. repeated non-finite losses, an unusable resume); the message says why."""
