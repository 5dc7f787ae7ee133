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

Python objects are rewards too (docs/python-api.md): :class:`RewardPipeline` takes callables next to
:class:`postrl.config.RewardSpec` entries, and :func:`python_rewards` registers callables in-process
under generated names (``python:my_fn``) so that a config can name them. :func:`reward_entry` tells a
TRL-style function (``fn(prompts, completions, **kwargs) -> list[float]``) from a postrl one.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

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
    if name.startswith(PYTHON_PREFIX):
        raise ConfigError(
            f"rewards: {name!r} names a Python callable that was registered in-process (postrl.train(..., "
            "rewards=[fn]) or python_rewards()) and is not registered now; pass the same callable again with "
            "rewards=[...] (such names cannot be imported, e.g. by `postrl train --resume`).")
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            missing = getattr(exc, "name", None)
            why = (f"module {module_name!r} is not on the Python path (run from the directory that holds it, or "
                   "add that directory to PYTHONPATH)" if missing == module_name.split(".")[0] or missing == module_name
                   else f"importing module {module_name!r} failed: {exc}")
            raise ConfigError(f"rewards: cannot load {name!r}: {why}.") from exc
        except Exception as exc:  # noqa: BLE001 - the user's module raised while importing
            raise ConfigError(f"rewards: cannot load {name!r}: importing {module_name!r} raised "
                              f"{type(exc).__name__}: {exc}") from exc
        fn = getattr(module, attr, None)
        if fn is None:
            raise ConfigError(f"rewards: module {module_name!r} has no {attr!r} (its names: "
                              f"{', '.join(n for n in dir(module) if not n.startswith('_'))[:200]})")
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


# ----- Python objects as rewards ----------------------------------------------------------------------
PYTHON_PREFIX = "python:"
"""Prefix of the names that :func:`python_rewards` registers callables under."""

_SPEC_KEYS = ("fn", "name", "weight", "kwargs", "timeout_s", "failure_score")
_STYLE_HELP = (
    "a reward function must be one of: TRL-style `def f(prompts, completions, **kwargs) -> list[float]` (first "
    "parameter named prompts or completions, or **kwargs only; called once per batch with keyword arguments); "
    "postrl per-completion `def f(completion, sample, **kwargs) -> float`; postrl batched `def f(batch, **kwargs) "
    "-> list[float]`; or anything registered with @register_reward")


