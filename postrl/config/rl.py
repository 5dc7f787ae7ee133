"""Sections of RL training (``postrl train``): sampling, rewards, the objective, the critic, optimisation.

``train``'s optimizer keys (lr, schedule, betas, grad_clip, checkpoints) are shared by every trainer;
its batch keys are RL's (see the batch-size notes in :mod:`postrl.config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from .checks import Problems, divisors, ConfigTree


LR_SCHEDULES = ("constant", "linear", "cosine")
ADV_STD_SCOPES = ("group", "batch", "none")
TIS_MODES = ("off", "clamp", "mask")
SCORING_MODES = ("sum_then_normalize", "normalize_each_then_sum")
STRATEGIES = ("none", "ddp", "fsdp")
MIXED_PRECISION = ("none", "bf16")
REWARD_EXECUTORS = ("local", "ray")


@dataclass
class RolloutConfig:
    """Sampling of completions during training."""

    n: int = 8
    """Completions per prompt (= group size for group-relative advantages)."""
    max_new_tokens: int = 64
    """Maximum generated tokens per completion."""
    temperature: float = 1.0
    """Sampling temperature (> 0)."""
    top_p: float = 1.0
    """Nucleus sampling threshold in (0, 1]; 1 = off."""
    top_k: int = 0
    """Top-k sampling; 0 = off."""
    batch_size: int = 0
    """Sequences decoded together (generation batch); 0 = the whole rollout batch."""
    backend: str = "torch"
    """Generation backend: torch (in-process) or a served engine; the names are checked by the backend
    factory in postrl/rollout when the trainer builds it."""

    def validate(self, p: Problems, cfg: ConfigTree) -> None:
        # the one place that requires groups: every built-in group-relative estimator (grpo, dr_grpo, rloo,
        # reinforce_pp_baseline, bnpo) and scoring.normalize=normalize_each_then_sum rely on it
        p.check(self.n >= 2, "rollout.n", self.n,
                "group-relative advantages need at least 2 completions per prompt, so use >= 2")
        p.at_least("rollout.max_new_tokens", self.max_new_tokens, 1)
        p.check(self.temperature > 0, "rollout.temperature", self.temperature, "must be > 0")
        p.check(0 < self.top_p <= 1, "rollout.top_p", self.top_p, "must be in (0, 1]")
        p.at_least("rollout.top_k", self.top_k, 0, " (0 = off)")
        p.at_least("rollout.batch_size", self.batch_size, 0, " (0 = whole rollout batch)")
        p.check(bool(self.backend), "rollout.backend", self.backend, "must not be empty (default: torch)")


@dataclass
class RewardSpec:
    """One reward function; the total reward is the weighted sum over ``Config.rewards``."""

    name: str = "task"
    """Registered reward name, or ``"module:function"`` to import one."""
    weight: float = 1.0
    """Multiplier applied to this reward."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the reward function. Keys written next to ``name`` in YAML
    (``{name: code, weight: 1, mode: all}``) that are not fields here are put into ``kwargs``."""
    timeout_s: float = 0.0
    """Per-call time limit for a parallel (process-pool) reward; 0 = ``scoring.timeout_s``."""
    failure_score: Optional[float] = None
    """Score given to a completion whose reward raised, timed out or returned a non-finite
    value; None = ``scoring.failure_score``."""

    _extra_keys_into: ClassVar[str] = "kwargs"

    def validate(self, p: Problems, key: str) -> None:
        """Check this entry of the ``rewards`` list, ``key`` = ``rewards.N``. The name is resolved by
        postrl.rewards (which sits above the config) when a trainer starts."""
        p.check(bool(self.name), f"{key}.name", self.name, "must not be empty")
        p.check(abs(self.weight) < float("inf"), f"{key}.weight", self.weight, "must be finite")
        p.check(self.timeout_s >= 0, f"{key}.timeout_s", self.timeout_s, "must be >= 0 (0 = scoring.timeout_s)")
        p.check(self.failure_score is None or abs(self.failure_score) < float("inf"),
                f"{key}.failure_score", self.failure_score, "must be finite or null")


def validate_rewards(p: Problems, rewards: list[RewardSpec]) -> None:
    """At least one reward, and every entry."""
    p.check(len(rewards) >= 1, "rewards", rewards, "at least one reward is needed")
    for i, spec in enumerate(rewards):
        spec.validate(p, f"rewards.{i}")


@dataclass
class ScoringConfig:
    """How the configured rewards are run and combined (see docs/rewards.md)."""

    normalize: str = "sum_then_normalize"
    """Multi-reward combination: ``sum_then_normalize`` (weighted sum of raw rewards; the advantage
    estimator normalizes the total) or ``normalize_each_then_sum`` (each reward is standardized
    within its prompt group first, then the weighted sum is taken, as in GDPO)."""
    failure_score: float = 0.0
    """Score for a completion whose reward raised, timed out or returned a non-finite value."""
    timeout_s: float = 10.0
    """Default per-call time limit for parallel (process-pool) rewards."""
    workers: int = 2
    """Processes in the pool that runs parallel rewards; 0 = run them in the trainer's process
    (no timeout is then possible)."""
    eps: float = 1e-6
    """Added to the group std by ``normalize_each_then_sum``."""

    def validate(self, p: Problems, cfg: ConfigTree) -> None:
        p.check(self.normalize in SCORING_MODES, "scoring.normalize", self.normalize,
                "must be 'sum_then_normalize' or 'normalize_each_then_sum'")
        p.check(abs(self.failure_score) < float("inf"), "scoring.failure_score", self.failure_score, "must be finite")
        p.check(self.timeout_s > 0, "scoring.timeout_s", self.timeout_s, "must be > 0 seconds")
        p.check(self.workers >= 0, "scoring.workers", self.workers, "must be >= 0 (0 = run in the trainer's process)")
        p.check(self.eps > 0, "scoring.eps", self.eps, "must be > 0")


@dataclass
class AlgoConfig:
    """The RL objective. Method names are checked against the registries of :mod:`postrl.algorithms`."""

    advantage: str = "grpo"
    """Registered advantage estimator."""
    policy_loss: str = "ppo_clip"
    """Registered policy loss."""
    loss_agg: str = "token_mean"
    """Registered loss aggregation over tokens and sequences."""
    clip_eps_low: float = 0.2
    """Lower PPO ratio clip: ratio >= 1 - clip_eps_low."""
    clip_eps_high: float = 0.2
    """Upper PPO ratio clip: ratio <= 1 + clip_eps_high."""
    adv_eps: float = 1e-6
    """Added to the group std when normalising advantages."""
    kl_coef: float = 0.0
    """Weight of the KL penalty to the reference model; 0 = no reference model."""
    kl_estimator: str = "k3"
    """Registered KL estimator: k1 | k2 | k3."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus; 0 = off."""
    adv_std_scope: str = "group"
    """grpo: divide by the std of the group | batch | none."""
    gamma: float = 1.0
    """Discount for token-level returns (reinforce_pp, gae)."""
    lam: float = 1.0
    """GAE lambda."""
    adv_whiten: bool = False
    """gae: whiten advantages over the valid tokens of the batch."""
    dual_clip_c: float = 0.0
    """Dual-clip constant c (> 1) bounding the loss of negative-advantage tokens; 0 = off."""
    tis_mode: str = "off"
    """Truncated importance sampling against the behaviour (rollout engine) log-probs: off | clamp | mask."""
    tis_cap: float = 2.0
    """Cap C of the truncated importance weight."""
    kl_in_reward: bool = False
    """Put the KL penalty into the per-token reward (REINFORCE++/PPO style) instead of the loss."""
    kl_target: float = 0.0
    """Adaptive KL coefficient (Ziegler et al. 2019) towards this KL; 0 = fixed kl_coef."""
    kl_horizon: int = 10000
    """Horizon of the adaptive KL controller."""
    overlong_buffer: int = 0
    """DAPO overlong shaping: linear penalty in the last N tokens before max_new_tokens; 0 = off."""
    overlong_penalty: float = 1.0
    """DAPO overlong shaping: penalty at the maximum length."""
    overlong_filter: bool = False
    """DAPO overlong filtering: truncated completions are masked out of the loss."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: drop groups whose rewards are all equal and sample more prompts until
    train.prompts_per_step groups remain (or max_sampling_tries batches were drawn)."""
    max_sampling_tries: int = 4
    """Cap on rollout batches drawn per step with dynamic_sampling."""

    def validate(self, p: Problems, cfg: ConfigTree) -> None:
        # Imported here, not at the top: postrl.algorithms imports torch, and its modules may name
        # AlgoConfig in annotations; the registries are complete once the package is imported.
        from postrl.algorithms import ADVANTAGES, KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES

        for registry, name in ((ADVANTAGES, self.advantage), (POLICY_LOSSES, self.policy_loss),
                               (LOSS_AGGREGATIONS, self.loss_agg), (KL_ESTIMATORS, self.kl_estimator)):
            p.registered(registry, name)
        p.at_least("algo.clip_eps_low", self.clip_eps_low, 0)
        p.at_least("algo.clip_eps_high", self.clip_eps_high, 0)
        p.at_least("algo.adv_eps", self.adv_eps, 0)
        p.at_least("algo.kl_coef", self.kl_coef, 0)
        p.check(abs(self.entropy_coef) < float("inf"), "algo.entropy_coef", self.entropy_coef, "must be finite")
        p.choice("algo.adv_std_scope", self.adv_std_scope, ADV_STD_SCOPES)
        p.choice("algo.tis_mode", self.tis_mode, TIS_MODES)
        p.check(0 <= self.gamma <= 1, "algo.gamma", self.gamma, "must be in [0, 1]")
        p.check(0 <= self.lam <= 1, "algo.lam", self.lam, "must be in [0, 1]")
        p.check(self.dual_clip_c == 0 or self.dual_clip_c > 1, "algo.dual_clip_c", self.dual_clip_c,
                "must be 0 (off) or > 1")
        p.check(self.tis_cap > 0, "algo.tis_cap", self.tis_cap, "must be > 0")
        p.at_least("algo.kl_target", self.kl_target, 0, " (0 = fixed coefficient)")
        p.at_least("algo.kl_horizon", self.kl_horizon, 1)
        max_new = cfg.rollout.max_new_tokens
        p.at_least("algo.overlong_buffer", self.overlong_buffer, 0, " (0 = off)")
        p.check(self.overlong_buffer < max_new or self.overlong_buffer == 0, "algo.overlong_buffer",
                self.overlong_buffer, f"must be smaller than rollout.max_new_tokens ({max_new})")
        p.at_least("algo.overlong_penalty", self.overlong_penalty, 0)
        p.at_least("algo.max_sampling_tries", self.max_sampling_tries, 1)
        self._check_combinations(p, cfg)

    def _check_combinations(self, p: Problems, cfg: ConfigTree) -> None:
        """Pieces that are each valid but do not fit together. The rules name built-in methods only; a
        method registered by a user should raise ValueError on inputs it cannot use."""
        refused = [
            (self.kl_in_reward and self.kl_coef == 0,
             "algo.kl_in_reward=true needs algo.kl_coef > 0 (the KL penalty it puts into the reward)."),
            (self.kl_target > 0 and self.kl_coef == 0,
             "algo.kl_target (adaptive KL) needs algo.kl_coef > 0 as the starting coefficient."),
            (self.policy_loss == "gspo" and self.loss_agg != "seq_mean_token_mean",
             f"algo.policy_loss=gspo is a sequence-level objective (GSPO eq. 5 averages over sequences); use "
             f"algo.loss_agg=seq_mean_token_mean, not {self.loss_agg}."),
            (self.dual_clip_c > 0 and self.policy_loss != "ppo_clip",
             f"algo.dual_clip_c applies to algo.policy_loss=ppo_clip only, not {self.policy_loss}."),
            (self.advantage == "bnpo" and (self.kl_in_reward or self.overlong_buffer > 0),
             "algo.advantage=bnpo models binary success rates with a Beta distribution: it cannot take per-token "
             "KL rewards (algo.kl_in_reward) or overlong shaping (algo.overlong_buffer)."),
            (self.advantage == "remax" and self.dynamic_sampling,
             "algo.dynamic_sampling drops groups with all-equal rewards, but algo.advantage=remax compares with "
             "the greedy completion, so its advantages are not zero for such groups; turn one of them off."),
            (self.advantage == "remax" and cfg.scoring.normalize == "normalize_each_then_sum",
             "scoring.normalize=normalize_each_then_sum standardizes each reward within a prompt's group, but the "
             "algo.advantage=remax baseline is a single greedy completion per prompt; use "
             "scoring.normalize=sum_then_normalize."),
        ]
        for bad, message in refused:
            if bad:
                p.add(message)


