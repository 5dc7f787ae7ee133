"""Greedy held-out accuracy, shared by ``postrl train``'s before/after evaluation."""

from __future__ import annotations

from typing import Any, Callable

from postrl.rollout.generator import Generator


def greedy_eval(
    generator: Generator,
    tokenizer,
    source: Any,
    samples: list[Any],
    render: Callable[[Any], list[int]],
    max_new_tokens: int,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Decode one greedy completion per sample and score it with the source.

    Returns ``{"accuracy", "reward_mean", "response_len_mean", "n", "examples"}``
    where ``accuracy`` is the fraction scored exactly correct by the source
    (score >= 1 - 1e-9, as ``source.is_correct``) and ``examples`` holds the first few completions.
    The greedy part of :func:`postrl.eval.runner.heldout_eval` (one code path with ``postrl eval``).
    """
    from postrl.eval.runner import heldout_eval

    return heldout_eval(generator, tokenizer, source, samples, render, max_new_tokens, batch_size)
