"""Rewards on Ray actors (``scoring.executor: ray``, postrl/rewards/ray_executor.py).

- :class:`RayPool` answers like the process pool: values in input order, exceptions as errors, a crashing call
  (``os._exit``) isolated as WorkerDied and a hanging one as Timeout, both counted, the pool still working;
- through the reward pipeline, the code reward (batched, its sandbox on the actors) and a parallel
  per-completion reward give exactly the local scores and statuses; a crashing reward is counted per completion.

Skipped when Ray is not installed (``pip install 'postrl[ray]'``; the ``test`` extra installs it).
"""

from __future__ import annotations

import os
import sys
import time

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'postrl[ray]')")

from postrl.config import load_config  # noqa: E402
from postrl.data.sources import Sample  # noqa: E402
from postrl.rewards import RewardPipeline, register_reward, unregister_reward  # noqa: E402
from postrl.rewards import sandbox as sbx  # noqa: E402
from postrl.rewards.pool import TimeoutPool  # noqa: E402
from postrl.rewards.ray_executor import RayPool  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # actors cannot import tests/: ship by value


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray instance for the module (2 CPUs); the pools use it and do not shut it down."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def square_or_fail(x, fail_on=-1):
    if x == fail_on:
        raise ValueError(f"no square for {x}")
    return x * x


def test_ray_pool_answers_like_the_process_pool(ray_session):
    args = [(i,) for i in range(8)]
    with TimeoutPool(2) as local, RayPool(2) as remote:
        want = local.run(square_or_fail, args, {"fail_on": 5}, timeout_s=30)
        got = remote.run(square_or_fail, args, {"fail_on": 5}, timeout_s=30)
    assert [r.value for r in got] == [r.value for r in want] == [0, 1, 4, 9, 16, None, 36, 49]
    assert [(r.ok, r.kind) for r in got] == [(r.ok, r.kind) for r in want]
    assert got[5].kind == "ValueError" and "no square for 5" in got[5].message


def test_a_crashing_and_a_hanging_call_are_isolated_and_counted(ray_session):
    def flaky(x):  # defined here, so Ray ships it by value
        if x == 2:
            os._exit(3)  # the actor process dies
        if x == 4:
            time.sleep(60)  # hangs past the timeout
        return x + 100

    pool = RayPool(2)
    try:
        out = pool.run(flaky, [(i,) for i in range(6)], timeout_s=3)
        assert [r.value for r in out if r.ok] == [100, 101, 103, 105]
        assert out[2].kind == "WorkerDied" and out[4].kind == "Timeout"
        assert pool.restarts == 2
        again = pool.run(flaky, [(7,), (8,)], timeout_s=3)  # replaced actors keep working
        assert [r.value for r in again] == [107, 108]
    finally:
        pool.close()


ADD_IO = {"tests": [{"input": "2 3\n", "output": "5\n"}, {"input": "10 -1", "output": "9"}]}
ADD_ASSERTS = {"test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]}
COMPLETIONS = [
    ("```python\na, b = map(int, input().split())\nprint(a + b)\n```", ADD_IO),  # pass
    ("```python\na, b = map(int, input().split())\nprint(a - b)\n```", ADD_IO),  # wrong answer
    ("```python\ndef add(a, b):\n    return a + b\n```", ADD_ASSERTS),  # pass
    ("```python\ndef add(a, b) return a\n```", ADD_ASSERTS),  # compile error
    ("```python\nraise SystemExit(3)\n```", ADD_IO),  # runtime error
    ("no code at all", ADD_ASSERTS),
]


def dies_on_wrong(completion, sample, **kwargs):
    """A parallel reward that kills its worker (process or actor) on one input."""
    if "a - b" in completion:
        os._exit(9)
    return float(len(completion) % 7)


def test_pipeline_on_ray_gives_the_local_scores_and_counts_a_crashing_reward(ray_session):
    ok, reason = sbx.probe_isolation()
    if not ok:
        pytest.skip(f"this host cannot isolate code: {reason}")

    register_reward("ray_test_dies", parallel=True)(dies_on_wrong)
    try:
        texts = [c for c, _ in COMPLETIONS]
        samples = [Sample(question="q", answer="", metadata=m) for _, m in COMPLETIONS]
        results = {}
        for executor in ("local", "ray"):
            cfg = load_config(None, [f"scoring.executor={executor}", "scoring.workers=2", "scoring.timeout_s=20",
                                     "rewards=[{name: code, timeout_s: 2.0, memory_mb: 256, workers: 2}, "
                                     "{name: ray_test_dies}]"])
            pipe = RewardPipeline(cfg.rewards, scoring=cfg.scoring)
            try:
                results[executor] = pipe(texts, samples)
            finally:
                pipe.close()
        local, remote = results["local"], results["ray"]
        assert remote.components["code"] == local.components["code"] == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
        assert remote.statuses == local.statuses
        assert remote.components["ray_test_dies"] == local.components["ray_test_dies"]
        assert remote.errors == local.errors == {("ray_test_dies", "WorkerDied"): 1}
        assert remote.total == local.total
    finally:
        unregister_reward("ray_test_dies")
