"""The RL loop (GRPO family), top to bottom like the paper's pseudo-code.

    for step in steps:
        prompts   = sampler.next_batch(prompts_per_step)           # PromptSource
        rollouts  = generator.generate(prompts x n)                # Rollout (ids, mask, logprobs)
        rewards   = reward_pipeline(completions) (+ overlong shaping)  # Reward (isolated failures)
        adv       = advantage_fn(rewards, mask, n, cfg.algo, ...)  # Advantage [B, T]
        for epoch, mini batch:                                     # Update
            for micro batch: loss = agg(policy_loss(...) + kl_coef * kl(...)); backward
            clip grads; optimizer.step()
        log metrics; checkpoint; periodic eval

Everything algorithmic is looked up by name in ``postrl.algorithms``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from collections import Counter

from postrl.algorithms import ADVANTAGES, KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES
from postrl.algorithms.kl_control import build_kl_controller, kl_penalty_rewards
from postrl.algorithms.policy_losses import tis_weights
from postrl.algorithms.advantages import gae_advantages_and_returns, last_token_rewards
from postrl.algorithms.shaping import dynamic_sampling_keep, overlong_filter_mask, overlong_penalty
from postrl.algorithms.value_losses import clipped_value_loss
from postrl.models.value import ValueModel
from postrl.config import Config, ConfigError, save_config
from postrl.data import PromptSampler, build_messages, build_source, render_prompt
from postrl.data.sources import CORRECT_EPS
from postrl.eval.runner import flat_eval_metrics, heldout_eval
from postrl.eval.report import append_samples, sample_log_record, should_log_samples, write_environment
from postrl.models.loading import load_model_and_tokenizer
from postrl.models.logprobs import completion_logprobs
from postrl.rewards import RewardContext, RewardPipeline, resolve_reward
from postrl.rollout.generator import Generation, Generator, SamplingParams, eos_token_ids
from postrl.trainer.checkpoint import (
    latest_checkpoint,
    load_trainer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from postrl.trainer.optim import clipped_step, stop_after_nonfinite_streak
from postrl.trainer.progress import Progress

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. repeated non-finite losses); the message says why."""


@dataclass
class RunState:
    """What a checkpoint needs beyond model and optimizer to continue exactly."""

    step: int = 0
    consecutive_nonfinite: int = 0
    nonfinite_total: int = 0
    results: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float = 0.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def length_sorted_order(lengths: torch.Tensor) -> torch.Tensor:
    """Positions that sort ``lengths [N]`` ascending (stable), so that consecutive micro batches hold
    sequences of similar length and pad little. The gradient of a mini batch is the sum over its
    micro batches, so the order changes it only by floating-point summation order."""
    if lengths.dim() != 1:
        raise ValueError(f"length_sorted_order expects a 1-D tensor of lengths, got shape {tuple(lengths.shape)}")
    return torch.argsort(lengths, stable=True)


def step_seed(seed: int, step: int) -> int:
    """Sampling seed of one step: a function of (run seed, step) only, so resume is exact."""
    return (seed * 1_000_003 + step * 7_919 + 17) % (2**62)