def reward_style(fn: Callable[..., Any]) -> str:
    """How to call an unregistered function, from its parameter names: ``"trl"``, ``"completion"`` or ``"batch"``.

    * ``"trl"``: the first parameter is named ``prompts`` or ``completions``, or the only parameters are
      ``**kwargs`` (and ``*args``). TRL passes everything by keyword, so the order of the others is free.
    * ``"completion"``: the first two parameters are ``completion, sample`` (postrl per-completion).
    * ``"batch"``: the first parameter is ``batch`` (postrl batched function, gets a :class:`RewardBatch`).

    Anything else raises :class:`TypeError` saying which shapes are valid.
    """
    label = getattr(fn, "__qualname__", None) or type(fn).__name__
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"reward {label}: cannot read its signature ({exc}); {_STYLE_HELP}") from None
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    named = [p.name for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    if (named and named[0] in ("prompts", "completions")) or (params and not named):
        return "trl"
    if named[:2] == ["completion", "sample"]:
        return "completion"
    if named[:1] == ["batch"]:
        return "batch"
    raise TypeError(f"reward {label}{sig}: cannot tell how to call it; {_STYLE_HELP}")


def _default_name(obj: Any) -> str:
    target = getattr(obj, "func", obj)  # functools.partial
    raw = getattr(target, "__name__", None) or type(target).__name__
    return PYTHON_PREFIX + (re.sub(r"[^A-Za-z0-9_.]+", "", raw) or "reward")


def reward_entry(obj: Any, name: Optional[str] = None) -> RewardEntry:
    """The :class:`RewardEntry` of a Python object passed as a reward.

    A function or class registered with :func:`register_reward` keeps its registered shape (and name,
    unless ``name`` is given). Any other callable is classified by :func:`reward_style`; its entry is named
    ``name`` or ``python:<its __name__>``. Raises :class:`TypeError` for a non-callable, an unregistered
    class, or a function of no known shape.
    """
    if isinstance(obj, RewardEntry):
        return obj if name is None else dataclasses.replace(obj, name=name)
    _load_builtins()
    for entry in REWARDS.values():
        if entry.fn is obj:
            return entry if name is None else dataclasses.replace(entry, name=name)
    if isinstance(obj, type):
        raise TypeError(f"reward class {obj.__qualname__} is not registered: decorate it with "
                        "@register_reward(NAME, batched=True) (it is built as cls(context=..., **kwargs))")
    if not callable(obj):
        raise TypeError(f"a reward must be callable, got {type(obj).__name__} {obj!r}; {_STYLE_HELP}")
    style = reward_style(obj)
    return RewardEntry(name=name or _default_name(obj), fn=obj, batched=style != "completion",
                       trl_style=style == "trl")


def _check_weight(weight: Any, where: str) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise TypeError(f"{where}: the weight must be a finite number, got {weight!r}")
    return float(weight)


def _parse_item(item: Any, where: str) -> tuple[Optional[Callable[..., Any]], dict[str, Any]]:
    """One ``rewards=`` item as (the callable or None, :class:`RewardSpec` fields)."""
    from postrl.config import RewardSpec

    if isinstance(item, RewardSpec):
        return None, {f.name: getattr(item, f.name) for f in dataclasses.fields(RewardSpec)}
    if isinstance(item, str):
        return None, {"name": item}
    if isinstance(item, tuple):
        if len(item) != 2:
            raise TypeError(f"{where}: a tuple must be (reward, weight), got {len(item)} items")
        fn, fields = _parse_item(item[0], where)
        fields["weight"] = _check_weight(item[1], where)
        return fn, fields
    if isinstance(item, Mapping):
        bad = [k for k in item if k not in _SPEC_KEYS]
        if bad:
            raise TypeError(f"{where}: unknown keys {bad} in {dict(item)!r}; valid: {', '.join(_SPEC_KEYS)}")
        fields = dict(item)
        fn = fields.pop("fn", None)
        if fn is None and not isinstance(fields.get("name"), str):
            raise TypeError(f"{where}: a dict needs 'fn' (a callable) or 'name' (a registered reward)")
        if fn is not None and not callable(fn):
            raise TypeError(f"{where}: 'fn' must be callable, got {type(fn).__name__}")
        if "weight" in fields:
            fields["weight"] = _check_weight(fields["weight"], where)
        return fn, fields
    if callable(item):
        return item, {}
    raise TypeError(f"{where}: {item!r} ({type(item).__name__}) is not a reward; give a callable, a (callable, "
                    "weight) tuple, a registered name, a RewardSpec or a dict with 'fn'")


def _items(rewards: Any) -> list[Any]:
    if isinstance(rewards, Mapping):  # {reward: weight}
        return list(rewards.items())
    pair = isinstance(rewards, tuple) and len(rewards) == 2 and isinstance(rewards[1], (int, float))
    if pair or isinstance(rewards, str) or callable(rewards) or not isinstance(rewards, Sequence):
        raise TypeError(f"rewards must be a list (or a dict {{reward: weight}}), got {type(rewards).__name__}: "
                        "write rewards=[fn] or rewards=[(fn, weight)]")
    return list(rewards)


def _resolve_items(rewards: Any) -> list[tuple[Any, RewardEntry, bool]]:
    """(RewardSpec, RewardEntry, given as a Python object) for each item of ``rewards``."""
    from postrl.config import RewardSpec

    out = []
    for i, item in enumerate(_items(rewards)):
        fn, fields = _parse_item(item, f"rewards[{i}]")
        if fn is None:
            spec = RewardSpec(**fields)
            out.append((spec, resolve_reward(spec.name), False))
        else:
            entry = reward_entry(fn, fields.pop("name", None))
            out.append((RewardSpec(name=entry.name, **fields), entry, True))
    return out


def reward_specs(rewards: Any) -> list[tuple[Any, RewardEntry]]:
    """``(RewardSpec, RewardEntry)`` for each item of ``rewards`` (the forms of :func:`python_rewards`), without
    registering anything; names resolve with :func:`resolve_reward`, objects with :func:`reward_entry`."""
    return [(spec, entry) for spec, entry, _ in _resolve_items(rewards)]


@contextmanager
def python_rewards(rewards: Any) -> Iterator[list[Any]]:
    """Register the Python callables of ``rewards`` for the ``with`` block; yields the :class:`RewardSpec` list.

    ``rewards`` is a list whose items are a callable, a ``(callable, weight)`` tuple, a registered name
    (``"format"``), a :class:`RewardSpec`, or a dict ``{"fn": callable, "weight": 1.0, "name": ..., "kwargs":
    {...}, "failure_score": ..., "timeout_s": ...}``; or a dict ``{callable_or_name: weight}``. A callable that
    is not registered yet is registered under its ``name`` or ``python:<__name__>`` (``#2``, ``#3``, ... when
    another callable holds that name) and unregistered on exit, so the specs can travel in a config.
    """
    items = _resolve_items(rewards)
    if not items:
        raise ConfigError("rewards: the list is empty; give at least one reward")
    added: list[str] = []
    try:
        for spec, entry, is_object in items:
            taken = REWARDS.get(entry.name)
            if not is_object or taken == entry:  # a name, or a callable registered under this name already
                continue
            if taken is not None and not entry.name.startswith(PYTHON_PREFIX):
                raise ConfigError(f"rewards: the name {entry.name!r} is taken by another registered reward; "
                                  "choose another name")
            name, k = entry.name, 1
            while name in REWARDS:
                k += 1
                name = f"{entry.name}#{k}"
            REWARDS[name] = dataclasses.replace(entry, name=name)
            added.append(name)
            spec.name = name
        yield [spec for spec, _, _ in items]
    finally:
        for name in added:
            REWARDS.pop(name, None)


def unregister_reward(name: str) -> None:
    """Remove a registered reward (no error when it is not registered)."""
    REWARDS.pop(name, None)


def trl_arguments(batch: RewardBatch) -> dict[str, Any]:
    """The keyword arguments of a TRL-style reward for ``batch``: one list per column, one entry per completion.

    ``prompts``, ``completions`` (text), ``completion_ids``, ``prompt_ids`` (lists of token ids; ``prompt_ids``
    is None when the batch has none), ``answer`` and ``question`` (from each :class:`postrl.data.Sample`), and
    one list per key of the samples' ``metadata`` dicts (None where a sample lacks the key; a key that is one of
    the names above is left out).
    """
    samples = batch.samples
    out: dict[str, Any] = {
        "prompts": list(batch.prompts),
        "completions": list(batch.completions),
        "completion_ids": [list(ids) for ids in batch.completion_ids],
        "prompt_ids": None if batch.prompt_ids is None else [list(ids) for ids in batch.prompt_ids],
        "answer": [getattr(s, "answer", None) for s in samples],
        "question": [getattr(s, "question", None) for s in samples],
    }
    metas = [getattr(s, "metadata", None) or {} for s in samples]
    for meta in metas:
        for key in meta:
            if isinstance(key, str) and key not in out:
                out[key] = [m.get(key) for m in metas]
    return out


def _call_trl(fn: Callable[..., Any], batch: RewardBatch, kwargs: dict[str, Any]) -> Any:
    """Call a TRL-style reward: all columns when it takes ``**kwargs``, else only the ones it names."""
    args = {**trl_arguments(batch), **kwargs}
    params = inspect.signature(fn).parameters.values()
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        names = {p.name for p in params}
        args = {k: v for k, v in args.items() if k in names}
    return fn(**args)



def check_reward_kwargs(entry: RewardEntry, kwargs: Mapping[str, Any], where: str) -> None:
    """Refuse ``kwargs`` that the reward's function (or class constructor) does not take, before anything runs:
    otherwise every call would fail and score the failure score. ``where`` names the config entry."""
    target = entry.fn.__init__ if entry.is_class else entry.fn
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):  # a builtin or C callable: nothing to check
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    fixed = 1 if entry.is_class else (1 if entry.batched else 2)  # self / batch / (completion, sample)
    names = [n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    accepted = [n for n in names[fixed:] if n not in ("context",)]
    unknown = sorted(set(kwargs) - set(accepted) - {"source"})
    if unknown:
        fn_name = getattr(entry.fn, "__qualname__", entry.name)
        raise ConfigError(f"{where} ({entry.name}): {fn_name} takes no argument {', '.join(map(repr, unknown))}; "
                          f"valid: {', '.join(accepted) or 'none'}")


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

    ``specs`` are :class:`postrl.config.RewardSpec` or Python rewards in any form that
    :func:`python_rewards` takes (a callable, ``(callable, weight)``, a dict with ``fn``; used without
    registering them); ``scoring`` a :class:`postrl.config.ScoringConfig` (defaults when None). Each
    completion's failure in one reward (exception, timeout, None/NaN) gives it that reward's failure
    score, is counted per reward and kind, and is logged once per kind; training goes on.
    """

    def __init__(self, specs: Sequence[Any], source: Any = None, scoring: Any = None,
                 context: RewardContext | None = None):
        from postrl.config import ScoringConfig

        self.scoring = scoring if scoring is not None else ScoringConfig()
        self.context = context if context is not None else RewardContext(source=source)
        if self.context.source is None:
            self.context.source = source
        pairs = reward_specs(specs)
        names = [spec.name for spec, _ in pairs]
        self.items: list[_Item] = []
        for i, (spec, entry) in enumerate(pairs):
            label = spec.name if names.count(spec.name) == 1 else f"{spec.name}.{i}"
            kwargs = dict(spec.kwargs)
            if entry.fn is task_reward:
                kwargs["source"] = self.context.source
            failure = spec.failure_score if spec.failure_score is not None else self.scoring.failure_score
            timeout = spec.timeout_s or self.scoring.timeout_s
            if not entry.trl_style:
                check_reward_kwargs(entry, spec.kwargs, f"rewards.{i}")
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
            if getattr(self.scoring, "executor", "local") == "ray":  # Ray actors (postrl/rewards/ray_executor.py)
                from postrl.rewards.ray_executor import RayPool

                self._pool = RayPool(self.scoring.workers, self.scoring.ray_address)
            else:
                from postrl.rewards.pool import TimeoutPool

                self._pool = TimeoutPool(self.scoring.workers)
        return self._pool

    def _on_ray(self, item: _Item) -> bool:
        """A batched reward that scoring.executor=ray runs on the actors (scoring.ray_batched)."""
        s = self.scoring
        return (getattr(s, "executor", "local") == "ray" and s.workers > 0 and item.entry.name in s.ray_batched
                and not item.entry.trl_style)

    def _run_item(self, item: _Item, batch: RewardBatch) -> list[Any]:
        """Raw answers (values, Scored, or exceptions) for every completion of the batch."""
        n = len(batch)
        if item.entry.batched and self._on_ray(item):
            from postrl.rewards.ray_executor import RemoteRewardError

            answers = self._pool_for().score_batched(item.entry.fn, item.entry.is_class, item.kwargs, batch,
                                                     item.timeout_s)
            return [_PoolError(a.kind, str(a)) if isinstance(a, RemoteRewardError) else a for a in answers]
        if item.entry.batched:
            if item.obj is not None:
                call = item.obj
            elif item.entry.trl_style:
                call = lambda b: _call_trl(item.entry.fn, b, item.kwargs)  # noqa: E731
            else:
                call = lambda b: item.entry.fn(b, **item.kwargs)  # noqa: E731
            try:
                raw = call(batch)
            except Exception as exc:  # noqa: BLE001 - isolation: this reward fails for the batch
                return [exc] * n
            fn_name = getattr(item.entry.fn, "__qualname__", None) or type(item.entry.fn).__name__
            if isinstance(raw, (str, bytes, Mapping)) or not hasattr(raw, "__iter__"):
                return [_Failure(f"reward {item.label!r} ({fn_name}) returned {type(raw).__name__}, expected one "
                                 f"value per completion ({n})")] * n
            out = list(raw)
            if len(out) != n:
                return [_Failure(f"reward {item.label!r} ({fn_name}) returned {len(out)} values for {n} "
                                 "completions")] * n
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
                 completion_ids: Sequence[Sequence[int]] | None = None, group_size: int = 1,
                 prompt_ids: Sequence[Sequence[int]] | None = None) -> RewardResult:
        """Score plain lists: ``prompts`` are text (default empty strings), ``completion_ids`` default to empty
        lists, ``prompt_ids`` to None. A prompt that is not a str raises :class:`TypeError`."""
        n = len(completions)
        batch = RewardBatch(prompts=list(prompts) if prompts is not None else [""] * n,
                            completions=list(completions),
                            completion_ids=[list(x) for x in completion_ids] if completion_ids is not None
                            else [[] for _ in range(n)],
                            samples=list(samples),
                            prompt_ids=[list(x) for x in prompt_ids] if prompt_ids is not None else None)
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
