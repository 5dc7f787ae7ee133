"""What every prompt source is built on: :class:`Sample`, :class:`PromptSource`, :class:`DataError`.

A module of its own below :mod:`postrl.data.sources` (the built-in sources and their factory) and
:mod:`postrl.data.toy` (the toy tasks), so that both import it and neither imports the other's module
for its base class.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

from .answers import ANSWER_MODES, extract_answer

logger = logging.getLogger(__name__)

CORRECT_EPS = 1e-9


class DataError(ValueError):
    """Bad data configuration or malformed data (unknown task, bad kwargs, bad JSONL, ...)."""


@dataclass
class Sample:
    """One prompt with its ground truth.

    question: user-facing problem text (inserted into the prompt template as ``{question}``).
    answer:   ground-truth answer as a string.
    metadata: free-form (reasoning-gym entry metadata, task name, split, source index, extra JSONL fields).
    entry:    the raw reasoning-gym entry (needed by its scorer), None for other sources.
    uid:      stable id, e.g. ``basic_arithmetic/train/17`` or ``file.jsonl:12``.
    """

    question: str
    answer: str
    metadata: dict = field(default_factory=dict)
    entry: Optional[dict] = None
    uid: str = ""


def _check_mode(mode: str) -> str:
    if mode not in ANSWER_MODES:
        raise DataError(f"unknown answer_extraction {mode!r}; valid modes: {', '.join(ANSWER_MODES)}")
    return mode


class PromptSource:
    """Base class for prompt sources.

    Subclasses fill ``train``, ``eval`` and ``name`` and implement :meth:`_score_extracted`
    (or override :meth:`score`).
    """

    name: str = "source"

    def __init__(self, answer_extraction: str = "answer_tag"):
        self.answer_extraction = _check_mode(answer_extraction)
        self.train: list[Sample] = []
        self.eval: list[Sample] = []

    def extract(self, completion: str) -> Optional[str]:
        """The answer extracted from ``completion`` with this source's extraction mode."""
        try:
            return extract_answer(completion, self.answer_extraction)
        except Exception:  # pragma: no cover - extract_answer does not raise for text input
            return None

    def _score_extracted(self, extracted: str, sample: Sample) -> float:
        raise NotImplementedError

    def score(self, completion: str, sample: Sample, strict: bool = False) -> float:
        """Reward in [0, 1] for ``completion`` on ``sample``.

        Never raises unless ``strict``: then a failing scorer raises, so that the
        reward pipeline can count the failure (it still scores 0 there).
        """
        extracted = self.extract(completion)
        if extracted is None or extracted == "":
            return 0.0
        try:
            r = float(self._score_extracted(extracted, sample))
        except Exception as e:  # scorer bugs / timeouts must not crash training
            if strict:
                raise
            logger.debug("scoring failed for %s: %r", sample.uid, e)
            return 0.0
        if r != r:  # NaN
            return 0.0
        return min(1.0, max(0.0, r))

    def is_correct(self, completion: str, sample: Sample) -> bool:
        """Exact correctness (score == 1 up to 1e-9), used for accuracy."""
        return self.score(completion, sample) >= 1.0 - CORRECT_EPS

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, train={len(self.train)}, eval={len(self.eval)})"


def check_keyword_args(section: str, name: str, kwargs: dict, params: dict) -> None:
    """Raise :class:`DataError` when ``kwargs`` (config ``section``, e.g. ``data.sampler``, method ``name``) hold
    a key that is not in ``params`` (the method's keyword arguments with their defaults), listing the valid
    keys with their defaults."""
    bad = [k for k in kwargs if k not in params]
    if bad:
        valid = ", ".join(f"{k}={v!r}" for k, v in params.items()) or "(none)"
        raise DataError(f"{section} {name!r} got unknown keys {', '.join(map(repr, bad))}; valid keys with "
                        f"their defaults: {valid}")
