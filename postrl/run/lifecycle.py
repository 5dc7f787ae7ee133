"""The run lifecycle, owned once for every training command (train, sft, dpo, rm).

A trainer is a :class:`Job`: it builds its model, data and optimizer, and supplies one step of its
algorithm, its own state and its evaluation. :func:`run_job` does everything around it, the same way for
every command::

    resume?  -> run directory and its latest checkpoint (or a new, never-overwritten run directory)
    threads, seed; job = build(cfg, checkpoint)                  # model, data, optimizer; nothing written yet
    restore run state, optimizer, scheduler, job state, RNG      # from the checkpoint, any postrl version
    RUN/config.yaml, env.json; metrics.jsonl / samples.jsonl cut back to the checkpoint; trackers
    eval before
    until job.finished(step):
        out = job.step(run)                                       # the algorithm
        non-finite streak; metrics.jsonl + trackers; progress; periodic eval; checkpoint every save_every
        Ctrl-C: checkpoint, results, "resume with" and stop
    eval after; checkpoint; RUN/final (the model for from_pretrained); results.json

Under ``torchrun`` (docs/scaling.md) every rank runs this loop in lock step: rank 0 alone writes the run
directory (config, env.json, metrics, samples, results, trackers, final/), every rank writes its part of each
checkpoint, and a Ctrl-C on any rank stops every rank at the same step boundary.

Every file is written atomically (checkpoints renamed into place, JSON through one writer), so a crash while
writing never loses what was written before.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from postrl.run import distributed
from postrl.run.checkpoint import (
    SHARDED_DIR,
    STATE_FORMAT,
    latest_checkpoint,
    load_full_optimizer,
    load_sharded,
    load_trainer_state,
    load_weights,
    publish_final,
    save_checkpoint,
    save_checkpoint_distributed,
    upgrade_state,
)
from postrl.run.dirs import check_writable_dir, new_run_dir, resume_checkpoint
from postrl.run.errors import TrainingError
from postrl.run.files import append_jsonl, truncate_log, write_json_atomic
from postrl.run.interrupt import InterruptFlag
from postrl.run.memory import keep_freed_memory
from postrl.run.optim import parameters_finite, stop_after_nonfinite_streak
from postrl.run.progress import Progress
from postrl.run.rng import rng_state, seed_everything, set_rng_state

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
RESULTS_FILE = "results.json"


@dataclass
class RunState:
    """What the lifecycle checkpoints beyond the model, optimizer and the job's own state."""

    step: int = 0
    consecutive_nonfinite: int = 0
    nonfinite_total: int = 0
    results: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float = 0.0
    no_update_steps: int = 0  # steps whose update had nothing to learn from (e.g. every advantage 0)


@dataclass
class StepOutput:
    """What one step of a job reports: its metrics (one ``metrics.jsonl`` line without ``step``) and whether
    its update was applied (``ok=False``: a non-finite loss or gradient skipped it; counted towards
    ``train.max_nonfinite_steps``)."""

    metrics: dict[str, Any]
    ok: bool = True
    updated: bool = True  # False: nothing was learned (no gradient: e.g. every advantage 0, every row skipped)


