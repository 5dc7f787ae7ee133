"""The run lifecycle, owned once: run directory, resume, RNG, metrics and trackers, atomic checkpoints,
Ctrl-C, the non-finite streak, results and the ``final/`` model, for every training command.

A trainer is a :class:`Job` (its step, state and evaluation); :func:`run_job` drives it.
"""

from postrl.run.errors import TrainingError
from postrl.run.lifecycle import Job, Run, RunState, StepOutput, run_job

__all__ = ["Job", "Run", "RunState", "StepOutput", "TrainingError", "run_job"]