def lr_lambda(schedule: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return f


def build_data_source(cfg: Config):
    d = cfg.data
    common = dict(train_size=d.train_size, eval_size=d.eval_size, seed=cfg.resolved_data_seed,
                  answer_extraction=d.answer_extraction)
    if d.source in ("reasoning_gym", "toy"):
        return build_source(d.source, task=d.task, task_kwargs=dict(d.task_kwargs), **common)
    return build_source(d.source, path=d.path, eval_path=d.eval_path, **common)


def check_registries(cfg: Config) -> None:
    """Fail before any model is loaded if a method name is unknown or needs what is not built yet."""
    a = cfg.algo
    incompatible = [
        (a.kl_in_reward and a.kl_coef == 0,
         "algo.kl_in_reward=true needs algo.kl_coef > 0 (the KL penalty it puts into the reward)."),
        (a.kl_target > 0 and a.kl_coef == 0,
         "algo.kl_target (adaptive KL) needs algo.kl_coef > 0 as the starting coefficient."),
        (a.policy_loss == "gspo" and a.loss_agg != "seq_mean_token_mean",
         f"algo.policy_loss=gspo is a sequence-level objective (GSPO eq. 5 averages over sequences); use "
         f"algo.loss_agg=seq_mean_token_mean, not {a.loss_agg}."),
        (a.dual_clip_c > 0 and a.policy_loss != "ppo_clip",
         f"algo.dual_clip_c applies to algo.policy_loss=ppo_clip only, not {a.policy_loss}."),
        (a.advantage == "bnpo" and (a.kl_in_reward or a.overlong_buffer > 0),
         "algo.advantage=bnpo models binary success rates with a Beta distribution: it cannot take per-token KL "
         "rewards (kl_in_reward) or overlong shaping (overlong_buffer)."),
        (a.advantage == "remax" and a.dynamic_sampling,
         "algo.dynamic_sampling drops groups with all-equal rewards, but remax advantages compare with the greedy "
         "completion and are not zero for such groups; turn one of them off."),
        (a.advantage == "remax" and cfg.scoring.normalize == "normalize_each_then_sum",
         "scoring.normalize=normalize_each_then_sum standardizes each reward within a prompt's group, but the "
         "remax baseline is a single greedy completion per prompt; use scoring.normalize=sum_then_normalize."),
        (cfg.scoring.normalize == "normalize_each_then_sum" and cfg.rollout.n < 2,
         "scoring.normalize=normalize_each_then_sum needs rollout.n >= 2 (it standardizes within a prompt's group)."),
        (a.advantage in ("rloo", "reinforce_pp_baseline", "bnpo", "grpo", "dr_grpo") and cfg.rollout.n < 2,
         f"algo.advantage={a.advantage} compares completions of the same prompt: rollout.n must be >= 2."),
    ]
    for bad, message in incompatible:
        if bad:
            raise ConfigError(message)
    for registry, name in ((ADVANTAGES, cfg.algo.advantage), (POLICY_LOSSES, cfg.algo.policy_loss),
                           (LOSS_AGGREGATIONS, cfg.algo.loss_agg), (KL_ESTIMATORS, cfg.algo.kl_estimator)):
        try:
            registry.get_fn(name)
        except KeyError as exc:
            raise ConfigError(exc.args[0]) from None
    for spec in cfg.rewards:  # also before the (possibly slow) data source is built
        resolve_reward(spec.name)


def fresh_dir(parent: str | Path, name: str) -> Path:
    """``parent/name``, or ``name-2``, ``name-3``... if taken (exists and is not empty), created: an earlier
    run or evaluation is never overwritten."""
    base = Path(parent) / name
    candidate, i = base, 1
    while candidate.exists() and any(candidate.iterdir()):
        i += 1
        candidate = base.with_name(f"{name}-{i}")
    candidate.mkdir(parents=True, exist_ok=True)
    return candidate


def new_run_dir(cfg: Config, run_dir: str | Path | None = None) -> Path:
    """The directory of a new run: ``run_dir`` when given (it must be empty: a run is never overwritten),
    else ``run.output_dir/run.name`` made fresh by :func:`fresh_dir`."""
    if run_dir is None:
        return fresh_dir(cfg.run.output_dir, cfg.run.name)
    run_dir = Path(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise TrainingError(f"run directory {run_dir} is not empty; a run is never overwritten")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


_ROW_FIELDS = ("samples", "prompts", "texts", "rewards", "correct", "baseline_rewards")


def _select_rows(batch: dict[str, Any], rows: list[int], pad_id: int) -> dict[str, Any]:
    """The rows of a rollout batch (list fields, per-reward components and the generation)."""
    out = {k: [batch[k][i] for i in rows] for k in _ROW_FIELDS if k in batch}
    out["components"] = {name: [v[i] for i in rows] for name, v in batch["components"].items()}
    out["gen"] = batch["gen"].select(rows)
    out["errors"] = batch["errors"]  # counted over everything that was sampled
    out["statuses"] = batch.get("statuses", Counter())
    out["failed"] = {name: [v[i] for i in rows] for name, v in batch.get("failed", {}).items()}
    return out


def _concat_batches(parts: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    if len(parts) == 1:
        return parts[0]
    out = {k: [x for p in parts for x in p[k]] for k in _ROW_FIELDS if k in parts[0]}
    out["components"] = {name: [x for p in parts for x in p["components"][name]] for name in parts[0]["components"]}
    out["gen"] = Generation.concat([p["gen"] for p in parts], pad_id)
    out["errors"] = sum((Counter(p["errors"]) for p in parts), Counter())
    out["statuses"] = sum((Counter(p.get("statuses", {})) for p in parts), Counter())
    out["failed"] = {name: [x for p in parts for x in p.get("failed", {}).get(name, [])]
                     for name in parts[0].get("failed", {})}
    return out


class _InterruptFlag:
    """First Ctrl-C asks the loop to checkpoint and stop at the next step boundary; a second one aborts."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not in the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\n[postrl] Ctrl-C: finishing this step, writing a checkpoint, then stopping "
              "(press Ctrl-C again to abort without saving).", flush=True)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


class RLTrainer:
    """Holds the pieces of one run; :meth:`fit` is the loop."""

    skip_zero_advantage = True  # exact compute saving, see update(); tests switch it off to compare
    sort_micro_batches = True  # length-sorted micro batches in update() (same gradient up to summation order)

    def __init__(self, cfg: Config, resume: str | Path | None = None, run_dir: str | Path | None = None):
        self.cfg = cfg
        check_registries(cfg)
        ckpt = None
        if resume is not None:
            self.run_dir = Path(resume)
            ckpt = latest_checkpoint(self.run_dir / "checkpoints")
            if ckpt is None:
                raise TrainingError(f"--resume {resume}: no complete checkpoint under {self.run_dir / 'checkpoints'}")
        if cfg.run.threads > 0:
            torch.set_num_threads(cfg.run.threads)
        seed_everything(cfg.run.seed)
        self.source = build_data_source(cfg)

        m = cfg.model
        self.model, self.tokenizer, self.model_source = load_model_and_tokenizer(
            str(ckpt) if ckpt else m.name_or_path, dtype=m.dtype, device=m.device, revision=m.revision,
            offline_fallback=m.offline_fallback, cache_dir=m.cache_dir, trust_remote_code=m.trust_remote_code,
        )
        self.device = next(self.model.parameters()).device
        self.rewards = RewardPipeline(cfg.rewards, self.source, cfg.scoring, RewardContext(
            source=self.source, tokenizer=self.tokenizer, device=self.device))
        self.ref_model = None
        if cfg.algo.kl_coef > 0:
            # reference = the starting policy (the original model, also on resume)
            if ckpt is None:
                self.ref_model = copy.deepcopy(self.model)
            else:
                self.ref_model = load_model_and_tokenizer(
                    m.name_or_path, dtype=m.dtype, device=m.device, revision=m.revision,
                    offline_fallback=m.offline_fallback, cache_dir=m.cache_dir,
                    trust_remote_code=m.trust_remote_code)[0]
            self.ref_model.eval().requires_grad_(False)
        self.generator = Generator(self.model, eos_token_ids(self.model, self.tokenizer), self.tokenizer.pad_token_id)

        self.advantage_fn = ADVANTAGES.get_fn(cfg.algo.advantage)
        self.policy_loss_fn = POLICY_LOSSES.get_fn(cfg.algo.policy_loss)
        self.agg_fn = LOSS_AGGREGATIONS.get_fn(cfg.algo.loss_agg)
        self.kl_fn = KL_ESTIMATORS.get_fn(cfg.algo.kl_estimator)

        t = cfg.train
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(t.lr_schedule, t.warmup_steps, t.steps))
        self.critic, self.critic_optimizer = None, None
        if cfg.algo.advantage == "gae":  # PPO with a learned value model
            critic_lm = load_model_and_tokenizer(
                cfg.critic.name_or_path or m.name_or_path, dtype=m.dtype, device=m.device, revision=m.revision,
                offline_fallback=m.offline_fallback, cache_dir=m.cache_dir, trust_remote_code=m.trust_remote_code)[0]
            self.critic = ValueModel(critic_lm)
            self.critic_optimizer = torch.optim.AdamW(self.critic.parameters(), lr=cfg.critic.lr,
                                                      betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
        self.sampler = PromptSampler(self.source.train, seed=cfg.resolved_data_seed)
        self.state = RunState()
        self.kl_ctl = build_kl_controller(cfg.algo)  # fixed kl_coef, or adaptive towards algo.kl_target
        self.algo_state: dict[str, Any] = {}  # estimator state that persists across steps (e.g. BNPO's statistics)
        self._prompt_cache: dict[str, list[int]] = {}
        if ckpt is not None:
            self._load_state(ckpt)
        else:  # created only now, so that a config, data or model error leaves no empty run directory behind
            self.run_dir = new_run_dir(cfg, run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._truncate_metrics(self.state.step)
        save_config(cfg, self.run_dir / "config.yaml")
        write_environment(self.run_dir, cfg, self.model, self.model_source, self.state.step)  # env.json, for reports

    # ----- helpers -------------------------------------------------------------------------------------------
    def render(self, sample) -> list[int]:
        key = sample.uid or sample.question
        if key not in self._prompt_cache:
            messages = build_messages(sample, self.cfg.data.system_prompt, self.cfg.data.prompt_template)
            self._prompt_cache[key] = render_prompt(self.tokenizer, messages)
        return self._prompt_cache[key]

    def evaluate(self) -> dict[str, Any]:
        e = self.cfg.eval  # greedy accuracy (+ pass@k with eval.n samples): the code of `postrl eval`
        return heldout_eval(self.generator, self.tokenizer, self.source, self.source.eval, self.render,
                            self.cfg.resolved_eval_max_new_tokens, e.batch_size, n=e.n, ks=e.k,
                            temperature=e.temperature, seed=self.cfg.run.seed)

    def _truncate_metrics(self, step: int) -> None:
        """On resume, drop metric (and sample-log) lines written after the checkpoint (they will be re-run)."""
        for path in (self.metrics_path, self.run_dir / "samples.jsonl"):
            if not path.exists():
                continue
            lines = [ln for ln in path.read_text().splitlines()
                     if ln.strip() and json.loads(ln).get("step", 0) <= step]
            path.write_text("".join(ln + "\n" for ln in lines))

    def _write_results(self) -> None:
        path = self.run_dir / "results.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.state.results, indent=2))
        os.replace(tmp, path)

    def trainer_state(self) -> dict[str, Any]:
        return {
            "run_state": self.state.__dict__.copy(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": rng_state(),
            "kl_controller": self.kl_ctl.state_dict(),
            **({"critic": self.critic.state_dict(), "critic_optimizer": self.critic_optimizer.state_dict()}
               if self.critic is not None else {}),
            "algo_state": self.algo_state,
        }

    def _load_state(self, ckpt: Path) -> None:
        try:
            st = load_trainer_state(ckpt)
            self.state = RunState(**st["run_state"])
            self.optimizer.load_state_dict(st["optimizer"])
            self.scheduler.load_state_dict(st["scheduler"])
            self.sampler.load_state_dict(st["sampler"])
            set_rng_state(st["rng"])
            if "kl_controller" in st:  # absent in checkpoints written before the algorithm library
                self.kl_ctl.load_state_dict(st["kl_controller"])
            self.algo_state = st.get("algo_state", {})
            if self.critic is not None:
                self.critic.load_state_dict(st["critic"])
                self.critic_optimizer.load_state_dict(st["critic_optimizer"])
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            # e.g. resuming with other data (sampler size) or another model (optimizer param groups)
            raise TrainingError(
                f"--resume {self.run_dir}: cannot restore the trainer state of {ckpt}: {exc}. Resume with the "
                f"run's own config ({self.run_dir / 'config.yaml'}); only settings such as train.steps may change."
            ) from exc
        log.info("resumed from %s at step %d", ckpt, self.state.step)

    def save(self) -> Path:
        return save_checkpoint(self.run_dir / "checkpoints", self.state.step, self.model, self.tokenizer,
                               self.trainer_state(), keep=self.cfg.train.keep_checkpoints)

    # ----- one step ------------------------------------------------------------------------------------------
    def _sample_groups(self, samples: list, seed: int) -> dict[str, Any]:
        """Generate ``n`` completions per sample, decode and score them (one rollout batch)."""
        cfg, r = self.cfg, self.cfg.rollout
        group = [s for s in samples for _ in range(r.n)]
        prompts = [self.render(s) for s in group]
        self.model.eval()
        gen = self.generator.generate(prompts, SamplingParams(r.max_new_tokens, r.temperature, r.top_p, r.top_k),
                                      seed=seed, batch_size=r.batch_size)
        texts = self.decode(gen)
        res = self.rewards(texts, group, prompts=prompts, completion_ids=self._completion_ids(gen), group_size=r.n)
        rewards = list(res.total)
        components = dict(res.components)
        a = cfg.algo
        if a.overlong_buffer > 0:  # DAPO overlong reward shaping
            pen = self._overlong(gen)
            rewards = [x + p for x, p in zip(rewards, pen)]
            components["overlong"] = pen
        batch = {"samples": group, "prompts": prompts, "gen": gen, "texts": texts, "rewards": rewards,
                 "components": components, "errors": res.errors, "statuses": res.statuses,
                 "failed": res.failed,
                 "correct": self._correct(texts, group, res.components)}
        if a.advantage == "remax":  # ReMax baseline: reward of the greedy completion of each prompt
            greedy = self.generator.generate([self.render(s) for s in samples],
                                             SamplingParams(r.max_new_tokens, temperature=0.0), batch_size=r.batch_size)
            base = self.rewards(self.decode(greedy), samples, prompts=[self.render(s) for s in samples],
                                completion_ids=self._completion_ids(greedy)).total
            if a.overlong_buffer > 0:  # the baseline is scored exactly like the samples
                base = [x + p for x, p in zip(base, self._overlong(greedy))]
            batch["baseline_rewards"] = [b for b in base for _ in range(r.n)]
        return batch

    def _correct(self, texts: list[str], samples: list, components: dict[str, list[float]]) -> list[bool]:
        """Exact correctness per completion; reuses the ``task`` reward's scores when that reward is configured
        (it is the same scorer), so slow verifiers such as math-verify run once per completion, not twice."""
        if "task" in components:
            return [v >= 1.0 - CORRECT_EPS for v in components["task"]]
        return [self.source.is_correct(t, s) for t, s in zip(texts, samples)]

    def _overlong(self, gen: Generation) -> list[float]:
        a = self.cfg.algo
        return overlong_penalty(gen.lengths, self.cfg.rollout.max_new_tokens, a.overlong_buffer,
                                a.overlong_penalty).tolist()

    @staticmethod
    def _completion_ids(gen: Generation) -> list[list[int]]:
        return [ids[m.bool()].tolist() for ids, m in zip(gen.completion_ids, gen.completion_mask)]

    def decode(self, gen: Generation) -> list[str]:
        return self.tokenizer.batch_decode(
            [ids[m.bool()] for ids, m in zip(gen.completion_ids, gen.completion_mask)], skip_special_tokens=True)

    def rollout(self, step: int) -> dict[str, Any]:
        """Sample ``n`` completions for each of ``prompts_per_step`` prompts and score them.

        With ``algo.dynamic_sampling`` (DAPO), groups whose rewards are all equal carry no
        group-relative signal: they are dropped and more prompts are drawn, up to
        ``algo.max_sampling_tries`` rollout batches; the step then trains on the groups it has.
        """
        cfg, n, want = self.cfg, self.cfg.rollout.n, self.cfg.train.prompts_per_step
        base_seed = step_seed(cfg.run.seed, step)
        if not cfg.algo.dynamic_sampling:
            batch = self._sample_groups(self.sampler.next_batch(want), base_seed)
            batch["sampling_tries"], batch["groups_dropped"] = 1, 0
            return batch
        kept: list[dict[str, Any]] = []
        n_kept, tries, dropped = 0, 0, 0
        while n_kept < want and tries < cfg.algo.max_sampling_tries:
            # a seed stream of its own per try (base_seed + 7919 * k would be step s + k's seed)
            part = self._sample_groups(self.sampler.next_batch(want), (base_seed + 1_000_000_007 * tries) % 2**62)
            tries += 1
            keep = dynamic_sampling_keep(torch.tensor(part["rewards"]), n).tolist()
            groups = [g for g, k in enumerate(keep) if k][: want - n_kept]
            dropped += len(keep) - sum(keep)
            if groups:
                kept.append(_select_rows(part, [g * n + j for g in groups for j in range(n)], self.tokenizer.pad_token_id))
                n_kept += len(groups)
        if not kept:  # every group was uniform: train on the last batch (its advantages are all 0)
            kept = [part]
        batch = _concat_batches(kept, self.tokenizer.pad_token_id)
        batch["sampling_tries"], batch["groups_dropped"] = tries, dropped
        return batch

    def update(self, batch: dict[str, Any], step: int) -> dict[str, float]:
        """PPO-style update over mini batches (optimizer steps) and micro batches (accumulation)."""
        cfg, a = self.cfg, self.cfg.algo
        gen = batch["gen"]
        ids, mask, behaviour_lp = gen.completion_ids, gen.completion_mask, gen.logprobs
        prompts = batch["prompts"]
        B, micro = len(prompts), cfg.train.micro_batch_size
        temp, pad = cfg.rollout.temperature, self.tokenizer.pad_token_id
        loss_mask = mask.float()
        seq_lens = torch.tensor([len(p) for p in prompts]) + mask.sum(-1).cpu()  # prompt + completion tokens
        if a.overlong_filter:  # DAPO: truncated completions do not enter the loss
            loss_mask = overlong_filter_mask(loss_mask, gen.truncated.to(loss_mask.device))

        def forward_all(model) -> torch.Tensor:
            with torch.no_grad():
                parts = [completion_logprobs(model, prompts[i:i + micro], ids[i:i + micro], mask[i:i + micro], pad,
                                             temp)[0] for i in range(0, B, micro)]
            width = ids.shape[1]
            return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts])

        ref_lp = forward_all(self.ref_model) if self.ref_model is not None else None
        # Old (proximal) log-probs: the sampler's own, unless truncated importance sampling is on, which
        # needs the trainer's forward of the rollout policy to compare with the behaviour log-probs.
        old_lp = behaviour_lp
        tis_w, tis_stats = None, {}
        if a.tis_mode != "off":
            old_lp = forward_all(self.model)
            tis_w, tis_stats = tis_weights(old_lp, behaviour_lp, loss_mask, a.tis_mode, a.tis_cap)
        kl_coef = self.kl_ctl.value if self.ref_model is not None else 0.0
        token_rewards = None
        if ref_lp is not None and a.kl_in_reward:
            token_rewards = kl_penalty_rewards(old_lp, ref_lp, loss_mask, kl_coef, self.kl_fn)
        rewards = torch.tensor(batch["rewards"], dtype=torch.float32)
        base = batch.get("baseline_rewards")
        values = critic_out = None
        if self.critic is not None:
            with torch.no_grad():
                self.critic.eval()
                values = torch.cat([torch.nn.functional.pad(
                    self.critic(prompts[i:i + micro], ids[i:i + micro], mask[i:i + micro], pad),
                    (0, ids.shape[1] - ids[i:i + micro].shape[1])) for i in range(0, B, micro)])
        adv = self.advantage_fn(
            rewards, loss_mask, cfg.rollout.n, a, token_rewards=token_rewards, state=self.algo_state,
            baseline_rewards=torch.tensor(base, dtype=torch.float32) if base is not None else None,
            values=values,
        ).to(self.device)
        if self.critic is not None:
            per_token = last_token_rewards(rewards.to(loss_mask.device), loss_mask)
            if token_rewards is not None:
                per_token = per_token + token_rewards
            returns = gae_advantages_and_returns(per_token, values, loss_mask, a.gamma, a.lam)[1]
            critic_out = self.update_critic(prompts, ids, mask, loss_mask, values, returns, step)
            if step < cfg.critic.warmup_steps:  # critic warm-up: the policy waits
                return {"loss": 0.0, "clip_frac": 0.0, "kl": 0.0, "lr": self.scheduler.get_last_lr()[0],
                        "grad_norm": float("nan"), "updates": 0, "skipped_updates": 0, "rows_computed_frac": 0.0,
                        "policy_frozen": 1, **critic_out}
        kl_in_loss = ref_lp is not None and not a.kl_in_reward
        # Sequences with advantage exactly 0 contribute exactly 0 loss and gradient when the policy loss says
        # so and no KL / entropy term is on: skip their forward/backward but keep their tokens in the
        # token-mean denominator, so the update is the same as computing them.
        skip_zero = (self.skip_zero_advantage and not kl_in_loss and a.entropy_coef == 0
                     and getattr(self.policy_loss_fn, "zero_at_zero_advantage", False))
        sums = {"loss": 0.0, "clip_frac": 0.0, "kl": 0.0, "kl_ref": 0.0}
        tokens_seen, grad_norms, skipped, updates, rows_computed = 0.0, [], 0, 0, 0
        lr = self.scheduler.get_last_lr()[0]
        self.model.train()
        for mb, norms in self._mini_batches(loss_mask, step, salt=1):
            if skip_zero:
                mb = mb[(adv[mb] * loss_mask[mb]).abs().sum(-1).cpu() != 0]
            for p in self.params:  # explicit zeros, so a step with every row skipped still steps Adam
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                else:
                    p.grad.zero_()
            finite = True
            if self.sort_micro_batches:  # similar lengths share a micro batch: less padding, same gradient sum
                mb = mb[length_sorted_order(seq_lens[mb])]
            for mstart in range(0, len(mb), micro):
                idx = mb[mstart:mstart + micro]
                width = max(1, int(mask[idx].sum(-1).max()))
                m_ids, m_mask = ids[idx, :width], loss_mask[idx, :width]
                lp, ent = completion_logprobs(self.model, [prompts[i] for i in idx], m_ids, mask[idx, :width],
                                              pad, temp, with_entropy=a.entropy_coef > 0, entropy_grad=True)
                loss_tok, stats = self.policy_loss_fn(lp, old_lp[idx, :width], adv[idx, :width], m_mask, a)
                if tis_w is not None:
                    loss_tok = loss_tok * tis_w[idx, :width]
                if ref_lp is not None:
                    kl_ref_tok = self.kl_fn(lp, ref_lp[idx, :width])
                    if kl_in_loss:
                        loss_tok = loss_tok + kl_coef * kl_ref_tok
                    sums["kl_ref"] += float((kl_ref_tok.detach() * m_mask).sum())
                if a.entropy_coef > 0:
                    loss_tok = loss_tok - a.entropy_coef * ent
                loss = self.agg_fn(loss_tok, m_mask, **norms)
                if not torch.isfinite(loss):
                    finite = False
                    break
                loss.backward()
                rows_computed += len(idx)
                with torch.no_grad():
                    sums["loss"] += float(loss)
                    sums["clip_frac"] += float((stats["clipped"] * m_mask).sum())
                    sums["kl"] += float((KL_ESTIMATORS["k3"](lp.detach(), old_lp[idx, :width]) * m_mask).sum())
                tokens_seen += float(m_mask.sum())
            # the step is taken also when every row was skipped: zero gradients, Adam moments still move
            gnorm, ok = clipped_step(self.params, self.optimizer, cfg.train.grad_clip, finite)
            if not ok:
                self.optimizer.zero_grad(set_to_none=True)
                skipped += 1
                continue
            updates += 1
            grad_norms.append(float(gnorm))
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        denom = max(tokens_seen, 1.0)
        out = {"loss": sums["loss"] / max(updates, 1), "clip_frac": sums["clip_frac"] / denom,
               "kl": sums["kl"] / denom, "lr": lr,
               "grad_norm": float(np.mean(grad_norms)) if grad_norms else float("nan"),
               "updates": updates, "skipped_updates": skipped,
               "rows_computed_frac": rows_computed / max(1, B * cfg.train.epochs)}
        if ref_lp is not None:
            out["kl_ref"] = sums["kl_ref"] / denom
            out["kl_coef"] = kl_coef
            self.kl_ctl.update(out["kl_ref"], B)
        for k, v in tis_stats.items():
            out[f"tis/{k}"] = float(v)
        if critic_out is not None:
            out.update(critic_out, policy_frozen=0)
        return out

    def _mini_batches(self, loss_mask: torch.Tensor, step: int, salt: int):
        """Yield ``(rows, normalisers)`` per mini batch over ``train.epochs`` passes (epoch 0 in order, later
        epochs reshuffled with a seed of (run seed, step, salt)); the normalisers are the mini batch's, so
        aggregation does not depend on the micro-batch split."""
        cfg, B = self.cfg, loss_mask.shape[0]
        mini = cfg.resolved_mini_batch_size
        order_rng = torch.Generator().manual_seed(step_seed(cfg.run.seed, step) + salt)
        for epoch in range(cfg.train.epochs):
            order = torch.arange(B) if epoch == 0 else torch.randperm(B, generator=order_rng)
            for start in range(0, B, mini):
                mb = order[start:start + mini]
                yield mb, {"num_tokens": float(loss_mask[mb].sum()), "num_seqs": len(mb),
                           "max_len": cfg.rollout.max_new_tokens}

    def update_critic(self, prompts, ids, mask, loss_mask, old_values, returns, step: int) -> dict[str, float]:
        """Regress the value model on the GAE returns with the clipped value loss (same batching as the policy)."""
        cfg = self.cfg
        micro = cfg.train.micro_batch_size
        pad = self.tokenizer.pad_token_id
        params = list(self.critic.parameters())
        self.critic.train()
        total, clipped, tokens, updates = 0.0, 0.0, 0.0, 0
        for mb, norms in self._mini_batches(loss_mask, step, salt=2):
            self.critic_optimizer.zero_grad(set_to_none=True)
            for mstart in range(0, len(mb), micro):
                idx = mb[mstart:mstart + micro]
                width = max(1, int(mask[idx].sum(-1).max()))
                m_mask = loss_mask[idx, :width]
                v = self.critic([prompts[i] for i in idx], ids[idx, :width], mask[idx, :width], pad)
                loss_tok, was_clipped = clipped_value_loss(v, old_values[idx, :width], returns[idx, :width],
                                                           cfg.critic.value_clip)
                loss = LOSS_AGGREGATIONS["token_mean"](loss_tok, m_mask, **norms)
                loss.backward()
                total += float(loss.detach())
                clipped += float((was_clipped * m_mask).sum())
                tokens += float(m_mask.sum())
            clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
            if torch.isfinite(torch.nn.utils.clip_grad_norm_(params, clip)):
                self.critic_optimizer.step()
                updates += 1
        self.critic_optimizer.zero_grad(set_to_none=True)
        valid = loss_mask.bool()
        return {"value_loss": total / max(updates, 1), "value_clip_frac": clipped / max(tokens, 1.0),
                "values_mean": float(old_values[valid].mean()) if valid.any() else 0.0,
                "returns_mean": float(returns[valid].mean()) if valid.any() else 0.0}

    # ----- the loop ------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        t_start = time.time()
        wall_before = self.state.wall_time_s
        self.state.results.pop("interrupted", None)  # a resumed run is no longer the interrupted one
        if cfg.eval.before and "eval_before" not in self.state.results:
            ev = self.state.results["eval_before"] = self.evaluate()
            self._write_results()
            if cfg.run.progress:
                print(f"[eval] before training: held-out greedy accuracy {ev['accuracy']:.1%} (n={ev['n']})", flush=True)
        progress = Progress(total=cfg.train.steps, initial=self.state.step, enabled=cfg.run.progress)
        interrupted = False
        with _InterruptFlag() as stop, progress:
            while self.state.step < cfg.train.steps:
                step = self.state.step
                t0 = time.time()
                batch = self.rollout(step)
                t_gen = time.time() - t0
                upd = self.update(batch, step)
                t_step = time.time() - t0
                if upd["updates"] == 0 and upd["skipped_updates"] > 0:
                    self.state.consecutive_nonfinite += 1
                    self.state.nonfinite_total += 1
                else:
                    self.state.consecutive_nonfinite = 0
                self.state.step = step + 1
                record = self._metrics(batch, upd, t_gen, t_step)
                if cfg.eval.every and self.state.step % cfg.eval.every == 0 and self.state.step < cfg.train.steps:
                    ev = self.evaluate()  # logged with the step's metrics as eval/* keys, and in results.json
                    record.update(flat_eval_metrics(ev))
                    self.state.results.setdefault("eval_during", []).append({"step": self.state.step, **ev})
                    progress.write(f"[eval] step {self.state.step}: accuracy {ev['accuracy']:.3f}")
                with open(self.metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                progress.update(record)
                if should_log_samples(self.state.step, cfg.train.steps):  # best/worst completions, for reports
                    append_samples(self.run_dir, sample_log_record(self.state.step, batch, cfg.rollout.n))
                stop_after_nonfinite_streak(self.state.consecutive_nonfinite, cfg.train.max_nonfinite_steps,
                                            self.state.step, self.run_dir / "checkpoints")
                self.state.wall_time_s = wall_before + time.time() - t_start
                if cfg.train.save_every and self.state.step % cfg.train.save_every == 0:
                    self.save()
                if stop.requested:
                    interrupted = True
                    break
        if interrupted:
            self.state.results["interrupted"] = True
            path = self.save()
            self._write_results()
            progress.write(f"[postrl] interrupted at step {self.state.step}; checkpoint {path}. "
                           f"Resume with: postrl train {self.run_dir / 'config.yaml'} --resume {self.run_dir}")
            return self.state.results
        if cfg.eval.after:
            ev = self.state.results["eval_after"] = self.evaluate()
            if cfg.run.progress:
                print(f"[eval] after training: held-out greedy accuracy {ev['accuracy']:.1%} (n={ev['n']})", flush=True)
        self.state.wall_time_s = wall_before + time.time() - t_start
        self.state.results["steps"] = self.state.step
        self.state.results["wall_time_s"] = self.state.wall_time_s
        self.state.results["nonfinite_steps"] = self.state.nonfinite_total
        self.save()
        self._write_results()
        return self.state.results

    def _metrics(self, batch, upd: dict[str, float], t_gen: float, t_step: float) -> dict[str, Any]:
        gen = batch["gen"]
        lengths = gen.lengths.float()
        gen_tokens = float(lengths.sum())
        record: dict[str, Any] = {
            "step": self.state.step,
            "reward_mean": float(np.mean(batch["rewards"])),
            "reward_std": float(np.std(batch["rewards"])),
            "accuracy": float(np.mean(batch["correct"])),
            "kl": upd["kl"],
            "entropy": float((gen.entropy * gen.completion_mask).sum() / max(gen_tokens, 1.0)),
            "response_len_mean": float(lengths.mean()),
            "response_len_max": float(lengths.max()),
            "truncated_frac": float(gen.truncated.float().mean()),
            "tokens_per_s": gen_tokens / t_step,
            "gen_tokens_per_s": gen_tokens / max(t_gen, 1e-9),
            "step_time_s": t_step,
            "gen_time_s": t_gen,
            "loss": upd["loss"],
            "clip_frac": upd["clip_frac"],
            "grad_norm": upd["grad_norm"],
            "lr": upd["lr"],
            "rows_computed_frac": upd["rows_computed_frac"],
            "skipped_updates": upd["skipped_updates"],
            "nonfinite_steps": self.state.nonfinite_total,
            "reward_errors": sum(batch["errors"].values()),
            "sampling_tries": batch["sampling_tries"],
            "groups_dropped": batch["groups_dropped"],
        }
        record.update({k: v for k, v in upd.items()
                       if k in ("kl_ref", "kl_coef", "value_loss", "value_clip_frac", "values_mean", "returns_mean",
                                "policy_frozen") or k.startswith("tis/")})
        for name, values in batch["components"].items():
            record[f"reward/{name}"] = float(np.mean(values))
        for (name, kind), count in batch["errors"].items():
            record[f"reward_errors/{name}/{kind}"] = count
        for name, fails in batch.get("failed", {}).items():
            record[f"reward_error_frac/{name}"] = float(np.mean(fails)) if fails else 0.0
        for (name, status), count in batch.get("statuses", {}).items():
            record[f"reward_status/{name}/{status}"] = count
        return record


def train(cfg: Config, resume: str | Path | None = None,
          run_dir: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Run (or resume) training; returns the run directory and ``results``. ``run_dir``: start the new run in
    that (empty) directory instead of ``run.output_dir/run.name[-N]``."""
    trainer = RLTrainer(cfg, resume=resume, run_dir=run_dir)
    try:
        return trainer.run_dir, trainer.fit()
    finally:
        trainer.rewards.close()  # reward worker processes, judge clients
