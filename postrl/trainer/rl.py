"""The RL step (GRPO family), top to bottom like the paper's pseudo-code.

    one step (RLTrainer.step):
        prompts   = sampler.next_batch(prompts_per_step)             # PromptSource
        gen       = backend.generate(prompt ids x n)                 # Generation (ids, mask, behaviour logprobs)
        rewards   = reward_pipeline(texts, prompt text + ids) (+ overlong shaping)  # isolated failures
        batch     = RolloutBatch(gen, rewards, components, ...)      # the typed batch
        adv       = advantage_fn(rewards, loss_mask, n, cfg.algo, **declared requires)  # [B, T]
        for epoch, mini batch:                                       # Update
            for micro batch: loss = agg(policy_loss(...) + kl_coef * kl(...)); backward
            clip grads; optimizer.step()
        -> StepOutput(metrics)

The loop around it (steps, metrics and trackers, checkpoints, periodic eval, Ctrl-C, resume) is
``postrl.run.run_job``, shared by every command. Everything algorithmic is looked up by name in
``postrl.algorithms``.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from postrl.algorithms import ADVANTAGES, KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES
from postrl.algorithms.advantages import gae_advantages_and_returns, last_token_rewards
from postrl.algorithms.kl_control import build_kl_controller, kl_penalty_rewards, reference_reset_due
from postrl.algorithms.policy_losses import logprob_mismatch, tis_weights
from postrl.algorithms.shaping import dynamic_sampling_keep, overlong_filter_mask, overlong_penalty
from postrl.algorithms.value_losses import clipped_value_loss, shared_backbone_loss
from postrl.config import Config, ConfigError, check_command
from postrl.data import build_data_source, build_messages, render_prompt
from postrl.data.guidance import build_guidance
from postrl.data.mixture import MixtureSource, mixture_eval, per_task_metrics, task_eval_metrics
from postrl.data.samplers import RolloutLedger, build_sampler
from postrl.data.sources import CORRECT_EPS
from postrl.eval.report import sample_log_record, should_log_samples
from postrl.eval.runner import flat_eval_metrics, heldout_eval
from postrl.models.loading import load_from_config, load_policy
from postrl.models.lora import lora_enabled, reference_view
from postrl.models.logprobs import completion_logprobs, completion_logprobs_and_values, distinct_prompts
from postrl.models.value import ValueHead, ValueModel
from postrl.rewards import RewardContext, RewardPipeline, check_reward_kwargs, resolve_reward
from postrl.rollout.backend import TorchBackend, backend_from_config, build_backend
from postrl.rollout.batch import RolloutBatch
from postrl.rollout.generator import Generation, SamplingParams, sampling_params
from postrl.rollout.selection import guide_failed_groups, luffy_rollout, speed_rollout
from postrl.run import Job, StepOutput, TrainingError, run_job
from postrl.run import distributed
from postrl.run.optim import build_optimizer, clipped_step
from postrl.run.rng import step_seed

log = logging.getLogger(__name__)

__all__ = ["RLTrainer", "TrainingError", "grouped_length_order", "length_sorted_order", "micro_batch_tokens", "train"]


def length_sorted_order(lengths: torch.Tensor) -> torch.Tensor:
    """Positions that sort ``lengths [N]`` ascending (stable), so that consecutive micro batches hold
    sequences of similar length and pad little. The gradient of a mini batch is the sum over its
    micro batches, so the order changes it only by floating-point summation order."""
    if lengths.dim() != 1:
        raise ValueError(f"length_sorted_order expects a 1-D tensor of lengths, got shape {tuple(lengths.shape)}")
    return torch.argsort(lengths, stable=True)


def grouped_length_order(groups: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Positions that keep the rows of a group (the same prompt) together, groups ordered by their longest row
    and rows by length inside each group: a micro batch then holds few distinct prompts (each run once by the
    shared-prefix forward) and pads little. ``groups, lengths [N]`` -> ``[N]``; as with
    :func:`length_sorted_order`, only the floating-point summation order of the gradient changes."""
    if groups.shape != lengths.shape or lengths.dim() != 1:
        raise ValueError(f"grouped_length_order expects two 1-D tensors of one shape, got {tuple(groups.shape)} "
                         f"and {tuple(lengths.shape)}")
    group_max = torch.zeros(int(groups.max()) + 1 if len(groups) else 0, dtype=lengths.dtype)
    group_max = group_max.scatter_reduce(0, groups, lengths, reduce="amax", include_self=False)
    order = torch.argsort(lengths, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]
    return order[torch.argsort(group_max[groups[order]], stable=True)]


def micro_batch_tokens(order: torch.Tensor, groups: torch.Tensor, prompt_lens: torch.Tensor,
                       completion_lens: torch.Tensor, micro: int) -> int:
    """Token positions the shared-prefix forward computes when ``order`` is cut into micro batches of ``micro``
    rows: per micro batch, its distinct prompts padded to its longest prompt, plus every row's completion
    padded to its longest completion (all ``[N]`` tensors indexed by row)."""
    total = 0
    for start in range(0, len(order), micro):
        rows = order[start:start + micro]
        distinct = len(torch.unique(groups[rows]))
        total += distinct * int(prompt_lens[rows].max()) + len(rows) * int(completion_lens[rows].max())
    return total


def episode_returns(batch: RolloutBatch) -> torch.Tensor:
    """The total reward of each row ``[B]``: ``rewards`` plus any per-token rewards (multi-turn episodes put
    their earlier step rewards there), i.e. the episode return."""
    if batch.token_rewards is None:
        return batch.rewards
    return batch.rewards + (batch.token_rewards * batch.loss_mask).sum(-1).to(batch.rewards.dtype)


def check_rewards(cfg: Config) -> None:
    """Fail before any model is loaded if a reward name does not resolve (method names and their combinations
    are checked by the config's own validation; rewards live above the config and are resolved here)."""
    for i, spec in enumerate(cfg.rewards):
        entry = resolve_reward(spec.name)
        if not entry.trl_style:
            check_reward_kwargs(entry, spec.kwargs, f"rewards.{i}")