class Job:
    """The step logic of one training command; :func:`run_job` drives it.

    A job sets ``model``, ``tokenizer`` (saved in every checkpoint), ``optimizer``, ``scheduler`` (checkpointed
    by the lifecycle) and ``total_steps`` in its constructor, and writes nothing to disk there.
    """

    command = "train"  # the CLI command, for "resume with" messages
    no_update_hint = "every gradient was zero"  # why steps may apply no update, and what to try (end-of-run warning)
    progress_fields: Optional[tuple[tuple[str, str, str], ...]] = None  # None: the RL progress fields
    model: Any = None
    tokenizer: Any = None
    model_source: Optional[str] = None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    total_steps: int = 0

    def start(self, run: "Run") -> None:
        """Called once the run directory exists and the state is restored, before the first evaluation (e.g. to
        compute or load files the job keeps in the run directory)."""

    def step(self, run: "Run") -> StepOutput:
        """One step (``run.state.step`` is its 0-based index)."""
        raise NotImplementedError

    def finished(self, step: int) -> bool:
        return step >= self.total_steps

    def evaluate(self) -> dict[str, Any]:
        return {}

    def describe_eval(self, ev: dict[str, Any]) -> Optional[str]:
        """One line for the console, e.g. ``held-out greedy accuracy 48.0% (n=100)``; None prints nothing."""
        return None

    def eval_metrics(self, ev: dict[str, Any]) -> dict[str, float]:
        """The ``eval/*`` entries a periodic evaluation adds to that step's metrics."""
        return {f"eval/{k}": float(v) for k, v in ev.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "n"}

    def results_header(self) -> dict[str, Any]:
        """Entries put into ``results.json`` when the run starts (data counts, the loss used, ...)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The job's own state beyond model, optimizer and scheduler (data position, controllers, ...)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def sharded_modules(self) -> dict[str, tuple[Any, Any]]:
        """``{name: (module, optimizer)}`` beside ``model`` / ``optimizer`` whose state is sharded under
        ``train.strategy: fsdp`` (checkpointed with torch.distributed.checkpoint, not in ``state_dict``)."""
        return {}

    def close(self) -> None:
        """Release processes and clients (reward workers, judges)."""


class Run:
    """One run directory being trained in: what a job may use during :meth:`Job.step`."""

    def __init__(self, cfg: Any, job: Job, run_dir: Path, state: RunState):
        self.cfg, self.job, self.run_dir, self.state = cfg, job, run_dir, state
        self.progress: Optional[Progress] = None
        self.dist = distributed.current()  # None: one process
        self.main = self.dist is None or self.dist.is_main  # the rank that writes the run directory

    @property
    def results(self) -> dict[str, Any]:
        return self.state.results

    def write(self, text: str) -> None:
        """A line on the console that does not break the progress bar (rank 0's only)."""
        if not self.main:
            return
        if self.progress is not None:
            self.progress.write(text)
        else:
            print(text, flush=True)

    def log_samples(self, record: dict[str, Any]) -> None:
        """One ``samples.jsonl`` line (best and worst completions, for reports)."""
        if self.main:
            append_jsonl(self.run_dir / SAMPLES_FILE, record)

    def write_results(self) -> None:
        if self.main:
            write_json_atomic(self.run_dir / RESULTS_FILE, self.state.results)

    def save(self) -> Path:
        job, s = self.job, self.state
        if self.dist is not None:
            return self._save_distributed()
        state = {"format": STATE_FORMAT, "kind": job.command, "run_state": dataclasses.asdict(s),
                 "optimizer": job.optimizer.state_dict(), "scheduler": job.scheduler.state_dict(),
                 "rng": rng_state(), "job": job.state_dict()}
        return save_checkpoint(self.run_dir / "checkpoints", s.step, job.model, job.tokenizer, state,
                               keep=self.cfg.train.keep_checkpoints)

    def _save_distributed(self) -> Path:
        """Every rank: rank 0's trainer state with every rank's RNG; FSDP's sharded state through DCP."""
        job, s, d = self.job, self.state, self.dist
        sharded = {"policy": (job.model, job.optimizer), **job.sharded_modules()} if d.strategy == "fsdp" else None
        rngs = d.gather_objects(rng_state())
        state = {"format": STATE_FORMAT, "kind": job.command, "run_state": dataclasses.asdict(s),
                 "optimizer": None if sharded else job.optimizer.state_dict(),
                 "scheduler": job.scheduler.state_dict(), "rng": rngs[0], "rng_ranks": rngs,
                 "world_size": d.world_size, "strategy": d.strategy, "job": job.state_dict()}
        return save_checkpoint_distributed(d, self.run_dir / "checkpoints", s.step, job.model, job.tokenizer, state,
                                           keep=self.cfg.train.keep_checkpoints, sharded=sharded)

    def _roll_back(self, step: int) -> None:
        """Step ``step`` left non-finite parameters: put the model, optimizer and scheduler back to the latest
        checkpoint (the data position goes on), or stop when there is none to go back to."""
        ckpt = latest_checkpoint(self.run_dir / "checkpoints")
        if ckpt is None:
            raise TrainingError(
                f"step {step} left non-finite parameters (NaN or inf weights) and there is no checkpoint to roll back "
                f"to; nothing was saved. Try a lower train.lr or train.grad_clip, and train.save_every > 0.")
        st = upgrade_state(load_trainer_state(ckpt))
        if (ckpt / SHARDED_DIR).is_dir():  # train.strategy=fsdp: every rank loads its shards of both
            load_sharded(ckpt, {"policy": (self.job.model, self.job.optimizer)})
        else:
            load_weights(self.job.model, ckpt)
            self.job.optimizer.load_state_dict(st["optimizer"])
        self.job.scheduler.load_state_dict(st["scheduler"])
        self.write(f"[postrl] step {step} left non-finite parameters; rolled back to {ckpt}")

    def _eval(self, when: str) -> dict[str, Any]:
        ev = self.job.evaluate()
        line = self.job.describe_eval(ev)
        if line and self.cfg.run.progress:
            self.write(f"[eval] {when}: {line}")
        return ev

    def fit(self, trackers: list) -> dict[str, Any]:
        cfg, job, s = self.cfg, self.job, self.state
        res = s.results
        res.pop("interrupted", None)  # a resumed run is no longer the interrupted one
        res.update(job.results_header())
        t_start, wall_before = time.time(), s.wall_time_s
        job.start(self)
        if cfg.eval.before and "eval_before" not in res:
            res["eval_before"] = self._eval("before training")
            self.write_results()
        every, interrupted = cfg.eval.every, False
        self.progress = Progress(total=job.total_steps, initial=s.step, enabled=cfg.run.progress and self.main,
                                 fields=job.progress_fields)
        with InterruptFlag() as stop, self.progress:
            while not job.finished(s.step):
                out = job.step(self)
                if out.ok and not parameters_finite(job.model):  # whatever path led there (e.g. an overflow)
                    self._roll_back(s.step + 1)
                    out.ok = out.updated = False
                    out.metrics["rolled_back"] = 1
                if out.ok:
                    s.consecutive_nonfinite = 0
                else:
                    s.consecutive_nonfinite += 1
                    s.nonfinite_total += 1
                s.no_update_steps += 0 if out.ok and out.updated else 1
                s.step += 1
                record = {"step": s.step, **out.metrics, "nonfinite_steps": s.nonfinite_total,
                          "updated": int(out.ok and out.updated), "no_update_steps": s.no_update_steps}
                if every and s.step % every == 0 and not job.finished(s.step):
                    ev = self._eval(f"step {s.step}")  # logged with the step's metrics, and in results.json
                    record.update(job.eval_metrics(ev))
                    res.setdefault("eval_during", []).append({"step": s.step, **ev})
                if self.main:
                    append_jsonl(self.run_dir / METRICS_FILE, record)
                for tracker in trackers:
                    tracker.log(record, s.step)
                self.progress.update(record)
                stop_after_nonfinite_streak(s.consecutive_nonfinite, cfg.train.max_nonfinite_steps, s.step,
                                            self.run_dir / "checkpoints")
                s.wall_time_s = wall_before + time.time() - t_start
                if cfg.train.save_every and s.step % cfg.train.save_every == 0:
                    self.save()
                if stop.requested if self.dist is None else self.dist.any(stop.requested):  # every rank stops here
                    interrupted = True
                    break
        self.progress = None
        if interrupted:
            res["interrupted"] = True
            path = self.save()
            self.write_results()
            self.write(f"[postrl] interrupted at step {s.step}; checkpoint {path}. Resume with: "
                       f"postrl {job.command} {self.run_dir / 'config.yaml'} --resume {self.run_dir}")
            return res
        if cfg.eval.after:
            res["eval_after"] = self._eval("after training")
        s.wall_time_s = wall_before + time.time() - t_start
        res.update(steps=s.step, wall_time_s=s.wall_time_s, nonfinite_steps=s.nonfinite_total,
                   no_update_steps=s.no_update_steps)
        if s.step and s.no_update_steps * 2 > s.step:  # most of the run learned nothing: say so, and why
            warning = (f"{s.no_update_steps} of {s.step} steps applied no update: {job.no_update_hint}")
            res.setdefault("warnings", []).append(warning)
            self.write(f"[postrl] warning: {warning}")
        ckpt = self.save()
        if self.main:
            publish_final(ckpt, self.run_dir, job.model, job.tokenizer)  # LoRA: + final/merged/
        res["final_model"] = str(self.run_dir / "final")
        if self.dist is not None:
            self.dist.barrier()  # final/ is in place for every rank
        self.write_results()
        return res


# what a resumed run must share with the run it continues: the model, the data and the seed (other settings,
# such as train.steps or eval, may change; the run's config.yaml then records the new values)
RESUME_FIXED = ("model.name_or_path", "model.revision", "data", "run.seed", "sft.path", "sft.eval_path",
                "preference.path", "preference.eval_path", "preference.online")


def check_resume_config(cfg: Any, run_dir: Path) -> None:
    """Refuse to resume ``run_dir`` with a config whose model, data or seed differ from the run's own
    ``config.yaml``: the run's record would describe something that did not happen."""
    from postrl.config import ConfigError, load_config, to_dict

    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    try:
        saved = to_dict(load_config(saved_path, migrate=True))
    except ConfigError:
        return  # a config of another postrl version that no longer loads: the state check still applies
    now = to_dict(cfg)

    def leaves(tree: Any, key: str) -> dict[str, Any]:  # "data" -> {"data.path": ..., "data.train_size": ...}
        for part in key.split("."):
            tree = tree.get(part) if isinstance(tree, dict) else None
        return {f"{key}.{k}": v for k, v in tree.items()} if isinstance(tree, dict) else {key: tree}

    changed = []
    for key in RESUME_FIXED:
        old, new = leaves(saved, key), leaves(now, key)
        changed += [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                    if old.get(k) != new.get(k)]
    if changed:
        raise TrainingError(f"--resume {run_dir}: this config differs from the run's own ({saved_path}) in what a "
                            f"run cannot change midway: {'; '.join(changed)}. Resume with the run's config (only "
                            "settings such as train.steps may change), or start a new run.")


def _restore(job: Job, ckpt: Path, run_dir: Path) -> RunState:
    """Run state, optimizer, scheduler, job state and RNG of ``ckpt`` (written by any postrl version)."""
    try:
        st = upgrade_state(load_trainer_state(ckpt))
        state = RunState(**st["run_state"])
        d = distributed.current()
        if (ckpt / SHARDED_DIR).is_dir():  # FSDP's optimizer (and critic) state, resharded to this job's ranks
            load_sharded(ckpt, {"policy": (job.model, job.optimizer), **job.sharded_modules()})
        elif d is not None and d.strategy == "fsdp":  # a full optimizer state (none / ddp), sharded on loading
            if job.sharded_modules():
                raise TrainingError(f"{ckpt} holds the full state of a run with train.strategy="
                                    f"{st.get('strategy', 'none')} and a critic; resume it with none or ddp")
            load_full_optimizer(job.model, job.optimizer, st["optimizer"])
        else:
            job.optimizer.load_state_dict(st["optimizer"])
        job.scheduler.load_state_dict(st["scheduler"])
        job.load_state_dict(st["job"])
        rngs = st.get("rng_ranks") or [st["rng"]]  # a rank beyond the saved ones continues with rank 0's
        set_rng_state(rngs[d.rank] if d is not None and d.rank < len(rngs) else rngs[0])
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        # e.g. resuming with other data (sampler size) or another model (optimizer param groups)
        raise TrainingError(
            f"--resume {run_dir}: cannot restore the trainer state of {ckpt}: {exc}. Resume with the run's own "
            f"config ({run_dir / 'config.yaml'}); only settings such as train.steps may change.") from exc
    log.info("resumed from %s at step %d", ckpt, state.step)
    return state


def run_job(build: Callable[[Any, Optional[Path]], Job], cfg: Any, resume: str | Path | None = None,
            run_dir: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Run (or resume) the job that ``build(cfg, checkpoint_or_None)`` makes; returns ``(run_dir, results)``.

    resume:  a run directory to continue from its latest complete checkpoint (an error if it has none).
    run_dir: a new run goes into this (empty) directory instead of ``run.output_dir/run.name[-N]``.

    The job is built (model, data: the slow and error-prone part) before the run directory of a new run is
    created, so a config, data or model error leaves nothing behind.
    """
    from postrl.run.trackers import check_trackers

    report_to = list(cfg.run.report_to)
    check_trackers(report_to)
    ckpt = None
    if resume is not None:
        run_dir, ckpt = resume_checkpoint(resume)
        check_resume_config(cfg, run_dir)
    else:
        check_writable_dir(run_dir if run_dir is not None else Path(cfg.run.output_dir) / cfg.run.name,
                           "run_dir" if run_dir is not None else "run.output_dir/run.name")
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    keep_freed_memory()  # freed tensors are reused instead of faulted in again each step (postrl.run.memory)
    dist = distributed.init_distributed(cfg)  # None in one process; under torchrun: join the ranks
    try:
        return _run_job(build, cfg, report_to, ckpt, run_dir, dist)
    finally:
        distributed.shutdown()


def _run_job(build: Callable[[Any, Optional[Path]], Job], cfg: Any, report_to: list[str], ckpt: Optional[Path],
             run_dir: Any, dist: Optional["distributed.Dist"]) -> tuple[Path, dict[str, Any]]:
    """:func:`run_job` once the process knows its place (``dist``: its rank, or None in one process)."""
    from postrl.config import save_config, to_dict
    from postrl.eval.report import write_environment
    from postrl.run.trackers import build_trackers

    main = dist is None or dist.is_main
    seed_everything(cfg.run.seed)  # the same on every rank: identical models (e.g. a fresh value head)
    job = build(cfg, ckpt)
    if dist is not None:
        seed_everything(distributed.rank_seed(cfg.run.seed, dist.rank))  # each rank its own random streams
    try:
        if ckpt is not None:
            state = _restore(job, ckpt, run_dir)
            if job.total_steps < state.step:
                raise TrainingError(
                    f"--resume {run_dir}: the run has already done {state.step} steps, more than the {job.total_steps} "
                    f"this config plans (train.steps, or the epochs of sft/dpo/rm); nothing was changed. To train "
                    f"further give more steps; to use the run as it is, load {run_dir / 'final'} or its checkpoint.")
        else:
            state = RunState()
            if main:
                run_dir = new_run_dir(cfg.run.output_dir, cfg.run.name, run_dir)
            if dist is not None:  # rank 0 chose (and made) the directory
                run_dir = Path(dist.broadcast(str(run_dir) if main else None))
        if main:
            for name in (METRICS_FILE, SAMPLES_FILE):
                truncate_log(run_dir / name, state.step)
            save_config(cfg, run_dir / "config.yaml")
            write_environment(run_dir, cfg, job.model, job.model_source, state.step)  # env.json, for reports
        trackers = build_trackers(report_to, run_dir, run_dir.name, to_dict(cfg),
                                  resume_step=state.step if ckpt is not None else None) if main else []
        try:
            return run_dir, Run(cfg, job, run_dir, state).fit(trackers)
        finally:
            for tracker in trackers:  # every tracker gets closed; a failing one only warns (the run is saved)
                try:
                    tracker.close()
                except Exception as exc:  # noqa: BLE001
                    log.warning("closing the %s tracker failed: %s: %s", tracker.name, type(exc).__name__, exc)
    finally:
        job.close()
