"""The evaluation runner: sample, score, summarize. Used by ``postrl eval`` and by ``postrl train``.

    for model in models:
        prompts  = render(task.problems)                               # chat template + prompt template
        greedy   = generate(prompts, temperature=0)        -> scores   # greedy accuracy
        samples  = generate(prompts x n, temperature)      -> scores   # pass@k, maj@k, reward, length, diversity
        per-problem values -> mean over problems + bootstrap CI over problems   (postrl.eval.metrics)
    write eval.json, samples.jsonl, pass_at_k.png; print a side-by-side table

``postrl train`` calls :func:`heldout_eval` (greedy accuracy, and pass@k when ``eval.n > 0``) for its
before / after / periodic evaluation, so training and ``postrl eval`` share one code path.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from postrl.data.sources import CORRECT_EPS
from postrl.run.files import write_text_atomic
from postrl.eval.metrics import (
    distinct_correct_answers,
    distinct_n,
    maj_at_k,
    mean_with_ci,
    normalize_answer,
    pass_at_k,
    powers_of_two_up_to,
)
from postrl.rollout.backend import GenerationBackend, build_backend
from postrl.rollout.generator import SamplingParams

DISTINCT_NS = (1, 2, 3, 4)


class EvalError(ValueError):
    """Bad evaluation arguments (k > n, no models, an output directory that would be overwritten, ...)."""


# --------------------------------------------------------------------------------------------------
# generate + score (shared by greedy and sampled evaluation)
# --------------------------------------------------------------------------------------------------

@dataclass
class Scored:
    """Completions of P problems, ``n`` per problem, problem-major (``texts[p][j]``)."""

    texts: list[list[str]]
    token_ids: list[list[list[int]]]
    scores: list[list[float]]
    correct: list[list[bool]]
    extracted: list[list[Optional[str]]]
    truncated: list[list[bool]]

    @property
    def lengths(self) -> list[list[int]]:
        return [[len(t) for t in row] for row in self.token_ids]


def generate_and_score(backend: GenerationBackend, tokenizer, source: Any, problems: Sequence[Any],
                       prompts: Sequence[list[int]], n: int, params: SamplingParams, seed: int = 0,
                       batch_size: int = 64) -> Scored:
    """Sample ``n`` completions for each problem (``prompts[p]`` its token ids) with ``backend`` and score
    each once.

    Decoding runs in chunks of about ``batch_size`` sequences (whole problems per chunk). A completion is
    correct when ``source.score >= 1 - 1e-9`` (the same rule as ``PromptSource.is_correct``). ``seed``
    fixes the samples.
    """
    if n < 1:
        raise EvalError(f"samples per problem must be >= 1, got {n}")
    if len(problems) != len(prompts):
        raise EvalError(f"{len(problems)} problems but {len(prompts)} prompts")
    out = Scored([], [], [], [], [], [])
    if not problems:
        return out
    per_chunk = max(1, batch_size // n)
    for start in range(0, len(problems), per_chunk):
        chunk = list(range(start, min(len(problems), start + per_chunk)))
        gen = backend.generate([prompts[p] for p in chunk for _ in range(n)], params,
                               seed=seed + start, batch_size=batch_size)
        ids = [row[m.bool()].tolist() for row, m in zip(gen.completion_ids, gen.completion_mask)]
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        for j, p in enumerate(chunk):
            rows = range(j * n, (j + 1) * n)
            sample = problems[p]
            scores = [source.score(texts[r], sample) for r in rows]
            out.texts.append([texts[r] for r in rows])
            out.token_ids.append([ids[r] for r in rows])
            out.scores.append(scores)
            out.correct.append([s >= 1.0 - CORRECT_EPS for s in scores])
            out.extracted.append([source.extract(texts[r]) for r in rows])
            out.truncated.append([bool(gen.truncated[r]) for r in rows])
    return out


# --------------------------------------------------------------------------------------------------
# per-problem values and their summary
# --------------------------------------------------------------------------------------------------

def per_problem_values(sampled: Scored, ks: Sequence[int], greedy: Optional[Scored] = None,
                       maj_subsets: int = 32, seed: int = 0) -> dict[str, list[float]]:
    """One value per problem for every metric (the mean over problems is the model's score).

    Keys: ``pass@k`` and ``maj@k`` for each k, ``greedy_accuracy`` (when ``greedy`` is given),
    ``reward_mean`` and ``response_len_mean`` over the problem's samples, ``distinct_1..4`` over the
    problem's sampled token ids, ``distinct_correct_answers``.
    """
    n = len(sampled.texts[0]) if sampled.texts else 0
    bad = [k for k in ks if k > n]
    if bad:
        raise EvalError(f"k = {', '.join(map(str, bad))} > n = {n} samples per problem; use n >= {max(bad)} "
                        f"or only k <= {n}")
    vals: dict[str, list[float]] = {f"pass@{k}": [] for k in ks}
    vals.update({f"maj@{k}": [] for k in ks})
    lengths = sampled.lengths  # a computed property: once, not once per problem
    for p in range(len(sampled.texts)):
        c = sum(sampled.correct[p])
        answers = [normalize_answer(a) for a in sampled.extracted[p]]
        for k in ks:
            vals[f"pass@{k}"].append(pass_at_k(n, c, k))
            vals[f"maj@{k}"].append(maj_at_k(answers, sampled.correct[p], k, maj_subsets, seed=seed + p))
        vals.setdefault("reward_mean", []).append(float(np.mean(sampled.scores[p])))
        vals.setdefault("response_len_mean", []).append(float(np.mean(lengths[p])))
        for d in DISTINCT_NS:
            vals.setdefault(f"distinct_{d}", []).append(distinct_n(sampled.token_ids[p], d))
        vals.setdefault("distinct_correct_answers", []).append(
            float(distinct_correct_answers(answers, sampled.correct[p])))
    if greedy is not None:
        vals["greedy_accuracy"] = [float(row[0]) for row in greedy.correct]
        vals["greedy_reward_mean"] = [float(row[0]) for row in greedy.scores]
        vals["greedy_response_len_mean"] = [float(row[0]) for row in greedy.lengths]
    return vals


def task_rows(problems: Sequence[Any]) -> dict[str, list[int]]:
    """The problems of each task of a mixture (``metadata["task_name"]``, see :mod:`postrl.data.mixture`), in
    order of first appearance; empty when fewer than two tasks are present."""
    from postrl.data.mixture import TASK_KEY

    rows: dict[str, list[int]] = {}
    for i, s in enumerate(problems):
        name = (getattr(s, "metadata", None) or {}).get(TASK_KEY)
        if name is None:
            return {}
        rows.setdefault(str(name), []).append(i)
    return rows if len(rows) > 1 else {}


def summarize_by_task(values: dict[str, list[float]], problems: Sequence[Any], num_resamples: int = 1000,
                      seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """:func:`summarize` over each task's problems separately (a mixture's held-out set), with
    ``num_problems``; ``{}`` for a single task."""
    out = {}
    for name, idx in task_rows(problems).items():
        out[name] = summarize({k: [v[i] for i in idx] for k, v in values.items()}, num_resamples, seed, level)
        out[name]["num_problems"] = len(idx)
    return out


def summarize(values: dict[str, list[float]], num_resamples: int = 1000, seed: int = 0,
              level: float = 0.95) -> dict[str, Any]:
    """Means over problems with bootstrap CIs: ``{"pass_at_k": {"1": {"value", "ci", "n"}, ...},
    "maj_at_k": {...}, <scalar metric>: {"value", "ci", "n"}, ...}`` (every metric resampled with the
    same ``seed``, so the intervals of one model come from the same resampled problem sets)."""
    out: dict[str, Any] = {"pass_at_k": {}, "maj_at_k": {}}
    for key, v in values.items():
        stat = mean_with_ci(v, num_resamples, seed, level)
        if key.startswith("pass@"):
            out["pass_at_k"][key[5:]] = stat
        elif key.startswith("maj@"):
            out["maj_at_k"][key[4:]] = stat
        else:
            out[key] = stat
    return out


# --------------------------------------------------------------------------------------------------
# the held-out evaluation of `postrl train`
# --------------------------------------------------------------------------------------------------

def heldout_eval(backend: GenerationBackend, tokenizer, source: Any, samples: list[Any],
                 render: Callable[[Any], list[int]], max_new_tokens: int, batch_size: int = 64, n: int = 0,
                 ks: Sequence[int] = (), temperature: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """Greedy held-out accuracy, and pass@k from ``n`` samples per problem when ``n > 0``, sampled with
    ``backend``.

    Returns ``{"accuracy", "reward_mean", "response_len_mean", "format_rate", "n", "examples"}`` (greedy
    decoding; ``format_rate`` is the share of completions from which the source's answer extraction gets
    an answer at all; ``n`` is the number of problems; ``examples`` the first five completions) and, with
    ``n > 0``, also
    ``"samples_per_problem"``, ``"pass@k"`` (``{k: value}``, default k: powers of two up to n) and
    ``"sampled_reward_mean"``.
    """
    if not samples:
        return {"accuracy": float("nan"), "reward_mean": float("nan"), "response_len_mean": 0.0, "n": 0,
                "examples": []}
    prompts = [render(s) for s in samples]
    greedy = generate_and_score(backend, tokenizer, source, samples, prompts, 1,
                                SamplingParams(max_new_tokens, temperature=0.0), seed=0, batch_size=batch_size)
    m = len(samples)
    out: dict[str, Any] = {
        "accuracy": sum(row[0] for row in greedy.correct) / m,
        "reward_mean": sum(row[0] for row in greedy.scores) / m,
        "response_len_mean": float(np.mean([row[0] for row in greedy.lengths])),
        "format_rate": sum(row[0] not in (None, "") for row in greedy.extracted) / m,
        "n": m,
        "examples": [{"question": s.question, "answer": s.answer, "completion": t[0], "correct": c[0]}
                     for s, t, c in list(zip(samples, greedy.texts, greedy.correct))[:5]],
    }
    if n > 0:
        ks = list(ks) or powers_of_two_up_to(n)
        sampled = generate_and_score(backend, tokenizer, source, samples, prompts, n,
                                     SamplingParams(max_new_tokens, temperature=temperature), seed=seed,
                                     batch_size=batch_size)
        counts = [sum(row) for row in sampled.correct]
        out["samples_per_problem"] = n
        out["pass@k"] = {str(k): float(np.mean([pass_at_k(n, c, k) for c in counts])) for k in ks}
        out["sampled_reward_mean"] = float(np.mean([np.mean(row) for row in sampled.scores]))
    return out


def flat_eval_metrics(ev: dict[str, Any], prefix: str = "eval/") -> dict[str, float]:
    """The numbers of a :func:`heldout_eval` result as flat ``metrics.jsonl`` keys
    (``eval/accuracy``, ``eval/reward_mean``, ``eval/response_len_mean``, ``eval/pass@4``, ...)."""
    out = {f"{prefix}{k}": float(ev[k]) for k in ("accuracy", "reward_mean", "response_len_mean",
                                                  "sampled_reward_mean") if k in ev}
    out.update({f"{prefix}pass@{k}": float(v) for k, v in (ev.get("pass@k") or {}).items()})
    return out


# --------------------------------------------------------------------------------------------------
# postrl eval: models x task -> eval.json, samples.jsonl, pass_at_k.png
# --------------------------------------------------------------------------------------------------

@dataclass
class EvalSettings:
    """Everything ``postrl eval`` needs besides the models and the task."""

    n: int = 64
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: Optional[int] = None  # None = the task's default
    batch_size: int = 256
    seed: int = 0
    bootstrap: int = 1000
    ci_level: float = 0.95
    maj_subsets: int = 32
    greedy: bool = True
    device: str = "auto"
    dtype: str = "auto"

    def validate(self) -> None:
        errors = []
        if self.n < 1:
            errors.append(f"n={self.n}: must be >= 1 (samples per problem)")
        bad = [k for k in self.ks if k < 1 or k > self.n]
        if not self.ks:
            errors.append("k: give at least one k (e.g. 1,2,4,8)")
        elif bad:
            errors.append(f"k={','.join(map(str, bad))}: every k must be in [1, n={self.n}] (pass@k with k > n is "
                          f"undefined; raise --n to {max(bad)} or drop those k)")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            errors.append(f"temperature={self.temperature}: must be > 0 for sampling (greedy accuracy is "
                          "computed separately)")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            errors.append(f"top_p={self.top_p}: must be in (0, 1]")
        for name in ("batch_size", "bootstrap", "maj_subsets"):
            if getattr(self, name) < 1:
                errors.append(f"{name}={getattr(self, name)}: must be >= 1")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            errors.append(f"max_new_tokens={self.max_new_tokens}: must be >= 1 (leave it out for the task's default)")
        if self.seed < 0:
            errors.append(f"seed={self.seed}: must be >= 0")
        from postrl.config import DEVICE_PATTERN, DTYPES

        if not DEVICE_PATTERN.match(self.device):
            errors.append(f"device={self.device!r}: must be one of auto, cpu, cuda, cuda:N (N a GPU index), mps")
        if self.dtype not in DTYPES:
            errors.append(f"dtype={self.dtype!r}: must be one of {', '.join(DTYPES)}")
        if not 0 < self.ci_level < 1:
            errors.append(f"ci_level={self.ci_level}: must be in (0, 1)")
        if errors:
            raise EvalError("invalid evaluation settings:\n  - " + "\n  - ".join(errors))


def check_model_spec(spec: str) -> None:
    """Refuse, before any model is evaluated, a ``--model`` that names a local path that does not exist (a
    relative or absolute path, ``~/...``, or more than one ``/``); ``org/name`` may be a hub id and is left to
    the loader, as are ``tiny:...`` specs."""
    p = Path(spec).expanduser()
    if p.exists() or spec.startswith("tiny"):
        return
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1 or spec.endswith("/"):
        raise EvalError(f"--model {spec}: no such model or run directory (and not a hub id of the form org/name)")


def resolve_model(spec: str) -> tuple[str, Optional[Path]]:
    """``(what to load, run directory or None)``: a run directory written by ``postrl train`` (it has
    ``checkpoints/``) loads its latest checkpoint; anything else (a model directory, a hub id) as is."""
    from postrl.run.checkpoint import latest_checkpoint

    p = Path(spec).expanduser()
    if p.is_dir() and not (p / "config.json").is_file() and (p / "checkpoints").is_dir():
        ckpt = latest_checkpoint(p / "checkpoints")
        if ckpt is None:
            raise EvalError(f"--model {spec}: a run directory without a complete checkpoint under "
                            f"{p / 'checkpoints'} (train with train.save_every or let the run finish)")
        return str(ckpt), p
    return spec, None


def model_labels(specs: Sequence[str]) -> list[str]:
    """Short distinct names for the models: a path's last component or the hub id; the full path when
    two paths share their last component; ``#1``, ``#2``... when the same model is given twice."""
    from collections import Counter

    short = [Path(s).expanduser().name if Path(s).expanduser().exists() else s for s in specs]
    clash = Counter(short)
    labels = [str(Path(s).expanduser().resolve()) if clash[lab] > 1 and Path(s).expanduser().exists() else lab
              for s, lab in zip(specs, short)]
    total, seen = Counter(labels), Counter()
    for i, lab in enumerate(labels):
        if total[lab] > 1:
            seen[lab] += 1
            labels[i] = f"{lab}#{seen[lab]}"
    return labels


