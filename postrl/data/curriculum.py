"""``rg_curriculum``: reasoning-gym's own curricula as a prompt sampler (``data.sampler: {name: rg_curriculum}``).

reasoning-gym registers a curriculum for most of its tasks (``reasoning_gym.factory.CURRICULA``): a list of
difficulty attributes (e.g. ``basic_arithmetic``: ``num_terms`` levels 2..6, ``num_digits`` levels 1..4), each
with levels, and ``generate_configuration()`` turns the current levels into the task's config. This sampler
drives that API rather than a hand-written ladder:

- every reasoning-gym task of the run (the single source, or each reasoning-gym entry of a mixture) starts
  at ``start_level`` (``curriculum.set_global_level``); other mixture entries are drawn uniformly from
  their training set;
- the prompts of a task at its current levels are a pool of ``pool`` problems made by
  ``create_dataset(task, **curriculum.generate_configuration(task_kwargs, context))`` with a seed derived
  from (data seed, task, levels), walked in a seeded permutation; ``range_mode`` is reasoning-gym's
  ``RangeAttributeMode`` (``inclusive``: levels 0..L, ``upper_bound``: level L only, ``last_k``);
- after each step the task's completions (reward ≥ ``success_threshold`` = success) enter a window of the
  last ``window`` completions; when the window is full and its success rate is ≥ ``promote_at`` the task
  moves up (``increment_global_level``), and with ``demote_at`` ≥ 0 it moves down when the rate is
  ≤ ``demote_at`` (``decrement_global_level``); the window empties on every move;
- a mixture picks each prompt's task with probability ``weight`` (``rng(seed, 6, batch)``).

The held-out set stays the source's own (the configured ``task_kwargs``): the curriculum is how the model
gets there. Scoring uses the source's scorer (the task's ``score_answer`` on the generated entry).
State: the levels, windows and the walk of each task, so a resumed run regenerates the same pools and
draws the same prompts.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections import deque
from typing import Any

import numpy as np

from .base import DataError, Sample
from .mixture import TASK_KEY, MixtureSource
from .sampler import PromptSampler
from .samplers import Sampler, _check, _rng, is_guided, register_sampler
from .sources import ReasoningGymSource

RANGE_MODES = ("inclusive", "upper_bound", "last_k")


class _Task:
    """One reasoning-gym task under its curriculum."""

    def __init__(self, name: str, source: ReasoningGymSource, tagged: bool, seed: int, pool: int, window: int,
                 start_level: int, context: Any):
        from reasoning_gym.factory import CURRICULA, create_curriculum

        if source.task not in CURRICULA:
            have = sorted(CURRICULA)
            raise DataError(f"rg_curriculum: reasoning-gym task {source.task!r} has no curriculum; tasks with one "
                            f"({len(have)}): {', '.join(have)}")
        self.name, self.source, self.tagged, self.seed, self.pool = name, source, tagged, seed, pool
        self.curriculum = create_curriculum(source.task)
        self.curriculum.set_global_level(start_level)
        self.context = context
        self.window: deque = deque(maxlen=window)
        controlled = set()
        for attr in self.curriculum.attributes.values():
            controlled.update(getattr(attr, n) for n in ("field_name", "lower_field_name", "upper_field_name")
                              if hasattr(attr, n))
        self.defaults = {k: v for k, v in source.task_kwargs.items() if k not in controlled}
        self._pools: dict[str, list[Sample]] = {}
        self.walk = PromptSampler(self.samples(), seed=self._pool_seed())

    @property
    def levels(self) -> dict[str, int]:
        return {a: self.curriculum.get_attr_level(a) for a in self.curriculum.attributes}

    @property
    def signature(self) -> str:
        return "-".join(str(v) for v in self.levels.values())

    def _pool_seed(self) -> int:
        return zlib.crc32(f"{self.seed}|{self.source.task}|{self.signature}".encode()) & 0x7FFFFFFF

    def samples(self) -> list[Sample]:
        """The pool of the current levels (generated once per level signature)."""
        sig = self.signature
        if sig not in self._pools:
            import reasoning_gym

            cfg = self.curriculum.generate_configuration(
                defaults={**self.defaults, "seed": self._pool_seed(), "size": self.pool}, context=self.context)
            try:
                ds = reasoning_gym.create_dataset(self.source.task, **dataclasses.asdict(cfg))
            except Exception as e:  # noqa: BLE001 - a task config the curriculum made that does not validate
                raise DataError(f"rg_curriculum: reasoning-gym task {self.source.task!r} at levels {self.levels} "
                                f"with task_kwargs {self.defaults}: {type(e).__name__}: {e}") from e
            level = self.curriculum.get_max_level()
            out = []
            for i in range(self.pool):
                entry = ds[i]
                meta = dict(entry.get("metadata") or {})
                meta.update(task=self.source.task, split="train", index=i, curriculum_level=level,
                            curriculum_levels=self.levels)
                if self.tagged:
                    meta[TASK_KEY] = self.name
                out.append(Sample(question=str(entry["question"]),
                                  answer=str(entry["answer"]) if entry.get("answer") is not None else "",
                                  metadata=meta, entry=entry, uid=f"{self.name}/curriculum/{sig}/{i}"))
            self._pools[sig] = out
        return self._pools[sig]

    def moved(self) -> None:
        self.window.clear()
        self.walk = PromptSampler(self.samples(), seed=self._pool_seed())


@register_sampler("rg_curriculum")
class ReasoningGymCurriculumSampler(Sampler):
    """See the module docstring."""

    def __init__(self, source: Any, seed: int = 0, group_size: int = 1, start_level: int = 0,
                 promote_at: float = 0.8, demote_at: float = -1.0, window: int = 64, pool: int = 512,
                 range_mode: str = "inclusive", last_k: int = 2, success_threshold: float = 1.0):
        super().__init__(source, seed, group_size)
        _check(isinstance(start_level, int) and start_level >= 0, "start_level", start_level, "must be an int >= 0")
        _check(0 < promote_at <= 1, "promote_at", promote_at, "must be in (0, 1]")
        _check(demote_at < promote_at, "demote_at", demote_at, f"must be < promote_at={promote_at} (< 0 = never)")
        _check(isinstance(window, int) and window >= 1, "window", window, "must be an int >= 1")
        _check(isinstance(pool, int) and pool >= 1, "pool", pool, "must be an int >= 1")
        _check(range_mode in RANGE_MODES, "range_mode", range_mode, f"must be one of {', '.join(RANGE_MODES)}")
        from reasoning_gym.coaching.base_curriculum import DefaultCurriculumContext, RangeAttributeMode

        context = DefaultCurriculumContext(mode=RangeAttributeMode(range_mode),
                                           k=last_k if range_mode == "last_k" else None)
        self.promote_at, self.demote_at, self.success_threshold = float(promote_at), float(demote_at), float(success_threshold)
        if isinstance(source, MixtureSource):
            parts = list(source.parts.items())
            self.names = [n for n, _ in parts]
            self.p = np.array([source.weights[n] for n in self.names], dtype=np.float64)
        elif isinstance(source, ReasoningGymSource):
            parts, self.names, self.p = [(source.task, source)], [source.task], np.ones(1)
        else:
            raise DataError("data.sampler rg_curriculum needs reasoning_gym tasks (data.source: reasoning_gym or "
                            f"reasoning_gym entries in data.mixture), got {type(source).__name__}")
        self.tasks: dict[str, _Task] = {}
        self.static: dict[str, PromptSampler] = {}
        tagged = isinstance(source, MixtureSource)
        for j, (name, part) in enumerate(parts):
            if isinstance(part, ReasoningGymSource):
                self.tasks[name] = _Task(name, part, tagged, self.seed, pool, window, start_level, context)
            else:
                train = [s for s in self.samples if s.metadata.get(TASK_KEY) == name]
                self.static[name] = PromptSampler(train, seed=self.seed + 7919 * (j + 1))
        if not self.tasks:
            raise DataError("data.sampler rg_curriculum needs at least one reasoning_gym task in the mixture")
        self.batches = 0

    def _next(self, name: str) -> Any:
        if name in self.tasks:
            return self.tasks[name].walk.next_batch(1)[0]
        return self.static[name].next_batch(1)[0]

    def next_batch(self, k: int) -> list[Any]:
        if len(self.names) == 1:
            self.batches += 1
            return [self._next(self.names[0]) for _ in range(k)]
        rng = _rng(self.seed, 6, self.batches)
        self.batches += 1
        picks = rng.choice(len(self.names), size=k, p=self.p / self.p.sum())
        return [self._next(self.names[j]) for j in picks]

    def task_of(self, sample: Any) -> str | None:
        meta = getattr(sample, "metadata", None) or {}
        if "curriculum_level" not in meta:
            return None
        return meta.get(TASK_KEY, self.names[0] if len(self.names) == 1 else None)

    def update(self, samples, rewards, advantages) -> None:
        touched = []
        for s, r in zip(samples, rewards):
            name = self.task_of(s)
            if name is None or name not in self.tasks or is_guided(s):
                continue
            self.tasks[name].window.append(float(r) >= self.success_threshold)
            if name not in touched:
                touched.append(name)
        for name in touched:
            t = self.tasks[name]
            if len(t.window) < t.window.maxlen:
                continue
            rate = sum(t.window) / len(t.window)
            if rate >= self.promote_at and t.curriculum.increment_global_level():
                t.moved()
                self._count(f"sampler/promoted/{name}")
            elif self.demote_at >= 0 and rate <= self.demote_at and t.curriculum.decrement_global_level():
                t.moved()
                self._count(f"sampler/demoted/{name}")

    def metrics(self) -> dict[str, float]:
        out = super().metrics()
        for name, t in self.tasks.items():
            out[f"sampler/level/{name}"] = float(t.curriculum.get_max_level())
            if t.window:
                out[f"sampler/window_success/{name}"] = sum(t.window) / len(t.window)
        return out

    def state_dict(self) -> dict:
        return {"sampler": self.name, "batches": self.batches,
                "tasks": {n: {"levels": t.levels, "window": [bool(x) for x in t.window], "walk": t.walk.state_dict()}
                          for n, t in self.tasks.items()},
                "static": {n: w.state_dict() for n, w in self.static.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._check_state(state)
        if set(state["tasks"]) != set(self.tasks) or set(state["static"]) != set(self.static):
            raise ValueError(f"rg_curriculum state is for tasks {sorted(state['tasks'])}, this run has "
                             f"{sorted(self.tasks)}")
        self.batches = int(state["batches"])
        for n, t in self.tasks.items():
            st = state["tasks"][n]
            for attr, level in st["levels"].items():
                t.curriculum.set_attr_level(attr, int(level))
            t.moved()
            t.window.extend(bool(x) for x in st["window"])
            t.walk.load_state_dict(st["walk"])
        for n, w in self.static.items():
            w.load_state_dict(state["static"][n])
