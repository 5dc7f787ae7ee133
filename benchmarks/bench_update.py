"""Time one RL update (``RLTrainer.update``) with and without the shared-prefix forward, on a recipe's model.

    python benchmarks/bench_update.py                            # the quickstart (SmolLM2-135M), ~2 min
    python benchmarks/bench_update.py --tiny                     # postrl.models.tiny on the copy task, seconds
    python benchmarks/bench_update.py --reps 1 --profile rollout.max_new_tokens=128 rollout.min_new_tokens=128 \
        train.prompts_per_step=2 train.micro_batch_size=8 train.mini_batch_size=16   # where an update's time goes

One rollout of the recipe's first step is generated, its rewards are replaced by alternating 0/1 (so every
row has a non-zero advantage and goes through forward and backward), and the update is run ``--reps`` times
per setting, interleaved (shared, plain, shared, plain, ...) from the same weights after two warm-up updates
(the first allocates the gradients and AdamW's state; on the 2-core VM the first two updates of a process also
fault in ~1.1 M fresh pages, 4-12 s of kernel time each, which later updates reuse: measured with
``resource.getrusage``, 800 k / 320 k / 0 / 0 minor faults in the first four steps of a training loop). Prints the median seconds per update for
each setting, the tokens that go through the model, and the largest difference of the two gradients.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="quickstart", help="a shipped recipe's name or a YAML path")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny", action="store_true",
                    help="postrl.models.tiny on a copy task instead of the recipe's model")
    ap.add_argument("--profile", action="store_true",
                    help="after the timings, run one more shared-prefix update under torch.profiler and print the "
                         "operators by self CPU time")
    ap.add_argument("overrides", nargs="*", help="config overrides (key=value) applied after the recipe")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    from postrl.run.memory import keep_freed_memory

    keep_freed_memory()  # as `postrl train` does: freed buffers stay mapped (no page faults on re-use)
    from postrl.api import RECIPES
    from postrl.config import load_config
    from postrl.models.logprobs import distinct_prompts
    from postrl.run.rng import seed_everything
    from postrl.trainer.rl import RLTrainer

    out = tempfile.mkdtemp()
    overrides = [f"run.output_dir={out}", "eval.before=false", "eval.after=false", "run.progress=false"]
    if args.tiny:
        import json
        from pathlib import Path

        from postrl.models.tiny import build_tiny_model

        model = build_tiny_model(Path(out) / "tiny", hidden_size=128, num_layers=4)
        data = Path(out) / "copy.jsonl"
        data.write_text("".join(json.dumps({"prompt": f"please copy the digit {d} now", "answer": str(d)}) + "\n"
                                for d in range(10)))
        overrides += [f"model.name_or_path={model}", "data.source=jsonl", f"data.path={data}", "data.eval_size=2",
                      "rollout.max_new_tokens=16"]
    recipe = args.recipe if args.recipe.endswith((".yaml", ".yml")) else str(RECIPES / f"{args.recipe}.yaml")
    cfg = load_config(recipe, overrides + list(args.overrides))
    seed_everything(cfg.run.seed)
    trainer = RLTrainer(cfg)
    batch = trainer.rollout(0)
    batch.rewards = torch.tensor([float(i % 2) for i in range(len(batch))], dtype=torch.float64)
    prompt_tokens = sum(len(p) for p in batch.prompt_ids)
    distinct = distinct_prompts(batch.prompt_ids)[0]
    completion_tokens = int(batch.attention_mask.sum())
    print(f"{args.recipe}{' (tiny)' if args.tiny else ''}: {len(batch)} rows from {len(distinct)} prompts, "
          f"{prompt_tokens} prompt + {completion_tokens} completion tokens, micro batch "
          f"{cfg.train.micro_batch_size}, mini batch {cfg.resolved_mini_batch_size}")
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    grads: dict[bool, list[torch.Tensor]] = {}
    step = trainer.optimizer.step

    def update(share: bool, capture: bool = False) -> float:
        trainer.share_prefix = share
        trainer.model.load_state_dict(state)
        if capture:  # keep the first mini batch's gradient, then take the optimizer step as usual
            def grab(*a, **k):
                grads.setdefault(share, [p.grad.clone() for p in trainer.params])
                return step(*a, **k)

            trainer.optimizer.step = grab
        start = time.perf_counter()
        trainer.update(batch, 0)
        elapsed = time.perf_counter() - start
        trainer.optimizer.step = step
        return elapsed

    for _ in range(2):  # warm-up: allocates gradients and AdamW's state, and faults in the pages later updates reuse
        update(True)
    times: dict[bool, list[float]] = {True: [], False: []}
    for rep in range(args.reps):
        for share in (True, False):
            times[share].append(update(share, capture=rep == 0))
    for share in (True, False):
        label = "shared prefix" if share else "plain forward"
        print(f"{label}: median {statistics.median(times[share]):.2f} s per update "
              f"({', '.join(f'{t:.2f}' for t in times[share])})")
    diff = max(float((a - b).abs().max()) for a, b in zip(grads[True], grads[False]))
    scale = max(float(g.abs().max()) for g in grads[False])
    print(f"largest gradient difference {diff:.2e} (largest gradient entry {scale:.2e}); speed-up "
          f"{statistics.median(times[False]) / statistics.median(times[True]):.2f}x")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            update(True)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    trainer.close()


if __name__ == "__main__":
    main()
