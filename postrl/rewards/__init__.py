"""Rewards: named functions that score completions, run safely and combined.

See :mod:`postrl.rewards.base` for the protocol (per-completion functions, batched functions,
batched classes). Register one with :func:`register_reward` or name it in a config as
``module:function``. :class:`RewardPipeline` runs the configured rewards on a
:class:`RewardBatch` and combines them (``scoring.normalize``); an exception, a timeout or a
non-finite value from one reward for one completion gives that completion the failure score,
is counted per reward and error kind, is logged once per kind, and never stops training.
Per-completion rewards registered with ``parallel=True`` run in a process pool
(:mod:`postrl.rewards.pool`) with a per-call timeout. Built-in rewards live in the modules
``verifiers``, ``sql``, ``code`` (through :mod:`postrl.rewards.sandbox`), ``bleu``,
``reward_model`` and ``judge``; docs/rewards.md lists them.
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

from postrl.algorithms.reward_combine import combine_lists
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
    """Per-completion totals and per-reward components, plus failure and status counts.

    total:      the combined reward per completion (``scoring.normalize``).
    components: raw value per reward label per completion (failures hold the failure score).
    failed:     per reward label, which completions failed (exception, timeout, non-finite).
    errors:     (reward label, error kind) -> count; kinds are exception class names, ``Timeout``...
    statuses:   (reward label, status) -> count, from ``Scored.info["status"]``.
    infos:      per reward label, the ``Scored.info`` dict of each completion (empty when none).
    """

    total: list[float]
    components: dict[str, list[float]]
    errors: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    failed: dict[str, list[bool]] = field(default_factory=dict)
    infos: dict[str, list[dict]] = field(default_factory=dict)


@dataclass
class _Item:
    label: str
    entry: RewardEntry
    weight: float
    kwargs: dict
    timeout_s: float
    failure_score: float
    obj: Any = None  # the instance, for class rewards


class _Failure(Exception):
    """A reward's answer that is not a usable value (None, NaN, wrong type)."""


def _as_value(raw: Any) -> tuple[float, dict]:
    if isinstance(raw, Scored):
        value, info = raw.score, dict(raw.info)
    elif raw is None:
        raise _Failure("reward returned None (failed)")
    else:
        value, info = raw, {}
    if isinstance(value, bool):
        value = float(value)
    if not isinstance(value, (int, float)) and not (hasattr(value, "item") and getattr(value, "ndim", 1) == 0):
        raise _Failure(f"reward returned {type(value).__name__}, expected a float or Scored")
    value = float(value)
    if not math.isfinite(value):
        raise _Failure(f"reward returned a non-finite value {value}")
    return value, info


