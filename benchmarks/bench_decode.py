"""Where generation time goes on this machine: one decode step of SmolLM2-135M at batch B, split into
its matrix products, against the 2048^2 matmul throughput that bench_grpo.py uses for the FLOP limit.

    python benchmarks/bench_decode.py [--batch 64] [--threads 2] [--compile]
    python benchmarks/bench_decode.py --tiny --batch 8 --new-tokens 8     # smoke run, seconds

Prints: the model's own decode step (one token for B rows, KV cache of 50 tokens, no sampling), the
same step's linear layers measured alone (per layer: q, k, v, o, gate, up, down at the model's shapes;
and the LM head), each as GFLOP/s; postrl's fused decode step (postrl/models/fast_llama.py) at the same
shapes (and its torch.compile'd variant with --compile); postrl's Generator on B distinct 50-token prompts
x 32 tokens (prefill included) with the transformers forward and with the fused one, as tokens/s and as
a share of the FLOP-bound limit (2048^2 matmul throughput / FLOPs per generated token, with n_ctx = prompt
length + half the new tokens, as bench_grpo.py counts; in parentheses the share when the FLOPs of prefilling the
distinct prompts are counted as well); the same in GRPO's shape (B/8 distinct prompts x 8 copies, each prompt
prefilled once, 128 tokens per row, no EOS, so the batch stays at B); and
continuous batching: 4B prompts through a decode batch of B, with a few frequent tokens as extra EOS ids
so that completions end at different steps, chunked vs refilled.
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
    ap.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    ap.add_argument("--tiny", action="store_true", help="postrl.models.tiny instead of --model (smoke run)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the fused decode step")
    ap.add_argument("--group", type=int, default=8, help="GRPO shape: copies of each prompt (batch / group prompts)")
    ap.add_argument("--grpo-tokens", type=int, default=128, help="GRPO shape: new tokens per completion")
    ap.add_argument("--grpo-prompt-len", type=int, default=50, help="GRPO shape: tokens per prompt")
    ap.add_argument("--only-grpo", action="store_true", help="skip the step breakdown and continuous batching")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    from postrl.run.memory import keep_freed_memory

    keep_freed_memory()  # as `postrl train` does: freed buffers stay mapped (no page faults on re-use)
    from postrl.models.loading import load_model_and_tokenizer
    from postrl.rollout.generator import Generator, SamplingParams

    name = args.model
    if args.tiny:
        import tempfile

        from postrl.models.tiny import build_tiny_model
        name = str(build_tiny_model(tempfile.mkdtemp() + "/tiny", hidden_size=128, num_layers=4))
    model, tok = load_model_and_tokenizer(name, dtype="float32", device="cpu")[:2]
    model.eval()
    cfg, B = model.config, args.batch
    d, inter, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    big = 2 * 2048**3 / median_time(lambda: torch.mm(a, b)) / 1e9
    print(f"torch.mm 2048^2 fp32, {args.threads} threads: {big:.1f} GFLOP/s")

    cache_kw = Generator(model, tok.eos_token_id, tok.pad_token_id)._cache_kw  # `cache` or `past_key_values`
    with torch.inference_mode():
        lo, hi = (100, 1000) if cfg.vocab_size >= 1000 else (1, cfg.vocab_size)  # (1, vocab): --tiny
        ids = torch.randint(lo, hi, (B, 50))
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
    from postrl.models.fast_llama import FusedLlama

    vocab = model.config.vocab_size
    with torch.inference_mode():
        ids = torch.randint(lo, hi, (B, 50))
        fused_steps = {} if args.only_grpo else {"eager, prepacked oneDNN linear": FusedLlama(model),
                                                 "eager, F.linear": FusedLlama(model, prepack=False)}
        if args.compile:
            fused_steps["compiled"] = FusedLlama(model, compile=True)
        for label, fused in fused_steps.items():
            cache = fused.new_cache(B, 50 + 64)
            fused.prefill(cache, torch.arange(B), ids, torch.ones_like(ids))
            tokens = ids[:, -1]
            if label == "compiled":
                start = time.perf_counter()
                for _ in range(3):
                    fused.decode(cache, tokens)
                print(f"torch.compile of the fused decode step: {time.perf_counter() - start:.1f} s to compile "
                      "and run 3 steps")
            t_fused = median_time(lambda: fused.decode(cache, tokens))  # the cache grows by 1 token per call
            print(f"fused decode step ({label}), B={B}: {t_fused * 1e3:.1f} ms = {B / t_fused:.0f} tokens/s "
                  f"({t_step / t_fused:.2f}x the model's step)")
    # FLOP-bound limit as bench_grpo.py and BENCHMARKS.md count it: 2 (N_nonembed + N_lm_head) + 2 n_layer n_ctx
    # d_attn FLOPs per generated token, n_ctx = prompt length + half the new tokens (the mean context of a step)
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel()
    n_head = head.numel()
    tied = head.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    n_nonembed = n_params - n_embed - (0 if tied else n_head)
    d_attn = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads)

    def flops_per_token(n_ctx: float) -> float:
        return 2 * (n_nonembed + n_head) + 2 * n_layers * n_ctx * d_attn

    def share(n: int, dt: float, prompt_len: int, new_tokens: int, distinct_prompts: int) -> str:
        """``n`` tokens in ``dt`` seconds as a share of the limit; in parentheses with the prefill of the distinct
        prompts counted as work too (its tokens at n_ctx = prompt_len / 2)."""
        work = n * flops_per_token(prompt_len + new_tokens / 2)
        pct = 100 * work / dt / (big * 1e9)
        pct_all = 100 * (work + distinct_prompts * prompt_len * flops_per_token(prompt_len / 2)) / dt / (big * 1e9)
        return f"{pct:.1f}% of the limit ({pct_all:.1f}% counting the prefill)"

    limit = big * 1e9 / flops_per_token(50 + args.new_tokens / 2)
    print(f"FLOP-bound limit: {flops_per_token(50 + args.new_tokens / 2) / 1e6:.1f} MFLOP per token "
          f"(n_ctx {50 + args.new_tokens / 2:.0f}) -> {limit:.0f} generated tokens/s")
    prompts = [[lo + (i + j) % (hi - lo) for i in range(50)] for j in range(B)]
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0)
    def timed(decode: str, eos, batch: list[list[int]], sampling, **kw) -> tuple[float, int, int]:
        """Seconds, generated tokens and decode steps of one Generator call (after a 2-token warm-up)."""
        gen = Generator(model, eos, tok.pad_token_id, decode=decode, **kw)
        gen.generate(batch[:2], SamplingParams(max_new_tokens=2), seed=0)
        start = time.perf_counter()
        out = gen.generate(batch, sampling, seed=0)
        return time.perf_counter() - start, int(out.completion_mask.sum()), out.decode_steps

    for decode in () if args.only_grpo else ("transformers", "fused"):
        dt, n, steps = timed(decode, tok.eos_token_id, prompts, params)
        print(f"postrl Generator decode={decode}, {B} distinct 50-token prompts x {args.new_tokens} tokens: "
              f"{dt:.2f} s for {n} tokens = {n / dt:.0f} tokens/s = {share(n, dt, 50, args.new_tokens, B)} "
              f"({steps} steps; prefill of {50 * B} prompt tokens included)")

    # GRPO's shape: B // group distinct prompts x `group` copies (each distinct prompt prefilled once), every row
    # decoding to the budget (no EOS id can be sampled), so the decode batch stays at B for every step
    # (--grpo-prompt-len: 234 is a long-prompt shape; the quickstart's chat-templated prompts are 28-31 tokens,
    # about what its default of 50 stands for); the fused forward with each
    # prompt's keys / values once (shared prompt attention, the default) and with a copy per row, with its linear
    # layers through oneDNN's prepacked weights (the default on CPU) and through F.linear
    group, long_params = args.group, SamplingParams(max_new_tokens=args.grpo_tokens, temperature=1.0)
    L = args.grpo_prompt_len
    grpo_prompts = [[lo + (i + j // group) % (hi - lo) for i in range(L)] for j in range(B)]
    from postrl.models import fast_llama
    default_min_hidden = fast_llama.PREPACK_MIN_HIDDEN
    for decode, kw, prepack in (("transformers", {}, False), ("fused", {"shared_prompt_attention": False}, True),
                                ("fused", {"shared_prompt_attention": True}, False),
                                ("fused", {"shared_prompt_attention": True}, True)):
        # the default (prepacked where oneDNN has it and the model is large enough), or F.linear for every size
        fast_llama.PREPACK_MIN_HIDDEN = default_min_hidden if prepack else 1 << 62
        dt, n, _ = timed(decode, [-1], grpo_prompts, long_params, **kw)
        fast_llama.PREPACK_MIN_HIDDEN = default_min_hidden
        packed = prepack and fast_llama.prepack_available() and cfg.hidden_size >= default_min_hidden
        how = decode + ("" if not kw else ", shared prompt attention" if kw["shared_prompt_attention"]
                        else ", prompt copied per row")
        how += "" if decode == "transformers" else ", prepacked oneDNN linear" if packed else ", F.linear"
        print(f"postrl Generator decode={how}, GRPO shape {B // group} {L}-token prompts x {group} copies x "
              f"{args.grpo_tokens} tokens (batch {B} every step): {dt:.2f} s for {n} tokens = {n / dt:.0f} tokens/s "
              f"= {share(n, dt, L, args.grpo_tokens, B // group)} (prefill of {L * B // group} prompt tokens "
              "included in the time)")

    if args.only_grpo:
        return
    # continuous batching: 4B prompts through B decode rows; completions end early at a few frequent tokens
    many = [prompts[j % B][:50 - (j % 7)] + [1 + j % (vocab - 1)] for j in range(4 * B)]
    probe = Generator(model, tok.eos_token_id, tok.pad_token_id).generate(many[:B], params, seed=1)
    common = torch.bincount(probe.completion_ids[probe.completion_mask.bool()], minlength=vocab).topk(3).indices
    eos = [tok.eos_token_id] + common.tolist()
    for cb in (False, True):
        gen = Generator(model, eos, tok.pad_token_id, decode="fused", continuous_batching=cb)
        start = time.perf_counter()
        out = gen.generate(many, params, seed=0, batch_size=B)
        dt = time.perf_counter() - start
        n = int(out.completion_mask.sum())
        how = "continuous batching" if cb else "chunks of B"
        print(f"fused, {4 * B} prompts, batch_size={B}, {how}: "
              f"{dt:.2f} s for {n} tokens = {n / dt:.0f} tokens/s, {out.decode_steps} decode steps, "
              f"mean length {n / (4 * B):.1f}")


if __name__ == "__main__":
    main()
