"""``postrl pipeline``: named stages (e.g. sft -> dpo -> grpo) run in order in one run directory.

    RUN/config.yaml                      the pipeline config (with its ``stages:`` list)
    RUN/results.json                     per-stage held-out metrics; "summary": the rows of the table below
    RUN/summary.txt                      the per-stage table printed at the end (format_table)
    RUN/stages/01-sft/                   a normal run directory of that stage's trainer
        config.yaml  metrics.jsonl  results.json  checkpoints/step_N/
        stage_done.json                  written atomically when the stage has finished
    RUN/stages/02-dpo/ ...

    weights = model.name_or_path
    for i, stage in enumerate(stages):
        if stage_done.json exists: weights = its final model; continue    # resume at stage boundaries
        cfg = pipeline config + stage.config; cfg.model.name_or_path = weights
        trainer(stage.kind)(cfg, resume=stage dir if it has a checkpoint)  # resume within a stage
        weights = latest checkpoint of the stage; evaluate it on data's held-out set; write stage_done.json

A stage's config is the pipeline's config with the stage's ``config`` mapping merged in (nested sections or
dotted keys). The pipeline's ``eval.before`` / ``eval.after`` ask for the pipeline's own held-out evaluation
(greedy accuracy on ``data``) of the starting model / after every stage; the stages themselves run with
``eval.before`` and ``eval.after`` off unless their ``config`` turns them on. An ``rm`` stage trains a
reward model from the current weights but does not change the policy that later stages start from.
"""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

from postrl.config import Config, ConfigError, StageSpec, from_dict, save_config, to_dict, validate
from postrl.run.checkpoint import latest_checkpoint
from postrl.run.dirs import new_run_dir
from postrl.run.files import read_json, write_json_atomic

log = logging.getLogger(__name__)

STAGE_DONE = "stage_done.json"
POLICY_KINDS = ("sft", "dpo", "grpo", "rl")  # kinds whose result is the next stage's starting policy