def evaluate_model(spec: str, label: str, task, settings: EvalSettings, samples_file=None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Load one model, evaluate it on ``task``; append its completions to ``samples_file``; return its
    ``eval.json`` entry (see :func:`summarize`)."""
    import torch

    from postrl.data import build_messages, render_prompt
    from postrl.models.loading import load_model_and_tokenizer

    load_path, run_dir = resolve_model(spec)
    t0 = time.time()
    model, tokenizer, loaded_from = load_model_and_tokenizer(load_path, dtype=settings.dtype, device=settings.device)
    prompts = [render_prompt(tokenizer, build_messages(s, task.system_prompt, task.prompt_template))
               for s in task.problems]
    max_new = (settings.max_new_tokens or task.default_max_new_tokens)
    P, n = len(task.problems), settings.n
    greedy = None
    backend = build_backend("torch", model, tokenizer)
    try:
        if settings.greedy:
            log(f"[eval] {label}: greedy decoding of {P} problems")
            greedy = generate_and_score(backend, tokenizer, task.source, task.problems, prompts, 1,
                                        SamplingParams(max_new, temperature=0.0), seed=settings.seed,
                                        batch_size=settings.batch_size)
        log(f"[eval] {label}: sampling {P} problems x {n} completions (temperature {settings.temperature})")
        sampled = generate_and_score(backend, tokenizer, task.source, task.problems, prompts, n,
                                     SamplingParams(max_new, temperature=settings.temperature, top_p=settings.top_p),
                                     seed=settings.seed, batch_size=settings.batch_size)
    finally:
        backend.close()
    values = per_problem_values(sampled, settings.ks, greedy, settings.maj_subsets, settings.seed)
    entry: dict[str, Any] = {"name": label, "model": spec, "loaded_from": str(loaded_from),
                             "run_dir": str(run_dir) if run_dir else None, "num_problems": P,
                             "samples_per_problem": n}
    entry.update(summarize(values, settings.bootstrap, settings.seed, settings.ci_level))
    per_task = summarize_by_task(values, task.problems, settings.bootstrap, settings.seed, settings.ci_level)
    if per_task:  # a mixture's held-out set: every number per task as well
        entry["tasks"] = per_task
    entry["truncated_frac"] = float(np.mean([t for row in sampled.truncated for t in row]))
    entry["eval_time_s"] = time.time() - t0
    if samples_file is not None:
        for p, sample in enumerate(task.problems):
            rows = [("greedy", 0)] if greedy is not None else []
            rows += [("sampled", j) for j in range(n)]
            for kind, j in rows:
                src = greedy if kind == "greedy" else sampled
                samples_file.write(json.dumps({
                    "model": label, "uid": sample.uid, "kind": kind, "index": j,
                    "score": src.scores[p][j], "correct": src.correct[p][j],
                    "extracted": src.extracted[p][j], "normalized": normalize_answer(src.extracted[p][j]),
                    "length": len(src.token_ids[p][j]), "truncated": src.truncated[p][j],
                    "completion": src.texts[p][j], "reference": sample.answer,
                }) + "\n")
    del backend, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return entry


OUTPUT_FILES = ("eval.json", "samples.jsonl", "pass_at_k.png")


def resolve_out_dir(out: Optional[str | Path], run_dir: Optional[Path] = None) -> Path:
    """The output directory. Without ``out``: ``RUN_DIR/eval`` (``eval-2``, ...) when ``run_dir`` (the first
    model given as a training run directory) is set, else a new ``runs/eval[-N]``; both never overwrite.
    With ``out``: that directory, or for a training run directory its ``eval/`` subdirectory (where
    ``postrl report`` looks), refusing one that already holds eval outputs."""
    from postrl.run.dirs import fresh_dir

    if out is None:
        return fresh_dir(run_dir, "eval") if run_dir is not None else fresh_dir("runs", "eval")
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise EvalError(f"--out {p}: a file, not a directory; give a directory for eval.json, samples.jsonl and "
                        "pass_at_k.png")
    probe = p
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise EvalError(f"--out {p}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise EvalError(f"--out {p}: {probe} is not writable by this user")
    if (p / "config.yaml").is_file() and (p / "metrics.jsonl").is_file():
        p = p / "eval"  # a training run: keep its own samples.jsonl
    taken = [f for f in OUTPUT_FILES if (p / f).exists()]
    if taken:
        raise EvalError(f"--out {p}: it already holds {', '.join(taken)} from an earlier evaluation; give a new "
                        "directory (or leave --out out for a fresh one)")
    p.mkdir(parents=True, exist_ok=True)
    return p


def _fmt(stat: dict[str, Any], pct: bool = True, digits: int = 3) -> str:
    v, (lo, hi) = stat["value"], stat["ci"]
    if v is None or not math.isfinite(v):
        return "n/a"
    if pct:
        return f"{v * 100:.1f} [{lo * 100:.1f}, {hi * 100:.1f}]"
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def format_table(models: Sequence[dict[str, Any]]) -> str:
    """Side-by-side text table: one column per model, one row per metric (value and 95% CI)."""
    rows: list[tuple[str, list[str]]] = []
    if all("greedy_accuracy" in m for m in models):
        rows.append(("greedy accuracy %", [_fmt(m["greedy_accuracy"]) for m in models]))
    for k in sorted(models[0]["pass_at_k"], key=int):
        rows.append((f"pass@{k} %", [_fmt(m["pass_at_k"][k]) for m in models]))
    for k in sorted(models[0]["maj_at_k"], key=int):
        rows.append((f"maj@{k} %", [_fmt(m["maj_at_k"][k]) for m in models]))
    rows.append(("mean reward", [_fmt(m["reward_mean"], pct=False) for m in models]))
    rows.append(("mean length (tokens)", [_fmt(m["response_len_mean"], pct=False, digits=1) for m in models]))
    for d in DISTINCT_NS:
        rows.append((f"distinct-{d}", [_fmt(m[f"distinct_{d}"], pct=False) for m in models]))
    rows.append(("distinct correct answers", [_fmt(m["distinct_correct_answers"], pct=False, digits=2)
                                               for m in models]))
    return render_columns([m["name"] for m in models], rows)


def render_columns(names: Sequence[str], rows: Sequence[tuple[str, list[str]]]) -> str:
    """A text table with one right-aligned column per name and one labelled row per metric."""
    width = max(24, *(len(r[0]) for r in rows))
    cols = [max(len(name), *(len(r[1][i]) for r in rows)) for i, name in enumerate(names)]
    lines = [" " * width + "  " + "  ".join(name.rjust(c) for name, c in zip(names, cols))]
    for label, cells in rows:
        lines.append(label.ljust(width) + "  " + "  ".join(cell.rjust(c) for cell, c in zip(cells, cols)))
    return "\n".join(lines)


def _json_safe(obj: Any) -> Any:
    """NaN / inf -> None (null), so eval.json is strict JSON (a metric undefined for a model is null)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def run_eval(model_specs: Sequence[str], task, settings: EvalSettings, out: Optional[str | Path] = None,
             log: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]]:
    """Evaluate every model on ``task``; write ``eval.json``, ``samples.jsonl`` and ``pass_at_k.png`` into
    the output directory (:func:`resolve_out_dir`). Returns ``(directory, eval.json contents)``."""
    import postrl

    if not model_specs:
        raise EvalError("give at least one --model")
    settings.validate()
    if not task.problems:
        raise EvalError(f"task {task.spec!r} has no problems to evaluate")
    for spec in model_specs:  # every model before the first is evaluated (and before anything is written)
        check_model_spec(spec)
    from postrl.data import build_messages

    try:  # a prompt template with a placeholder other than {question} fails here, not after the first model
        build_messages(task.problems[0], task.system_prompt, task.prompt_template)
    except ValueError as exc:
        raise EvalError(f"--prompt-template: {exc}") from None
    run_dirs = [d for d in (resolve_model(spec)[1] for spec in model_specs) if d is not None]
    out_dir = resolve_out_dir(out, run_dirs[0] if run_dirs else None)
    labels = model_labels(model_specs)
    t0 = time.time()
    models = []
    samples_tmp = out_dir / ".samples.jsonl.tmp"  # renamed when every model is done: a failed evaluation
    try:                                          # leaves nothing that blocks reusing --out
        with open(samples_tmp, "w") as f:
            for spec, label in zip(model_specs, labels):
                models.append(evaluate_model(spec, label, task, settings, f, log))
        os.replace(samples_tmp, out_dir / "samples.jsonl")
    finally:
        samples_tmp.unlink(missing_ok=True)
    result = {
        "task": task.spec, "task_name": task.name, "task_info": task.info, "num_problems": len(task.problems),
        "n": settings.n, "ks": list(settings.ks), "temperature": settings.temperature, "top_p": settings.top_p,
        "max_new_tokens": (settings.max_new_tokens or task.default_max_new_tokens), "seed": settings.seed,
        "bootstrap_resamples": settings.bootstrap, "ci_level": settings.ci_level,
        "maj_subsets": settings.maj_subsets, "prompt_template": task.prompt_template,
        "system_prompt": task.system_prompt, "answer_extraction": task.source.answer_extraction,
        "postrl_version": getattr(postrl, "__version__", None), "wall_time_s": time.time() - t0,
        "models": models,
    }
    write_text_atomic(out_dir / "eval.json", json.dumps(_json_safe(result), indent=2, allow_nan=False))
    from postrl.eval.report import parse_eval, pass_at_k_png  # one plot for eval and report

    png = pass_at_k_png(parse_eval(_json_safe(result)))
    if png is not None:
        (out_dir / "pass_at_k.png").write_bytes(png)
    return out_dir, result
