"""``postrl eval --env NAME``: models evaluated on multi-turn episodes of an environment (agents, tools).

    for model in models:
        starts   = P start states: environment seeds (and data samples with --task)
        greedy   = one greedy episode per start                       -> greedy success, return, turns, tool calls
        sampled  = n episodes per start at the temperature            -> success rate, pass@k over episodes, ...
        per-start values -> mean over starts + bootstrap CI over starts   (postrl.eval.metrics, as single-turn)
    write eval.json, samples.jsonl (whole transcripts), pass_at_k.png; print a side-by-side table

A *start* plays the role of a problem: the episodes of one start begin from the same state (same environment
seed, same data sample), so pass@k is "at least one of k episodes from this start succeeds", estimated without
bias from the n episodes with :func:`postrl.eval.metrics.pass_at_k` (Chen et al. 2021, eq. 1). Starts are the
independent units, so the confidence intervals resample starts.

The environment seeds of the starts are those of ``postrl train``'s held-out episode evaluation
(:func:`heldout_env_seeds`): with ``--seed`` equal to a run's ``run.seed`` the greedy success here is the run's
``eval/accuracy`` on the same start states. The episodes are played by the same runner as in training
(:class:`postrl.rollout.episodes.EpisodeRunner`), so tokens, turn limits and tool calls behave identically.
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
import yaml

from postrl.config.env import EnvConfig
from postrl.eval.metrics import pass_at_k
from postrl.eval.runner import (
    EvalError,
    EvalSettings,
    _json_safe,
    check_model_spec,
    model_labels,
    render_columns,
    resolve_model,
    resolve_out_dir,
    summarize,
)
from postrl.run.files import write_text_atomic

DEFAULT_STARTS = 100
DEFAULT_MAX_TOKENS_PER_TURN = 64
EPISODE_METRICS = ("success_rate", "return_mean", "turns_mean", "tool_calls_mean", "tool_call_frac",
                   "tool_errors_mean", "invalid_actions_mean", "env_errors_mean", "truncated_frac",
                   "sampled_tokens_mean", "episode_tokens_mean")
GREEDY_METRICS = {"greedy_success_rate": "success", "greedy_return_mean": "episode_return", "greedy_turns_mean": "turns",
                  "greedy_tool_calls_mean": "tool_calls"}


def heldout_env_seeds(seed: int, count: int) -> list[int]:
    """Environment seeds of ``count`` held-out starts: ``(seed * 1_000_003 + 104_729 * i) mod 2^31``, the
    seeds of ``RLTrainer.evaluate_episodes`` for a run with ``run.seed = seed``."""
    return [(int(seed) * 1_000_003 + 104_729 * i) % 2**31 for i in range(count)]


# --------------------------------------------------------------------------------------------------
# what to play
# --------------------------------------------------------------------------------------------------

@dataclass
class EnvTask:
    """The episodes of one evaluation: the environment (an :class:`EnvConfig`, tools and limits included)
    and the starts (``seeds[i]`` with ``samples[i]``, None for procedurally generated environments)."""

    spec: str
    name: str
    env: EnvConfig
    seeds: list[int]
    samples: list[Any]
    system_prompt: Optional[str] = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        e = self.env
        return {"name": e.name, "kwargs": dict(e.kwargs), "tools": list(e.tools), "max_turns": e.max_turns,
                "max_tokens_per_turn": e.max_tokens_per_turn, "max_episode_tokens": e.max_episode_tokens,
                "success_threshold": e.success_threshold}


def _split_top_level(text: str) -> list[str]:
    from postrl.eval.tasks import _split_top_level as split

    return split(text)


def parse_env_kwargs(values: Sequence[str] | None) -> dict[str, Any]:
    """``--env-kwargs`` values merged in order: each a YAML mapping (``'{size: 3, shaping: 0.1}'``) or
    ``key=value[,key=value...]`` pairs (values read as YAML: ``3`` is an int, ``[3,4]`` a list)."""
    out: dict[str, Any] = {}
    for text in values or []:
        text = str(text).strip()
        if not text:
            continue
        if text.startswith("{"):
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise EvalError(f"--env-kwargs {text!r}: not a YAML mapping ({exc})") from None
            if not isinstance(value, dict):
                raise EvalError(f"--env-kwargs {text!r}: expected a mapping such as '{{size: 3}}'")
            out.update({str(k): v for k, v in value.items()})
            continue
        for pair in _split_top_level(text):
            key, eq, raw = pair.partition("=")
            if not eq or not key.strip().isidentifier():
                raise EvalError(f"--env-kwargs {text!r}: {pair!r} is not key=value; give key=value pairs "
                                f"(size=3,shaping=0.1) or a YAML mapping ('{{size: 3}}')")
            try:
                out[key.strip()] = yaml.safe_load(raw.strip()) if raw.strip() else ""
            except yaml.YAMLError:
                out[key.strip()] = raw.strip()
    return out


def parse_tools(text: Optional[str]) -> list[Any]:
    """``--tools``: comma-separated tool names (``calculator,python``) or a YAML list whose entries are names
    or mappings with a ``name`` (``'[calculator, {name: search, corpus: docs.jsonl}]'``)."""
    if text is None or not str(text).strip():
        return []
    text = str(text).strip()
    items: list[Any]
    if text.startswith("["):
        try:
            items = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise EvalError(f"--tools {text!r}: not a YAML list ({exc})") from None
        if not isinstance(items, list):
            raise EvalError(f"--tools {text!r}: expected a list")
    else:
        items = []
        for part in _split_top_level(text):
            if part.startswith("{"):
                try:
                    items.append(yaml.safe_load(part))
                except yaml.YAMLError as exc:
                    raise EvalError(f"--tools: {part!r} is not a YAML mapping ({exc})") from None
            else:
                items.append(part)
    for item in items:
        if not (isinstance(item, str) and item or isinstance(item, dict) and isinstance(item.get("name"), str)):
            raise EvalError(f"--tools: {item!r} must be a tool name or a mapping with a 'name' key")
    return items


def check_env(env: EnvConfig) -> None:
    """Build the environment (and its tools) once, so that an unknown name, an unknown or bad argument fails
    now, naming the valid ones (:class:`postrl.config.ConfigError`), before any model is loaded."""
    from postrl.config import ConfigError
    from postrl.config.checks import Problems
    from postrl.envs import EnvError, env_factory

    problems = Problems()
    env.validate(problems, None)
    if problems.messages:
        flags = {"env.max_turns": "--max-turns", "env.max_tokens_per_turn": "--max-new-tokens",
                 "env.max_episode_tokens": "--max-episode-tokens", "env.tools": "--tools"}
        msgs = []
        for m in problems.messages:
            for key, flag in flags.items():
                m = m.replace(key, flag)
            msgs.append(m)
        raise EvalError("invalid environment settings:\n  - " + "\n  - ".join(msgs))
    try:
        env_factory(env)
    except (EnvError, TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise EvalError(f"--env {env.name}: the environment cannot be built with {dict(env.kwargs)} "
                        f"({type(exc).__name__}: {exc})") from None


def build_env_task(name: str, kwargs: Optional[dict[str, Any]] = None, tools: Optional[list[Any]] = None, *,
                   max_turns: int = 8, max_tokens_per_turn: int = DEFAULT_MAX_TOKENS_PER_TURN,
                   max_episode_tokens: int = 1024, starts: int = DEFAULT_STARTS, seed: int = 0,
                   samples: Optional[list[Any]] = None, system_prompt: Optional[str] = None,
                   success_threshold: float = 1.0, spec: Optional[str] = None) -> EnvTask:
    """An :class:`EnvTask` of ``starts`` held-out starts (seeds :func:`heldout_env_seeds` of ``seed``; with
    ``samples``, the first ``starts`` of them go to ``reset``). The environment is built once here."""
    if isinstance(starts, bool) or not isinstance(starts, int) or starts < 1:
        raise EvalError(f"--starts {starts}: must be an integer >= 1 (start states evaluated)")
    env = EnvConfig(name=name, kwargs=dict(kwargs or {}), tools=list(tools or []), max_turns=max_turns,
                    max_tokens_per_turn=max_tokens_per_turn, max_episode_tokens=max_episode_tokens,
                    success_threshold=success_threshold)
    check_env(env)
    if samples is not None:
        samples = list(samples)[:starts]
        if not samples:
            raise EvalError(f"--env {name}: the --task gave no samples to start episodes from")
    else:
        samples = [None] * starts
    seeds = heldout_env_seeds(seed, len(samples))
    label = name + (f"{json.dumps(env.kwargs, sort_keys=True, default=str)}" if env.kwargs else "")
    if tools:
        label += " + tools " + ",".join(t if isinstance(t, str) else str(t.get("name")) for t in tools)
    return EnvTask(spec or f"env:{label}", name, env, seeds, samples, system_prompt,
                   info={"starts": len(seeds), "env_seed": seed})


def env_task_from_run_config(cfg: Any, spec: str, starts: Optional[int] = None) -> EnvTask:
    """The held-out episodes of a training run with ``env.name``: its environment, tools and limits, its
    held-out samples (``data.eval_size``), the seeds of its own held-out evaluation (``run.seed``) and its
    system prompt, so the greedy success equals the run's ``eval/accuracy`` for the same weights."""
    from postrl.data import build_data_source

    source = build_data_source(cfg)
    samples = list(source.eval)
    if starts is not None:
        samples = samples[:starts]
    e = cfg.env
    per_turn = e.max_tokens_per_turn or cfg.rollout.max_new_tokens
    task = build_env_task(e.name, e.kwargs, e.tools, max_turns=e.max_turns, max_tokens_per_turn=per_turn,
                          max_episode_tokens=e.max_episode_tokens, starts=max(1, len(samples)), seed=cfg.run.seed,
                          samples=samples, system_prompt=cfg.data.system_prompt,
                          success_threshold=e.success_threshold, spec=spec)
    task.name = f"{e.name} (held-out episodes of the run)"
    return task