def _expand_dotted(mapping: dict[str, Any]) -> dict[str, Any]:
    """``{"train.lr": 1e-4, "sft": {"epochs": 2}}`` -> ``{"train": {"lr": 1e-4}, "sft": {"epochs": 2}}``."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            value = _expand_dotted(value)
        parts = str(key).split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            _deep_merge(node[parts[-1]], value)
        else:
            node[parts[-1]] = value
    return out


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def stage_name(i: int, spec: StageSpec) -> str:
    """Directory name of stage ``i`` (0-based): ``01-sft``, ``02-dpo``, ..."""
    return f"{i + 1:02d}-{spec.name or spec.kind}"


def stage_config(base: Config, i: int, spec: StageSpec) -> Config:
    """The config of stage ``i``: the pipeline's config with ``spec.config`` merged in, validated.

    The stage's eval.before / eval.after are off unless ``spec.config`` sets them; ``stages`` is emptied.
    """
    data = to_dict(base)
    data["stages"] = []
    data["eval"]["before"] = data["eval"]["after"] = False
    try:
        _deep_merge(data, _expand_dotted(dict(spec.config)))
        cfg = from_dict(Config, data)
        validate(cfg)
    except ConfigError as exc:
        raise ConfigError(f"stage {stage_name(i, spec)} (stages.{i}.config): {exc}") from None
    return cfg


def check_stages(cfg: Config) -> list[Config]:
    """All stage configs, built and validated before anything runs (so a typo in stage 3 fails at once)."""
    if not cfg.stages:
        raise ConfigError("the pipeline config has no stages; add e.g. `stages: [{kind: sft}, {kind: grpo}]` "
                          "(kinds: sft, dpo, rm, grpo)")
    return [stage_config(cfg, i, spec) for i, spec in enumerate(cfg.stages)]


# --------------------------------------------------------------------------------------------------
# one stage
# --------------------------------------------------------------------------------------------------


def _trainer(kind: str) -> Callable[..., tuple[Path, dict[str, Any]]]:
    """The train function of a stage kind (preference trainers are imported lazily)."""
    if kind == "sft":
        from postrl.trainer.sft import train_sft

        return train_sft
    if kind in ("grpo", "rl"):
        from postrl.trainer.rl import train

        return train
    try:
        if kind == "dpo":
            from postrl.trainer.preference import train_dpo

            return train_dpo
        if kind == "rm":
            from postrl.trainer.reward_model import train_rm

            return train_rm
    except ImportError as exc:
        raise ConfigError(f"stage kind {kind!r} is not available in this installation: {exc}") from exc
    raise ConfigError(f"unknown stage kind {kind!r}; valid kinds: sft, dpo, rm, grpo (= rl)")


def run_stage(kind: str, cfg: Config, stage_dir: Path, resume: bool) -> tuple[Path, dict[str, Any]]:
    """Run one stage in ``stage_dir`` (resuming from its latest checkpoint when ``resume``)."""
    if resume:
        return _trainer(kind)(copy.deepcopy(cfg), resume=stage_dir)
    return _trainer(kind)(copy.deepcopy(cfg), run_dir=stage_dir)


def final_model(stage_dir: Path, stage_results: Optional[dict[str, Any]] = None) -> Path:
    """The stage's final weights: the ``final_model`` directory its trainer reports (``RUN/final``), else (a run
    of an older postrl that wrote no ``final``) its latest complete checkpoint."""
    reported = (stage_results or {}).get("final_model")
    if reported and (Path(reported) / "config.json").is_file():
        return Path(reported)
    ckpt = latest_checkpoint(stage_dir / "checkpoints")
    if ckpt is None:
        raise RuntimeError(f"stage {stage_dir.name} finished without a checkpoint under {stage_dir / 'checkpoints'}")
    return ckpt


def read_stage_done(stage_dir: Path) -> Optional[dict[str, Any]]:
    return read_json(stage_dir / STAGE_DONE)


# --------------------------------------------------------------------------------------------------
# held-out evaluation of a policy (the same greedy accuracy as `postrl train`)
# --------------------------------------------------------------------------------------------------


def evaluate_policy(cfg: Config, model_path: str) -> dict[str, Any]:
    """Greedy held-out metrics of ``model_path`` on ``cfg.data``'s held-out set, by the evaluation of
    ``postrl train`` (:func:`postrl.eval.runner.heldout_eval`: accuracy, mean reward, mean response length,
    ``format_rate``)."""
    import torch

    from postrl.data import build_messages, render_prompt
    from postrl.eval.runner import heldout_eval
    from postrl.models.loading import load_from_config
    from postrl.rollout.backend import build_backend
    from postrl.data import build_data_source

    model, tok, _ = load_from_config(cfg.model, model_path)
    model.eval()
    source = build_data_source(cfg)
    render = lambda s: render_prompt(tok, build_messages(s, cfg.data.system_prompt, cfg.data.prompt_template))  # noqa: E731
    with torch.no_grad():
        return heldout_eval(build_backend(cfg.rollout.backend, model, tok), tok, source,
                            source.eval, render, cfg.resolved_eval_max_new_tokens, cfg.eval.batch_size)


# --------------------------------------------------------------------------------------------------
# the pipeline
# --------------------------------------------------------------------------------------------------


def run_pipeline(cfg: Config, resume: str | Path | None = None,
                 log_fn: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]]:
    """Run (or resume) the stages of ``cfg``; returns the run directory and the pipeline results.

    Results: ``{"initial": eval, "stages": [{"name", "kind", "dir", "init_model", "final_model", "eval",
    "results"}], "final_model", "summary": summary_rows(...), "interrupted"?: True}``; the table of
    :func:`format_table` is also written to ``RUN/summary.txt`` when the last stage has finished. A stage that
    was interrupted (Ctrl-C) stops the pipeline; resume with ``--resume RUN``: finished stages are skipped, the
    interrupted one continues from its checkpoint.
    """
    stage_cfgs = check_stages(cfg)
    for spec in cfg.stages:
        _trainer(spec.kind)  # fail now if e.g. the dpo trainer is missing
    if resume is not None:
        run_dir = Path(resume)
        if not run_dir.is_dir():
            raise ConfigError(f"--resume {resume}: no such run directory")
    else:
        run_dir = new_run_dir(cfg.run.output_dir, cfg.run.name)
    save_config(cfg, run_dir / "config.yaml")
    results_path = run_dir / "results.json"
    results: dict[str, Any] = read_json(results_path, {})
    results.pop("interrupted", None)
    results.pop("summary", None)
    results["stages"] = []
    stages_root = run_dir / "stages"
    stages_root.mkdir(exist_ok=True)

    weights = cfg.model.name_or_path
    if cfg.eval.before and "initial" not in results:
        results["initial"] = evaluate_policy(cfg, weights)
        write_json_atomic(results_path, results)
        log_fn(f"[pipeline] start: held-out accuracy {results['initial']['accuracy']:.1%}")
    for i, (spec, scfg) in enumerate(zip(cfg.stages, stage_cfgs)):
        name = stage_name(i, spec)
        stage_dir = stages_root / name
        done = read_stage_done(stage_dir)
        if done is not None:
            log_fn(f"[pipeline] stage {name}: already done, skipped")
        else:
            scfg.model.name_or_path = weights
            has_ckpt = latest_checkpoint(stage_dir / "checkpoints") is not None
            if stage_dir.exists() and not has_ckpt:  # started but never checkpointed: nothing to resume
                shutil.rmtree(stage_dir)
            log_fn(f"[pipeline] stage {name} ({spec.kind}) from {weights}"
                   + (" (resuming its checkpoint)" if has_ckpt else ""))
            _, stage_results = run_stage(spec.kind, scfg, stage_dir, resume=has_ckpt)
            if stage_results.get("interrupted"):
                results["interrupted"] = True
                results["interrupted_stage"] = name
                write_json_atomic(results_path, results)
                log_fn(f"[pipeline] interrupted in stage {name}. Resume with: postrl pipeline "
                       f"{run_dir / 'config.yaml'} --resume {run_dir}")
                return run_dir, results
            final = final_model(stage_dir, stage_results)
            ev = evaluate_policy(cfg, str(final)) if cfg.eval.after and spec.kind in POLICY_KINDS else None
            done = {"name": name, "kind": spec.kind, "dir": str(stage_dir), "init_model": str(weights),
                    "final_model": str(final), "eval": ev, "results": _summary(stage_results)}
            write_json_atomic(stage_dir / STAGE_DONE, done)
            if ev is not None:
                log_fn(f"[pipeline] stage {name} done: held-out accuracy {ev['accuracy']:.1%}")
        results["stages"].append(done)
        if spec.kind in POLICY_KINDS:
            weights = done["final_model"]
        write_json_atomic(results_path, results)
    results["final_model"] = weights
    results["summary"] = summary_rows(results)
    write_json_atomic(results_path, results)
    (run_dir / "summary.txt").write_text(format_table(results) + "\n")
    return run_dir, results


def _summary(stage_results: dict[str, Any]) -> dict[str, Any]:
    """The scalar entries of a stage's results plus its own eval sections (no long lists)."""
    return {k: v for k, v in stage_results.items()
            if isinstance(v, (int, float, str, bool)) or k.startswith("eval_") and isinstance(v, dict)}


