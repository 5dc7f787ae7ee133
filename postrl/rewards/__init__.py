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
from postrl.rewards.base import RewardBatch, RewardContext, RewardEntry, Scored  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

RewardFn = Callable[..., Any]
REWARDS: dict[str, RewardEntry] = {}


def register_reward(name: str, *, batched: bool = False, parallel: bool = False) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make a reward available as ``rewards: [{name: <name>, ...}]``.

    See :mod:`postrl.rewards.base` for the three shapes (per-completion function, batched
    function, batched class). ``parallel=True`` runs a per-completion function in a process
    pool with a per-call timeout.
    """
    if parallel and batched:
        raise ValueError(f"reward {name!r}: parallel=True applies to per-completion rewards, not batched ones")

    def deco(fn: RewardFn) -> RewardFn:
        if isinstance(fn, type) and not batched:
            raise ValueError(f"reward {name!r}: a class reward must be registered with batched=True")
        REWARDS[name] = RewardEntry(name=name, fn=fn, batched=batched, parallel=parallel)
        return fn

    return deco


def resolve_reward(name: str) -> RewardEntry:
    """A registered name, or ``package.module:function``; :class:`ConfigError` (a ValueError) otherwise.

    An imported callable that was decorated with :func:`register_reward` keeps its registered
    shape; an undecorated one is taken as a per-completion function.
    """
    _load_builtins()
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
        for entry in REWARDS.values():
            if entry.fn is fn:
                return entry
        return RewardEntry(name=name, fn=fn)
    close = difflib.get_close_matches(name, list(REWARDS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(
        f"Unknown reward {name!r}.{hint} Valid: {', '.join(sorted(REWARDS))}, or 'package.module:function'."
    )


_BUILTIN_MODULES = ("verifiers", "sql", "code", "bleu", "reward_model", "judge")


def _load_builtins() -> None:
    """Import the built-in reward modules (they register themselves); missing ones are skipped."""
    for mod in _BUILTIN_MODULES:
        try:
            importlib.import_module(f"postrl.rewards.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"postrl.rewards.{mod}":
                raise


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
            fn = resolve_reward(spec.name).fn
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
