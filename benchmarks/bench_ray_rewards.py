"""Reward throughput: ``scoring.executor: ray`` (2 local Ray actors) against the local executor, same completions.

    python benchmarks/bench_ray_rewards.py [--n 256] [--repeats 3]

Two rewards, each scored by a RewardPipeline built from a config, once per executor:

- ``code`` (batched, the sandbox runs every test): local = the reward in the trainer's process (its thread pool
  of 2 sandbox calls), ray = the batch in 2 chunks on 2 actors (each its own reward object, 1 sandbox call at a
  time, so both sides run at most 2 programs at once);
- ``math`` (per completion, ``parallel=True``): local = the process pool (2 workers), ray = 2 actors.

The pools are started and warmed by a first batch that is not timed; each figure is the best of ``--repeats``
timed batches. The scores of the two executors are checked to be identical.
"""

from __future__ import annotations

import argparse
import json
import time

from postrl.config import load_config
from postrl.data.sources import Sample
from postrl.rewards import RewardPipeline

ADD_IO = {"tests": [{"input": f"{a} {b}\n", "output": f"{a + b}\n"} for a, b in ((2, 3), (10, -1), (7, 8))]}
RIGHT = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
WRONG = "```python\na, b = map(int, input().split())\nprint(a * b)\n```"


def workload(n: int):
    # every program distinct (a comment), so the code reward's de-duplication does not skip any sandbox run
    code = ([(RIGHT if i % 3 else WRONG).replace("\n```", f"  # {i}\n```") for i in range(n)],
            [Sample("add", "", metadata=ADD_IO)] * n)
    math = ([f"The answer is \\boxed{{{i % 13}}}." for i in range(n)],
            [Sample(f"q{i}", str(i % 7)) for i in range(n)])
    return {"code": code, "math": math}


def measure(reward: str, executor: str, texts, samples, repeats: int) -> tuple[float, list[float]]:
    spec = ("{name: code, workers: 1, timeout_s: 5.0, memory_mb: 256}" if executor == "ray"
            else "{name: code, workers: 2, timeout_s: 5.0, memory_mb: 256}") if reward == "code" else "{name: math}"
    cfg = load_config(None, [f"scoring.executor={executor}", "scoring.workers=2", "scoring.timeout_s=30",
                             f"rewards=[{spec}]"])
    pipe = RewardPipeline(cfg.rewards, scoring=cfg.scoring)
    try:
        scores = pipe(texts[:8], samples[:8]).total  # start and warm the workers
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            scores = pipe(texts, samples).total
            best = min(best, time.perf_counter() - t0)
    finally:
        pipe.close()
    return best, scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    out = {}
    for reward, (texts, samples) in workload(args.n).items():
        (t_local, s_local), (t_ray, s_ray) = (measure(reward, e, texts, samples, args.repeats)
                                              for e in ("local", "ray"))
        assert s_local == s_ray, f"{reward}: the executors disagree"
        out[reward] = {"completions": args.n, "local_per_s": round(args.n / t_local, 1),
                       "ray_per_s": round(args.n / t_ray, 1), "ray_over_local": round(t_local / t_ray, 2)}
        print(reward, json.dumps(out[reward]), flush=True)


if __name__ == "__main__":
    main()
