"""Evaluation: held-out greedy accuracy (pass@k and reports come with later issues)."""

from .accuracy import greedy_eval

__all__ = ["greedy_eval"]
