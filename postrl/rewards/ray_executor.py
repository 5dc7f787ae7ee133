"""Reward functions on Ray actors (``scoring.executor: ray``), on this machine or on a Ray cluster.

:class:`RayPool` has the interface and the guarantees of :class:`postrl.rewards.pool.TimeoutPool`:
``run(fn, arg_list, kwargs, timeout_s) -> [TaskResult]`` in input order, at most ``workers`` calls in flight
(one per actor), an exception in a call is reported as that call's error and the actor lives on, a call that
runs past ``timeout_s`` gets its actor killed (``ray.kill``) and replaced and is reported as ``"Timeout"``, an
actor that dies (segfault, ``os._exit``, a lost node) gives ``"WorkerDied"``. Starting an actor and loading
the function into it are not counted in any call's time (``startup_timeout_s`` bounds them).

Batched rewards listed in ``scoring.ray_batched`` (default: the code reward, whose sandbox is the CPU-heavy
part of a code-RL step) run there too: the batch is cut into ``workers`` contiguous chunks and each chunk is
scored by the reward's own object, built once per actor (:func:`score_chunk`); a chunk's time limit is the
reward's ``timeout_s`` times its number of completions.

Ray is an optional dependency (``pip install 'postrl[ray]'``). Without ``scoring.ray_address`` a Ray instance
is started on this machine (or the one this process already joined is used); with an address such as
``ray://head:10001`` or ``auto`` the actors run on that cluster (docs/scaling.md).
"""

from __future__ import annotations

import time
import traceback
from typing import Any, Callable, Optional, Sequence

from postrl.rewards.pool import TaskResult

_OBJECTS: dict[Any, Any] = {}  # inside an actor: the batched reward objects built there, by (fn, kwargs)


def _import_ray():
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - the config check refuses executor=ray first
        raise ImportError("scoring.executor=ray needs Ray: pip install 'postrl[ray]'") from exc
    return ray


def score_chunk(reward_fn: Any, is_class: bool, kwargs: dict[str, Any], batch: Any) -> list[Any]:
    """Score ``batch`` (a :class:`postrl.rewards.RewardBatch`) with a batched reward, inside an actor. A class
    reward is built once per actor and kept; exceptions propagate (the pool reports them for the chunk)."""
    if not is_class:
        return list(reward_fn(batch, **kwargs))
    key = (reward_fn, repr(sorted(kwargs.items())))
    if key not in _OBJECTS:
        _OBJECTS[key] = reward_fn(context=None, **kwargs)
    return list(_OBJECTS[key](batch))