def stage_metric(stage: dict[str, Any], prev_eval: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The stage's own held-out metric before and after it: ``{"name", "before", "after"}`` (+ ``margin_before``
    / ``margin_after`` for preference stages), or None.

    sft: completion loss (mean NLL per completion token, from the stage's ``eval_before`` / ``eval_after``);
    dpo (offline) and rm: pair accuracy, the share of held-out pairs whose implicit reward (dpo: ``beta`` times
    the policy/reference log-ratio difference, Rafailov et al. 2023, eq. 5) or reward-model score ranks chosen
    above rejected; 0 before DPO, where the policy is the reference and every margin is 0. Other kinds (and
    stages run without their own evals): the pipeline's held-out mean reward of the previous and this model.
    """
    res = stage.get("results") or {}
    before, after = res.get("eval_before"), res.get("eval_after")
    kind = stage.get("kind")
    if before and after and before.get("n") and after.get("n"):
        if kind == "sft" and "loss" in after:
            return {"name": "completion loss", "before": before["loss"], "after": after["loss"]}
        if kind in ("dpo", "rm") and "margin_mean" in after:
            return {"name": "pair accuracy", "before": before["accuracy"], "after": after["accuracy"],
                    "margin_before": before["margin_mean"], "margin_after": after["margin_mean"]}
    if stage.get("eval") and prev_eval:
        return {"name": "reward", "before": prev_eval["reward_mean"], "after": stage["eval"]["reward_mean"]}
    return None


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model of the pipeline (``start`` when evaluated, then each stage): the pipeline's held-out
    greedy accuracy, its change from the previous row, mean reward, format rate and response length (None for
    an ``rm`` stage, which does not change the policy), and :func:`stage_metric`."""
    rows: list[dict[str, Any]] = []
    prev = results.get("initial")
    if prev:
        rows.append({"stage": "start", "kind": "-", "accuracy": prev["accuracy"], "accuracy_change": None,
                     "reward": prev["reward_mean"], "format_rate": prev.get("format_rate"),
                     "response_len": prev["response_len_mean"], "stage_metric": None})
    for st in results.get("stages", []):
        ev, metric = st.get("eval"), stage_metric(st, prev)
        if not ev and not metric:
            continue
        rows.append({"stage": st["name"], "kind": st["kind"], "accuracy": ev["accuracy"] if ev else None,
                     "accuracy_change": ev["accuracy"] - prev["accuracy"] if ev and prev else None,
                     "reward": ev["reward_mean"] if ev else None, "format_rate": ev.get("format_rate") if ev else None,
                     "response_len": ev["response_len_mean"] if ev else None, "stage_metric": metric})
        prev = ev or prev
    return rows


def _format_metric(m: Optional[dict[str, Any]]) -> str:
    if not m:
        return ""
    if m["name"] == "pair accuracy":
        return (f"pair accuracy {m['before']:.1%} -> {m['after']:.1%} "
                f"(margin {m['margin_before']:+.3f} -> {m['margin_after']:+.3f})")
    return f"{m['name']} {m['before']:.3f} -> {m['after']:.3f}"


def format_table(results: dict[str, Any]) -> str:
    """Per-stage held-out table: accuracy, its change, reward, response length, share of answers in the expected
    format, and each stage's own held-out metric before -> after (:func:`stage_metric`)."""
    rows = summary_rows(results)
    if not rows:
        return "(no held-out evaluation: eval.before / eval.after are off)"

    def cell(value: Any, fmt: str, width: int) -> str:
        return f"{'' if value is None else format(value, fmt):>{width}s}"

    lines = [f"{'stage':16s} {'kind':6s} {'accuracy':>9s} {'change':>9s} {'reward':>8s} {'format':>7s} {'len':>6s}  "
             "stage's own held-out metric (before -> after)"]
    for r in rows:
        change = "" if r["accuracy_change"] is None else f"{r['accuracy_change'] * 100:+.1f} pt"
        lines.append((f"{r['stage']:16s} {r['kind']:6s} {cell(r['accuracy'], '.1%', 9)} {change:>9s} "
                      f"{cell(r['reward'], '.3f', 8)} {cell(r['format_rate'], '.0%', 7)} "
                      f"{cell(r['response_len'], '.1f', 6)}  {_format_metric(r['stage_metric'])}").rstrip())
    n = next((st["eval"].get("n", 0) for st in reversed(results.get("stages", [])) if st.get("eval")),
             (results.get("initial") or {}).get("n", 0))
    lines.append(f"(greedy decoding on n = {n} held-out problems; format = share of completions with an "
                 "extractable answer)")
    return "\n".join(lines)