# --------------------------------------------------------------------------------------------------
# per-start values
# --------------------------------------------------------------------------------------------------

def per_start_values(sampled: Sequence[Sequence[Any]], ks: Sequence[int],
                     greedy: Optional[Sequence[Any]] = None) -> dict[str, list[float]]:
    """One value per start for every metric, from ``sampled[p]`` (the n :class:`EpisodeInfo` of start p)
    and ``greedy[p]`` (its greedy episode): ``pass@k`` (unbiased, from the number of successful episodes),
    the means over the start's episodes of :data:`EPISODE_METRICS` and, with ``greedy``, ``greedy_*``."""
    n = len(sampled[0]) if sampled else 0
    bad = [k for k in ks if k > n]
    if bad:
        raise EvalError(f"k = {', '.join(map(str, bad))} > n = {n} episodes per start; use n >= {max(bad)}")
    vals: dict[str, list[float]] = {f"pass@{k}": [] for k in ks}
    for key in EPISODE_METRICS:
        vals[key] = []
    for eps in sampled:
        c = sum(bool(e.success) for e in eps)
        for k in ks:
            vals[f"pass@{k}"].append(pass_at_k(n, c, k))
        m = len(eps)
        vals["success_rate"].append(c / m)
        vals["return_mean"].append(float(np.mean([e.episode_return for e in eps])))
        vals["turns_mean"].append(float(np.mean([e.turns for e in eps])))
        vals["tool_calls_mean"].append(float(np.mean([e.tool_calls for e in eps])))
        vals["tool_call_frac"].append(sum(e.tool_calls > 0 for e in eps) / m)
        vals["tool_errors_mean"].append(float(np.mean([e.tool_errors for e in eps])))
        vals["invalid_actions_mean"].append(float(np.mean([e.invalid_actions for e in eps])))
        vals["env_errors_mean"].append(float(np.mean([e.env_errors for e in eps])))
        vals["truncated_frac"].append(sum(bool(e.truncated) for e in eps) / m)
        vals["sampled_tokens_mean"].append(float(np.mean([e.sampled_tokens for e in eps])))
        vals["episode_tokens_mean"].append(float(np.mean([e.sampled_tokens + e.env_tokens for e in eps])))
    if greedy is not None:
        for key, attr in GREEDY_METRICS.items():
            vals[key] = [float(getattr(e, attr)) for e in greedy]
    return vals


