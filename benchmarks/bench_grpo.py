"""postrl vs TRL's GRPOTrainer, side by side, interleaved step by step. See benchmarks/README.md.

    python benchmarks/bench_grpo.py            # full run (main config + tiny-model scaling sweep)
    python benchmarks/bench_grpo.py --quick    # ~3-minute smoke run of the same pipeline

Each library runs in its own worker process (``benchmarks/workers.py``) so that its peak
resident memory is its own. The coordinator drives them in lock step: postrl step, TRL step,
postrl step, ... ; only one computes at a time. Results: ``benchmarks/results/grpo_vs_trl.json``
and ``.md`` (printed at the end).
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
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = HERE / "workers.py"
LIBS = ("postrl", "trl")

# The task: reasoning-gym basic_arithmetic (two 1-2 digit numbers added), as in the quickstart recipe.
TASK = {"task": "basic_arithmetic",
        "task_kwargs": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2, "operators": ["+"],
                        "allow_parentheses": False, "allow_negation": False},
        "system_prompt": "Answer with only the final number.", "answer_extraction": "last_number",
        "train_size": 1000}


# ----------------------------------------------------------------------------------------------------------------
# the physical limit
# ----------------------------------------------------------------------------------------------------------------


def matmul_gflops(device: str, threads: int, size: int = 2048, reps: int = 9) -> float:
    """Median fp32 ``torch.mm`` throughput of ``size x size`` matrices in GFLOP/s (2 n^3 FLOPs per product)."""
    torch.set_num_threads(threads)
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    times = []
    for i in range(reps + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # two warm-up products
            times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def model_flops_per_token(model_path: str, context: float) -> dict[str, float]:
    """Forward FLOPs per generated token (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", Table 1).

    ``C = 2 * (N_nonembed + N_head) + 2 * n_layer * n_ctx * d_attn``: two FLOPs per multiply-add of every
    non-embedding weight, plus the output projection (the LM head, ``vocab x d_model``, a real matmul at each
    token even when tied to the input embedding), plus the attention scores and weighted sum over a context of
    ``n_ctx`` tokens (``d_attn = n_heads * head_dim``). Embedding look-ups cost no FLOPs.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    non_embed = total - embed - (0 if tied else head)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    d_attn = cfg.num_attention_heads * head_dim
    attention = 2 * cfg.num_hidden_layers * context * d_attn
    return {"params_total": total, "params_non_embedding": non_embed, "params_lm_head": head,
            "tied_embeddings": tied, "n_layer": cfg.num_hidden_layers, "d_attn": d_attn, "n_ctx_mean": context,
            "flops_per_token": 2 * (non_embed + head) + attention}


# ----------------------------------------------------------------------------------------------------------------
# workers
# ----------------------------------------------------------------------------------------------------------------


class Worker:
    """One library's worker process and its line protocol."""

    def __init__(self, lib: str, spec: dict[str, Any], log_dir: Path):
        self.lib = lib
        self.log_path = log_dir / f"{spec['label']}-{lib}.log"
        self.log = open(self.log_path, "w")
        env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]),
                   TOKENIZERS_PARALLELISM="false", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        self.proc = subprocess.Popen([sys.executable, str(WORKER), lib, json.dumps(spec)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=ROOT, env=env)

    def read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            tail = self.log_path.read_text()[-3000:]
            raise RuntimeError(f"{self.lib} worker exited (rc={self.proc.returncode}); log {self.log_path}:\n{tail}")
        return json.loads(line)

    def send(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def close(self) -> dict[str, Any]:
        try:
            self.send("quit")
            final = self.read()
        finally:
            self.proc.wait(timeout=120)
            self.log.close()
        return final


def run_interleaved(spec: dict[str, Any], libs: tuple[str, ...], log_dir: Path) -> dict[str, Any]:
    """Start one worker per library, then alternate single steps: A, B, A, B, ... Returns raw per-step records."""
    workers = [Worker(lib, spec, log_dir) for lib in libs]  # both load at once (loading is not measured)
    out: dict[str, Any] = {lib: {"steps": []} for lib in libs}
    try:
        for w in workers:
            out[w.lib]["ready"] = w.read()
        for step in range(spec["total_steps"]):
            for w in workers:
                w.send("step")
                rec = w.read()
                out[w.lib]["steps"].append(rec)
                print(f"  [{spec['label']}] step {step} {w.lib:6s} {rec['step_s']:7.2f} s  gen {rec['gen_s']:6.2f} s  "
                      f"{rec['gen_tokens']:5d} tok  reward {rec['reward_mean']:.3f}", flush=True)
        for w in workers:
            out[w.lib]["final"] = w.close()
    except BaseException:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.kill()
        raise
    return out


def summarize(raw: dict[str, Any], warmup: int) -> dict[str, Any]:
    """Medians over the measured steps (after ``warmup``) per library, and postrl/TRL ratios."""
    summary: dict[str, Any] = {}
    for lib, data in raw.items():
        steps = data["steps"][warmup:]
        if not steps:
            raise ValueError(f"no measured steps for {lib}: total steps must exceed --warmup")
        med = lambda xs: statistics.median(xs)  # noqa: E731
        summary[lib] = {
            "step_s": med([s["step_s"] for s in steps]),
            "gen_s": med([s["gen_s"] for s in steps]),
            "update_s": med([s["step_s"] - s["gen_s"] for s in steps]),
            "gen_tokens_per_s": med([s["gen_tokens"] / s["gen_s"] for s in steps]),
            "train_tokens_per_s": med([(s["gen_tokens"] + s["prompt_tokens"]) / max(s["step_s"] - s["gen_s"], 1e-9)
                                       for s in steps]),
            "gen_tokens": med([s["gen_tokens"] for s in steps]),
            "peak_rss_mb": data["final"]["rss_mb"],
            "gpu_peak_mb": data["final"].get("gpu_peak_mb"),
            "reward_per_step": [s["reward_mean"] for s in data["steps"]],
            "reward_mean_measured": statistics.mean(s["reward_mean"] for s in steps),
            "rows_computed_frac": med([s["rows_computed_frac"] for s in steps]),
            "measured_steps": len(steps),
        }
    if "postrl" in summary and "trl" in summary:
        p, t = summary["postrl"], summary["trl"]
        summary["ratio_postrl_over_trl"] = {k: p[k] / t[k] for k in
                                            ("step_s", "gen_s", "update_s", "gen_tokens_per_s", "train_tokens_per_s",
                                             "peak_rss_mb") if t[k]}
    return summary


# ----------------------------------------------------------------------------------------------------------------
# configurations
# ----------------------------------------------------------------------------------------------------------------


def base_spec(args, label: str, model_path: str, out_dir: str, **kw) -> dict[str, Any]:
    spec = {"label": label, "model_path": model_path, "dtype": "float32", "device": args.device,
            "threads": args.threads, "seed": args.seed, "lr": args.lr, "temperature": 1.0,
            "postrl_loss_agg": args.loss_agg, "output_dir": out_dir, **TASK}
    spec.update(kw)
    spec["total_steps"] = spec["warmup"] + spec["steps"]
    return spec


def tiny_model(path: Path) -> str:
    """postrl's tiny Llama (char tokenizer), scaled up a little, with EOS made unreachable.

    The EOS embedding row (tied to the LM head) is zeroed and the final norm scaled up, so the EOS logit is
    exactly 0 while the others spread far around it: every completion runs to the token budget and response
    length is the controlled variable of the sweep.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from postrl.models.tiny import build_tiny_model

    build_tiny_model(path, seed=0, hidden_size=128, num_layers=4, num_heads=4)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight[tok.eos_token_id].zero_()
        model.model.norm.weight.mul_(50.0)
    model.config.max_position_embeddings = 4096
    model.save_pretrained(path)
    return str(path)


def markdown(result: dict[str, Any]) -> str:
    env, main = result["environment"], result["main"]
    s = main["summary"]
    lines = [f"# postrl vs TRL GRPOTrainer ({result['date']})", "",
             f"Command: `{result['command']}`  ", f"Machine: {env['machine']}  ", f"Device: {env['device']}, "
             f"{env['threads']} threads; torch {env['torch']}, transformers {env['transformers']}, trl {env['trl']}", "",
             f"## Main configuration: {main['spec_text']}", "",
             f"Medians over {s['postrl']['measured_steps']} measured steps after {main['warmup']} warm-up step(s), "
             "interleaved postrl/TRL step by step.", "",
             "| metric | postrl | TRL | postrl / TRL |", "|---|---:|---:|---:|"]
    ratio = s.get("ratio_postrl_over_trl", {})
    for key, name, fmt in (("step_s", "seconds per step", "{:.2f}"), ("gen_s", "  of which generation (s)", "{:.2f}"),
                           ("update_s", "  of which reward + update (s)", "{:.2f}"),
                           ("gen_tokens_per_s", "generated tokens / s", "{:.1f}"),
                           ("train_tokens_per_s", "training tokens / s (prompt+completion / update s)", "{:.1f}"),
                           ("peak_rss_mb", "peak resident memory (MiB)", "{:.0f}"),
                           ("reward_mean_measured", "mean reward (measured steps)", "{:.3f}"),
                           ("rows_computed_frac", "rows through forward/backward", "{:.2f}")):
        r = ratio.get(key)
        lines.append(f"| {name} | {fmt.format(s['postrl'][key])} | {fmt.format(s['trl'][key])} | "
                     f"{'' if r is None else f'{r:.2f}'} |")
    if "postrl_base" in s:
        b = s["postrl_base"]
        lines += ["", "postrl with its speed levers off (DynamicCache, torch.multinomial, no shared prefill, unsorted micro batches), "
                  "same interleaving: "
                  f"{b['step_s']:.2f} s/step (generation {b['gen_s']:.2f} s, update {b['update_s']:.2f} s), "
                  f"{b['gen_tokens_per_s']:.1f} generated tokens/s, {b['peak_rss_mb']:.0f} MiB; levers on / off "
                  f"seconds per step = {s['postrl']['step_s'] / b['step_s']:.2f}."]
    lines += ["", "Mean reward per step (all steps, warm-up included):", "",
              "| step | " + " | ".join(str(i) for i in range(len(s["postrl"]["reward_per_step"]))) + " |",
              "|---|" + "---:|" * len(s["postrl"]["reward_per_step"])]
    for lib in ("postrl", "trl"):
        lines.append(f"| {lib} | " + " | ".join(f"{r:.3f}" for r in s[lib]["reward_per_step"]) + " |")
    lim = result["limit"]
    lines += ["", "## Physical limit", "",
              f"fp32 matmul throughput (torch.mm {lim['matmul_size']}^2, median): **{lim['gflops']:.1f} GFLOP/s**.  ",
              f"FLOPs per generated token = 2 (N_nonembed + N_lm_head) + 2 n_layer n_ctx d_attn = "
              f"2 ({lim['model']['params_non_embedding']/1e6:.1f}M + {lim['model']['params_lm_head']/1e6:.1f}M) + "
              f"2 x {lim['model']['n_layer']} x {lim['model']['n_ctx_mean']:.0f} x {lim['model']['d_attn']} = "
              f"{lim['model']['flops_per_token']/1e6:.1f} MFLOP (n_ctx = mean prompt length + half the mean "
              "completion length).  ",
              f"Limit: {lim['tokens_per_s']:.1f} tokens/s. postrl generation: "
              f"{s['postrl']['gen_tokens_per_s']:.1f} tokens/s = **{lim['postrl_pct']:.1f}%** of the limit "
              f"(decode batch {main['batch']}; the generation time includes the prompt prefill).", ""]
    sweep = result.get("sweep")
    if sweep:
        lines += ["## Tiny model scaling (postrl.models.tiny, hidden 128, 4 layers, EOS unreachable)", "",
                  "| group size n | prompts | new tokens | postrl s/step | TRL s/step | postrl / TRL | "
                  "postrl gen tok/s | TRL gen tok/s |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for point in sweep:
            ps, ts = point["summary"].get("postrl"), point["summary"].get("trl")
            if point.get("error"):
                lines.append(f"| {point['n']} | {point['prompts']} | {point['tokens']} | error: {point['error']} |"
                             " | | | |")
                continue
            if ts is None:  # postrl only (TRL not installed)
                lines.append(f"| {point['n']} | {point['prompts']} | {point['tokens']} | {ps['step_s']:.2f} | - | - | "
                             f"{ps['gen_tokens_per_s']:.0f} | - |")
                continue
            lines.append(f"| {point['n']} | {point['prompts']} | {point['tokens']} | {ps['step_s']:.2f} | "
                         f"{ts['step_s']:.2f} | {ps['step_s'] / ts['step_s']:.2f} | {ps['gen_tokens_per_s']:.0f} | "
                         f"{ts['gen_tokens_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~3-minute smoke run: smaller batch, 32 tokens, 2+1 steps")
    ap.add_argument("--steps", type=int, default=None, help="measured steps per library (default 5; quick 2)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps per library (default 1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--loss-agg", default="token_mean", choices=["token_mean", "seq_mean_token_mean"],
                    help="postrl aggregation; TRL gets the matching loss_type (token_mean=dapo, "
                         "seq_mean_token_mean=grpo)")
    ap.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda")
    ap.add_argument("--no-sweep", action="store_true", help="skip the tiny-model scaling sweep")
    ap.add_argument("--equal-lengths", action="store_true",
                    help="every completion runs to the token budget in both libraries (EOS held back: postrl "
                         "rollout.min_new_tokens, TRL generation_kwargs min_new_tokens), so that every step of "
                         "the main configuration compares equal work")
    ap.add_argument("--postrl-only", action="store_true", help="run postrl alone (for quick A/B of levers)")
    ap.add_argument("--with-baseline", action="store_true",
                    help="also interleave postrl with its speed levers off (DynamicCache, torch.multinomial, no shared prefill, "
                         "unsorted micro batches), to measure what the levers give")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="postrl config override for the benchmark runs, e.g. rollout.static_cache=false")
    ap.add_argument("--out", default=str(HERE / "results"), help="directory for grpo_vs_trl.json/.md and logs")
    args = ap.parse_args(argv)
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    warmup = 1 if args.warmup is None else args.warmup
    steps = args.steps if args.steps is not None else (2 if args.quick else 5)
    libs = ("postrl",) if args.postrl_only else LIBS
    if args.with_baseline:
        libs = libs + ("postrl_base",)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)  # typed like a YAML config value
    out_dir = Path(args.out)
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    work = tempfile.mkdtemp(prefix="postrl-bench-")
    t_start = time.time()

    from postrl.models.loading import convert_gguf_to_cache

    model_path = str(convert_gguf_to_cache())  # the fp32 safetensors copy postrl loads offline; TRL gets the path
    import transformers
    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version, libs = None, tuple(lib for lib in libs if lib != "trl")
        print("TRL is not installed (pip install 'postrl[bench]'): running postrl only.", flush=True)
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu"
    cpu_model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    environment = {"machine": f"{platform.node()} / {cpu_model} / {os.cpu_count()} logical CPUs / "
                              f"{platform.system()} {platform.release()}",
                   "device": f"{args.device} ({device_name})", "threads": args.threads, "torch": torch.__version__,
                   "transformers": transformers.__version__, "trl": trl_version, "python": platform.python_version()}

    prompts, n, tokens = (4, 4, 32) if args.quick else (8, 8, 128)
    spec = base_spec(args, "main", model_path, work, prompts_per_step=prompts, n=n, max_new_tokens=tokens,
                     min_new_tokens=tokens if args.equal_lengths else 0,
                     micro_batch_size=min(8, prompts * n), warmup=warmup, steps=steps, postrl_overrides=overrides)
    spec_text = (f"SmolLM2-135M-Instruct fp32, {args.device}, {args.threads} threads, reasoning-gym "
                 f"{TASK['task']}, {prompts} prompts x {n} completions, "
                 f"{f'exactly {tokens} new tokens (EOS held back)' if args.equal_lengths else f'<= {tokens} new tokens'}"
                 ", temperature 1.0, "
                 f"one optimizer step per rollout batch, micro batch {spec['micro_batch_size']}, KL coef 0, "
                 f"lr {args.lr}, loss {args.loss_agg} (TRL loss_type "
                 f"{ {'token_mean': 'dapo', 'seq_mean_token_mean': 'grpo'}[args.loss_agg]}), seed {args.seed}")
    print(f"main configuration: {spec_text}", flush=True)
    gflops = matmul_gflops(args.device, args.threads)
    print(f"fp32 matmul: {gflops:.1f} GFLOP/s", flush=True)
    raw = run_interleaved(spec, libs, out_dir / "logs")
    summary = summarize(raw, warmup)
    measured = raw["postrl"]["steps"][warmup:]
    mean_prompt = statistics.mean(s["prompt_tokens"] for s in measured) / (prompts * n)
    mean_completion = statistics.mean(s["gen_tokens"] for s in measured) / (prompts * n)
    model_info = model_flops_per_token(model_path, mean_prompt + mean_completion / 2)
    limit = gflops * 1e9 / model_info["flops_per_token"]
    result: dict[str, Any] = {
        "date": dt.datetime.now().isoformat(timespec="seconds"), "command": " ".join([Path(sys.argv[0]).name] +
                                                                                    sys.argv[1:]),
        "environment": environment,
        "main": {"spec": spec, "spec_text": spec_text, "warmup": warmup, "batch": prompts * n, "raw": raw,
                 "summary": summary},
        "limit": {"matmul_size": 2048, "gflops": gflops, "model": model_info, "tokens_per_s": limit,
                  "postrl_pct": 100 * summary["postrl"]["gen_tokens_per_s"] / limit},
    }
    if not args.no_sweep:
        tiny_path = tiny_model(Path(work) / "tiny")
        points = ([(4, 4, 32), (16, 4, 32)] if args.quick else
                  [(4, 4, 128), (16, 4, 128), (64, 4, 128), (8, 8, 32), (8, 8, 128), (8, 8, 512)])
        sweep = []
        for n_i, p_i, t_i in points:
            s_spec = base_spec(args, f"tiny-n{n_i}-p{p_i}-t{t_i}", tiny_path, work, prompts_per_step=p_i, n=n_i,
                               max_new_tokens=t_i, micro_batch_size=min(32, p_i * n_i), warmup=1,
                               steps=1 if args.quick else 3, postrl_overrides=overrides)
            point = {"n": n_i, "prompts": p_i, "tokens": t_i}
            try:
                s_raw = run_interleaved(s_spec, tuple(lib for lib in libs if lib != "postrl_base"),
                                        out_dir / "logs")
                point.update(summary=summarize(s_raw, 1), raw=s_raw)
            except RuntimeError as exc:
                point.update(summary={}, error=str(exc).splitlines()[0])
            sweep.append(point)
        result["sweep"] = sweep
    result["wall_s"] = time.time() - t_start
    (out_dir / "grpo_vs_trl.json").write_text(json.dumps(result, indent=2))
    md = markdown(result) if "trl" in summary else json.dumps(summary, indent=2)
    (out_dir / "grpo_vs_trl.md").write_text(md)
    print(md)
    print(f"wrote {out_dir / 'grpo_vs_trl.json'} and {out_dir / 'grpo_vs_trl.md'} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
