"""Memory per rank of data-parallel RL training: DDP against FSDP2, measured after one real update.

    torchrun --standalone --nproc-per-node 2 benchmarks/bench_dist_memory.py --strategy ddp  --out ddp.json
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_dist_memory.py --strategy fsdp --out fsdp.json

Each rank builds RLTrainer on a randomly initialised Llama (``--hidden 512 --layers 8``: 18.9M parameters,
float32, built locally: no download) or on ``--model PATH`` (e.g. SmolLM2-135M's offline copy), samples its share of one rollout batch and takes one update (AdamW), then
counts the bytes its tensors hold on this rank: parameters, gradients (before they are freed) and optimizer
state (``DTensor.to_local()`` under FSDP: the rank's shard). ``peak_rss_mb`` is the process's peak resident
memory (``ru_maxrss``), which also holds the Python runtime, torch and the transient full parameters FSDP
gathers for a forward. Rank 0 writes one JSON object per rank to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strategy", choices=("ddp", "fsdp"), required=True)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--model", default=None, help="a model directory instead of the random Llama")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from postrl.config import load_config
    from postrl.models.tiny import build_tiny_model
    from postrl.run import distributed
    from postrl.trainer.rl import RLTrainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    work = Path(tempfile.gettempdir()) / f"postrl-bench-mem-{args.hidden}-{args.layers}"
    if rank == 0 and not (work / "model" / "config.json").exists():
        build_tiny_model(work / "model", seed=0, hidden_size=args.hidden, num_layers=args.layers,
                         num_heads=max(1, args.hidden // 64))
        (work / "copy.jsonl").write_text("".join(json.dumps({"prompt": f"copy {d}", "answer": str(d)}) + "\n"
                                                 for d in range(10)) * 10)
    dist.barrier()
    model = args.model or str(work / "model")
    cfg = load_config(None, [f"model.name_or_path={model}", "model.dtype=float32", "data.source=jsonl",
                             f"data.path={work / 'copy.jsonl'}", "data.eval_size=10", "data.answer_extraction=raw",
                             "rollout.n=4", "rollout.max_new_tokens=8", "train.prompts_per_step=4",
                             "train.micro_batch_size=8", "train.lr=1e-5", f"train.strategy={args.strategy}",
                             f"run.output_dir={work / 'runs'}"])
    distributed.activate(args.strategy)
    trainer = RLTrainer(cfg)
    rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    batch = trainer.rollout(0)
    grads: dict[str, int] = {}
    step = trainer.optimizer.step

    def measuring_step(*a, **k):  # the gradients exist between backward and the optimizer's zero_grad
        grads["bytes"] = local_bytes(p.grad for p in trainer.params)
        return step(*a, **k)

    trainer.optimizer.step = measuring_step
    trainer.update(batch, 0)
    state = [v for st in trainer.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    n_params = sum(p.numel() for p in trainer.params)
    row = {"rank": rank, "strategy": args.strategy, "world_size": dist.get_world_size(), "parameters": n_params,
           "param_mb": local_bytes(trainer.params) / 2**20, "grad_mb": grads["bytes"] / 2**20,
           "optimizer_mb": local_bytes(state) / 2**20,
           "rss_after_build_mb": rss_built, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    row["param_grad_optimizer_mb"] = row["param_mb"] + row["grad_mb"] + row["optimizer_mb"]
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if rank == 0:
        Path(args.out).write_text(json.dumps(rows, indent=1))
        for r in rows:
            print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()}))
    trainer.close()
    distributed.shutdown()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
