"""Rewards: named functions that score completions, isolated from each other.

A reward is a function ``fn(completion: str, sample: Sample, **kwargs) -> float``.
Register one with :func:`register_reward` or name it in a config as
``module:function``. :class:`RewardPipeline` computes the weighted sum of the
configured rewards; an exception or a non-finite value from one reward for one
completion gives that completion the failure score (0), is counted per reward
and error kind, is logged once per kind, and never stops training.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from postrl.config import ConfigError

log = logging.getLogger(__name__)

RewardFn = Callable[..., float]
REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make ``fn`` available as ``rewards: [{name: <name>}]``."""

    def deco(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn

    return deco


def resolve_reward(name: str) -> RewardFn:
    """A registered name, or ``package.module:function``; :class:`ConfigError` (a ValueError) otherwise."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"rewards: cannot import {name!r} ({exc}); use 'package.module:function'.") from exc
        if not callable(fn):
            raise ConfigError(f"rewards: {name!r} is not callable")
        return fn
    close = difflib.get_close_matches(name, list(REWARDS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(
        f"Unknown reward {name!r}.{hint} Valid: {', '.join(sorted(REWARDS))}, or 'package.module:function'."
    )


@register_reward("task")
def task_reward(completion: str, sample: Any, *, source: Any) -> float:
    """The prompt source's own scorer (reasoning-gym's ``score_answer``, math-verify for JSONL)."""
    return source.score(completion, sample, strict=True)


@dataclass
class RewardResult:
    """Per-completion totals and per-reward components, plus failure counts."""

    total: list[float]
    components: dict[str, list[float]]
    errors: Counter = field(default_factory=Counter)  # (reward name, error kind) -> count


class RewardPipeline:
    """Weighted sum of named rewards with per-completion failure isolation."""

    def __init__(self, specs: Sequence[Any], source: Any, failure_score: float = 0.0):
        self.items: list[tuple[str, float, RewardFn, dict]] = []
        for spec in specs:
            fn = resolve_reward(spec.name)
            kwargs = dict(spec.kwargs)
            if fn is task_reward:
                kwargs["source"] = source
            self.items.append((spec.name, float(spec.weight), fn, kwargs))
        self.failure_score = failure_score
        self._logged: set[tuple[str, str]] = set()

    def __call__(self, completions: Sequence[str], samples: Sequence[Any]) -> RewardResult:
        totals = [0.0] * len(completions)
        components: dict[str, list[float]] = {}
        errors: Counter = Counter()
        for name, weight, fn, kwargs in self.items:
            values = []
            for text, sample in zip(completions, samples):
                try:
                    value = float(fn(text, sample, **kwargs))
                    if not math.isfinite(value):
                        raise ValueError(f"reward returned a non-finite value {value}")
                except Exception as exc:  # noqa: BLE001 - isolation is the point
                    kind = type(exc).__name__
                    errors[(name, kind)] += 1
                    if (name, kind) not in self._logged:
                        self._logged.add((name, kind))
                        log.warning("reward %r failed with %s: %s (scored %s; logged once per kind)",
                                    name, kind, exc, self.failure_score)
                    value = self.failure_score
                values.append(value)
            components[name] = values
            totals = [t + weight * v for t, v in zip(totals, values)]
        return RewardResult(total=totals, components=components, errors=errors)
