"""Evaluation: pass@k / maj@k / diversity metrics, the evaluation runner (``postrl eval`` and the
trainer's held-out evaluation), task specs, and reports."""

from .runner import heldout_eval

__all__ = ["heldout_eval"]
