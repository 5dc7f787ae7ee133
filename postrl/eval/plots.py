"""Training-curve and pass@k plots for ``postrl report``, rendered to PNG bytes.

Matplotlib is driven through its Agg canvas directly (``Figure`` + ``FigureCanvasAgg``), so no
global backend is switched, nothing opens a window, and figures are freed when they go out of scope.
Figures are small (``FIGSIZE`` at ``DPI``) so that the self-contained HTML report stays small.

Which metrics are plotted is data, not code: :data:`PLOTS` lists one :class:`PlotSpec` per panel with
the ``metrics.jsonl`` keys it draws (``docs/runs-and-checkpoints.md`` defines them). A panel whose
keys are all absent (or never finite) in a run is skipped by the report with a note.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 100
FIGSIZE = (4.8, 3.0)  # inches: 480 x 300 px at DPI
MARKERS_UP_TO = 40  # draw point markers when a series has at most this many points (short runs stay visible)


@dataclass(frozen=True)
class PlotSpec:
    """One panel of the report: ``keys`` (exact ``metrics.jsonl`` keys) and ``prefixes`` (every key that
    starts with one, e.g. ``reward/`` for the per-component rewards), drawn against ``step``."""

    name: str  # file stem of the PNG copy: plots/<name>.png
    title: str
    ylabel: str
    keys: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)  # key -> legend label
    band: dict[str, str] = field(default_factory=dict)  # key -> key of its +/- std band
    logy: bool = False


PLOTS: tuple[PlotSpec, ...] = (
    PlotSpec("reward", "Reward (total and per component)", "reward", keys=("reward_mean",), prefixes=("reward/",),
             labels={"reward_mean": "total (weighted)"}, band={"reward_mean": "reward_std"}),
    PlotSpec("accuracy", "Rollout accuracy", "fraction correct", keys=("accuracy",),
             labels={"accuracy": "sampled completions"}),
    PlotSpec("kl", "KL", "KL per token", keys=("kl", "kl_ref"),
             labels={"kl": "to old policy (k3)", "kl_ref": "to reference"}),
    PlotSpec("entropy", "Entropy", "nats per token", keys=("entropy",), labels={"entropy": "sampler entropy"}),
    PlotSpec("response_length", "Response length", "tokens", keys=("response_len_mean", "response_len_max"),
             labels={"response_len_mean": "mean", "response_len_max": "max"}),
    PlotSpec("clip_fraction", "Clip fraction", "fraction of tokens", keys=("clip_frac",),
             labels={"clip_frac": "clipped tokens"}),
    PlotSpec("grad_norm", "Gradient norm (before clipping)", "L2 norm", keys=("grad_norm",),
             labels={"grad_norm": "mean over updates"}),
    PlotSpec("learning_rate", "Learning rate", "lr", keys=("lr",), labels={"lr": "policy lr"}),
    PlotSpec("tokens_per_s", "Throughput", "generated tokens / s", keys=("tokens_per_s", "gen_tokens_per_s"),
             labels={"tokens_per_s": "per step (rollout + update)", "gen_tokens_per_s": "generation only"}),
    PlotSpec("step_time", "Step time", "seconds", keys=("step_time_s", "gen_time_s"),
             labels={"step_time_s": "step (rollout + update)", "gen_time_s": "rollout"}),
    PlotSpec("zero_variance", "Zero-variance groups (all rewards equal: no signal)", "fraction",
             keys=("zero_var/group_frac", "zero_var/sampled_group_frac", "zero_var/rollouts_frac"),
             prefixes=("zero_var/task/",),
             labels={"zero_var/group_frac": "of trained groups", "zero_var/sampled_group_frac": "of sampled groups",
                     "zero_var/rollouts_frac": "of generated rollouts"}),
)

EPISODE_PLOTS: tuple[PlotSpec, ...] = (
    PlotSpec("episodes", "Episodes: success, tool use, truncation", "fraction of episodes",
             keys=("episodes/success_rate", "episodes/tool_call_frac", "episodes/truncated_frac"),
             labels={"episodes/success_rate": "success", "episodes/tool_call_frac": "with a tool call",
                     "episodes/truncated_frac": "truncated"}),
    PlotSpec("episode_turns", "Episodes: turns and tool calls", "per episode",
             keys=("episodes/turns_mean", "episodes/tool_calls_mean", "episodes/invalid_actions_mean"),
             labels={"episodes/turns_mean": "turns", "episodes/tool_calls_mean": "tool calls",
                     "episodes/invalid_actions_mean": "invalid actions"}),
)
"""Panels drawn only for runs with an environment (``episodes/*`` metrics); absent otherwise, without a note."""

SAMPLER_PLOTS: tuple[PlotSpec, ...] = (
    PlotSpec("sampler", "Sampler: prompts skipped and rollouts spent", "per step",
             keys=("sampler/skipped", "sampler/screened", "sampler/screen_rollouts", "sampler/forced",
                   "zero_var/rollouts"),
             labels={"sampler/skipped": "prompts skipped", "sampler/screened": "prompts screened",
                     "sampler/screen_rollouts": "screening rollouts", "sampler/forced": "prompts forced",
                     "zero_var/rollouts": "rollouts on zero-variance groups"}),
    PlotSpec("sampler_tasks", "Sampler: share of prompts per task", "probability", prefixes=("sampler/prob/",)),
    PlotSpec("sampler_levels", "Sampler: curriculum level per task", "level", prefixes=("sampler/level/",)),
)
"""Panels drawn only for runs with a prompt sampler other than ``uniform`` (``sampler/*`` metrics)."""

HELD_OUT_NAME = "held_out_eval"
PASS_AT_K_NAME = "pass_at_k"


@dataclass
class Series:
    """One line: ``xs``/``ys`` of equal length, optionally a symmetric band ``ys +/- spread``."""

    label: str
    xs: list[float]
    ys: list[float]
    spread: list[float] | None = None
    lower: list[float] | None = None  # explicit band (e.g. a confidence interval), used instead of spread
    upper: list[float] | None = None
    dashed: bool = False  # e.g. reward components, drawn over the solid total


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def metric_series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of ``key`` over the rows that have a finite value for it (NaN, missing and
    non-numeric entries are left out, e.g. ``grad_norm`` of a step without an applied update)."""
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if _finite(v) and _finite(r.get("step")):
            xs.append(float(r["step"]))
            ys.append(float(v))
    return xs, ys


def spec_keys(spec: PlotSpec, rows: Iterable[dict[str, Any]]) -> list[str]:
    """The keys ``spec`` draws that occur in ``rows``: its exact keys in order, then prefixed keys sorted."""
    present: set[str] = set()
    for r in rows:
        present.update(r)
    exact = [k for k in spec.keys if k in present]
    prefixed = sorted(k for k in present if any(k.startswith(p) for p in spec.prefixes) and k not in exact)
    return exact + prefixed


def spec_series(spec: PlotSpec, rows: Sequence[dict[str, Any]]) -> list[Series]:
    """The non-empty series of one panel (an empty list means: the metric is absent from this run)."""
    out = []
    for key in spec_keys(spec, rows):
        xs, ys = metric_series(rows, key)
        if not xs:
            continue
        spread = None
        if key in spec.band:
            by_step = {float(r["step"]): r.get(spec.band[key]) for r in rows if _finite(r.get("step"))}
            spread = [float(by_step[x]) if _finite(by_step.get(x)) else 0.0 for x in xs]
        out.append(Series(spec.labels.get(key, key), xs, ys, spread, dashed=key not in spec.keys))
    return out


def line_plot(title: str, ylabel: str, series: Sequence[Series], xlabel: str = "step",
              logx: bool = False, logy: bool = False) -> bytes:
    """PNG bytes of one small line chart; raises ValueError when there is nothing to draw."""
    series = [s for s in series if s.xs]
    if not series:
        raise ValueError(f"line_plot({title!r}): no series with data points")
    for s in series:
        if len(s.xs) != len(s.ys):
            raise ValueError(f"line_plot({title!r}): series {s.label!r} has {len(s.xs)} x and {len(s.ys)} y values")
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for s in series:
        marker = "o" if len(s.xs) <= MARKERS_UP_TO else None
        (line,) = ax.plot(s.xs, s.ys, label=s.label, marker=marker, markersize=3,
                          linewidth=1.2 if s.dashed else 1.8, linestyle="--" if s.dashed else "-")
        lo = s.lower if s.lower is not None else ([y - d for y, d in zip(s.ys, s.spread)] if s.spread else None)
        hi = s.upper if s.upper is not None else ([y + d for y, d in zip(s.ys, s.spread)] if s.spread else None)
        if lo is not None and hi is not None:
            ax.fill_between(s.xs, lo, hi, color=line.get_color(), alpha=0.18, linewidth=0)
    if logx:
        ax.set_xscale("log", base=2)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if logy:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.3)
    if len(series) > 1 or series[0].label:
        ax.legend(fontsize=7, loc="best", frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def pass_at_k_plot(curves: Sequence[Series]) -> bytes:
    """pass@k against k (log2 axis), one curve per model, with its confidence band when given."""
    return line_plot("pass@k", "pass@k", curves, xlabel="k (samples per problem)", logx=True)
