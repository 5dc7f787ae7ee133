"""Task mixtures: several prompt sources in one run, each with its own scorer and weight (``data.mixture``).

A :class:`MixtureSource` is a :class:`PromptSource` whose ``train`` and ``eval`` are the concatenation of its
parts' splits. Every sample it hands out is a copy of its part's sample with

- ``metadata["task_name"]`` = the part's name (:data:`TASK_KEY`), so the name travels with the sample through
  rollouts, rewards, samplers and logs;
- ``uid`` = ``"<name>/<part uid>"`` (unique over the mixture).

``score(completion, sample)`` is the sample's own part's scorer (reasoning-gym's ``score_answer``,
math-verify, the toy positional match) with that part's answer extraction, so the ``task`` reward and the
held-out evaluation score every task as they would in a run of that task alone.

The weights are the parts' shares of the prompts under the uniform sampler
(:class:`postrl.data.samplers.UniformSampler`); the per-prompt samplers use them as a prior.

Per-task numbers: :func:`per_task_metrics` (training: ``reward/task/<name>``, ``accuracy/task/<name>``,
``groups/task/<name>``, ``zero_var/task/<name>``) and :func:`mixture_eval` (held-out: the overall numbers and
``tasks[<name>]``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

from .base import DataError, PromptSource, Sample

TASK_KEY = "task_name"


def task_name(sample: Any, default: Optional[str] = None) -> Optional[str]:
    """The mixture task a sample belongs to (``metadata["task_name"]``), else ``default``."""
    meta = getattr(sample, "metadata", None) or {}
    return meta.get(TASK_KEY, default)


def _tagged(sample: Sample, name: str) -> Sample:
    return dataclasses.replace(sample, metadata={**sample.metadata, TASK_KEY: name}, uid=f"{name}/{sample.uid}")


class MixtureSource(PromptSource):
    """Several named sources with weights; see the module docstring."""

    def __init__(self, parts: Sequence[tuple[str, float, PromptSource]], answer_extraction: str = "raw"):
        super().__init__(answer_extraction)
        if not parts:
            raise DataError("a task mixture needs at least one source")
        names = [name for name, _, _ in parts]
        if len(set(names)) != len(names):
            raise DataError(f"mixture task names must be unique, got {names}")
        for name, weight, source in parts:
            if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
                raise DataError(f"mixture task {name!r}: weight must be > 0, got {weight!r}")
            if not source.train:
                raise DataError(f"mixture task {name!r} has no training examples")
        self.parts = {name: source for name, _, source in parts}
        total = float(sum(w for _, w, _ in parts))
        self.weights = {name: float(w) / total for name, w, _ in parts}
        self.name = "mixture(" + "+".join(names) + ")"
        self.train = [_tagged(s, name) for name, _, src in parts for s in src.train]
        self.eval = [_tagged(s, name) for name, _, src in parts for s in src.eval]

    @property
    def task_names(self) -> list[str]:
        return list(self.parts)

    def part(self, sample: Any) -> PromptSource:
        name = task_name(sample)
        if name not in self.parts:
            raise DataError(f"sample {getattr(sample, 'uid', '?')!r} belongs to no task of {self.name} "
                            f"(metadata task_name={name!r})")
        return self.parts[name]

    def score(self, completion: str, sample: Sample, strict: bool = False) -> float:
        try:
            part = self.part(sample)
        except DataError:
            if strict:
                raise
            return 0.0
        return part.score(completion, sample, strict=strict)


def per_task_metrics(samples: Sequence[Any], rewards: Sequence[float], correct: Sequence[bool],
                     group_ids: Sequence[int], tasks: Sequence[str] = ()) -> dict[str, float]:
    """Training metrics per mixture task over the rows of one step: ``reward/task/<name>`` (mean reward),
    ``accuracy/task/<name>`` (share of exactly right completions), ``groups/task/<name>`` (prompts of the task
    in the step) and ``zero_var/task/<name>`` (share of those groups whose rewards are all equal). Rows of
    samples without a task name are left out; empty when there are none. ``tasks``: names that get
    ``groups/task/<name>`` = 0 when they have no row in the step (the others have no reward to report)."""
    rows: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        name = task_name(s)
        if name is not None:
            rows.setdefault(name, []).append(i)
    out: dict[str, float] = {f"groups/task/{name}": 0.0 for name in tasks}
    for name, idx in sorted(rows.items()):
        groups: dict[int, list[float]] = {}
        for i in idx:
            groups.setdefault(int(group_ids[i]), []).append(float(rewards[i]))
        out[f"reward/task/{name}"] = sum(float(rewards[i]) for i in idx) / len(idx)
        out[f"accuracy/task/{name}"] = sum(bool(correct[i]) for i in idx) / len(idx)
        out[f"groups/task/{name}"] = float(len(groups))
        out[f"zero_var/task/{name}"] = sum(max(g) - min(g) <= 1e-12 for g in groups.values()) / len(groups)
    return out


def mixture_eval(source: MixtureSource, evaluate: Callable[[list[Any]], dict[str, Any]]) -> dict[str, Any]:
    """Held-out evaluation per task: ``evaluate(samples)`` (e.g. :func:`postrl.eval.runner.heldout_eval` on a
    subset) is called once per task on its held-out samples; the result has the overall numbers (means over
    every held-out problem, i.e. weighted by the tasks' sizes: ``accuracy``, ``reward_mean``,
    ``response_len_mean``, ``format_rate``, ``pass@k``, ``sampled_reward_mean``), ``n``, the first task's
    ``examples`` and ``tasks`` = ``{name: that task's result}``."""
    tasks: dict[str, dict[str, Any]] = {}
    for name in source.task_names:
        samples = [s for s in source.eval if task_name(s) == name]
        if samples:
            tasks[name] = evaluate(samples)
    total = sum(r.get("n", 0) for r in tasks.values())
    out: dict[str, Any] = {"n": total, "tasks": tasks,
                           "examples": next((r.get("examples", []) for r in tasks.values()), [])}
    if total == 0:
        out.update(accuracy=float("nan"), reward_mean=float("nan"), response_len_mean=0.0)
        return out
    for key in ("accuracy", "reward_mean", "response_len_mean", "format_rate", "sampled_reward_mean"):
        if all(key in r for r in tasks.values()):
            out[key] = sum(float(r[key]) * r["n"] for r in tasks.values()) / total
    ks = [set((r.get("pass@k") or {}).keys()) for r in tasks.values()]
    if ks and all(ks) and all(k == ks[0] for k in ks):
        out["pass@k"] = {k: sum(float(r["pass@k"][k]) * r["n"] for r in tasks.values()) / total
                         for k in sorted(ks[0], key=lambda x: int(x))}
        out["samples_per_problem"] = next(iter(tasks.values())).get("samples_per_problem")
    return out


def task_eval_metrics(ev: dict[str, Any], prefix: str = "eval/") -> dict[str, float]:
    """``eval/accuracy/<task>`` and ``eval/reward_mean/<task>`` (and ``eval/pass@k/<task>``) of a
    :func:`mixture_eval` result; empty for a single-source result."""
    out: dict[str, float] = {}
    for name, r in (ev.get("tasks") or {}).items():
        for key in ("accuracy", "reward_mean"):
            if key in r:
                out[f"{prefix}{key}/{name}"] = float(r[key])
        for k, v in (r.get("pass@k") or {}).items():
            out[f"{prefix}pass@{k}/{name}"] = float(v)
    return out
