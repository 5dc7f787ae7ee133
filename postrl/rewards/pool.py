"""A small process pool whose tasks have a wall-clock timeout that is really enforced.

``concurrent.futures`` cannot stop a task that hangs: the worker stays busy forever. Here a
task that runs past its deadline gets its worker killed (SIGKILL) and replaced, and the
task is reported as a timeout. Workers are started with ``spawn`` (no forked copy of the
trainer's threads, CUDA context or open files) on first use and reused across batches.

Used by :class:`postrl.rewards.RewardPipeline` for per-completion rewards registered with
``parallel=True`` (math-verify and other verifiers that can be slow or hang). It is not a
security boundary: untrusted code goes through :mod:`postrl.rewards.sandbox`.
"""

from __future__ import annotations

import multiprocessing as mp
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Optional, Sequence


@dataclass
class TaskResult:
    """Outcome of one task: ``ok`` with ``value``, or an error ``kind`` (exception class name or
    ``"Timeout"`` / ``"WorkerDied"``) with a message."""

    ok: bool
    value: Any = None
    kind: str = ""
    message: str = ""


def _worker_main(conn: Connection) -> None:  # pragma: no cover - runs in the child process
    fn = None
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        if msg[0] == "load":  # unpickling the function imports its module: done once, outside any timeout
            try:
                fn = msg[1]
                out = ("loaded",)
            except BaseException as exc:  # noqa: BLE001
                out = ("err", type(exc).__name__, f"{exc}"[:2000])
            conn.send(out)
            continue
        _, args, kwargs = msg
        try:
            out = ("ok", fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, the worker lives on
            out = ("err", type(exc).__name__, f"{exc}"[:2000] or traceback.format_exc(limit=2)[-2000:])
        try:
            conn.send(out)
        except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable return value
            conn.send(("err", type(exc).__name__, f"result could not be sent back: {exc}"[:2000]))


class _Worker:
    def __init__(self, ctx: Any) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child,), daemon=True, name="postrl-reward-worker")
        self.proc.start()
        child.close()
        self.fn: Any = None  # the function this worker has loaded

    def load(self, fn: Callable[..., Any], timeout_s: float) -> Optional[TaskResult]:
        """Send ``fn`` once (its module is imported then, not counted in any task's time); None when ready."""
        if self.fn is fn:
            return None
        try:
            self.conn.send(("load", fn))
            if not self.conn.poll(timeout_s):
                return TaskResult(False, kind="Timeout", message=f"worker not ready within {timeout_s:g} s")
            msg = self.conn.recv()
        except Exception as exc:  # noqa: BLE001 - unpicklable function, dead worker
            return TaskResult(False, kind=type(exc).__name__, message=f"cannot load the function: {exc}")
        if msg[0] != "loaded":
            return TaskResult(False, kind=msg[1], message=msg[2])
        self.fn = fn
        return None

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class TimeoutPool:
    """``workers`` processes; :meth:`run` maps a function over argument tuples with a per-task timeout."""

    def __init__(self, workers: int = 2, start_method: str = "spawn", startup_timeout_s: float = 120.0) -> None:
        if workers < 1:
            raise ValueError(f"TimeoutPool needs workers >= 1, got {workers}")
        self.size = workers
        self._ctx = mp.get_context(start_method)
        self._idle: list[_Worker] = []
        self.restarts = 0  # workers killed (timeouts, crashes) and replaced
        self.startup_timeout_s = startup_timeout_s

    def run(self, fn: Callable[..., Any], arg_list: Sequence[tuple], kwargs: Optional[dict] = None,
            timeout_s: float = 10.0) -> list[TaskResult]:
        """``fn(*args, **kwargs)`` for each ``args`` in ``arg_list``; results in input order.

        ``fn`` must be picklable (a module-level function). A task that raises gives
        ``TaskResult(ok=False, kind=<exception class>)``; one that runs longer than
        ``timeout_s`` seconds gives ``kind="Timeout"`` and its worker is killed and replaced;
        a worker that dies (segfault, ``os._exit``) gives ``kind="WorkerDied"``. Starting a worker
        and importing ``fn``'s module in it is not counted in the timeout (``startup_timeout_s``
        bounds it instead).
        """
        kwargs = kwargs or {}
        results: list[Optional[TaskResult]] = [None] * len(arg_list)
        pending = list(range(len(arg_list)))[::-1]  # pop() from the end = input order
        busy: dict[Connection, tuple[_Worker, int, float]] = {}
        while pending or busy:
            while pending and len(busy) < self.size:
                worker = self._idle.pop() if self._idle else _Worker(self._ctx)
                i = pending.pop()
                failed = worker.load(fn, self.startup_timeout_s)
                if failed is not None:
                    results[i] = failed
                    worker.kill()
                    self.restarts += 1
                    continue
                try:
                    worker.conn.send(("call", arg_list[i], kwargs))
                except Exception as exc:  # noqa: BLE001 - unpicklable arguments
                    results[i] = TaskResult(False, kind=type(exc).__name__, message=f"cannot send task: {exc}")
                    self._idle.append(worker)
                    continue
                busy[worker.conn] = (worker, i, time.monotonic() + timeout_s)
            if not busy:
                continue
            now = time.monotonic()
            next_deadline = min(d for _, _, d in busy.values())
            ready = wait(list(busy), timeout=max(0.0, next_deadline - now))
            for conn in ready:
                worker, i, _ = busy.pop(conn)
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    results[i] = TaskResult(False, kind="WorkerDied",
                                            message=f"worker exited with code {worker.proc.exitcode}")
                    worker.kill()
                    self.restarts += 1
                    continue
                if msg[0] == "ok":
                    results[i] = TaskResult(True, value=msg[1])
                else:
                    results[i] = TaskResult(False, kind=msg[1], message=msg[2])
                self._idle.append(worker)
            now = time.monotonic()
            for conn, (worker, i, deadline) in list(busy.items()):
                if now >= deadline:
                    busy.pop(conn)
                    worker.kill()
                    self.restarts += 1
                    results[i] = TaskResult(False, kind="Timeout", message=f"no result within {timeout_s:g} s")
        return [r if r is not None else TaskResult(False, kind="Lost") for r in results]

    def close(self) -> None:
        for worker in self._idle:
            try:
                worker.conn.send(None)
            except Exception:  # noqa: BLE001
                pass
            worker.kill()
        self._idle = []

    def __enter__(self) -> "TimeoutPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # best effort; the workers are daemons and die with the trainer anyway
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
