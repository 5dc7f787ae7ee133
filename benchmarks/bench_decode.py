"""Where generation time goes on this machine: one decode step of SmolLM2-135M at batch B, split into
its matrix products, against the 2048^2 matmul throughput that bench_grpo.py uses for the FLOP limit.

    python benchmarks/bench_decode.py [--batch 64] [--threads 2]

Prints: the model's own decode step (one token for B rows, KV cache of 50 tokens, no sampling), the
same step's linear layers measured alone (per layer: q, k, v, o, gate, up, down at the model's shapes;
and the LM head), each as GFLOP/s, and postrl's Generator on B distinct 50-token prompts x 32 tokens
(prefill included). It shows how far a zero-overhead decode loop around this forward could go.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch


def median_time(fn, reps: int = 10, warmup: int = 2) -> float:
    times = []
    for i in range(reps + warmup):
        start = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    from postrl.models.loading import load_model_and_tokenizer
    from postrl.rollout.generator import Generator, SamplingParams

    model, tok = load_model_and_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct", dtype="float32", device="cpu")[:2]
    model.eval()
    cfg, B = model.config, args.batch
    d, inter, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    big = 2 * 2048**3 / median_time(lambda: torch.mm(a, b)) / 1e9
    print(f"torch.mm 2048^2 fp32, {args.threads} threads: {big:.1f} GFLOP/s")

    cache_kw = Generator(model, tok.eos_token_id, tok.pad_token_id)._cache_kw  # `cache` or `past_key_values`
    with torch.inference_mode():
        ids = torch.randint(100, 1000, (B, 50))
        # a fresh prefilled cache per timing would be cleaner; the cache grows by 1 token per call (50 -> ~62)
        cache = model(input_ids=ids, use_cache=True).past_key_values
        state = {"attn": torch.ones(B, 51, dtype=torch.long)}

        def step():
            model(input_ids=ids[:, -1:], attention_mask=state["attn"], use_cache=True, logits_to_keep=1,
                  **{cache_kw: cache})
            state["attn"] = torch.cat([state["attn"], state["attn"].new_ones(B, 1)], -1)

        t_step = median_time(step)
        x, h = torch.randn(B, d), torch.randn(B, inter)
        shapes = [(d, d), (kv, d), (kv, d), (d, d), (inter, d), (inter, d)]  # nn.Linear weights [out, in]
        weights = [torch.randn(*s) for s in shapes]
        down = torch.randn(d, inter)

        def layer():
            for w in weights:
                torch.nn.functional.linear(x, w)
            torch.nn.functional.linear(h, down)

        layer_flops = 2 * B * (sum(o * i for o, i in shapes) + d * inter)
        t_layer = median_time(layer)
        head = model.get_output_embeddings().weight
        t_head = median_time(lambda: torch.nn.functional.linear(x, head))
        head_flops = 2 * B * head.numel()
    n_layers = cfg.num_hidden_layers
    print(f"model decode step, B={B}: {t_step * 1e3:.1f} ms = {B / t_step:.0f} tokens/s")
    print(f"  linear layers of one block: {t_layer * 1e3:.2f} ms ({layer_flops / t_layer / 1e9:.1f} GFLOP/s); "
          f"x{n_layers} = {t_layer * n_layers * 1e3:.1f} ms")
    print(f"  LM head ({head.shape[0]} x {head.shape[1]}): {t_head * 1e3:.1f} ms ({head_flops / t_head / 1e9:.1f} GFLOP/s)")
    print(f"  everything else (attention, norms, rotary, framework): "
          f"{(t_step - t_layer * n_layers - t_head) * 1e3:.1f} ms")
    gen = Generator(model, tok.eos_token_id, tok.pad_token_id)
    prompts = [[100 + (i + j) % 800 for i in range(50)] for j in range(B)]
    start = time.perf_counter()
    out = gen.generate(prompts, SamplingParams(max_new_tokens=32, temperature=1.0), seed=0)
    dt = time.perf_counter() - start
    n = int(out.completion_mask.sum())
    print(f"postrl Generator, {B} distinct 50-token prompts x 32 tokens: {dt:.2f} s for {n} tokens "
          f"({out.decode_steps} steps; prefill of {50 * B} prompt tokens included)")


if __name__ == "__main__":
    main()
