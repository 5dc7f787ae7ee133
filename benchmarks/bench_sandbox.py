"""Executions per second of the code sandbox (postrl/rewards/sandbox.py) and the code reward.

    python benchmarks/bench_sandbox.py            # ~1 minute
    python benchmarks/bench_sandbox.py --quick    # fewer repetitions

Cases: a trivial program; a test suite of 10 asserts run as one program; the same 10 asserts run
as 10 separate plain runs in one sandbox call; the same as 10 test runs (the program in one
process, each assert checked in a second one on plain data: what the code reward does since issue
18); the code reward end to end on a batch; and, for reference, a bare ``python -I -S -c pass`` (no
isolation) and the unsafe fallback (rlimits only). Sequential cases use one thread; "xN" cases
run N calls concurrently from a thread pool. Prints a table and writes
benchmarks/results/sandbox.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from postrl.data.sources import Sample  # noqa: E402
from postrl.rewards import sandbox as sbx  # noqa: E402
from postrl.rewards.base import RewardBatch  # noqa: E402
from postrl.rewards.code import CodeReward  # noqa: E402

SOLUTION = "def add(a, b):\n    return a + b\n"
ASSERTS = [f"assert add({i}, {2 * i}) == {3 * i}" for i in range(10)]
SUITE = SOLUTION + "\n".join(ASSERTS) + "\n"


def timed(fn, n: int, threads: int = 1) -> dict:
    """Run ``fn()`` n times (from ``threads`` threads); calls per second and per-call latency."""
    fn()  # warm-up (probe, caches)
    lat = []

    def one(_):
        t = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t)

    start = time.perf_counter()
    if threads == 1:
        for i in range(n):
            one(i)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(n)))
    total = time.perf_counter() - start
    return {"calls": n, "threads": threads, "seconds": total, "calls_per_s": n / total,
            "latency_ms_median": 1000 * statistics.median(lat),
            "latency_ms_p90": 1000 * sorted(lat)[int(0.9 * (n - 1))]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--out", default=str(HERE / "results" / "sandbox.json"))
    args = ap.parse_args()
    n = 15 if args.quick else 50
    threads = max(2, os.cpu_count() or 1)

    ok, reason = sbx.probe_isolation()
    if not ok:
        print(f"isolation unavailable on this host: {reason}", file=sys.stderr)
        return 1
    box = sbx.Sandbox(sbx.SandboxLimits(timeout_s=5))
    py = sbx.default_python()

    def check(results, count=1):
        assert len(results) == count and all(r.ok for r in results), results

    rows = []

    def add(name, runs_per_call, fn, threads_=1):
        res = timed(fn, n, threads_)
        res.update(case=name, runs_per_call=runs_per_call, runs_per_s=res["calls_per_s"] * runs_per_call)
        rows.append(res)
        print(f"  {name:<52} {res['runs_per_s']:8.1f} runs/s  {res['latency_ms_median']:7.1f} ms/call", flush=True)

    print("measuring...", flush=True)
    add("bare `python -I -S -c pass` (no isolation, reference)", 1,
        lambda: subprocess.run([py, "-I", "-S", "-c", "pass"], check=True))
    add("sandbox: trivial program", 1, lambda: check([box.run("print(1)")]))
    add(f"sandbox: trivial program x{threads} threads", 1, lambda: check([box.run("print(1)")]), threads)
    add("sandbox: 10 asserts in one program", 1, lambda: check([box.run(SUITE)]))
    add("sandbox: 10 asserts as 10 runs in one call", 10,
        lambda: check(box.run_many([SOLUTION + a for a in ASSERTS]), 10))
    add(f"sandbox: 10 asserts as 10 runs in one call x{threads}", 10,
        lambda: check(box.run_many([SOLUTION + a for a in ASSERTS]), 10), threads)
    tests = [{"code": SOLUTION, "test": a} for a in ASSERTS]
    add("sandbox: 10 asserts as 10 test runs in one call", 10, lambda: check(box.run_many(tests), 10))
    add(f"sandbox: 10 asserts as 10 test runs in one call x{threads}", 10, lambda: check(box.run_many(tests), 10),
        threads)

    reward = CodeReward(timeout_s=5, workers=threads)
    batch_size = 8
    sample = Sample("add", "", metadata={"test_list": ASSERTS})
    batch = RewardBatch([""] * batch_size,
                        [f"```python\n{SOLUTION}# variant {i}\n```" for i in range(batch_size)],  # distinct: no dedupe
                        [[] for _ in range(batch_size)], [sample] * batch_size)

    def reward_batch():
        out = reward(batch)
        assert all(s is not None and s.score == 1.0 for s in out), out

    res = timed(reward_batch, max(3, n // 5))
    res.update(case=f"code reward: batch of {batch_size} completions x 10 asserts (test runs), workers={threads}",
               runs_per_call=batch_size * 10, runs_per_s=res["calls_per_s"] * batch_size * 10,
               completions_per_s=res["calls_per_s"] * batch_size)
    rows.append(res)
    print(f"  {res['case']:<52} {res['completions_per_s']:8.1f} completions/s", flush=True)
    reward.close()

    sbx._PROBES[py] = (False, "benchmark: unsafe fallback")  # the rlimits-only path, for comparison
    unsafe = sbx.Sandbox(sbx.SandboxLimits(timeout_s=5), allow_unsafe=True)
    add("unsafe fallback (rlimits only): trivial program", 1, lambda: check([unsafe.run("print(1)")]))
    sbx._PROBES.pop(py)

    load = os.getloadavg()
    meta = {"date": dt.datetime.now().isoformat(timespec="seconds"), "python": sys.version.split()[0],
            "platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_after": load,
            "note": "shared machine: other processes were running; compare rows within one run",
            "memory_bound": box.memory_bound, "seccomp_filter": box.seccomp is not None}
    print()
    print(f"| case | runs/call | calls/s | runs/s | median ms/call |   (cpus={os.cpu_count()}, load {load[0]:.1f})")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['runs_per_call']} | {r['calls_per_s']:.1f} | {r['runs_per_s']:.1f} | "
              f"{r['latency_ms_median']:.1f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
