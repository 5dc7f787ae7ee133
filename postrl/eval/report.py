"""``postrl report RUN_DIR``: one self-contained HTML page per training run.

The page (``RUN_DIR/report.html``) embeds everything it shows: plots as base64 PNG data URIs, CSS in a
``<style>`` element, no scripts, no external resources, so it opens from disk in any browser and can be
mailed or attached as one file. PNG copies of the plots go to ``RUN_DIR/plots/``.

What it reads from the run directory (all optional except that one of the first two must exist):

- ``config.yaml``     the resolved config (shown in full, with a summary of the main keys);
- ``metrics.jsonl``   one row per step (``docs/runs-and-checkpoints.md``): the training curves;
- ``results.json``    held-out greedy evaluation before / during / after training, wall time;
- ``env.json``        versions, device, threads, seed: written by the trainer at start (:func:`write_environment`);
- ``samples.jsonl``   best and worst completions of a few groups at some steps (:func:`sample_log_record`);
- ``eval.json``       from ``postrl eval`` (pass@k, maj@k, ...), also looked for in ``RUN_DIR/eval/``, or
  given with ``--eval``.

The first half of this module is what the trainer calls while it runs (light imports only: the trainer
imports it); the second half reads a run and writes the page (matplotlib is imported only there).
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # the trainer-side half of this module stays light (no torch import)
    from postrl.rollout.batch import RolloutBatch

ENV_FILE = "env.json"
SAMPLES_FILE = "samples.jsonl"
REPORT_FILE = "report.html"
PLOTS_DIR = "plots"

SAMPLE_LOG_TARGET = 20  # about this many logged steps per run (plus the first and the last step)
SAMPLE_LOG_GROUPS = 2  # groups (prompts) logged per logged step: the first ones of the rollout batch
MAX_PROMPT_CHARS = 1000
MAX_COMPLETION_CHARS = 1500
MAX_TURN_CHARS = 600  # one turn of an episode's transcript
MAX_EPISODE_TOKEN_CHARS = 6000  # an episode's token spans, all together
REPORT_SAMPLE_STEPS = 4  # steps shown in the report's sample section, from early to late


class ReportError(ValueError):
    """The run directory (or the eval file) cannot be reported on; the message names the file and why."""


# ================================================================================================
# Recorded by the trainer while it runs
# ================================================================================================
def _package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment_info(cfg: Any, model: Any = None, model_source: str | None = None) -> dict[str, Any]:
    """Versions, device, dtype, threads and seeds of this process, as a JSON-ready dict."""
    import numpy as np
    import torch

    info: dict[str, Any] = {
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _package_version("transformers"),
        "postrl": _package_version("postrl"),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "seed": cfg.run.seed,
        "data_seed": cfg.resolved_data_seed,
        "model": cfg.model.name_or_path,
    }
    if model_source is not None:
        info["model_source"] = str(model_source)
    if model is not None:
        param = next(model.parameters())
        info["device"] = str(param.device)
        info["dtype"] = str(param.dtype).replace("torch.", "")
        if param.device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(param.device)
            info["cuda"] = torch.version.cuda
    return info


def write_environment(run_dir: str | Path, cfg: Any, model: Any = None, model_source: str | None = None,
                      start_step: int = 0) -> Path:
    """Write ``RUN_DIR/env.json`` for the process that starts (or resumes) training at ``start_step``.

    A resumed run keeps the earlier sessions' records under ``previous_sessions`` (oldest first).
    """
    path = Path(run_dir) / ENV_FILE
    info = environment_info(cfg, model, model_source)
    info["start_step"] = start_step
    previous: list[dict[str, Any]] = []
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            previous = list(old.pop("previous_sessions", [])) + [old]
        except (json.JSONDecodeError, AttributeError):
            previous = []  # an unreadable record is replaced, not fatal for training
    if previous:
        info["previous_sessions"] = previous
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, path)
    return path


def should_log_samples(step: int, total_steps: int, target: int = SAMPLE_LOG_TARGET) -> bool:
    """Whether completed step ``step`` (1-based) logs samples: the first and last step, and every
    ``max(1, total_steps // target)``-th step, so a run logs about ``target`` steps whatever its length."""
    if step < 1 or total_steps < 1 or target < 1:
        raise ValueError(f"should_log_samples: step ({step}), total_steps ({total_steps}) and target ({target}) "
                         f"must be >= 1")
    every = max(1, total_steps // target)
    return step == 1 or step == total_steps or step % every == 0


def clip_text(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, with a marker saying how much was cut."""
    if limit < 1:
        raise ValueError(f"clip_text: limit must be >= 1, got {limit}")
    text = str(text)
    if len(text) <= limit:
        return text
    return text[:limit] + f" [... {len(text) - limit} more characters]"


def _num(x: Any) -> float | None:
    """A JSON-safe float: non-finite values become None (JSON has no NaN)."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


ROLE_OF_MESSAGE = {"assistant": "policy", "tool": "tool", "system": "system"}  # anything else: environment


def episode_transcript(info: Any, max_chars: int = MAX_TURN_CHARS) -> list[dict[str, Any]]:
    """The turns of one episode (an :class:`~postrl.rollout.episodes.EpisodeInfo`) in order, each
    ``{"role", "text"}`` with ``role`` one of ``policy`` (a turn the model sampled: also ``turn`` (its index),
    ``reward`` (the environment's reward for it) and ``tool_calls`` (tool messages that answered it)),
    ``environment`` (an observation), ``tool`` (a tool's answer) or ``system``. Texts are cut to
    ``max_chars`` (:func:`clip_text`). The last observation (after ``done``) is in the transcript although it
    never entered the tokens (nothing was sampled after it)."""
    turns: list[dict[str, Any]] = []
    rewards = list(getattr(info, "turn_rewards", []) or [])
    k = 0
    for m in getattr(info, "messages", []) or []:
        role = ROLE_OF_MESSAGE.get(str(m.get("role")), "environment")
        turn: dict[str, Any] = {"role": role, "text": clip_text(m.get("content") or "", max_chars)}
        if role == "policy":
            turn.update(turn=k, reward=_num(rewards[k]) if k < len(rewards) else None, tool_calls=0)
            k += 1
        elif role == "tool":
            turn["name"] = str(m.get("name") or "")
            for prev in reversed(turns):  # the policy turn this tool message answers
                if prev["role"] == "policy":
                    prev["tool_calls"] += 1
                    break
        turns.append(turn)
    return turns


def episode_token_spans(info: Any, prompt_text: str, completion_ids: Sequence[int], tokenizer: Any,
                        max_chars: int = MAX_EPISODE_TOKEN_CHARS) -> list[dict[str, Any]]:
    """The episode's token stream as the trainer saw it, in spans ``{"kind", "text"}``: ``prompt`` (the first
    observation rendered with the chat template), then ``sampled`` (the model's tokens of turn ``turn``: the
    only ones in the loss) and ``env`` (observation deltas: chat-template tokens and environment / tool text,
    attended to but loss-masked), decoded with special tokens kept. About ``max_chars`` characters in all:
    later spans are cut (marked), the prompt first."""
    spans: list[dict[str, Any]] = [{"kind": "prompt", "text": str(prompt_text)}]
    turn = 0
    ids = list(completion_ids)
    for kind, start, end in getattr(info, "segments", []) or []:
        span: dict[str, Any] = {"kind": "sampled" if kind == "sampled" else "env",
                                "text": tokenizer.decode(ids[start:end], skip_special_tokens=False),
                                "tokens": end - start}
        if kind == "sampled":
            span["turn"] = turn
            turn += 1
        spans.append(span)
    budget = max_chars
    for span in spans:
        limit = max(1, budget)
        span["text"] = clip_text(span["text"], limit)
        budget -= min(len(span["text"]), limit)
    return spans


def episode_record(info: Any, prompt_text: str | None = None, completion_ids: Sequence[int] | None = None,
                   tokenizer: Any = None) -> dict[str, Any]:
    """One episode as JSON: its outcome (``success``, ``return``, ``turns``, ``end``, ``truncated``), per-turn
    rewards, tool calls and errors, invalid actions, environment errors, token counts, the ``transcript``
    (:func:`episode_transcript`) and, given the prompt text, the completion ids and a tokenizer, the token
    ``spans`` (:func:`episode_token_spans`). Used for the training run's ``samples.jsonl`` and ``postrl eval
    --env``'s."""
    rec: dict[str, Any] = {
        "success": bool(info.success), "return": _num(info.episode_return), "turns": int(info.turns),
        "end": str(info.end), "truncated": bool(info.truncated),
        "turn_rewards": [_num(r) for r in info.turn_rewards],
        "tool_calls": int(info.tool_calls), "tool_errors": int(info.tool_errors),
        "invalid_actions": int(info.invalid_actions), "env_errors": int(info.env_errors),
        "sampled_tokens": int(info.sampled_tokens), "env_tokens": int(info.env_tokens),
        "transcript": episode_transcript(info),
    }
    if info.error:
        rec["error"] = clip_text(info.error, MAX_TURN_CHARS)
    if tokenizer is not None and prompt_text is not None and completion_ids is not None:
        rec["spans"] = episode_token_spans(info, prompt_text, completion_ids, tokenizer)
    return rec


def _group_episode_stats(episodes: Sequence[Any]) -> dict[str, Any]:
    n = max(1, len(episodes))
    return {"success_rate": sum(bool(e.success) for e in episodes) / n,
            "turns_mean": sum(e.turns for e in episodes) / n,
            "tool_calls_mean": sum(e.tool_calls for e in episodes) / n,
            "tool_call_frac": sum(e.tool_calls > 0 for e in episodes) / n,
            "tool_errors": int(sum(e.tool_errors for e in episodes)),
            "invalid_actions_mean": sum(e.invalid_actions for e in episodes) / n}


def sample_log_record(step: int, batch: RolloutBatch, group_size: int,
                      max_groups: int = SAMPLE_LOG_GROUPS, tokenizer: Any = None) -> dict[str, Any]:
    """One ``samples.jsonl`` line: for the first ``max_groups`` groups of a rollout batch, the prompt,
    its ground truth, the rewards of all ``group_size`` completions, and the best- and worst-scored
    completion with their reward components.

    ``batch`` is the trainer's :class:`~postrl.rollout.batch.RolloutBatch`: row ``g * group_size + j`` is
    completion ``j`` of group ``g``; read are ``samples`` (objects with ``question`` and ``answer``),
    ``texts``, ``rewards`` (totals, ``[B]``), ``components`` (reward name -> per-row values) and
    ``correct``. Ties: the best is the first row with the highest reward, the worst the last row with the
    lowest, so with ``group_size >= 2`` they are two different completions.

    A batch of multi-turn episodes (an :class:`~postrl.rollout.episodes.EpisodeBatch` with ``episodes``):
    a row's reward is its episode return; the prompt is the first observation; best and worst carry the
    whole episode (:func:`episode_record`: transcript with roles and per-turn rewards, and with ``tokenizer``
    the token spans, sampled versus loss-masked), and each group its episode statistics (success rate, turns,
    tool calls).
    """
    if group_size < 1:
        raise ValueError(f"sample_log_record: group_size must be >= 1, got {group_size}")
    episodes = list(getattr(batch, "episodes", None) or [])
    rewards = [e.episode_return for e in episodes] if episodes else batch.rewards.tolist()
    if len(rewards) % group_size:
        raise ValueError(f"sample_log_record: {len(rewards)} rows is not a multiple of group_size {group_size}")
    components, correct = batch.components, batch.correct

    def entry(i: int) -> dict[str, Any]:
        e = {"index": i % group_size, "reward": _num(rewards[i]),
             "text": clip_text(batch.texts[i], MAX_COMPLETION_CHARS),
             "components": {name: _num(vals[i]) for name, vals in components.items()},
             "correct": bool(correct[i])}
        if episodes:
            ids = batch.completion_ids[i][batch.attention_mask[i].bool()].tolist() if tokenizer is not None else None
            e["episode"] = episode_record(episodes[i], batch.prompt_texts[i], ids, tokenizer)
        return e

    groups = []
    for g in range(min(max_groups, len(rewards) // group_size)):
        rows = list(range(g * group_size, (g + 1) * group_size))
        key = [(-math.inf if _num(rewards[i]) is None else rewards[i]) for i in rows]
        best = rows[max(range(len(rows)), key=lambda j: (key[j], -j))]
        worst = rows[min(range(len(rows)), key=lambda j: (key[j], -j))]
        sample = batch.samples[rows[0]]
        group = {
            "prompt": clip_text(getattr(sample, "question", sample), MAX_PROMPT_CHARS),
            "answer": clip_text(getattr(sample, "answer", ""), MAX_PROMPT_CHARS),
            "rewards": [_num(rewards[i]) for i in rows],
            "best": entry(best),
            "worst": entry(worst),
        }
        if episodes:
            first = []  # the first observation (system message included): the messages before the first turn
            for m in episodes[rows[0]].messages:
                if m.get("role") == "assistant":
                    break
                first.append(str(m.get("content") or ""))
            group["prompt"] = clip_text("\n\n".join(first), MAX_PROMPT_CHARS)
            group["sample"] = clip_text(getattr(sample, "question", ""), MAX_PROMPT_CHARS)
            group["episodes"] = _group_episode_stats([episodes[i] for i in rows])
        groups.append(group)
    return {"step": step, "groups": groups}


def append_samples(run_dir: str | Path, record: dict[str, Any]) -> None:
    """Append one :func:`sample_log_record` line to ``RUN_DIR/samples.jsonl``."""
    with open(Path(run_dir) / SAMPLES_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


# ================================================================================================
# Reading a run
# ================================================================================================
@dataclass
class RunData:
    """Everything the report shows, read from a run directory (missing files give empty values)."""

    run_dir: Path
    config_text: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    eval_data: Any = None
    eval_path: Path | None = None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file (blank lines skipped); a bad line raises :class:`ReportError`
    naming the file and line. A truncated last line (a run killed mid-write) is dropped."""
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines):
                break  # partial final line
            raise ReportError(f"{path}:{i}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise ReportError(f"{path}:{i}: expected a JSON object per line, got {type(row).__name__}")
        rows.append(row)
    return rows


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def find_eval_file(run_dir: Path, eval_path: str | Path | None = None) -> Path | None:
    """``--eval PATH`` (an ``eval.json`` or a directory holding one), else ``RUN_DIR/eval.json`` or
    ``RUN_DIR/eval/eval.json`` when present."""
    if eval_path is not None:
        p = Path(eval_path)
        if p.is_dir():
            p = p / "eval.json"
        if not p.is_file():
            raise ReportError(f"--eval {eval_path}: no such file (expected an eval.json written by `postrl eval`, "
                              f"or the directory that holds it)")
        return p
    for p in (run_dir / "eval.json", run_dir / "eval" / "eval.json"):
        if p.is_file():
            return p
    return None


def load_run(run_dir: str | Path, eval_path: str | Path | None = None) -> RunData:
    """Read a run directory; raises :class:`ReportError` if it is not one."""
    import yaml

    rd = Path(run_dir)
    if not rd.is_dir():
        raise ReportError(f"{run_dir}: no such directory (give the run directory that `postrl train` printed)")
    cfg_path, metrics_path = rd / "config.yaml", rd / "metrics.jsonl"
    if not cfg_path.is_file() and not metrics_path.is_file():
        raise ReportError(f"{run_dir}: not a postrl run directory (it has neither config.yaml nor metrics.jsonl)")
    data = RunData(run_dir=rd)
    if cfg_path.is_file():
        data.config_text = cfg_path.read_text()
        try:
            loaded = yaml.safe_load(data.config_text)
        except yaml.YAMLError as exc:
            raise ReportError(f"{cfg_path}: not valid YAML ({exc})") from None
        data.config = loaded if isinstance(loaded, dict) else {}
    if metrics_path.is_file():
        data.metrics = read_jsonl(metrics_path)
    for name, attr in (("results.json", "results"), (ENV_FILE, "env")):
        p = rd / name
        if p.is_file():
            value = _read_json(p)
            if not isinstance(value, dict):
                raise ReportError(f"{p}: expected a JSON object, got {type(value).__name__}")
            setattr(data, attr, value)
    if (rd / SAMPLES_FILE).is_file():
        data.samples = read_jsonl(rd / SAMPLES_FILE)
    data.eval_path = find_eval_file(rd, eval_path)
    if data.eval_path is not None:
        data.eval_data = _read_json(data.eval_path)
    return data


# ================================================================================================
# eval.json (from `postrl eval`): tolerant reading of per-model pass@k / maj@k / scalar metrics
# ================================================================================================
Point = tuple[float, "float | None", "float | None"]  # value, CI low, CI high


@dataclass
class ModelEval:
    name: str
    pass_at_k: dict[int, Point] = field(default_factory=dict)
    maj_at_k: dict[int, Point] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)


_CURVES = {"pass_at_k": ("pass_at_k", "pass@k", "passk"), "maj_at_k": ("maj_at_k", "maj@k", "majk")}
_VALUE_KEYS = ("value", "mean", "estimate", "point")
_CI_PAIRS = (("ci_low", "ci_high"), ("lo", "hi"), ("low", "high"), ("lower", "upper"))


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _pair(v: Any) -> tuple[float | None, float | None]:
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(_finite(x) for x in v):
        return float(v[0]), float(v[1])
    if isinstance(v, dict):
        for lo, hi in _CI_PAIRS:
            if _finite(v.get(lo)) and _finite(v.get(hi)):
                return float(v[lo]), float(v[hi])
    return None, None


def _point(v: Any) -> Point | None:
    """A number, ``[value, lo, hi]``, or a dict with a value key and optionally a CI."""
    if _finite(v):
        return float(v), None, None
    if isinstance(v, (list, tuple)) and len(v) == 3 and all(_finite(x) for x in v):
        return float(v[0]), float(v[1]), float(v[2])
    if isinstance(v, dict):
        value = next((v[k] for k in _VALUE_KEYS if _finite(v.get(k))), None)
        if value is None:
            return None
        lo, hi = _pair(v)
        for key in ("ci", "ci95", "ci_95"):
            if lo is None and key in v:
                lo, hi = _pair(v[key])
        return float(value), lo, hi
    return None


def _k(key: Any) -> int | None:
    s = str(key).strip().lower()
    for prefix in ("pass@", "maj@", "k=", "k"):
        if s.startswith(prefix):
            s = s[len(prefix):]
    try:
        k = int(s)
    except ValueError:
        return None
    return k if k >= 1 else None


def _curve(obj: Any) -> dict[int, Point]:
    out: dict[int, Point] = {}
    if isinstance(obj, dict):
        for key, v in obj.items():
            k, p = _k(key), _point(v)
            if k is not None and p is not None:
                out[k] = p
    elif isinstance(obj, list):
        for item in obj:
            if isinstance(item, dict) and _k(item.get("k")) is not None:
                p = _point(item)
                if p is not None:
                    out[_k(item["k"])] = p
    return dict(sorted(out.items()))


def _model_entries(data: Any) -> list[tuple[str, dict[str, Any]]]:
    def named(items: Any) -> list[tuple[str, dict[str, Any]]]:
        if isinstance(items, dict):
            return [(str(k), v) for k, v in items.items() if isinstance(v, dict)]
        if isinstance(items, list):
            return [(str(v.get("name") or v.get("label") or v.get("model") or f"model {i + 1}"), v)
                    for i, v in enumerate(items) if isinstance(v, dict)]
        return []

    if isinstance(data, list):
        return named(data)
    if isinstance(data, dict):
        for key in ("models", "results"):
            if key in data and named(data[key]):
                return named(data[key])
        return [(str(data.get("name") or data.get("model") or "model"), data)]
    return []


def parse_eval(data: Any) -> list[ModelEval]:
    """Per-model results of an ``eval.json``: pass@k and maj@k curves (with CIs when present) and the
    scalar metrics (numbers at the model's top level, and one level into nested dicts as ``a.b``).

    Accepted shapes: ``{"models": [{"name"|"model": ..., ...}, ...]}``, ``{"models": {name: {...}}}``
    (also under ``"results"``), a list of model dicts, or one model dict. A curve is a dict
    ``{k: value}`` (keys like ``1``, ``"pass@1"``), a list of ``{"k": .., "value": ..}``, or flat
    ``"pass@k"`` keys; a value is a number, ``[value, lo, hi]`` or ``{"value"|"mean"|"estimate": ..,
    "ci": [lo, hi]}`` (or ``ci_low``/``ci_high``). A separate ``pass_at_k_ci`` dict of ``[lo, hi]`` is merged.
    """
    models = []
    for name, d in _model_entries(data):
        m = ModelEval(name=name)
        for attr, keys in _CURVES.items():
            curve: dict[int, Point] = {}
            for key in keys:
                if key in d:
                    curve.update(_curve(d[key]))
            prefix = keys[1].split("@")[0] + "@"  # flat "pass@8": value keys
            for key, v in d.items():
                if str(key).lower().startswith(prefix) and _k(key) is not None and _point(v) is not None:
                    curve.setdefault(_k(key), _point(v))
            cis = d.get(f"{attr}_ci")
            if isinstance(cis, dict):
                for key, ci in cis.items():
                    k, (lo, hi) = _k(key), _pair(ci)
                    if k in curve and lo is not None:
                        curve[k] = (curve[k][0], lo, hi)
            setattr(m, attr, dict(sorted(curve.items())))
        skip = {k for keys in _CURVES.values() for k in keys} | {f"{a}_ci" for a in _CURVES}
        for key, v in d.items():
            if key in skip or str(key).lower().startswith(("pass@", "maj@")):
                continue
            if _finite(v):
                m.scalars[str(key)] = float(v)
            elif isinstance(v, dict) and _point(v) is not None and not any(isinstance(x, dict) for x in v.values()):
                m.scalars[str(key)] = _point(v)[0]
            elif isinstance(v, dict):
                for sub, x in v.items():
                    if _finite(x):
                        m.scalars[f"{key}.{sub}"] = float(x)
        if m.pass_at_k or m.maj_at_k or m.scalars:
            models.append(m)
    return models


# ================================================================================================
# Writing the page
# ================================================================================================
def pick_evenly(items: Sequence[Any], k: int) -> list[Any]:
    """At most ``k`` items spread evenly from the first to the last (both included when k >= 2)."""
    if k < 1:
        raise ValueError(f"pick_evenly: k must be >= 1, got {k}")
    n = len(items)
    if n <= k:
        return list(items)
    if k == 1:
        return [items[0]]
    idx = sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})
    return [items[i] for i in idx]


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(x: Any, digits: int = 4) -> str:
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
            return f"{x:.3g}"
        return f"{x:.{digits}g}"
    return str(x)


def _duration(seconds: Any) -> str:
    if not _finite(seconds):
        return "n/a"
    s = float(seconds)
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(round(s), 60)
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min {s:02d} s" if h else f"{m} min {s:02d} s"


def _table(header: Sequence[str] | None, rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    head = "<thead><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr></thead>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, _Raw) else _esc(_fmt(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    klass = f' class="{cls}"' if cls else ""
    return f"<table{klass}>{head}<tbody>{body}</tbody></table>"


class _Raw(str):
    """Already-escaped HTML for a table cell."""


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_esc(alt)}" width="480" height="300">'


def _dig(d: dict[str, Any], dotted: str) -> Any:
    cur: Any = d
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


CONFIG_SUMMARY = ("model.name_or_path", "data.source", "data.task", "data.path", "algo.advantage", "algo.policy_loss",
                  "algo.loss_agg", "algo.kl_coef", "rollout.n", "rollout.max_new_tokens", "rollout.temperature",
                  "train.prompts_per_step", "train.steps", "train.epochs", "train.lr", "run.seed")

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1560px;padding:16px 24px;
color:#1d2330;background:#fff;line-height:1.4}
h1{font-size:1.6em;margin:.2em 0}h2{border-bottom:2px solid #e3e7ee;padding-bottom:4px;margin-top:1.6em}
h3{margin:1.1em 0 .4em}nav a{margin-right:14px}
.meta{color:#5a6475}.note{color:#8a5a00;background:#fff7e6;border-left:3px solid #f0b400;padding:4px 10px;margin:4px 0}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(490px,1fr));gap:10px}
figure{margin:0;border:1px solid #e3e7ee;border-radius:6px;padding:4px;background:#fff}
figure img{display:block;max-width:100%;height:auto}figcaption{font-size:.8em;color:#5a6475;padding:2px 4px}
table{border-collapse:collapse;margin:6px 0 14px;font-size:.9em}
th,td{border:1px solid #dde2ea;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f3f5f9}td.num,th.num{text-align:right}
pre{background:#f6f8fa;border:1px solid #e3e7ee;border-radius:4px;padding:6px 8px;white-space:pre-wrap;
word-break:break-word;margin:2px 0;font-size:.85em;max-height:22em;overflow:auto}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:10px}
.best{border-left:4px solid #2e9d50;padding-left:8px}.worst{border-left:4px solid #d0453a;padding-left:8px}
.group{border:1px solid #e3e7ee;border-radius:6px;padding:6px 10px;margin:8px 0}
.up{color:#2e7d32}.down{color:#c62828}
.transcript{margin:4px 0}.turn{margin:3px 0;padding:2px 6px;border-radius:3px}
.turn .role{font-size:.8em;font-weight:600;text-transform:uppercase;letter-spacing:.03em}
.t-policy{background:#eaf7ee;border-left:4px solid #2e9d50}.t-environment{background:#f2f3f6;border-left:4px solid #8a94a6}
.t-tool{background:#eaf0fb;border-left:4px solid #3b6fd6}.t-system{background:#faf6ea;border-left:4px solid #c49a1c}
.t-policy pre{background:#fff;border-color:#b9e2c6;font-weight:600}.t-environment pre,.t-tool pre,.t-system pre{font-style:italic}
.turn-chip{padding:0 4px;border-radius:3px}.reward{font-size:.85em;color:#1d5e33;font-weight:600}
.tok-sampled{background:#bfe8cb;color:#0b3d1a;font-weight:600;outline:1px solid #7cc592}
.tok-masked{color:#6b7280;background:#eceff3;font-style:italic}
pre.tokens{line-height:1.6}.legend{font-size:.9em}
"""


@dataclass
class Plot:
    name: str
    title: str
    png: bytes


def _held_out_series(data: RunData) -> list[Any]:
    """Held-out greedy accuracy and reward over steps: before training at step 0, periodic evaluations,
    after training at the last step (results.json), or ``eval/*`` keys of metrics.jsonl."""
    from postrl.eval.plots import Series, metric_series

    res = data.results
    last = res.get("steps") or (data.metrics[-1].get("step") if data.metrics else None)
    points: list[tuple[float, dict[str, Any]]] = []
    if isinstance(res.get("eval_before"), dict):
        points.append((0.0, res["eval_before"]))
    for ev in res.get("eval_during") or []:
        if isinstance(ev, dict) and _finite(ev.get("step")):
            points.append((float(ev["step"]), ev))
    if isinstance(res.get("eval_after"), dict) and _finite(last):
        points.append((float(last), res["eval_after"]))
    series = []
    for key, label in (("accuracy", "accuracy (greedy)"), ("reward_mean", "mean reward")):
        pts = [(x, float(ev[key])) for x, ev in points if _finite(ev.get(key))]
        if pts:
            series.append(Series(label, [p[0] for p in pts], [p[1] for p in pts]))
    if not res.get("eval_during"):  # periodic evals logged as metrics instead
        keys = sorted({k for r in data.metrics for k in r if k.startswith("eval/")})
        for key in keys:
            xs, ys = metric_series(data.metrics, key)
            if xs:
                series.append(Series(key, xs, ys))
    return series


def render_plots(data: RunData) -> tuple[list[Plot], list[str]]:
    """The report's plots (PNG bytes) and a note for each metric absent from the run."""
    from postrl.eval import plots as P

    out, notes = [], []
    for spec in P.PLOTS:
        series = P.spec_series(spec, data.metrics)
        if not series:
            keys = ", ".join(list(spec.keys) + [p + "*" for p in spec.prefixes])
            notes.append(f"{spec.title}: not plotted, this run logged no finite values for {keys}.")
            continue
        out.append(Plot(spec.name, spec.title, P.line_plot(spec.title, spec.ylabel, series, logy=spec.logy)))
    for spec in P.EPISODE_PLOTS + P.SAMPLER_PLOTS:  # runs with an environment / a sampler only
        series = P.spec_series(spec, data.metrics)
        if series and (spec not in P.SAMPLER_PLOTS or any(k.startswith("sampler/") for k in P.spec_keys(spec, data.metrics))):
            out.append(Plot(spec.name, spec.title, P.line_plot(spec.title, spec.ylabel, series, logy=spec.logy)))
    held = _held_out_series(data)
    if held:
        out.insert(2, Plot(P.HELD_OUT_NAME, "Held-out evaluation",
                           P.line_plot("Held-out evaluation", "value", held)))
    else:
        notes.insert(2, "Held-out evaluation: not plotted, the run has no held-out evaluation "
                        "(eval.before, eval.after and eval.every were off).")
    return out, notes


def pass_at_k_png(models: list[ModelEval]) -> bytes | None:
    """pass@k against k (log2 axis), one curve per model with its CI band when present (None: no curve).
    Used by ``postrl eval`` (pass_at_k.png) and by the report."""
    from postrl.eval import plots as P

    curves = []
    for m in models:
        if not m.pass_at_k:
            continue
        ks = list(m.pass_at_k)
        pts = [m.pass_at_k[k] for k in ks]
        has_ci = all(p[1] is not None for p in pts)
        curves.append(P.Series(m.name, [float(k) for k in ks], [p[0] for p in pts],
                               lower=[p[1] for p in pts] if has_ci else None,
                               upper=[p[2] for p in pts] if has_ci else None))
    return P.pass_at_k_plot(curves) if curves else None


def _point_cell(p: Point) -> str:
    v, lo, hi = p
    return _fmt(v, 3) + (f" [{_fmt(lo, 3)}, {_fmt(hi, 3)}]" if lo is not None else "")


def _summary_section(data: RunData) -> str:
    res, m = data.results, data.metrics
    items = []
    steps = res.get("steps") or (m[-1].get("step") if m else 0)
    planned = _dig(data.config, "train.steps")
    items.append(("steps", f"{steps}" + (f" of {planned}" if planned and planned != steps else "")))
    if _finite(res.get("wall_time_s")):
        items.append(("wall time", _duration(res["wall_time_s"])))
    elif m:
        items.append(("training time (sum of step times)", _duration(sum(r.get("step_time_s") or 0 for r in m))))
    if m:
        last = m[-1]
        for key, label in (("reward_mean", "final reward (rollout)"), ("accuracy", "final accuracy (rollout)")):
            if _finite(last.get(key)):
                items.append((label, _fmt(last[key], 3)))
    before, after = res.get("eval_before"), res.get("eval_after")
    if isinstance(before, dict) and isinstance(after, dict) and _finite(before.get("accuracy")) \
            and _finite(after.get("accuracy")):
        d = (after["accuracy"] - before["accuracy"]) * 100
        items.append(("held-out accuracy", f"{before['accuracy']:.1%} → {after['accuracy']:.1%} ({d:+.1f} pt)"))
    if res.get("interrupted"):
        items.append(("status", "interrupted (resume to continue)"))
    return _table(None, [(k, v) for k, v in items], cls="summary")


def _eval_section(data: RunData, passk_png: bytes | None) -> str:
    res = data.results
    parts = []
    before, after = res.get("eval_before"), res.get("eval_after")
    rows = []
    keys: tuple[tuple[str, str], ...] = (
        ("accuracy", "held-out accuracy (greedy)"), ("reward_mean", "held-out mean reward"),
        ("response_len_mean", "mean response length (tokens)"), ("n", "problems"))
    if _is_episode_run(data):  # one greedy episode per held-out start
        keys = (("accuracy", "held-out success rate (greedy episodes)"), ("reward_mean", "held-out mean return"),
                ("turns_mean", "turns per episode"), ("tool_calls_mean", "tool calls per episode"),
                ("tool_call_frac", "episodes with a tool call"), ("invalid_actions_mean", "invalid actions per episode"),
                ("truncated_frac", "truncated episodes"), ("response_len_mean", "episode length (tokens)"),
                ("n", "episodes"))
    pct_keys = ("accuracy", "tool_call_frac", "truncated_frac")
    for key, label in keys:
        b = before.get(key) if isinstance(before, dict) else None
        a = after.get(key) if isinstance(after, dict) else None
        if b is None and a is None:
            continue
        change = ""
        if _finite(b) and _finite(a) and key != "n":
            delta = (a - b) * 100 if key in pct_keys else a - b
            cls = ("up" if delta > 0 else "down" if delta < 0 else "") if key in ("accuracy", "reward_mean") else ""
            text = f"{delta:+.1f} pt" if key in pct_keys else f"{delta:+.3f}"
            change = _Raw(f'<span class="{cls}">{_esc(text)}</span>')
        fmt = (lambda x: f"{x:.1%}") if key in pct_keys else (lambda x: _fmt(x, 4))
        rows.append((label, fmt(b) if _finite(b) else "—", fmt(a) if _finite(a) else "—", change))
    if rows:
        parts.append("<h3>Before and after training</h3>" + _table(["", "before", "after", "change"], rows))
    else:
        parts.append('<p class="note">No before/after evaluation in results.json '
                     '(run with eval.before=true and eval.after=true to get one).</p>')
    during = [ev for ev in res.get("eval_during") or [] if isinstance(ev, dict)]
    if during:
        parts.append("<h3>Periodic evaluation</h3>" + _table(
            ["step", "accuracy", "mean reward", "mean length", "n"],
            [(ev.get("step"), ev.get("accuracy"), ev.get("reward_mean"), ev.get("response_len_mean"), ev.get("n"))
             for ev in during]))
    if isinstance(before, dict) and isinstance(after, dict) and before.get("examples") and after.get("examples"):
        after_by_q = {ex.get("question"): ex for ex in after["examples"] if isinstance(ex, dict)}
        ex_rows = []
        for ex in before["examples"]:
            if not isinstance(ex, dict) or ex.get("question") not in after_by_q:
                continue
            ax = after_by_q[ex["question"]]
            ex_rows.append((_Raw(f"<pre>{_esc(ex['question'])}</pre>"), ex.get("answer", ""),
                            _Raw(f"<pre>{_esc(ex.get('completion', ''))}</pre>"), bool(ex.get("correct")),
                            _Raw(f"<pre>{_esc(ax.get('completion', ''))}</pre>"), bool(ax.get("correct"))))
        if ex_rows:
            parts.append("<h3>Held-out examples (greedy)</h3>" + _table(
                ["question", "answer", "before", "correct", "after", "correct"], ex_rows))
    parts.append(_pass_at_k_section(data, passk_png))
    return "\n".join(parts)


def _pass_at_k_section(data: RunData, png: bytes | None) -> str:
    if data.eval_data is None:
        return ('<h3>pass@k</h3><p class="note">No eval.json in the run directory: run <code>postrl eval</code> '
                'with <code>--out RUN_DIR</code>, or pass its file with <code>postrl report RUN_DIR --eval '
                'PATH</code>, to add pass@k curves here.</p>')
    models = parse_eval(data.eval_data)
    head = f'<h3>pass@k</h3><p class="meta">from {_esc(data.eval_path)}</p>'
    if not models:
        return head + '<p class="note">The eval file holds no per-model pass@k, maj@k or scalar metrics that ' \
                      'this report can read.</p>'
    parts = [head]
    if png is not None:
        parts.append(f'<figure>{_img(png, "pass@k versus k")}<figcaption>pass@k against k, one curve per model '
                     f'(band: confidence interval when the eval file has one)</figcaption></figure>')
    for attr, label in (("pass_at_k", "pass@k"), ("maj_at_k", "maj@k")):
        ks = sorted({k for m in models for k in getattr(m, attr)})
        if ks:
            rows = [[m.name] + [_point_cell(getattr(m, attr)[k]) if k in getattr(m, attr) else "—" for k in ks]
                    for m in models]
            parts.append(f"<h4>{label}</h4>" + _table(["model"] + [f"k={k}" for k in ks], rows))
    keys = sorted({k for m in models for k in m.scalars})
    if keys:
        rows = [[k] + [m.scalars.get(k, "—") for m in models] for k in keys]
        parts.append("<h4>Other metrics</h4>" + _table(["metric"] + [m.name for m in models], rows))
    return "\n".join(parts)


def _completion_block(kind: str, e: dict[str, Any]) -> str:
    comps = e.get("components") or {}
    comp = ", ".join(f"{_esc(k)} = {_esc(_fmt(v, 3))}" for k, v in comps.items())
    correct = "" if "correct" not in e else (" · correct" if e["correct"] else " · not correct")
    return (f'<div class="{kind}"><b>{kind}</b> (completion {_esc(e.get("index", "?"))}): reward '
            f'<b>{_esc(_fmt(e.get("reward"), 3))}</b>{_esc(correct)}'
            + (f'<br><span class="meta">{comp}</span>' if comp else "")
            + (f'<pre>{_esc(e["text"])}</pre>' if e.get("text") else '<p class="meta">(empty completion)</p>')
            + "</div>")


ROLE_LABELS = {"policy": "policy (sampled)", "environment": "environment", "tool": "tool", "system": "system"}
EPISODE_LEGEND = (
    '<p class="legend">Episodes: <span class="turn-chip t-policy">policy turns</span> were sampled by the model '
    '(the only tokens in the loss), <span class="turn-chip t-environment">environment</span> and '
    '<span class="turn-chip t-tool">tool</span> turns came from outside; in the token view '
    '<span class="tok-sampled">sampled tokens</span> differ from <span class="tok-masked">loss-masked '
    'tokens</span> (the prompt and the chat-template deltas that carry observations).</p>')


def _signed(x: Any) -> str:
    return f"{x:+.3g}" if _finite(x) else "n/a"


def _transcript_html(turns: Sequence[Any]) -> str:
    out = []
    for t in turns:
        if not isinstance(t, dict):
            continue
        role = t.get("role") if t.get("role") in ROLE_LABELS else "environment"
        label = ROLE_LABELS[role]
        extra = ""
        if role == "policy":
            label += f" · turn {_esc(t.get('turn', '?'))}"
            extra = f' <span class="reward">reward {_esc(_signed(t.get("reward")))}</span>'
            if t.get("tool_calls"):
                extra += f' <span class="meta">· {_esc(t["tool_calls"])} tool call(s)</span>'
        elif role == "tool" and t.get("name"):
            label += f" {t['name']}"
        text = str(t.get("text") or "")
        body = f"<pre>{_esc(text)}</pre>" if text else '<pre class="empty">(empty)</pre>'
        out.append(f'<div class="turn t-{role}"><span class="role">{_esc(label)}</span>{extra}{body}</div>')
    return f'<div class="transcript">{"".join(out)}</div>'


def _spans_html(spans: Sequence[Any]) -> str:
    parts, sampled, masked = [], 0, 0
    for sp in spans:
        if not isinstance(sp, dict):
            continue
        trained = sp.get("kind") == "sampled"
        n = sp.get("tokens") if _finite(sp.get("tokens")) else 0
        sampled, masked = sampled + (n if trained else 0), masked + (0 if trained else n)
        title = (f"turn {sp.get('turn', '?')}: sampled, in the loss" if trained else
                 "prompt: loss-masked" if sp.get("kind") == "prompt" else "environment delta: loss-masked")
        cls = "tok-sampled" if trained else "tok-masked"
        parts.append(f'<span class="{cls}" title="{_esc(title)}">{_esc(sp.get("text", ""))}</span>')
    return (f'<details class="tokens"><summary>tokens as trained ({_esc(sampled)} sampled, {_esc(masked)} '
            f'loss-masked after the prompt)</summary><pre class="tokens">{"".join(parts)}</pre></details>')


def _episode_block(kind: str, e: dict[str, Any]) -> str:
    ep = e.get("episode") or {}
    facts = [f"return <b>{_esc(_fmt(ep.get('return'), 3))}</b>",
             _esc("success" if ep.get("success") else "no success"),
             _esc(f"{ep.get('turns', '?')} turns"), _esc(f"ended: {ep.get('end', '?')}")]
    facts.append(_esc(f"tool calls {ep.get('tool_calls', 0)} (errors {ep.get('tool_errors', 0)})"))
    if ep.get("invalid_actions"):
        facts.append(_esc(f"invalid actions {ep['invalid_actions']}"))
    if ep.get("env_errors"):
        facts.append(_esc(f"environment errors {ep['env_errors']}"))
    rewards = ", ".join(_signed(r) for r in ep.get("turn_rewards") or [])
    html_ = (f'<div class="{kind} episode"><b>{kind}</b> (episode {_esc(e.get("index", "?"))}): '
             + " · ".join(facts)
             + f'<br><span class="meta">per-turn rewards: {_esc(rewards or "none")}</span>')
    if ep.get("error"):
        html_ += f'<br><span class="meta">error: {_esc(ep["error"])}</span>'
    html_ += _transcript_html(ep.get("transcript") or [])
    if ep.get("spans"):
        html_ += _spans_html(ep["spans"])
    return html_ + "</div>"


def _group_episode_line(st: dict[str, Any]) -> str:
    def pct(x: Any) -> str:
        return f"{x:.0%}" if _finite(x) else "n/a"

    return (f"episodes of this group: success {pct(st.get('success_rate'))}, turns {_fmt(st.get('turns_mean'), 3)}, "
            f"tool calls {_fmt(st.get('tool_calls_mean'), 3)} per episode (in {pct(st.get('tool_call_frac'))} of "
            f"them), tool errors {_fmt(st.get('tool_errors'))}, invalid actions "
            f"{_fmt(st.get('invalid_actions_mean'), 3)} per episode")


def _is_episode_run(data: RunData) -> bool:
    return bool(_dig(data.config, "env.name")) or any(
        "episodes" in g for r in data.samples for g in (r.get("groups") or []) if isinstance(g, dict))


def _samples_section(data: RunData) -> str:
    if not data.samples:
        return ('<p class="note">No samples.jsonl in the run directory (runs from before sample logging, or '
                'no step completed).</p>')
    logged = sorted((r for r in data.samples if _finite(r.get("step"))), key=lambda r: r["step"])
    chosen = pick_evenly(logged, REPORT_SAMPLE_STEPS)
    episodic = _is_episode_run(data)
    what = ("For each logged start state, the highest- and lowest-return of its episodes, whole."
            if episodic else "For each logged prompt, the highest- and lowest-scored of its completions.")
    parts = [f'<p class="meta">{len(logged)} logged steps; shown: steps '
             f'{", ".join(str(r["step"]) for r in chosen)}. {what}</p>']
    if episodic:
        parts.append(EPISODE_LEGEND)
    for rec in chosen:
        parts.append(f'<h3>Step {_esc(rec["step"])}</h3>')
        for g in rec.get("groups") or []:
            if isinstance(g, dict) and ("episodes" in g or "episode" in (g.get("best") or {})):
                parts.append(_episode_group(g))
                continue
            rewards = [r for r in g.get("rewards") or [] if _finite(r)]
            stats = (f"group rewards: mean {_fmt(sum(rewards) / len(rewards), 3)}, "
                     f"min {_fmt(min(rewards), 3)}, max {_fmt(max(rewards), 3)} over {len(rewards)} completions"
                     if rewards else "")
            parts.append(
                f'<div class="group"><b>prompt</b><pre>{_esc(g.get("prompt", ""))}</pre>'
                f'<span class="meta">answer: <code>{_esc(g.get("answer", ""))}</code> · {_esc(stats)}</span>'
                f'<div class="pair">{_completion_block("best", g.get("best") or {})}'
                f'{_completion_block("worst", g.get("worst") or {})}</div></div>')
    return "\n".join(parts)


def _episode_group(g: dict[str, Any]) -> str:
    rewards = [r for r in g.get("rewards") or [] if _finite(r)]
    stats = (f"returns: mean {_fmt(sum(rewards) / len(rewards), 3)}, min {_fmt(min(rewards), 3)}, "
             f"max {_fmt(max(rewards), 3)} over {len(rewards)} episodes" if rewards else "")
    line = _group_episode_line(g["episodes"]) if isinstance(g.get("episodes"), dict) else ""
    sample = f' · data sample: <code>{_esc(g["sample"])}</code>' if g.get("sample") else ""
    return (f'<div class="group"><b>first observation</b><pre>{_esc(g.get("prompt", ""))}</pre>'
            f'<span class="meta">{_esc(stats)}{sample}</span>'
            + (f'<br><span class="meta">{_esc(line)}</span>' if line else "")
            + f'<div class="pair">{_episode_block("best", g.get("best") or {})}'
            f'{_episode_block("worst", g.get("worst") or {})}</div></div>')


EPISODE_ROWS = (("episodes/success_rate", "success rate", "pct"), ("episodes/return_mean", "mean return", ""),
                ("episodes/turns_mean", "turns per episode", ""),
                ("episodes/tool_calls_mean", "tool calls per episode", ""),
                ("episodes/tool_call_frac", "episodes with a tool call", "pct"),
                ("episodes/tool_errors", "tool errors (per step)", ""),
                ("episodes/invalid_actions_mean", "invalid actions per episode", ""),
                ("episodes/env_errors", "environment errors (per step)", ""),
                ("episodes/truncated_frac", "truncated episodes", "pct"),
                ("episodes/sampled_tokens_mean", "sampled tokens per episode", ""),
                ("episodes/env_tokens_mean", "environment tokens per episode", ""))


def _episodes_section(data: RunData) -> str:
    """Episode statistics of the rollouts (tool calls included): first step, last step, mean over the run."""
    rows_in = [r for r in data.metrics if any(str(k).startswith("episodes/") for k in r)]
    if not rows_in:
        return ('<p class="note">No episode metrics in metrics.jsonl (episodes/*): the run has no environment, '
                'or no step completed.</p>')
    first, last = rows_in[0], rows_in[-1]

    def cell(v: Any, kind: str) -> str:
        return "—" if not _finite(v) else f"{v:.1%}" if kind == "pct" else _fmt(float(v), 4)

    rows = []
    ends = sorted({k for r in rows_in for k in r if str(k).startswith("episodes/end/")})
    for key, label, kind in EPISODE_ROWS + tuple((k, f"ended: {k.rsplit('/', 1)[1]}", "pct") for k in ends):
        vals = [float(r[key]) for r in rows_in if _finite(r.get(key))]
        if not vals:
            continue
        total = sum(vals) if key in ("episodes/tool_errors", "episodes/env_errors") else None
        rows.append((label, cell(first.get(key), kind), cell(last.get(key), kind),
                     cell(sum(vals) / len(vals), kind) + (f" (total {_fmt(total)})" if total is not None else "")))
    env = data.config.get("env") if isinstance(data.config.get("env"), dict) else {}
    tools = env.get("tools") or []
    head = (f'<p class="meta">environment <code>{_esc(env.get("name", "?"))}</code>'
            + (f', tools: {_esc(", ".join(t if isinstance(t, str) else str(t.get("name")) for t in tools))}'
               if tools else ", no tools")
            + f"; rollout episodes of step {_esc(first.get('step', '?'))} and step {_esc(last.get('step', '?'))}, "
              f"and the mean over the {len(rows_in)} logged steps.</p>")
    return head + _table(["", f"step {first.get('step', '?')}", f"step {last.get('step', '?')}", "mean over steps"],
                         rows)


def _environment_section(data: RunData) -> str:
    env, res = dict(data.env), data.results
    previous = env.pop("previous_sessions", [])
    rows = [(k, v) for k, v in env.items() if not isinstance(v, (dict, list))]
    if _finite(res.get("wall_time_s")):
        rows.append(("wall time (training and evaluation)", _duration(res["wall_time_s"])))
    for key in ("steps", "nonfinite_steps"):
        if key in res:
            rows.append((key, res[key]))
    parts = []
    if not env:
        parts.append('<p class="note">This run did not record its environment (no env.json: it was started by an '
                     'older postrl). Seed and threads from the config are shown.</p>')
        for key in ("run.seed", "run.threads", "model.device", "model.dtype"):
            v = _dig(data.config, key)
            if v is not None:
                rows.insert(0, (key, v))
    if previous:
        rows.append(("earlier sessions of this run (resumed)",
                     "; ".join(f"started {p.get('started_at', '?')} at step {p.get('start_step', '?')}"
                               for p in previous)))
    parts.append(_table(None, rows))
    return "\n".join(parts)


def _config_section(data: RunData) -> str:
    if not data.config_text:
        return '<p class="note">No config.yaml in the run directory.</p>'
    rows = [(k, _dig(data.config, k)) for k in CONFIG_SUMMARY if _dig(data.config, k) not in (None, "")]
    rewards = data.config.get("rewards")
    if isinstance(rewards, list):
        rows.append(("rewards", ", ".join(f"{r.get('name')} (weight {r.get('weight', 1)})"
                                          for r in rewards if isinstance(r, dict))))
    return (_table(["key", "value"], rows)
            + f"<details><summary>full config.yaml</summary><pre>{_esc(data.config_text)}</pre></details>")


def render_html(data: RunData, plots: list[Plot], notes: list[str], passk_png: bytes | None = None) -> str:
    """The report page for ``data`` with its rendered ``plots`` (see :func:`build_report`)."""
    name = data.run_dir.resolve().name
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    figs = "".join(f'<figure>{_img(p.png, p.title)}<figcaption>{_esc(p.title)} · plots/{_esc(p.name)}.png'
                   f'</figcaption></figure>' for p in plots)
    note_html = "".join(f'<p class="note">{_esc(n)}</p>' for n in notes)
    sections = [
        ("summary", "Summary", _summary_section(data)),
        ("curves", "Training curves",
         (f'<div class="plots">{figs}</div>' if plots else '<p class="note">No metrics to plot.</p>') + note_html),
        ("eval", "Evaluation", _eval_section(data, passk_png)),
        *([("episodes", "Episodes and tool calls", _episodes_section(data))] if _is_episode_run(data) else []),
        ("samples", "Sample episodes" if _is_episode_run(data) else "Sample completions", _samples_section(data)),
        ("environment", "Environment", _environment_section(data)),
        ("config", "Configuration", _config_section(data)),
    ]
    nav = "".join(f'<a href="#{sid}">{_esc(title)}</a>' for sid, title, _ in sections)
    body = "\n".join(f'<section id="{sid}"><h2>{_esc(title)}</h2>\n{content}\n</section>'
                     for sid, title, content in sections)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'<title>postrl report: {_esc(name)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n'
            f'<h1>postrl report: {_esc(name)}</h1>\n'
            f'<p class="meta">{_esc(data.run_dir)} · generated {_esc(now)}</p>\n<nav>{nav}</nav>\n'
            f'{body}\n</body>\n</html>\n')


RUN_FILES = ("config.yaml", "metrics.jsonl", "results.json", "env.json", "samples.jsonl", "eval.json",
             "trainer_state.pt", "ref_logps.pt", "stage_done.json", "summary.txt")
"""Files a run or an evaluation wrote: a report never replaces one of them."""


def check_report_out(path: Path) -> None:
    """Refuse an ``--out`` that is a directory, a run's own file (metrics, results, config, checkpoints, final
    model), a file that is not an HTML page, or in a directory that does not exist or cannot be written."""
    if path.is_dir():
        raise ReportError(f"--out {path}: a directory; give the HTML file to write, e.g. {path / REPORT_FILE}")
    if path.name in RUN_FILES or {"checkpoints", "final"} & set(path.parent.parts):
        raise ReportError(f"--out {path}: that is a file of a run (or inside its checkpoints); a report never "
                          f"overwrites a run's record; give a new .html path")
    if path.exists() and path.suffix.lower() not in (".html", ".htm"):
        raise ReportError(f"--out {path}: an existing file that is not an HTML report; give a new .html path")
    if not path.parent.is_dir():
        raise ReportError(f"--out {path}: the directory {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise ReportError(f"--out {path}: the directory {path.parent} is not writable")


def build_report(run_dir: str | Path, eval_path: str | Path | None = None, out: str | Path | None = None,
                 write_pngs: bool = True) -> Path:
    """Write the HTML report of a run (default ``RUN_DIR/report.html``) and PNG copies of its plots in
    ``RUN_DIR/plots/``; return the report's path. Raises :class:`ReportError` for a directory that is
    not a run or unreadable run files."""
    from postrl.eval import plots as P

    if out is not None:
        check_report_out(Path(out))
    data = load_run(run_dir, eval_path)
    plots, notes = render_plots(data)
    passk_png = pass_at_k_png(parse_eval(data.eval_data)) if data.eval_data is not None else None
    if write_pngs:
        pdir = data.run_dir / PLOTS_DIR
        pdir.mkdir(exist_ok=True)
        files = {f"{p.name}.png": p.png for p in plots}
        if passk_png is not None:
            files[f"{P.PASS_AT_K_NAME}.png"] = passk_png
        for fname, png in files.items():
            (pdir / fname).write_bytes(png)
        known = {s.name for s in P.PLOTS + P.EPISODE_PLOTS} | {P.HELD_OUT_NAME, P.PASS_AT_K_NAME}
        for stale in pdir.glob("*.png"):  # a plot of an earlier report whose metric is gone now
            if stale.stem in known and stale.name not in files:
                stale.unlink()
    path = Path(out) if out is not None else data.run_dir / REPORT_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_html(data, plots, notes, passk_png), encoding="utf-8")
    os.replace(tmp, path)
    return path
