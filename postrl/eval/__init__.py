"""Evaluation: pass@k / maj@k / diversity metrics, the evaluation runner (``postrl eval`` and the
trainer's held-out evaluation), task specs, and reports."""

from .accuracy import greedy_eval
from .runner import heldout_eval

__all__ = ["greedy_eval", "heldout_eval"]
