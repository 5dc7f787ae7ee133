"""LoRA against full fine-tuning on the quickstart (issue 14): held-out gain and peak memory, same steps, same seed.

Runs ``recipes/quickstart.yaml`` (full fine-tuning) and ``recipes/quickstart_lora.yaml`` (rank-8 LoRA adapters,
Hu et al. 2021, arXiv:2106.09685; everything else the same but ``run.name`` and ``train.lr``), each in its own
process so that each peak is its own, and prints for both: held-out greedy accuracy before and after training,
the gain, wall time, peak resident memory of the process (``ru_maxrss``), peak CUDA memory where a GPU ran, and
the trainable parameter count.

    python benchmarks/bench_lora.py                                  # both runs, the recipes' 25 steps (~10 min on CPU)
    python benchmarks/bench_lora.py --seeds 0 1 2                    # several seeds
    python benchmarks/bench_lora.py --steps 1 --set model.name_or_path=tiny data.eval_size=4   # smoke check
    python benchmarks/bench_lora.py --set model.lora.rank=1          # overrides go to both runs (LoRA keys: LoRA only)

Results: ``benchmarks/results/lora/<full|lora>-s<seed>/`` (metrics.jsonl, results.json, bench.json; the weights
are deleted) and ``benchmarks/results/lora/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "lora"
RECIPES = {"full": ROOT / "postrl" / "recipes" / "quickstart.yaml",
           "lora": ROOT / "postrl" / "recipes" / "quickstart_lora.yaml"}


def run_one(kind: str, out_dir: str, overrides: list[str]) -> None:
    """In this process: train ``kind``'s recipe with ``overrides`` into ``out_dir``; write ``bench.json``."""
    import torch

    from postrl.config import load_config
    from postrl.models.lora import trainable_parameter_count
    from postrl.trainer.rl import RLTrainer
    from postrl.run import run_job

    out = Path(out_dir)
    cfg = load_config(RECIPES[kind], [f"run.output_dir={out.parent}", f"run.name={out.name}", "run.progress=false",
                                      *overrides])
    counts = {}

    def build(c, ckpt):
        job = RLTrainer(c, ckpt)
        counts["trainable"], counts["total"] = trainable_parameter_count(job.model)
        return job

    t0 = time.time()
    run_dir, res = run_job(build, cfg, run_dir=out)
    wall = time.time() - t0
    before = (res.get("eval_before") or {}).get("accuracy")
    after = (res.get("eval_after") or {}).get("accuracy")
    record = {
        "kind": kind, "seed": cfg.run.seed, "steps": res.get("steps"), "lr": cfg.train.lr,
        "lora_rank": cfg.model.lora.rank, "accuracy_before": before, "accuracy_after": after,
        "gain": None if before is None or after is None else after - before,
        "wall_s": wall, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "trainable_params": counts.get("trainable"), "total_params": counts.get("total"),
    }
    (Path(run_dir) / "bench.json").write_text(json.dumps(record, indent=1))


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=0, help="train.steps for both runs (0 = the recipes' own)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for both runs")
    ap.add_argument("--keep-weights", action="store_true", help="keep checkpoints and final/ of every run")
    ap.add_argument("--_one", nargs=2, metavar=("KIND", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    overrides = list(args.set) + ([f"train.steps={args.steps}"] if args.steps else [])
    if args._one:
        run_one(args._one[0], args._one[1], overrides)
        return
    rows = []
    for seed in args.seeds:
        for kind in ("full", "lora"):
            out = OUT / f"{kind}-s{seed}"
            if out.exists():
                shutil.rmtree(out)
            extra = [o for o in overrides if kind == "lora" or not o.startswith("model.lora.")]
            cmd = [sys.executable, __file__, "--_one", kind, str(out), "--set", *extra, f"run.seed={seed}"]
            print(f"[bench_lora] {kind} seed {seed}: {' '.join(cmd[2:])}", flush=True)
            subprocess.run(cmd, check=True)
            rows.append(json.loads((out / "bench.json").read_text()))
            if not args.keep_weights:
                for sub in ("checkpoints", "final"):
                    shutil.rmtree(out / sub, ignore_errors=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "summary.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{'run':<6} {'seed':>4} {'steps':>5} {'lr':>8} {'acc before':>10} {'acc after':>9} {'gain':>7} "
          f"{'peak RSS MiB':>12} {'peak CUDA MiB':>13} {'trainable':>12} {'wall s':>7}")
    for r in rows:
        print(f"{r['kind']:<6} {r['seed']:>4} {r['steps']:>5} {r['lr']:>8.1e} {fmt(r['accuracy_before'], '10.1%')} "
              f"{fmt(r['accuracy_after'], '9.1%')} {fmt(r['gain'], '+7.1%')} {r['peak_rss_mib']:>12.0f} "
              f"{fmt(r['peak_cuda_mib'], '13.0f')} {r['trainable_params']:>12,} {r['wall_s']:>7.0f}")


if __name__ == "__main__":
    main()
