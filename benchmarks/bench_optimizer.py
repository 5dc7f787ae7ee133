"""AdamW step time over SmolLM2-135M's parameter shapes: torch's per-tensor loop, foreach, and the fused kernel
that :func:`postrl.run.optim.build_optimizer` picks (BENCHMARKS.md, issue 19).

    python benchmarks/bench_optimizer.py [--threads 2] [--steps 5]
"""

from __future__ import annotations

import argparse
import time

import torch

# SmolLM2-135M: tied embedding [49152, 576]; 30 layers of q, k, v, o, gate, up, down and two norms; final norm
LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536), (576,), (576,)]
SHAPES = [(49152, 576)] + LAYER * 30 + [(576,)]


def step_ms(steps: int, **impl) -> float:
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-5, **impl)
    opt.step()  # state allocated outside the timing
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - t0) / steps * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{sum(torch.Size(s).numel() for s in SHAPES):,} parameters in {len(SHAPES)} tensors, "
          f"{args.threads} threads")
    for name, impl in (("per-tensor loop", {"foreach": False}), ("foreach", {"foreach": True}),
                       ("fused", {"fused": True})):
        print(f"{name:16s} {step_ms(args.steps, **impl):8.1f} ms per step")


if __name__ == "__main__":
    main()