# --------------------------------------------------------------------------------------------------
# one model
# --------------------------------------------------------------------------------------------------

def _runner(backend: Any, tokenizer: Any, task: EnvTask, settings: EvalSettings, temperature: float):
    from postrl.envs import env_factory
    from postrl.rollout.episodes import EpisodeRunner
    from postrl.rollout.generator import SamplingParams

    e = task.env
    per_turn = settings.max_new_tokens or e.max_tokens_per_turn or DEFAULT_MAX_TOKENS_PER_TURN
    try:
        return EpisodeRunner(
            backend, tokenizer, env_factory(e), max_turns=e.max_turns, max_tokens_per_turn=per_turn,
            max_episode_tokens=max(e.max_episode_tokens, per_turn), max_active=settings.batch_size,
            sampling=SamplingParams(per_turn, temperature=temperature,
                                    top_p=settings.top_p if temperature > 0 else 1.0),
            system_prompt=task.system_prompt, success_threshold=e.success_threshold,
            chat_template_kwargs=task.chat_template_kwargs or None, batch_size=settings.batch_size)
    except ValueError as exc:  # e.g. a tokenizer without a chat template
        raise EvalError(f"cannot play episodes with this model: {exc}") from None


def _rows(batch: Any) -> list[tuple[Any, str, list[int]]]:
    mask = batch.attention_mask.bool()
    return [(info, batch.prompt_texts[i], batch.completion_ids[i][mask[i]].tolist())
            for i, info in enumerate(batch.episodes)]


