"""Greedy held-out accuracy, shared by ``postrl train``'s before/after evaluation."""

from __future__ import annotations

from typing import Any, Callable

from postrl.rollout.generator import Generator, SamplingParams


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
    (``source.is_correct``) and ``examples`` holds the first few completions.
    """
    if not samples:
        return {"accuracy": float("nan"), "reward_mean": float("nan"), "response_len_mean": 0.0, "n": 0, "examples": []}
    was_training = generator.model.training
    generator.model.eval()
    try:
        out = generator.generate([render(s) for s in samples], SamplingParams(max_new_tokens, temperature=0.0),
                                 seed=0, batch_size=batch_size)
    finally:
        generator.model.train(was_training)
    texts = tokenizer.batch_decode(
        [ids[mask.bool()] for ids, mask in zip(out.completion_ids, out.completion_mask)], skip_special_tokens=True
    )
    correct = [source.is_correct(t, s) for t, s in zip(texts, samples)]
    scores = [source.score(t, s) for t, s in zip(texts, samples)]
    n = len(samples)
    return {
        "accuracy": sum(correct) / n,
        "reward_mean": sum(scores) / n,
        "response_len_mean": float(out.lengths.float().mean()),
        "n": n,
        "examples": [{"question": s.question, "answer": s.answer, "completion": t, "correct": c}
                     for s, t, c in list(zip(samples, texts, correct))[:5]],
    }