@dataclass
class CriticConfig:
    """The value model of PPO; used only when algo.advantage is gae."""

    name_or_path: str | None = None
    """Model to initialise the critic's backbone from; None = the policy's model."""
    lr: float = 1e-5
    """Critic learning rate (AdamW; same betas, weight decay and grad_clip as the policy)."""
    value_clip: float = 0.2
    """Value clipping range eps_v around the rollout-time values; 0 = off."""
    warmup_steps: int = 0
    """Steps at the start during which only the critic is trained (the policy is not updated)."""

    def validate(self, p: Problems, cfg: ConfigTree) -> None:
        p.check(self.lr > 0, "critic.lr", self.lr, "must be > 0")
        p.at_least("critic.value_clip", self.value_clip, 0, " (0 = off)")
        p.at_least("critic.warmup_steps", self.warmup_steps, 0)


@dataclass
class TrainConfig:
    """Optimisation. See :mod:`postrl.config` for how the batch sizes relate."""

    steps: int = 20
    """Number of training steps (one rollout batch each)."""
    prompts_per_step: int = 8
    """Prompts sampled per step; rollout batch = prompts_per_step * rollout.n."""
    mini_batch_size: int = 0
    """Completions per optimizer update; 0 = the whole rollout batch."""
    micro_batch_size: int = 8
    """Completions per forward/backward; gradients accumulate over micro batches."""
    epochs: int = 1
    """Passes over each rollout batch."""
    lr: float = 1e-6
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW (beta1, beta2)."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 = off."""
    warmup_steps: int = 0
    """Linear warmup length in training steps (the schedule advances once per step)."""
    lr_schedule: str = "constant"
    """constant | linear | cosine (decay after warmup)."""
    max_nonfinite_steps: int = 3
    """Abort after this many consecutive steps with a non-finite loss or gradient."""
    save_every: int = 0
    """Save a checkpoint every N steps; 0 = only at the end."""
    keep_checkpoints: int = 2
    """Keep only the newest N checkpoints; 0 = keep all."""
    strategy: str = "none"
    """Data parallelism under ``torchrun`` (docs/scaling.md): none (one process) | ddp (a full replica per rank,
    gradients all-reduced) | fsdp (FSDP2: parameters, gradients and optimizer state sharded over the ranks)."""
    mixed_precision: str = "none"
    """fsdp only: none | bf16 (compute and all-gather in bfloat16; float32 master weights and gradient
    reduction, so load the model in float32)."""

    def validate(self, p: Problems, cfg: ConfigTree) -> None:
        p.at_least("train.steps", self.steps, 1)
        pps_ok = p.at_least("train.prompts_per_step", self.prompts_per_step, 1)
        mini_ok = p.at_least("train.mini_batch_size", self.mini_batch_size, 0, " (0 = whole rollout batch)")
        micro_ok = p.at_least("train.micro_batch_size", self.micro_batch_size, 1)
        p.at_least("train.epochs", self.epochs, 1)
        p.check(self.lr > 0, "train.lr", self.lr, "must be > 0")
        p.at_least("train.weight_decay", self.weight_decay, 0)
        if p.check(len(self.adam_betas) == 2, "train.adam_betas", self.adam_betas, "must have exactly 2 values"):
            for i, beta in enumerate(self.adam_betas):
                p.check(0 <= beta < 1, f"train.adam_betas.{i}", beta, "must be in [0, 1)")
        p.at_least("train.grad_clip", self.grad_clip, 0, " (0 = off)")
        p.at_least("train.warmup_steps", self.warmup_steps, 0)
        p.choice("train.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        p.at_least("train.max_nonfinite_steps", self.max_nonfinite_steps, 0)
        p.at_least("train.save_every", self.save_every, 0, " (0 = only at the end)")
        p.at_least("train.keep_checkpoints", self.keep_checkpoints, 0, " (0 = keep all)")
        p.choice("train.strategy", self.strategy, STRATEGIES)
        if p.choice("train.mixed_precision", self.mixed_precision, MIXED_PRECISION):
            p.check(self.mixed_precision == "none" or self.strategy == "fsdp", "train.mixed_precision",
                    self.mixed_precision, "needs train.strategy=fsdp (with ddp, load the model in bfloat16 "
                    "with model.dtype=bfloat16 instead)")
        if pps_ok and mini_ok and cfg.rollout.n >= 2:  # rollout.n is reported by its own section otherwise
            self._check_batch_sizes(p, cfg, micro_ok)

    def _check_batch_sizes(self, p: Problems, cfg: ConfigTree, micro_ok: bool) -> None:
        """micro_batch | mini_batch | rollout_batch = prompts_per_step * rollout.n."""
        rollout_batch = cfg.rollout_batch_size
        mini = cfg.resolved_mini_batch_size
        origin = f"train.prompts_per_step={self.prompts_per_step} x rollout.n={cfg.rollout.n}"
        if rollout_batch % mini:
            p.add(f"train.mini_batch_size={mini} must divide the rollout batch size {rollout_batch} "
                  f"({origin}). Valid values: 0 (= {rollout_batch}), {', '.join(map(str, divisors(rollout_batch)))}.")
        elif micro_ok and mini % self.micro_batch_size:
            source = (f"train.mini_batch_size={mini}" if self.mini_batch_size
                      else f"train.mini_batch_size=0, i.e. the rollout batch {origin}")
            p.add(f"train.micro_batch_size={self.micro_batch_size} must divide the mini batch size "
                  f"{mini} ({source}). Valid values: {', '.join(map(str, divisors(mini)))}.")