def evaluate_env_model(spec: str, label: str, task: EnvTask, settings: EvalSettings, samples_file=None,
                       log: Callable[[str], None] = print) -> dict[str, Any]:
    """Load one model and play ``task``'s episodes: greedy (one per start) and ``settings.n`` sampled per start;
    append every episode (transcript; token spans for the greedy ones) to ``samples_file``; return the model's
    ``eval.json`` entry."""
    import torch

    from postrl.eval.report import episode_record
    from postrl.models.loading import load_model_and_tokenizer
    from postrl.rollout.backend import build_backend
    from postrl.rollout.episodes import EpisodeTask

    load_path, run_dir = resolve_model(spec)
    t0 = time.time()
    model, tokenizer, loaded_from = load_model_and_tokenizer(load_path, dtype=settings.dtype, device=settings.device)
    model.eval()
    starts = [EpisodeTask(sample=s, seed=seed) for s, seed in zip(task.samples, task.seeds)]
    P, n = len(starts), settings.n
    backend = build_backend("torch", model, tokenizer)
    greedy_rows = None
    try:
        if settings.greedy:
            log(f"[eval] {label}: {P} greedy episodes of {task.env.name}")
            batch = _runner(backend, tokenizer, task, settings, 0.0).run(starts, 1, seed=settings.seed)
            greedy_rows = _rows(batch)
        log(f"[eval] {label}: {P} starts x {n} sampled episodes (temperature {settings.temperature})")
        batch = _runner(backend, tokenizer, task, settings, settings.temperature).run(starts, n, seed=settings.seed)
        sampled_rows = _rows(batch)
    finally:
        backend.close()
    sampled = [[sampled_rows[p * n + j][0] for j in range(n)] for p in range(P)]
    greedy = [r[0] for r in greedy_rows] if greedy_rows is not None else None
    values = per_start_values(sampled, settings.ks, greedy)
    entry: dict[str, Any] = {"name": label, "model": spec, "loaded_from": str(loaded_from),
                             "run_dir": str(run_dir) if run_dir else None, "num_problems": P, "num_starts": P,
                             "samples_per_problem": n, "episodes_per_start": n}
    entry.update(summarize(values, settings.bootstrap, settings.seed, settings.ci_level))
    entry.pop("maj_at_k", None)  # no answers to vote on: episodes succeed or not
    ends: dict[str, int] = {}
    for p in range(P):
        for e in sampled[p]:
            ends[e.end] = ends.get(e.end, 0) + 1
    entry["end_reasons"] = {k: v / (P * n) for k, v in sorted(ends.items())}
    entry["eval_time_s"] = time.time() - t0
    if samples_file is not None:
        rows = [("greedy", 0, r) for r in greedy_rows or []]
        rows += [("sampled", i % n, r) for i, r in enumerate(sampled_rows)]
        for i, (kind, j, (info, prompt_text, ids)) in enumerate(rows):
            p = i if kind == "greedy" else (i - len(greedy_rows or [])) // n
            sample = task.samples[p]
            rec = {"model": label, "start": p, "seed": task.seeds[p], "uid": getattr(sample, "uid", None),
                   "kind": kind, "index": j}
            rec.update(episode_record(info, prompt_text, ids, tokenizer if kind == "greedy" else None))
            samples_file.write(json.dumps(_json_safe(rec)) + "\n")
    del backend, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return entry


