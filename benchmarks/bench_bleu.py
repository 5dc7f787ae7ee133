"""Per-sentence BLEU on token ids: postrl's vectorized torch version vs NLTK and sacrebleu, same batch.

    python benchmarks/bench_bleu.py            # 256/1024 sentences x 128/512 tokens, 1 and 4 references
    python benchmarks/bench_bleu.py --quick    # the two smallest batches only

For each batch the three implementations score the same candidates against the same references:
``sentence_bleu_ids`` (one call for the whole batch; smoothing ``method1``, and ``exp`` with
effective order), NLTK ``sentence_bleu`` in a Python loop (``SmoothingFunction().method1``) and
sacrebleu ``BLEU(tokenize="none", smooth_method="exp", effective_order=True).sentence_score`` in a
loop on the ids written as space-separated strings (string conversion not timed). The largest
absolute difference to each reference is recorded too. Timings are medians over repetitions
(torch: 1 warm-up + ``--reps``; the loops: ``--loop-reps``). Results:
``benchmarks/results/bleu.json`` and a table on stdout.

Data: reference sentences of Zipf-distributed token ids (vocabulary 32k); each candidate is a copy
of its first reference with 30% of the tokens replaced and a random span dropped; further
references are other noisy copies, so that clipping and multi-reference maxima matter.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from postrl.rewards.bleu import sentence_bleu_ids  # noqa: E402

CONFIGS = [(256, 128, 1), (256, 128, 4), (256, 512, 4), (1024, 128, 4), (1024, 512, 4)]
QUICK = [(256, 128, 1), (256, 128, 4)]
VOCAB = 32_000


def make_batch(n: int, length: int, refs: int, seed: int = 0) -> tuple[list[list[int]], list[list[list[int]]]]:
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, VOCAB + 1, dtype=torch.float64)
    zipf = (1.0 / ranks) / (1.0 / ranks).sum()

    def noisy(x: torch.Tensor) -> list[int]:
        x = x.clone()
        swap = torch.rand(x.numel(), generator=g) < 0.3
        x[swap] = torch.multinomial(zipf, int(swap.sum()), replacement=True, generator=g)
        cut = int(torch.randint(0, x.numel(), (1,), generator=g))
        span = int(torch.randint(0, max(1, x.numel() // 10), (1,), generator=g))
        return torch.cat([x[:cut], x[cut + span:]]).tolist()

    cands, all_refs = [], []
    for _ in range(n):
        base = torch.multinomial(zipf, length, replacement=True, generator=g)
        these = [base.tolist()] + [noisy(base) for _ in range(refs - 1)]
        cands.append(noisy(base))
        all_refs.append(these)
    return cands, all_refs


def timed(fn, reps: int, warmup: int = 1) -> tuple[float, object]:
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def run(configs, reps: int, loop_reps: int, threads: list[int]) -> list[dict]:
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from sacrebleu.metrics import BLEU

    import logging
    logging.getLogger("sacrebleu").setLevel(logging.ERROR)
    method1 = SmoothingFunction().method1
    sacre = BLEU(tokenize="none", smooth_method="exp", effective_order=True)
    rows = []
    for n, length, refs in configs:
        cands, all_refs = make_batch(n, length, refs)
        row: dict = {"sentences": n, "tokens": length, "references": refs}
        for th in threads:
            torch.set_num_threads(th)
            t, ours = timed(lambda: sentence_bleu_ids(cands, all_refs, smoothing="method1"), reps)
            row[f"torch_method1_{th}t_s"] = t
            t, ours_exp = timed(lambda: sentence_bleu_ids(cands, all_refs, smoothing="exp", effective_order=True), reps)
            row[f"torch_exp_{th}t_s"] = t
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t, ref = timed(lambda: [sentence_bleu(r, c, smoothing_function=method1) for c, r in zip(cands, all_refs)],
                           loop_reps, warmup=0)
        row["nltk_s"] = t
        row["max_abs_diff_nltk"] = max(abs(a - b) for a, b in zip(ours.tolist(), ref))
        text_c = [" ".join(map(str, c)) for c in cands]
        text_r = [[" ".join(map(str, x)) for x in r] for r in all_refs]
        t, sref = timed(lambda: [sacre.sentence_score(c, r).score / 100 for c, r in zip(text_c, text_r)],
                        loop_reps, warmup=0)
        row["sacrebleu_s"] = t
        row["max_abs_diff_sacrebleu"] = max(abs(a - b) for a, b in zip(ours_exp.tolist(), sref))
        best = min(row[f"torch_method1_{th}t_s"] for th in threads)
        row["speedup_vs_nltk"] = row["nltk_s"] / best
        row["speedup_vs_sacrebleu"] = row["sacrebleu_s"] / min(row[f"torch_exp_{th}t_s"] for th in threads)
        rows.append(row)
        print(f"  done {n} x {length} x {refs} refs", flush=True)
    return rows


def table(rows: list[dict], threads: list[int]) -> str:
    head = ["sentences", "tokens", "refs"] + [f"torch {th}t (ms)" for th in threads] + [
        "NLTK loop (ms)", "sacrebleu loop (ms)", "x NLTK", "x sacrebleu", "max |diff|"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["sentences"]), str(r["tokens"]), str(r["references"])]
        cells += [f"{1000 * r[f'torch_method1_{th}t_s']:.0f}" for th in threads]
        cells += [f"{1000 * r['nltk_s']:.0f}", f"{1000 * r['sacrebleu_s']:.0f}", f"{r['speedup_vs_nltk']:.1f}",
                  f"{r['speedup_vs_sacrebleu']:.1f}",
                  f"{max(r['max_abs_diff_nltk'], r['max_abs_diff_sacrebleu']):.1e}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only the two smallest batches")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions of the torch version")
    ap.add_argument("--loop-reps", type=int, default=1, help="timed repetitions of the NLTK/sacrebleu loops")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "bleu.json")
    args = ap.parse_args()
    threads = sorted({1, torch.get_num_threads()})
    configs = QUICK if args.quick else CONFIGS
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows = run(configs, args.reps, args.loop_reps, threads)
    import nltk
    import sacrebleu

    result = {
        "benchmark": "per-sentence BLEU on token ids: postrl sentence_bleu_ids vs NLTK / sacrebleu loops",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "nltk": nltk.__version__, "sacrebleu": sacrebleu.__version__, "cpu_count": os.cpu_count(),
                    "load_average_at_start": load, "device": "cpu"},
        "settings": {"vocab": VOCAB, "reps": args.reps, "loop_reps": args.loop_reps, "threads": threads,
                     "torch_smoothing": "method1 (vs NLTK method1); exp + effective order (vs sacrebleu)"},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows, threads))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