class RewardPipeline:
    """Runs the configured rewards on a batch and combines them; failures are isolated.

    ``specs`` are :class:`postrl.config.RewardSpec`; ``scoring`` a
    :class:`postrl.config.ScoringConfig` (defaults when None). Each completion's failure in one
    reward (exception, timeout, None/NaN) gives it that reward's failure score, is counted per
    reward and kind, and is logged once per kind; training goes on.
    """

    def __init__(self, specs: Sequence[Any], source: Any = None, scoring: Any = None,
                 context: RewardContext | None = None):
        from postrl.config import ScoringConfig

        self.scoring = scoring if scoring is not None else ScoringConfig()
        self.context = context if context is not None else RewardContext(source=source)
        if self.context.source is None:
            self.context.source = source
        names = [spec.name for spec in specs]
        self.items: list[_Item] = []
        for i, spec in enumerate(specs):
            entry = resolve_reward(spec.name)
            label = spec.name if names.count(spec.name) == 1 else f"{spec.name}.{i}"
            kwargs = dict(spec.kwargs)
            if entry.fn is task_reward:
                kwargs["source"] = self.context.source
            failure = spec.failure_score if spec.failure_score is not None else self.scoring.failure_score
            timeout = spec.timeout_s or self.scoring.timeout_s
            item = _Item(label, entry, float(spec.weight), kwargs, float(timeout), float(failure))
            if entry.is_class:
                try:
                    item.obj = entry.fn(context=self.context, **kwargs)
                except TypeError as exc:
                    raise ConfigError(f"rewards.{i} ({spec.name}): bad arguments {sorted(kwargs)}: {exc}") from exc
            self.items.append(item)
        self.weights = {it.label: it.weight for it in self.items}
        self._pool = None
        self._logged: set[tuple[str, str]] = set()

    # ----- running each kind of reward -------------------------------------------------------------
    def _pool_for(self) -> Any:
        if self._pool is None:
            from postrl.rewards.pool import TimeoutPool

            self._pool = TimeoutPool(self.scoring.workers)
        return self._pool

    def _run_item(self, item: _Item, batch: RewardBatch) -> list[Any]:
        """Raw answers (values, Scored, or exceptions) for every completion of the batch."""
        n = len(batch)
        if item.entry.batched:
            call = item.obj if item.obj is not None else (lambda b: item.entry.fn(b, **item.kwargs))
            try:
                out = list(call(batch))
            except Exception as exc:  # noqa: BLE001 - isolation: this reward fails for the batch
                return [exc] * n
            if len(out) != n:
                err = _Failure(f"batched reward returned {len(out)} values for {n} completions")
                return [err] * n
            return out
        if item.entry.parallel and self.scoring.workers > 0:
            kwargs = {k: v for k, v in item.kwargs.items() if k != "source"}
            args = [(text, sample) for text, sample in zip(batch.completions, batch.samples)]
            if "source" in item.kwargs:  # the task reward: the source object travels with each call
                kwargs["source"] = item.kwargs["source"]
            results = self._pool_for().run(item.entry.fn, args, kwargs, timeout_s=item.timeout_s)
            return [r.value if r.ok else _PoolError(r.kind, r.message) for r in results]
        out = []
        for text, sample in zip(batch.completions, batch.samples):
            try:
                out.append(item.entry.fn(text, sample, **item.kwargs))
            except Exception as exc:  # noqa: BLE001 - isolation is the point
                out.append(exc)
        return out

    def score(self, batch: RewardBatch, group_size: int = 1) -> RewardResult:
        """Score a :class:`RewardBatch`; ``group_size`` = completions per prompt (for normalization)."""
        components: dict[str, list[float]] = {}
        failed: dict[str, list[bool]] = {}
        infos: dict[str, list[dict]] = {}
        errors: Counter = Counter()
        statuses: Counter = Counter()
        for item in self.items:
            values, fails, item_infos = [], [], []
            for raw in self._run_item(item, batch):
                info: dict = raw.info if isinstance(raw, Scored) and isinstance(raw.info, dict) else {}
                try:
                    if isinstance(raw, BaseException):
                        raise raw
                    value, info = _as_value(raw)
                    fail = False
                except Exception as exc:  # noqa: BLE001
                    kind = exc.kind if isinstance(exc, _PoolError) else (
                        "InvalidValue" if isinstance(exc, _Failure) else type(exc).__name__)
                    errors[(item.label, kind)] += 1
                    if (item.label, kind) not in self._logged:
                        self._logged.add((item.label, kind))
                        log.warning("reward %r failed with %s: %s (scored %s; logged once per kind)",
                                    item.label, kind, exc, item.failure_score)
                    value, fail = item.failure_score, True
                status = info.get("status") if isinstance(info, dict) else None
                if isinstance(status, str):
                    statuses[(item.label, status)] += 1
                values.append(value)
                fails.append(fail)
                item_infos.append(info if isinstance(info, dict) else {})
            components[item.label] = values
            failed[item.label] = fails
            infos[item.label] = item_infos
        total = combine_lists(components, self.weights, group_size, self.scoring.normalize, self.scoring.eps)
        return RewardResult(total=total, components=components, errors=errors, statuses=statuses,
                            failed=failed, infos=infos)

    def __call__(self, completions: Sequence[str], samples: Sequence[Any], prompts: Sequence[str] | None = None,
                 completion_ids: Sequence[Sequence[int]] | None = None, group_size: int = 1) -> RewardResult:
        """Score plain lists (prompts and token ids default to empty)."""
        n = len(completions)
        batch = RewardBatch(prompts=list(prompts) if prompts is not None else [""] * n,
                            completions=list(completions),
                            completion_ids=[list(x) for x in completion_ids] if completion_ids is not None
                            else [[] for _ in range(n)],
                            samples=list(samples))
        return self.score(batch, group_size=group_size)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        for item in self.items:
            if item.obj is not None and hasattr(item.obj, "close"):
                try:
                    item.obj.close()
                except Exception:  # noqa: BLE001
                    pass


class _PoolError(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