# --------------------------------------------------------------------------------------------------
# models x environment -> eval.json, samples.jsonl, pass_at_k.png
# --------------------------------------------------------------------------------------------------

def _fmt(stat: dict[str, Any], pct: bool, digits: int = 3) -> str:
    v, ci = stat.get("value"), stat.get("ci") or (None, None)
    if v is None or not math.isfinite(v):
        return "n/a"
    lo, hi = ci
    if pct:
        return f"{v * 100:.1f} [{lo * 100:.1f}, {hi * 100:.1f}]"
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


TABLE_ROWS = (("greedy_success_rate", "greedy success %", True), ("success_rate", "success rate %", True),
              ("return_mean", "mean return", False), ("turns_mean", "turns per episode", False),
              ("tool_calls_mean", "tool calls per episode", False), ("tool_call_frac", "episodes with a tool call %", True),
              ("tool_errors_mean", "tool errors per episode", False),
              ("invalid_actions_mean", "invalid actions per episode", False), ("truncated_frac", "truncated %", True),
              ("episode_tokens_mean", "tokens per episode", False))


def format_env_table(models: Sequence[dict[str, Any]]) -> str:
    """Side-by-side text table of an environment evaluation: one column per model (value and CI)."""
    rows: list[tuple[str, list[str]]] = []
    for key, label, pct in TABLE_ROWS:
        if all(key in m for m in models):
            rows.append((label, [_fmt(m[key], pct) for m in models]))
        if key == "success_rate":
            for k in sorted(models[0]["pass_at_k"], key=int):
                rows.append((f"pass@{k} %", [_fmt(m["pass_at_k"][k], True) for m in models]))
    return render_columns([m["name"] for m in models], rows)


def run_env_eval(model_specs: Sequence[str], task: EnvTask, settings: EvalSettings, out: Optional[str | Path] = None,
                 log: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]]:
    """Evaluate every model on ``task``'s episodes; write ``eval.json``, ``samples.jsonl`` (one line per
    episode) and ``pass_at_k.png`` into the output directory (as ``postrl eval`` does for tasks). Returns
    ``(directory, eval.json contents)``."""
    import postrl

    if not model_specs:
        raise EvalError("give at least one --model")
    settings.validate()
    if not task.seeds:
        raise EvalError(f"{task.spec!r} has no start states to evaluate")
    for spec in model_specs:
        check_model_spec(spec)
    run_dirs = [d for d in (resolve_model(spec)[1] for spec in model_specs) if d is not None]
    out_dir = resolve_out_dir(out, run_dirs[0] if run_dirs else None)
    labels = model_labels(model_specs)
    t0 = time.time()
    models = []
    samples_tmp = out_dir / ".samples.jsonl.tmp"
    try:
        with open(samples_tmp, "w") as f:
            for spec, label in zip(model_specs, labels):
                models.append(evaluate_env_model(spec, label, task, settings, f, log))
        os.replace(samples_tmp, out_dir / "samples.jsonl")
    finally:
        samples_tmp.unlink(missing_ok=True)
    result = {
        "kind": "env", "task": task.spec, "task_name": task.name, "task_info": task.info, "env": task.describe(),
        "num_problems": len(task.seeds), "num_starts": len(task.seeds), "start_seeds": list(task.seeds),
        "n": settings.n, "ks": list(settings.ks), "temperature": settings.temperature, "top_p": settings.top_p,
        "max_tokens_per_turn": settings.max_new_tokens or task.env.max_tokens_per_turn or DEFAULT_MAX_TOKENS_PER_TURN,
        "seed": settings.seed, "bootstrap_resamples": settings.bootstrap, "ci_level": settings.ci_level,
        "system_prompt": task.system_prompt, "postrl_version": getattr(postrl, "__version__", None),
        "wall_time_s": time.time() - t0, "models": models,
    }
    write_text_atomic(out_dir / "eval.json", json.dumps(_json_safe(result), indent=2, allow_nan=False))
    from postrl.eval.report import parse_eval, pass_at_k_png

    png = pass_at_k_png(parse_eval(_json_safe(result)))
    if png is not None:
        (out_dir / "pass_at_k.png").write_bytes(png)
    return out_dir, result