class _Actor:
    """One reward worker: holds the function it was given and calls it, reporting exceptions as values."""

    def __init__(self) -> None:
        self.fn: Optional[Callable[..., Any]] = None

    def load(self, fn: Callable[..., Any]) -> str:
        self.fn = fn  # unpickled (its module imported) here, outside any call's time limit
        return "loaded"

    def call(self, args: tuple, kwargs: dict) -> tuple:
        try:
            return ("ok", self.fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - reported to the trainer; the actor lives on
            return ("err", type(exc).__name__, f"{exc}"[:2000] or traceback.format_exc(limit=2)[-2000:])


class RayPool:
    """``workers`` Ray actors; :meth:`run` maps a function over argument tuples with a per-call timeout."""

    def __init__(self, workers: int = 2, address: Optional[str] = None, startup_timeout_s: float = 120.0,
                 num_cpus_per_worker: float = 1.0) -> None:
        if workers < 1:
            raise ValueError(f"RayPool needs workers >= 1, got {workers}")
        ray = _import_ray()
        self._owns = not ray.is_initialized()
        if self._owns:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        self.size, self.startup_timeout_s = workers, startup_timeout_s
        self._actor_cls = ray.remote(num_cpus=num_cpus_per_worker, max_restarts=0)(_Actor)
        self._idle: list[tuple[Any, Any]] = []  # (actor, the function it holds)
        self.restarts = 0  # actors killed (timeouts) or lost (crashes) and replaced

    def _ready(self, fn: Callable[..., Any]) -> tuple[Any, Optional[TaskResult]]:
        """An idle actor holding ``fn`` (started and loaded when needed), or the failure to get one."""
        ray = _import_ray()
        actor, held = self._idle.pop() if self._idle else (self._actor_cls.remote(), None)
        if held is fn:
            return actor, None
        try:
            ray.get(actor.load.remote(fn), timeout=self.startup_timeout_s)
        except Exception as exc:  # noqa: BLE001 - unpicklable function, actor that did not start in time
            self._kill(actor)
            kind = "Timeout" if type(exc).__name__ == "GetTimeoutError" else type(exc).__name__
            return None, TaskResult(False, kind=kind, message=f"cannot load the function on a Ray actor: {exc}"[:2000])
        return actor, None

    def _kill(self, actor: Any) -> None:
        try:
            _import_ray().kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def run(self, fn: Callable[..., Any], arg_list: Sequence[tuple], kwargs: Optional[dict] = None,
            timeout_s: float = 10.0) -> list[TaskResult]:
        """``fn(*args, **kwargs)`` for each ``args``; results in input order (see the module docstring)."""
        ray = _import_ray()
        kwargs = kwargs or {}
        results: list[Optional[TaskResult]] = [None] * len(arg_list)
        pending = list(range(len(arg_list)))[::-1]
        busy: dict[Any, tuple[Any, int, float]] = {}  # object ref -> (actor, task index, deadline)
        while pending or busy:
            while pending and len(busy) < self.size:
                i = pending.pop()
                actor, failed = self._ready(fn)
                if failed is not None:
                    results[i] = failed
                    self.restarts += 1
                    continue
                busy[actor.call.remote(tuple(arg_list[i]), kwargs)] = (actor, i, time.monotonic() + timeout_s)
            if not busy:
                continue
            wait_s = max(0.0, min(d for _, _, d in busy.values()) - time.monotonic())
            done, _ = ray.wait(list(busy), num_returns=1, timeout=wait_s)
            for ref in done:
                actor, i, _ = busy.pop(ref)
                try:
                    msg = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - the actor died (RayActorError) or its result was lost
                    results[i] = TaskResult(False, kind="WorkerDied", message=f"{type(exc).__name__}: {exc}"[:2000])
                    self._kill(actor)
                    self.restarts += 1
                    continue
                results[i] = TaskResult(True, value=msg[1]) if msg[0] == "ok" else \
                    TaskResult(False, kind=msg[1], message=msg[2])
                self._idle.append((actor, fn))
            now = time.monotonic()
            for ref, (actor, i, deadline) in list(busy.items()):
                if now >= deadline:
                    busy.pop(ref)
                    self._kill(actor)
                    self.restarts += 1
                    results[i] = TaskResult(False, kind="Timeout", message=f"no result within {timeout_s:g} s")
        return [r if r is not None else TaskResult(False, kind="Lost") for r in results]

    def score_batched(self, reward_fn: Any, is_class: bool, kwargs: dict[str, Any], batch: Any,
                      timeout_s: float) -> list[Any]:
        """A batched reward over ``batch`` in ``size`` chunks on the actors: one answer per completion (the
        chunk's answers, or for a failed chunk an exception that the pipeline counts for each of its
        completions)."""
        from postrl.rewards.base import RewardBatch

        n = len(batch)
        k = max(1, min(self.size, n))
        bounds = [(c * n // k, (c + 1) * n // k) for c in range(k)]
        chunks = [RewardBatch(prompts=batch.prompts[a:b], completions=batch.completions[a:b],
                              completion_ids=batch.completion_ids[a:b], samples=batch.samples[a:b],
                              prompt_ids=None if batch.prompt_ids is None else batch.prompt_ids[a:b])
                  for a, b in bounds]
        longest = max(b - a for a, b in bounds)
        results = self.run(score_chunk, [(reward_fn, is_class, kwargs, c) for c in chunks], timeout_s=timeout_s * longest)
        out: list[Any] = []
        for (a, b), r in zip(bounds, results):
            if r.ok and len(r.value) == b - a:
                out.extend(r.value)
            elif r.ok:
                out.extend([ValueError(f"returned {len(r.value)} values for {b - a} completions")] * (b - a))
            else:
                out.extend([RemoteRewardError(r.kind, r.message)] * (b - a))
        return out

    def close(self) -> None:
        for actor, _ in self._idle:
            self._kill(actor)
        self._idle = []
        if self._owns:
            ray = _import_ray()
            if ray.is_initialized():
                ray.shutdown()
            self._owns = False

    def __enter__(self) -> "RayPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class RemoteRewardError(Exception):
    """A chunk of a batched reward failed on its actor; ``kind`` as in :class:`TaskResult`."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