class RLTrainer(Job):
    """The RL step (rollout, rewards, advantages, update) as a :class:`postrl.run.Job`; ``postrl.run`` owns the
    run around it. ``RLTrainer(cfg)`` builds the pieces (model, data, rewards, optimizer) and writes nothing."""

    command = "train"
    no_update_hint = ("every completion of each prompt got the same reward, so every advantage was 0 (e.g. every "
                      "reward 0: the task is too hard for the model or the budget, or the reward is wrong). Try a "
                      "larger rollout.n or rollout.max_new_tokens, an easier task, or check the reward on a few "
                      "completions with postrl eval.")
    skip_zero_advantage = True  # exact compute saving, see update(); tests switch it off to compare
    sort_micro_batches = True  # length-sorted micro batches in update() (same gradient up to summation order)
    share_prefix = True  # each distinct prompt of a micro batch runs once in the update's forwards (same values)

    def __init__(self, cfg: Config, checkpoint: Path | None = None):
        self.cfg = cfg
        check_command(cfg, "train")
        check_rewards(cfg)
        self.source = build_data_source(cfg)
        # data.sampler and data.guidance (docs/curricula.md), checked before the model loads
        d = cfg.data
        self.sampler = build_sampler(d.sampler.name, d.sampler.kwargs, self.source, cfg.resolved_data_seed,
                                     cfg.rollout.n)
        self.guidance = build_guidance(d.guidance.name, d.guidance.kwargs, self.source, cfg.resolved_data_seed,
                                       cfg.rollout.n, cfg.train.steps)
        self.ledger = RolloutLedger()  # what each step spends on rollouts (zero-variance accounting)
        self._row_advantages: list[float] = []  # per completion, fed back to the sampler after the update
        self.model, self.tokenizer, self.model_source = load_policy(cfg.model, checkpoint)  # + LoRA adapters
        self.device = next(self.model.parameters()).device
        self.rewards = RewardPipeline(cfg.rewards, self.source, cfg.scoring, RewardContext(
            source=self.source, tokenizer=self.tokenizer, device=self.device))
        self.ref_model = None
        if cfg.algo.distill_teacher:  # on-policy distillation: the teacher is the reference of the KL-in-reward path
            self.ref_model, teacher_tok, _ = load_from_config(cfg.model, cfg.algo.distill_teacher)
            if teacher_tok.get_vocab() != self.tokenizer.get_vocab():
                raise ConfigError(f"algo.distill_teacher={cfg.algo.distill_teacher!r} has another tokenizer than "
                                  f"model.name_or_path={cfg.model.name_or_path!r}; on-policy distillation compares "
                                  "the two models' log-probs token by token and needs the same vocabulary")
            self.ref_model.eval().requires_grad_(False)
        elif cfg.algo.kl_coef > 0 and lora_enabled(cfg.model):  # LoRA: the base model = the adapter disabled
            self.ref_model = reference_view(self.model)
        elif cfg.algo.kl_coef > 0:  # reference = the starting policy (the original model, also on resume)
            self.ref_model = copy.deepcopy(self.model) if checkpoint is None else load_from_config(cfg.model)[0]
            self.ref_model.eval().requires_grad_(False)
        r = cfg.rollout
        self.async_pipeline = r.async_generation and r.max_staleness > 0
        if self.async_pipeline and r.backend == "torch":
            raise ConfigError("rollout.async_generation with rollout.max_staleness > 0 needs a served backend "
                              "(rollout.backend=openai_server): the torch backend samples from the model that the "
                              "update changes; use max_staleness=0 or a server")
        self.backend = backend_from_config(cfg, self.model, self.tokenizer)
        self.teacher_backend = None  # LUFFY with a teacher model: its traces are sampled here (docs/curricula.md)
        if getattr(self.guidance, "teacher", None):
            teacher, teacher_tok, _ = load_from_config(cfg.model, self.guidance.teacher)
            if teacher_tok.get_vocab() != self.tokenizer.get_vocab():
                raise ConfigError(f"data.guidance.kwargs.teacher={self.guidance.teacher!r} has another tokenizer than "
                                  f"model.name_or_path={cfg.model.name_or_path!r}; LUFFY trains the policy on the "
                                  "teacher's tokens and needs the same vocabulary")
            self.teacher_backend = build_backend("torch", teacher.eval().requires_grad_(False), self.tokenizer)
        # served generation (docs/generation-backends.md): the sampler holds a copy of the weights of policy
        # version sampler_version (None: the sampler is the trainer's own model, always current)
        self.served = not isinstance(self.backend, TorchBackend)
        self.sampler_version: int | None = None
        self.recompute_old = self.served if r.recompute_old_logprobs is None else r.recompute_old_logprobs
        self._pending = None  # async: (future of the next step's rollout batch, its step)
        self._sampler_state_at_launch = None
        self._trained_version = 0
        self._executor = None
        self.stale_dropped = 0  # async: samples dropped for being older than max_staleness (counted over the run)
        self.episodes = None  # multi-turn environments (env.name): the episode runner replaces single completions
        if cfg.env.name:
            from postrl.rollout.episodes import runner_from_config

            self.episodes = runner_from_config(cfg.env, cfg.rollout, self.backend, self.tokenizer,
                                               system_prompt=cfg.data.system_prompt)
        self.max_len = cfg.env.max_episode_tokens if cfg.env.name else cfg.rollout.max_new_tokens
        self.dist = distributed.current()  # None: one process (train.strategy=none), today's path
        self.train_model = self.model  # the module training forwards go through (a DDP wrapper under ddp)
        if self.dist is not None:  # data parallel (docs/scaling.md): this rank's prompts, wrapped models
            self.my_prompts, self.layout = self._distribute(cfg)
            self.train_model = self.dist.prepare(self.model)
            if self.ref_model is not None:
                self.dist.prepare(self.ref_model, trainable=False)
            if self.dist.strategy == "fsdp":
                self.backend = distributed.UnshardedBackend(self.backend, self.model, self.dist)
            if self.served:
                raise ConfigError(f"rollout.backend={cfg.rollout.backend!r} runs in one process only "
                                  "(train.strategy=none) for now")

        self.advantage_fn = ADVANTAGES.get_fn(cfg.algo.advantage)
        self.requires = tuple(getattr(self.advantage_fn, "requires", ()))  # the estimator's extra inputs
        self.policy_loss_fn = POLICY_LOSSES.get_fn(cfg.algo.policy_loss)
        self.agg_fn = LOSS_AGGREGATIONS.get_fn(cfg.algo.loss_agg)
        self.kl_fn = KL_ESTIMATORS.get_fn(cfg.algo.kl_estimator)

        self.total_steps = cfg.train.steps
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.value_head = None  # critic.shared_backbone: a value head on the policy, trained in the policy's loss
        if "values" in self.requires and cfg.critic.shared_backbone:
            self.value_head = ValueHead(self.model)
            self.params += list(self.value_head.parameters())
        self.optimizer, self.scheduler = build_optimizer(self.params, cfg.train, self.total_steps)
        self.critic, self.critic_optimizer = None, None
        if "values" in self.requires and self.value_head is None:  # e.g. PPO's GAE: a separate value model
            self.critic = ValueModel(load_from_config(cfg.model, cfg.critic.name_or_path)[0])
            self.critic_train = self.critic if self.dist is None else self.dist.prepare(self.critic)
            t = cfg.train
            self.critic_optimizer = torch.optim.AdamW(self.critic.parameters(), lr=cfg.critic.lr,
                                                      betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
        self.kl_ctl = build_kl_controller(cfg.algo)  # fixed kl_coef, or adaptive towards algo.kl_target
        self.algo_state: dict[str, Any] = {}  # estimator state that persists across steps (e.g. BNPO's statistics)
        self._prompt_cache: dict[str, list[int]] = {}
        self._prompt_text_cache: dict[tuple[int, ...], str] = {}

    # ----- helpers -------------------------------------------------------------------------------------------
    def render(self, sample) -> list[int]:
        key = sample.uid or sample.question
        if key not in self._prompt_cache:
            messages = build_messages(sample, self.cfg.data.system_prompt, self.cfg.data.prompt_template)
            self._prompt_cache[key] = render_prompt(self.tokenizer, messages)
        return self._prompt_cache[key]

    def evaluate(self) -> dict[str, Any]:
        e = self.cfg.eval  # greedy accuracy (+ pass@k with eval.n samples): the code of `postrl eval`
        if self._pending is not None:  # async: the background rollout owns the server until it is done
            self._pending[0].exception()
        self._sync_due(self._trained_version, force=True)  # a server evaluates the current weights
        if self.episodes is not None:
            return self.evaluate_episodes()
        def run(samples: list) -> dict[str, Any]:
            return heldout_eval(self.backend, self.tokenizer, self.source, samples, self.render,
                                self.cfg.resolved_eval_max_new_tokens, e.batch_size, n=e.n, ks=e.k,
                                temperature=e.temperature, seed=self.cfg.run.seed)

        if isinstance(self.source, MixtureSource):  # per task, and over all held-out problems
            return mixture_eval(self.source, run)
        return run(self.source.eval)

    def evaluate_episodes(self) -> dict[str, Any]:
        """Greedy episodes on the held-out samples (one each, environment seeds fixed by the run seed and the
        sample's index): ``accuracy`` = success rate, ``reward_mean`` = mean return, and the episode means."""
        import dataclasses

        from postrl.rollout.episodes import EpisodeTask, episode_metrics, runner_from_config

        samples = list(self.source.eval)
        if not samples:
            return {"accuracy": float("nan"), "reward_mean": float("nan"), "n": 0}
        greedy = dataclasses.replace(self.cfg.rollout, temperature=0.0)
        runner = runner_from_config(self.cfg.env, greedy, self.backend, self.tokenizer,
                                    system_prompt=self.cfg.data.system_prompt)
        tasks = [EpisodeTask(sample=smp, seed=(self.cfg.run.seed * 1_000_003 + 104_729 * i) % 2**31)
                 for i, smp in enumerate(samples)]
        batch = runner.run(tasks, 1, seed=self.cfg.run.seed)
        m = episode_metrics(batch)
        return {"accuracy": m["episodes/success_rate"], "reward_mean": m["episodes/return_mean"],
                "response_len_mean": float(batch.lengths.float().mean()), "n": len(samples),
                **{k.split("/", 1)[1]: v for k, v in m.items() if not k.startswith("episodes/end/")}}

    def describe_eval(self, ev: dict[str, Any]) -> str:
        return f"held-out greedy accuracy {ev['accuracy']:.1%} (n={ev['n']})"

    def eval_metrics(self, ev: dict[str, Any]) -> dict[str, float]:
        return {**flat_eval_metrics(ev), **task_eval_metrics(ev)}  # + eval/accuracy/<task> for a mixture

    def state_dict(self) -> dict[str, Any]:
        return {
            # async: the prompts of the batch generated ahead are drawn again after a resume
            "sampler": self._sampler_state_at_launch if self._pending is not None else self.sampler.state_dict(),
            "kl_controller": self.kl_ctl.state_dict(),
            **({"critic": self.critic.state_dict(), "critic_optimizer": self.critic_optimizer.state_dict()}
               if self.critic is not None and not self._sharded else {}),
            "algo_state": self.algo_state,
            **({"value_head": self.value_head.state_dict()} if self.value_head is not None else {}),
            # ProRL: after a reset the reference is no longer model.name_or_path, so it travels with the run
            **({"reference": self.ref_model.state_dict()} if self.cfg.algo.ref_reset_every and self.ref_model
               is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "reference" in state:
            self.ref_model.load_state_dict(state["reference"])
        self.sampler.load_state_dict(state["sampler"])
        if "kl_controller" in state:  # absent in checkpoints written before the algorithm library
            self.kl_ctl.load_state_dict(state["kl_controller"])
        self.algo_state = state.get("algo_state", {})
        if self.value_head is not None:
            self.value_head.load_state_dict(state["value_head"])
        if self.critic is not None and "critic" in state:  # else: restored from the sharded checkpoint
            self.critic.load_state_dict(state["critic"])
            self.critic_optimizer.load_state_dict(state["critic_optimizer"])

    @property
    def _sharded(self) -> bool:
        return self.dist is not None and self.dist.strategy == "fsdp"

    def sharded_modules(self) -> dict[str, tuple[Any, Any]]:
        """FSDP: the PPO critic and its optimizer are checkpointed sharded too, beside the policy."""
        return {"critic": (self.critic, self.critic_optimizer)} if self.critic is not None else {}

    def _distribute(self, cfg: Config) -> tuple[list[int], distributed.RowLayout]:
        """This rank's prompts of each step and the row layout (whole groups per rank; docs/scaling.md)."""
        from postrl.config import ConfigError

        d, P = self.dist, cfg.train.prompts_per_step
        if P % d.world_size:
            raise ConfigError(f"train.prompts_per_step={P} must be divisible by the {d.world_size} ranks: each rank "
                              f"samples whole groups of rollout.n completions")
        if cfg.algo.dynamic_sampling:
            raise ConfigError("algo.dynamic_sampling draws a different number of batches on each rank; it runs in "
                              "one process only (train.strategy=none) for now")
        if cfg.critic.shared_backbone:
            raise ConfigError("critic.shared_backbone calls the policy's decoder and heads directly, past the "
                              "DDP/FSDP wrapper; it runs in one process only (train.strategy=none) for now; under "
                              "torchrun use the separate critic (critic.shared_backbone=false)")
        if self.episodes is not None:
            raise ConfigError(f"env.name={cfg.env.name!r}: multi-turn episodes run in one process only "
                              "(train.strategy=none) for now")
        return distributed.rl_layout(P, cfg.rollout.n, cfg.resolved_mini_batch_size, d.world_size, d.rank)

    def close(self) -> None:
        if self._executor is not None:  # async: a rollout still running fails fast once its server is closed
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self.rewards.close()  # reward worker processes, judge clients
        self.backend.close()

    # ----- one step ------------------------------------------------------------------------------------------
    def prompt_text(self, prompt_ids: list[int]) -> str:
        """The rendered prompt text (chat template applied) that rewards see, decoded once per distinct prompt."""
        key = tuple(prompt_ids)
        if key not in self._prompt_text_cache:
            self._prompt_text_cache[key] = self.tokenizer.decode(prompt_ids, skip_special_tokens=False)
        return self._prompt_text_cache[key]

    def _score(self, gen: Generation, samples: list, group_size: int) -> tuple[list[str], Any, list[float]]:
        """Decode and score the completions of ``gen``: ``(texts, reward result, total rewards)``, the totals
        with DAPO's overlong shaping when it is on (also for the ReMax baseline, so both are scored alike)."""
        texts = self.decode(gen)
        prompt_ids = [list(p) for p in gen.prompt_ids]
        res = self.rewards(texts, samples, prompts=[self.prompt_text(p) for p in prompt_ids], prompt_ids=prompt_ids,
                           completion_ids=self._completion_ids(gen), group_size=group_size)
        rewards = list(res.total)
        if self.cfg.algo.overlong_buffer > 0:  # DAPO overlong reward shaping
            rewards = [x + p for x, p in zip(rewards, self._overlong(gen))]
        return texts, res, rewards

    def _sample_groups(self, samples: list, seed: int, step: int, n: int = 0,
                       gen: Generation | None = None) -> RolloutBatch:
        """Generate ``n`` completions per sample (0 = ``rollout.n``), decode and score them (one rollout batch);
        ``gen``: score these completions instead of sampling (LUFFY's teacher traces)."""
        r = self.cfg.rollout
        n = n or r.n
        group = [s for s in samples for _ in range(n)]
        if gen is None:
            gen = self.backend.generate([self.render(s) for s in group], sampling_params(r), seed=seed,
                                        batch_size=r.batch_size)
            self.ledger.generated(len(group), int(gen.lengths.sum()))
        texts, res, rewards = self._score(gen, group, n)
        batch = RolloutBatch.from_generation(gen, group, [self.prompt_text(p) for p in gen.prompt_ids], texts, n,
                                             policy_version=self._version(step),
                                             with_entropy=self.backend.reports_entropy)
        batch.rewards = torch.tensor(rewards, dtype=torch.float64)
        batch.components = dict(res.components)
        if self.cfg.algo.overlong_buffer > 0:
            batch.components["overlong"] = self._overlong(gen)
        batch.failed, batch.reward_errors, batch.reward_statuses = res.failed, res.errors, res.statuses
        batch.correct = self._correct(texts, group, res.components)
        if "baseline_rewards" in self.requires:  # e.g. ReMax: the reward of the greedy completion of each prompt
            greedy = self.backend.generate([self.render(s) for s in samples],
                                           SamplingParams(r.max_new_tokens, temperature=0.0), batch_size=r.batch_size)
            base = self._score(greedy, samples, 1)[2]
            batch.baseline_rewards = [b for b in base for _ in range(n)]
        batch.validate()
        return batch

    def _teacher_groups(self, samples: list, seed: int, m: int, step: int) -> RolloutBatch:
        """``m`` completions per sample from LUFFY's teacher model (``data.guidance.kwargs.teacher``), scored like
        the policy's; not counted as the policy's generated tokens."""
        r, g = self.cfg.rollout, self.guidance
        gen = self.teacher_backend.generate([self.render(s) for s in samples for _ in range(m)],
                                            SamplingParams(r.max_new_tokens, g.teacher_temperature),
                                            seed=seed, batch_size=r.batch_size)
        return self._sample_groups(samples, seed, step, n=m, gen=gen)

    def _sample_episodes(self, samples: list, seed: int, step: int) -> RolloutBatch:
        """``n`` multi-turn episodes per sample (one group each) through the episode runner: the environment's
        step rewards are the rewards (``rewards`` = the last step's, ``token_rewards`` the earlier ones, each on
        the last sampled token of its turn), ``correct`` = the episode's success; ``rewards`` of the config are
        not used. Each group's environments get a seed of (run seed, step, group)."""
        from postrl.rollout.episodes import EpisodeTask

        tasks = [EpisodeTask(sample=s, seed=(seed + 7_919 * g) % 2**31) for g, s in enumerate(samples)]
        batch = self.episodes.run(tasks, self.cfg.rollout.n, seed=seed, policy_version=self._version(step))
        self.ledger.generated(len(batch), int(batch.loss_mask.sum()))  # sampled tokens (not the environment's)
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

    def rollout(self, step: int) -> RolloutBatch:
        """Sample ``n`` completions for each of ``prompts_per_step`` prompts and score them.

        With ``algo.dynamic_sampling`` (DAPO), groups whose rewards are all equal carry no
        group-relative signal: they are dropped and more prompts are drawn, up to
        ``algo.max_sampling_tries`` rollout batches; the step then trains on the groups it has.
        """
        cfg, n, want = self.cfg, self.cfg.rollout.n, self.cfg.train.prompts_per_step
        base_seed = step_seed(cfg.run.seed, step)
        self.ledger.reset()
        if self.dist is not None:  # every rank draws the step's prompts (same sampler state) and samples its own
            base_seed = distributed.rank_seed(base_seed, self.dist.rank)
            prompts = self.sampler.next_batch(want)
            return self._sample_groups([prompts[i] for i in self.my_prompts], base_seed, step)
        sample = self._sample_episodes if self.episodes is not None else self._sample_groups
        if self.sampler.screen or self.guidance.name in ("guide", "luffy"):  # SPEED, Guide, LUFFY
            return self._assembled_rollout(want, base_seed, step)
        if not cfg.algo.dynamic_sampling:
            return sample(self._draw(want, step), base_seed, step)
        kept: list[RolloutBatch] = []
        n_kept, tries, dropped = 0, 0, 0
        while n_kept < want and tries < cfg.algo.max_sampling_tries:
            # a seed stream of its own per try (base_seed + 7919 * k would be step s + k's seed)
            part = sample(self._draw(want, step), (base_seed + 1_000_000_007 * tries) % 2**62, step)
            tries += 1
            keep = dynamic_sampling_keep(episode_returns(part).float(), n).tolist()
            groups = [g for g, k in enumerate(keep) if k][: want - n_kept]
            dropped += len(keep) - sum(keep)
            if groups:
                kept.append(part.select([g * n + j for g in groups for j in range(n)]))
                n_kept += len(groups)
        trained_anyway = 0
        if not kept:  # every group was uniform: train on the last batch (its advantages are all 0)
            kept, trained_anyway = [part], len(part) // n
        batch = type(kept[0]).concat(kept, self.tokenizer.pad_token_id)  # reward counters: over everything sampled
        batch.sampling_tries, batch.groups_dropped = tries, dropped
        self.ledger.discarded(n * (dropped - trained_anyway), dropped - trained_anyway)
        return batch

    def _draw(self, k: int, step: int) -> list:
        """The next ``k`` prompts of the sampler, with QuestA's prefix hints when ``data.guidance`` says so."""
        return self.guidance.prepare(self.sampler.next_batch(k), step)

    def _assembled_rollout(self, want: int, seed: int, step: int) -> RolloutBatch:
        """Groups assembled from several generations (postrl/rollout/selection.py, docs/curricula.md): SPEED's
        screening rollouts, LUFFY's teacher traces, Guide's hinted regeneration of groups that all failed."""
        n, pad = self.cfg.rollout.n, self.tokenizer.pad_token_id
        sample_fn = partial(self._sample_groups, step=step)
        if self.sampler.screen:
            batch = speed_rollout(self.sampler, sample_fn, want, n, seed, pad, self.ledger,
                                  draw=lambda k: self._draw(k, step))
        elif self.guidance.name == "luffy":
            batch = luffy_rollout(self._draw(want, step), self.guidance, sample_fn, self.tokenizer, self.render,
                                  self.cfg.rollout.max_new_tokens, n, seed, pad,
                                  teacher_fn=partial(self._teacher_groups, step=step) if self.teacher_backend else None)
        else:
            batch = sample_fn(self._draw(want, step), seed)
        if self.guidance.name == "guide":
            batch = guide_failed_groups(batch, n, self.guidance, sample_fn, self.render, self.prompt_text,
                                        (seed + 2_718_281_829) % 2**62, pad, self.ledger)
        return batch

    def update(self, batch: RolloutBatch, step: int) -> dict[str, float]:
        """PPO-style update over mini batches (optimizer steps) and micro batches (accumulation)."""
        cfg, a = self.cfg, self.cfg.algo
        ids, mask, behaviour_lp = batch.completion_ids, batch.attention_mask, batch.behaviour_logprobs
        prompts = batch.prompt_ids
        B, micro = len(prompts), cfg.train.micro_batch_size
        temp, pad = cfg.rollout.temperature, self.tokenizer.pad_token_id
        loss_mask = batch.loss_mask
        prompt_lens, completion_lens = torch.tensor([len(p) for p in prompts]), mask.sum(-1).cpu()
        seq_lens = prompt_lens + completion_lens  # prompt + completion tokens
        # shared-prefix forward in the update (not through a DDP/FSDP wrapper: two forwards per backward)
        share = self.share_prefix and self.dist is None
        prompt_index = distinct_prompts(prompts)[1] if share else None
        if a.overlong_filter:  # DAPO: truncated completions do not enter the loss
            loss_mask = overlong_filter_mask(loss_mask, batch.truncated.to(loss_mask.device))

        # log-probs of the batch, no gradient, in eval mode; the plain forward (the shared prompt pass is used for
        # the update's forward with gradient only; see docs/algorithms.md)
        def no_grad_passes(model, fn) -> list:
            """``fn(s)`` for each micro batch's slice ``s`` of the rows, without gradient, ``model`` in eval mode."""
            was_training = model.training
            model.eval()
            with torch.no_grad():
                parts = [fn(slice(i, i + micro)) for i in range(0, B, micro)]
            model.train(was_training)
            return parts

        def rows_cat(parts: list[torch.Tensor]) -> torch.Tensor:
            """The micro batches' ``[b, t]`` parts as one ``[B, T]`` tensor, each right-padded with 0 to T."""
            return torch.cat([torch.nn.functional.pad(p, (0, ids.shape[1] - p.shape[1])) for p in parts])

        def forward_all(model) -> torch.Tensor:
            return rows_cat(no_grad_passes(model, lambda s: completion_logprobs(
                model, prompts[s], ids[s], mask[s], pad, temp, share_prefix=False)[0]))

        def logprobs_and_values() -> tuple[torch.Tensor, torch.Tensor]:
            """The policy's log-probs and its shared value head's values V_old(s_t), from one no-grad pass."""
            parts = no_grad_passes(self.model, lambda s: completion_logprobs_and_values(
                self.model, self.value_head, prompts[s], ids[s], mask[s], pad, temp, share_prefix=False))
            return rows_cat([p[0] for p in parts]), rows_cat([p[2] for p in parts])

        ref_lp = forward_all(self.ref_model) if self.ref_model is not None else None
        # Old (proximal) log-probs: the sampler's own, unless truncated importance sampling is on, which
        # needs the trainer's forward of the rollout policy to compare with the behaviour log-probs, or the
        # sampler is not the trainer (a server: other kernels, maybe older weights), whose log-probs the
        # trainer recomputes (rollout.recompute_old_logprobs) and compares: mismatch/*.
        old_lp = behaviour_lp
        tis_w, tis_stats, mismatch = None, {}, {}
        head_values = None  # the shared value head's V_old(s_t), from the same pass as the old log-probs when both
        if a.tis_mode != "off" or self.recompute_old:
            if self.value_head is not None:
                old_lp, head_values = logprobs_and_values()
            else:
                old_lp = forward_all(self.model)
            mismatch = logprob_mismatch(old_lp, behaviour_lp, loss_mask)
        if a.tis_mode != "off":
            tis_w, tis_stats = tis_weights(old_lp, behaviour_lp, loss_mask, a.tis_mode, a.tis_cap)
        kl_coef = self.kl_ctl.value if self.ref_model is not None else 0.0
        token_rewards = None
        if ref_lp is not None and a.kl_in_reward:
            token_rewards = kl_penalty_rewards(old_lp, ref_lp, loss_mask, kl_coef, self.kl_fn)
        rewards = batch.rewards.float()
        if batch.token_rewards is not None:
            token_rewards = batch.token_rewards if token_rewards is None else token_rewards + batch.token_rewards
        base = batch.baseline_rewards
        values = critic_out = None
        if self.value_head is not None:  # the rollout-time values V_old(s_t) of the shared value head
            values = head_values if head_values is not None else logprobs_and_values()[1]
        if self.critic is not None:
            with torch.no_grad():
                self.critic.eval()
                values = torch.cat([torch.nn.functional.pad(
                    self.critic(prompts[i:i + micro], ids[i:i + micro], mask[i:i + micro], pad),
                    (0, ids.shape[1] - ids[i:i + micro].shape[1])) for i in range(0, B, micro)])
        advantage_fn = self.advantage_fn if self.dist is None else partial(
            self.dist.global_advantages, self.advantage_fn, self.layout)  # batch statistics over every rank
        turn_inputs = {name: getattr(batch, name) for name in ("turn_ids", "anchor_ids") if name in self.requires}
        adv = advantage_fn(
            rewards, loss_mask, cfg.rollout.n, a, token_rewards=token_rewards, state=self.algo_state,
            baseline_rewards=torch.tensor(base, dtype=torch.float32) if base is not None else None,
            values=values, **turn_inputs,
        ).to(self.device)
        lm = loss_mask.to(adv.device)  # the sampler's feedback: each completion's mean token advantage
        self._row_advantages = ((adv * lm).sum(-1) / lm.sum(-1).clamp(min=1)).tolist()
        # LUFFY: rows of teacher traces (policy_version -1) get the shaped probability instead of the clipped ratio
        off_rows = batch.policy_version < 0 if getattr(self.guidance, "off_policy_shaping", False) else None
        returns = None
        if values is not None:
            per_token = last_token_rewards(rewards.to(loss_mask.device), loss_mask)
            if token_rewards is not None:
                per_token = per_token + token_rewards
            returns = gae_advantages_and_returns(per_token, values, loss_mask, a.gamma, a.lam)[1]
        # shared backbone: during the critic warm-up the joint loss is the value loss alone
        policy_weight = 0.0 if self.value_head is not None and step < cfg.critic.warmup_steps else 1.0
        if self.critic is not None:
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
        needs_entropy = "entropy" in getattr(self.policy_loss_fn, "requires", ())
        sums = {"loss": 0.0, "clip_frac": 0.0, "kl": 0.0, "kl_ref": 0.0}
        if self.value_head is not None:
            sums.update(value_loss=0.0, value_clip_tokens=0.0)
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
            if self.sort_micro_batches and share:  # copies of a prompt together, or by length: the fewer tokens
                by_group = grouped_length_order(prompt_index[mb], seq_lens[mb])
                by_length = length_sorted_order(seq_lens[mb])
                sizes = [micro_batch_tokens(mb[o], prompt_index, prompt_lens, completion_lens, micro)
                         for o in (by_group, by_length)]
                mb = mb[by_group if sizes[0] <= sizes[1] else by_length]
            elif self.sort_micro_batches:  # similar lengths share a micro batch: less padding, same gradient sum
                mb = mb[length_sorted_order(seq_lens[mb])]
            chunks = [mb[s:s + micro] for s in range(0, len(mb), micro)]
            if self.dist is not None:  # as many passes on every rank (None: a zero-weight pass on row 0)
                chunks = self.dist.pad_chunks(chunks)
            for k, idx in enumerate(chunks):
                padding = idx is None
                if padding:
                    idx = torch.zeros(1, dtype=torch.long)
                width = max(1, int(mask[idx].sum(-1).max()))
                m_ids, m_mask = ids[idx, :width], loss_mask[idx, :width]
                if padding:
                    m_mask = torch.zeros_like(m_mask)
                if self.dist is not None:  # gradients synchronised in the last pass of the update
                    self.dist.set_grad_sync(self.train_model, last=k == len(chunks) - 1)
                with_entropy = a.entropy_coef > 0 or needs_entropy
                if self.value_head is None:
                    lp, ent = completion_logprobs(self.train_model, [prompts[i] for i in idx], m_ids,
                                                  mask[idx, :width], pad, temp, with_entropy=with_entropy,
                                                  entropy_grad=True, share_prefix=share)
                else:  # one forward: log-probs from the LM head, values from the value head
                    lp, ent, v = completion_logprobs_and_values(
                        self.train_model, self.value_head, [prompts[i] for i in idx], m_ids, mask[idx, :width], pad,
                        temp, share_prefix=share, with_entropy=with_entropy, entropy_grad=True)
                extra = {"entropy": ent.detach()} if needs_entropy else {}  # e.g. top_entropy's token selection
                loss_tok, stats = self.policy_loss_fn(lp, old_lp[idx, :width], adv[idx, :width], m_mask, a, **extra)
                if off_rows is not None:
                    loss_tok = self.guidance.shape(loss_tok, lp, adv[idx, :width], off_rows[idx])
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
                if self.value_head is not None:  # PPO's joint loss, eq. 9: L_policy + c1 * L_value
                    v_tok, v_clipped = clipped_value_loss(v, values[idx, :width], returns[idx, :width],
                                                          cfg.critic.value_clip)
                    v_loss = LOSS_AGGREGATIONS["token_mean"](v_tok, m_mask, **norms)
                    loss = shared_backbone_loss(policy_weight * loss, v_loss, cfg.critic.value_coef)
                    sums["value_loss"] += float(v_loss.detach())
                    sums["value_clip_tokens"] += float((v_clipped * m_mask).sum())
                if not torch.isfinite(loss):
                    finite = False
                    if self.dist is None:
                        break  # (distributed: the other ranks' passes still need this one's)
                if self.dist is None:
                    loss.backward()
                else:
                    self.dist.backward(loss)
                rows_computed += 0 if padding else len(idx)
                with torch.no_grad():
                    sums["loss"] += float(loss)
                    sums["clip_frac"] += float((stats["clipped"] * m_mask).sum())
                    sums["kl"] += float((KL_ESTIMATORS["k3"](lp.detach(), old_lp[idx, :width]) * m_mask).sum())
                tokens_seen += float(m_mask.sum())
            if self.dist is not None:  # every rank steps, or none does
                finite = self.dist.all_true(finite)
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
        if self.dist is not None:  # each rank holds its part of every sum; the global batch has B rows
            keys = sorted(sums)
            *totals, tokens_seen, rows_computed = self.dist.sums([sums[k] for k in keys] + [tokens_seen, rows_computed])
            sums, B = dict(zip(keys, totals)), self.layout.global_size
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
        if self.dist is not None and tis_stats:  # over every rank's tokens: token-weighted means, the max
            n = float((loss_mask > 0).sum())
            keys = [k for k in tis_stats if k != "ratio_max"]
            *totals, n_all = self.dist.sums([float(tis_stats[k]) * n for k in keys] + [n])
            tis_stats = {**{k: t / max(n_all, 1.0) for k, t in zip(keys, totals)},
                         "ratio_max": self.dist.max(float(tis_stats["ratio_max"]))}
        for k, v in tis_stats.items():
            out[f"tis/{k}"] = float(v)
        for k, v in mismatch.items():
            out[f"mismatch/{k}"] = v
        if critic_out is not None:
            out.update(critic_out, policy_frozen=0)
        if self.value_head is not None:
            valid = loss_mask.bool()
            out.update(value_loss=sums["value_loss"] / max(updates, 1),
                       value_clip_frac=sums["value_clip_tokens"] / denom,
                       values_mean=float(values[valid].mean()) if valid.any() else 0.0,
                       returns_mean=float(returns[valid].mean()) if valid.any() else 0.0,
                       policy_frozen=int(policy_weight == 0.0))
        return out

    def _mini_batches(self, loss_mask: torch.Tensor, step: int, salt: int):
        """Yield ``(rows, normalisers)`` per mini batch over ``train.epochs`` passes (epoch 0 in order, later
        epochs reshuffled with a seed of (run seed, step, salt)); the normalisers are the mini batch's, so
        aggregation does not depend on the micro-batch split."""
        cfg, B = self.cfg, loss_mask.shape[0]
        if self.dist is not None:  # the single process's mini batches of the global batch; this rank's rows
            B = self.layout.global_size
        mini = cfg.resolved_mini_batch_size
        order_rng = torch.Generator().manual_seed(step_seed(cfg.run.seed, step) + salt)
        for epoch in range(cfg.train.epochs):
            order = torch.arange(B) if epoch == 0 else torch.randperm(B, generator=order_rng)
            for start in range(0, B, mini):
                mb = order[start:start + mini]
                if self.dist is None:
                    yield mb, {"num_tokens": float(loss_mask[mb].sum()), "num_seqs": len(mb),
                               "max_len": self.max_len}
                    continue
                rows = self.layout.local(mb)
                tokens, seqs = float(loss_mask[rows].sum()), len(mb)
                if self.dist.reduce_normalisers:  # token-mean's count over every rank's rows of the mini batch
                    tokens = self.dist.sum(tokens)
                else:  # per-rank normalisers (wrong unless every rank holds as many tokens; see the tests)
                    seqs = len(rows)
                yield rows, {"num_tokens": tokens, "num_seqs": seqs, "max_len": self.max_len}

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
            chunks = [mb[s:s + micro] for s in range(0, len(mb), micro)]
            if self.dist is not None:  # as many passes on every rank, as in update()
                chunks = self.dist.pad_chunks(chunks)
            for k, idx in enumerate(chunks):
                padding = idx is None
                if padding:
                    idx = torch.zeros(1, dtype=torch.long)
                width = max(1, int(mask[idx].sum(-1).max()))
                m_mask = loss_mask[idx, :width]
                if padding:
                    m_mask = torch.zeros_like(m_mask)
                if self.dist is not None:
                    self.dist.set_grad_sync(self.critic_train, last=k == len(chunks) - 1)
                v = self.critic_train([prompts[i] for i in idx], ids[idx, :width], mask[idx, :width], pad)
                loss_tok, was_clipped = clipped_value_loss(v, old_values[idx, :width], returns[idx, :width],
                                                           cfg.critic.value_clip)
                loss = LOSS_AGGREGATIONS["token_mean"](loss_tok, m_mask, **norms)
                if self.dist is None:
                    loss.backward()
                else:
                    self.dist.backward(loss)
                total += float(loss.detach())
                clipped += float((was_clipped * m_mask).sum())
                tokens += float(m_mask.sum())
            clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
            if math.isfinite(float(torch.nn.utils.clip_grad_norm_(params, clip))):
                self.critic_optimizer.step()
                updates += 1
        self.critic_optimizer.zero_grad(set_to_none=True)
        valid = loss_mask.bool()
        if self.dist is not None:  # each rank holds its part of the global sums
            total, clipped, tokens, n, v, r = self.dist.sums([total, clipped, tokens, float(valid.sum()),
                                                              float(old_values[valid].sum()), float(returns[valid].sum())])
            return {"value_loss": total / max(updates, 1), "value_clip_frac": clipped / max(tokens, 1.0),
                    "values_mean": v / n if n else 0.0, "returns_mean": r / n if n else 0.0}
        return {"value_loss": total / max(updates, 1), "value_clip_frac": clipped / max(tokens, 1.0),
                "values_mean": float(old_values[valid].mean()) if valid.any() else 0.0,
                "returns_mean": float(returns[valid].mean()) if valid.any() else 0.0}

    # ----- served generation: policy versions, weight sync, the asynchronous pipeline --------------------------
    def _version(self, step: int) -> int:
        """The policy version of the sampler's weights when it samples for ``step`` (the number of steps whose
        updates they hold): ``step`` for the trainer's own model, the last synced version for a server."""
        return step if self.sampler_version is None else self.sampler_version

    def _sync_due(self, version: int, force: bool = False) -> None:
        """Push the weights (policy ``version``) to a served sampler every ``rollout.sync_every`` versions, or
        now with ``force``."""
        if not self.served or self.sampler_version is None or version <= self.sampler_version:
            return
        if force or version - self.sampler_version >= self.cfg.rollout.sync_every:
            self.backend.sync_weights(self.model)
            self.sampler_version = version

    def _timed_rollout(self, step: int) -> tuple[RolloutBatch, float]:
        t = time.time()
        return self.rollout(step), time.time() - t

    def _launch(self, step: int) -> None:
        """Start ``step``'s rollout in the background thread (it draws prompts and scores like the synchronous
        one, on its own ledger); the sampler's state from before the draw is what a checkpoint saves."""
        from concurrent.futures import ThreadPoolExecutor

        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="postrl-rollout")
        self._sampler_state_at_launch = copy.deepcopy(self.sampler.state_dict())
        self.ledger = RolloutLedger()
        self._pending = (self._executor.submit(self._timed_rollout, step), step)

    def _next_batch(self, step: int) -> tuple[RolloutBatch, float, dict[str, float]]:
        """``step``'s rollout batch and the time spent waiting for it: the one generated in the background when
        it is fresh enough (``step - version <= rollout.max_staleness``; older samples are dropped and counted),
        else generated now (after a weight sync when the server's weights are themselves too old)."""
        k, info, t = self.cfg.rollout.max_staleness, {}, time.time()
        batch = None
        if self._pending is not None:
            future, for_step = self._pending
            self._pending = None
            batch = future.result()[0]
            own = batch.policy_version >= 0  # (-1: teacher traces, not the policy's)
            too_old = own & (step - batch.policy_version > k)
            if for_step != step or bool(too_old.any()):
                self.stale_dropped += int(own.sum()) if for_step != step else int(too_old.sum())
                batch = None
        if batch is None:
            if self.async_pipeline and self.served and step - self._version(step) > k:
                self._sync_due(step, force=True)
            batch = self.rollout(step)
        t_gen = time.time() - t
        if self.served:
            own = batch.policy_version[batch.policy_version >= 0]
            stale = (step - own).float() if len(own) else torch.zeros(1)
            info.update({"policy_version_min": float(own.min()) if len(own) else float(step),
                         "staleness_mean": float(stale.mean()), "staleness_max": float(stale.max()),
                         "stale_dropped": float(self.stale_dropped)})
            info.update(getattr(self.backend, "metrics", dict)())
        return batch, t_gen, info

    # ----- the step ------------------------------------------------------------------------------------------
    def step(self, run) -> StepOutput:
        """Rollout, rewards, advantages and the update of step ``run.state.step``."""
        step = run.state.step
        if self.ref_model is not None and reference_reset_due(step, self.cfg.algo.ref_reset_every):
            # ProRL (arXiv:2505.24864): the reference becomes the current policy, the optimizer starts afresh
            self.ref_model.load_state_dict(self.model.state_dict())
            self.optimizer.state.clear()
        t0 = time.time()
        if self.served and self.sampler_version is None:  # the server samples from the weights the run starts from
            if not getattr(self.backend, "started_on_trainer_weights", False):
                self.backend.sync_weights(self.model)
            self.sampler_version = step
        batch, t_gen, served_info = self._next_batch(step)
        ledger = self.ledger
        if self.async_pipeline and step + 1 < self.total_steps:  # step + 1's rollout runs while this step trains
            self._launch(step + 1)
        upd = self.update(batch, step)
        if self._pending is not None:  # the server keeps its weights until the batch it is sampling is done
            self._pending[0].exception()
        self._trained_version = step + 1
        self._sync_due(step + 1)
        if self.dist is not None:  # metrics and samples of the whole batch, as one process would log them
            parts = self.dist.gather_objects(batch)
            batch = RolloutBatch.concat(parts, self.tokenizer.pad_token_id)
            batch.sampling_tries = parts[0].sampling_tries
        else:  # the sampler's feedback: rewards and advantages of every completion (docs/curricula.md)
            self.sampler.update(batch.samples, episode_returns(batch).tolist(), self._row_advantages)
        metrics = self._metrics(batch, upd, t_gen, time.time() - t0, ledger=ledger)
        metrics.update(served_info)
        if should_log_samples(step + 1, self.total_steps):  # best/worst completions, for reports
            run.log_samples(sample_log_record(step + 1, batch, self.cfg.rollout.n, tokenizer=self.tokenizer))
        return StepOutput(metrics, ok=not (upd["updates"] == 0 and upd["skipped_updates"] > 0),
                          updated=upd["updates"] > 0 and upd["grad_norm"] > 0)

    def _metrics(self, batch: RolloutBatch, upd: dict[str, float], t_gen: float, t_step: float,
                 ledger: RolloutLedger | None = None) -> dict[str, Any]:
        lengths = batch.lengths.float()
        gen_tokens = float(lengths.sum())
        rewards = episode_returns(batch).tolist()
        record: dict[str, Any] = {
            "reward_mean": float(np.mean(rewards)),
            "reward_std": float(np.std(rewards)),
            "accuracy": float(np.mean(batch.correct)),
            "kl": upd["kl"],
            **({"entropy": float((batch.entropy * batch.attention_mask).sum() / max(gen_tokens, 1.0))}
               if batch.entropy is not None else {}),
            "response_len_mean": float(lengths.mean()),
            "response_len_max": float(lengths.max()),
            "truncated_frac": float(batch.truncated.float().mean()),
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
            "reward_errors": sum(batch.reward_errors.values()),
            "sampling_tries": batch.sampling_tries,
            "groups_dropped": batch.groups_dropped,
        }
        record.update({k: v for k, v in upd.items()
                       if k in ("kl_ref", "kl_coef", "value_loss", "value_clip_frac", "values_mean", "returns_mean",
                                "policy_frozen") or k.startswith(("tis/", "mismatch/"))})
        for name, values in batch.components.items():
            record[f"reward/{name}"] = float(np.mean(values))
        if getattr(batch, "episodes", None):  # multi-turn: success, return, turns, tool calls, how episodes ended
            from postrl.rollout.episodes import episode_metrics

            record.update(episode_metrics(batch))
        for (name, kind), count in batch.reward_errors.items():
            record[f"reward_errors/{name}/{kind}"] = count
        for name, fails in batch.failed.items():
            record[f"reward_error_frac/{name}"] = float(np.mean(fails)) if fails else 0.0
        for (name, status), count in batch.reward_statuses.items():
            record[f"reward_status/{name}/{status}"] = count
        # zero-variance accounting, per-task numbers of a mixture, the sampler's and guidance's (docs/curricula.md)
        group_ids = batch.group_ids.tolist()
        ledger = (ledger or self.ledger).metrics(rewards, group_ids, (batch.policy_version >= 0).tolist())
        record.update(ledger if self.dist is None else {"zero_var/group_frac": ledger["zero_var/group_frac"]})
        record.update(per_task_metrics(batch.samples, rewards, batch.correct, group_ids,
                                       getattr(self.source, "task_names", ())))
        record.update(self.sampler.metrics())
        record.update(self.guidance.metrics())
        return record


def train(cfg: Config, resume: str | Path | None = None,
          run_dir: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Run (or resume) RL training; returns the run directory and ``results`` (see :func:`postrl.run.run_job`)."""
    return run_job(RLTrainer, cfg, resume=resume, run_dir=run_dir)
