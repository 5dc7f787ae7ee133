"""Executions per second of the code sandbox (postrl/rewards/sandbox.py) and the code reward.

    python benchmarks/bench_sandbox.py            # ~1 minute
    python benchmarks/bench_sandbox.py --quick    # fewer repetitions
    git worktree add /tmp/before <commit> && python benchmarks/bench_sandbox.py --before /tmp/before
                                                  # + before/after, calls of both interleaved

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
    ap.add_argument("--before", help="a checkout of an earlier postrl: compare its sandbox with this one, "
                                     "their calls interleaved (fair on a shared machine)")
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

    before_after = compare_with(args.before, box, n) if args.before else None
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
    if before_after:
        print("\n| case (interleaved) | before: runs/s (median ms/call) | after: runs/s (median ms/call) | after / before |")
        print("|---|---:|---:|---:|")
        for r in before_after:
            print(f"| {r['case']} | {r['before_runs_per_s']:.1f} ({r['before_ms']:.1f}) | "
                  f"{r['after_runs_per_s']:.1f} ({r['after_ms']:.1f}) | {r['ratio']:.2f} |")
    out.write_text(json.dumps({"meta": meta, "rows": rows, "before_after": before_after}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


def compare_with(before_dir: str, box, n: int) -> list:
    """Median latency of the same cases on an earlier sandbox (``before_dir``) and this one, their
    calls interleaved so that a change of load hits both alike."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sandbox_before",
                                                  os.path.join(before_dir, "postrl", "rewards", "sandbox.py"))
    old = importlib.util.module_from_spec(spec)
    sys.modules["sandbox_before"] = old
    spec.loader.exec_module(old)
    before = old.Sandbox(old.SandboxLimits(timeout_s=5))
    cases = [("trivial program", 1, lambda b: [b.run("print(1)")], lambda b: [b.run("print(1)")]),
             ("10 asserts as 10 runs in one call", 10, lambda b: b.run_many([SOLUTION + a for a in ASSERTS]),
              lambda b: b.run_many([SOLUTION + a for a in ASSERTS]))]
    if hasattr(box, "run_test"):
        cases.append(("10 asserts: 10 runs (before) vs 10 test runs (after)", 10,
                      lambda b: b.run_many([SOLUTION + a for a in ASSERTS]),
                      lambda b: b.run_many([{"code": SOLUTION, "test": a} for a in ASSERTS])))
    out = []
    print("comparing with", before_dir, flush=True)
    for name, runs, f_before, f_after in cases:
        lat = {"before": [], "after": []}
        f_before(before), f_after(box)
        for i in range(2 * n):
            pair = [("before", f_before, before), ("after", f_after, box)]
            for key, f, b in pair if i % 2 else pair[::-1]:
                t = time.perf_counter()
                res = f(b)
                lat[key].append(time.perf_counter() - t)
                assert all(r.ok for r in res), res
        mb, ma = statistics.median(lat["before"]), statistics.median(lat["after"])
        out.append({"case": name, "runs_per_call": runs, "calls": 2 * n, "before_ms": 1000 * mb, "after_ms": 1000 * ma,
                    "before_runs_per_s": runs / mb, "after_runs_per_s": runs / ma, "ratio": mb / ma})
    return out


if __name__ == "__main__":
    sys.exit(main())
