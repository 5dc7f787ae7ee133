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
DECODE_PATHS = ("auto", "fused", "transformers")  # rollout.decode (the torch backend's decode forward)
WEIGHT_SYNC_MODES = ("auto", "reload", "restart", "lora", "none")
DPPO_DIVERGENCES = ("binary_tv", "binary_kl")
OPMD_BASELINES = ("mean", "logavgexp")
GFPO_METRICS = ("length", "reward_per_token")
PPO_CLIP_LOSSES = ("ppo_clip", "clip_cov", "top_entropy")  # losses built on ppo_clip (they honour dual_clip_c)
SEQUENCE_LEVEL_LOSSES = ("gspo", "gmpo")  # one loss per sequence, broadcast over its tokens

# Settings whose trainer side is not wired yet (issue 17): the pure maths is in postrl/algorithms, the
# RL trainer does not act on them, so a config that sets them is refused rather than silently ignored.
# Each entry: (setting, what the trainer must do). The trainer's owner removes an entry when wiring it.
PENDING_TRAINER_HOOKS: tuple[tuple[str, str], ...] = ()
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
    min_new_tokens: int = 0
    """End-of-sequence ids cannot be sampled before this many tokens (HF min_new_tokens, vLLM min_tokens);
    0 = off. Changes the sampling distribution only, like top_p / top_k; single-turn rollouts."""
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
    decode: str = "auto"
    """torch backend's forward: auto (postrl's fused Llama-family decode where the model is supported, PEFT
    LoRA adapters included, else transformers') | fused (an error when unsupported) | transformers."""
    continuous_batching: bool = False
    """torch backend: with rollout.batch_size smaller than the rollout batch, a finished row's place in the
    decode batch goes to the next waiting prompt. Draws per-row random streams: seeded samples differ from
    the default's (same distribution) and no longer depend on rollout.batch_size."""
    # ----- served generation (rollout.backend=openai_server; docs/generation-backends.md) -----
    urls: list[str] = field(default_factory=list)
    """Base URLs of OpenAI-compatible servers (``http://host:port``), used round-robin; empty with
    ``rollout.server.python`` set: the managed server."""
    served_model_name: str = ""
    """The model name requests carry; ``/v1/models`` must list it ("" = the server's only model; a managed
    server serves ``postrl-policy``)."""
    timeout_s: float = 300.0
    """Time limit of one request to the server, in seconds."""
    retries: int = 3
    """Further attempts after a failed request (unreachable, timeout, HTTP 5xx, malformed answer)."""
    retry_backoff_s: float = 0.5
    """Wait before retry k (k = 1, 2, ...): ``retry_backoff_s * 2**(k-1)`` seconds."""
    max_concurrency: int = 32
    """Requests in flight to the servers at once."""
    server: ServerConfig = field(default_factory=lambda: ServerConfig())
    """A server that postrl starts and stops itself (``rollout.server.python`` set)."""
    weight_sync: str = "auto"
    """How the server gets the trainer's weights: auto (lora with model.lora, else reload), reload (save +
    vLLM's reload_weights), restart (save + restart the managed server), lora (hot-load the adapter), none."""
    sync_every: int = 1
    """Push the weights to the server every this many updates (the samples carry their policy version)."""
    recompute_old_logprobs: Optional[bool] = None
    """Recompute the old log-probs with the trainer's forward instead of the sampler's (null = yes for
    server backends, no for torch); the mismatch is reported as mismatch/*."""
    async_generation: bool = False
    """Generate the next batch in a background thread while the update runs (bounded staleness)."""
    max_staleness: int = 1
    """With async_generation: a sample of policy version v is used at step s only while s - v <= max_staleness
    (older ones are dropped and counted); 0 = exactly the synchronous run."""

    def validate(self, p: Problems, cfg: ConfigTree) -> None:
        # the one place that requires groups: every built-in group-relative estimator (grpo, dr_grpo, rloo,
        # reinforce_pp_baseline, bnpo) and scoring.normalize=normalize_each_then_sum rely on it
        p.check(self.n >= 2, "rollout.n", self.n,
                "group-relative advantages need at least 2 completions per prompt, so use >= 2")
        p.at_least("rollout.max_new_tokens", self.max_new_tokens, 1)
        p.check(0 <= self.min_new_tokens <= self.max_new_tokens, "rollout.min_new_tokens", self.min_new_tokens,
                f"must be in [0, rollout.max_new_tokens={self.max_new_tokens}] (0 = off)")
        p.check(self.temperature > 0, "rollout.temperature", self.temperature, "must be > 0")
        p.check(0 < self.top_p <= 1, "rollout.top_p", self.top_p, "must be in (0, 1]")
        p.at_least("rollout.top_k", self.top_k, 0, " (0 = off)")
        p.at_least("rollout.batch_size", self.batch_size, 0, " (0 = whole rollout batch)")
        p.check(bool(self.backend), "rollout.backend", self.backend, "must not be empty (default: torch)")
        p.check(self.decode in DECODE_PATHS, "rollout.decode", self.decode,
                f"must be one of {', '.join(DECODE_PATHS)}")
        p.check(self.timeout_s > 0, "rollout.timeout_s", self.timeout_s, "must be > 0")
        p.at_least("rollout.retries", self.retries, 0)
        p.check(self.retry_backoff_s >= 0, "rollout.retry_backoff_s", self.retry_backoff_s, "must be >= 0")
        p.at_least("rollout.max_concurrency", self.max_concurrency, 1)
        p.at_least("rollout.sync_every", self.sync_every, 1)
        p.at_least("rollout.max_staleness", self.max_staleness, 0)
        p.check(self.weight_sync in WEIGHT_SYNC_MODES, "rollout.weight_sync", self.weight_sync,
                f"must be one of {', '.join(WEIGHT_SYNC_MODES)}")
        for i, url in enumerate(self.urls):
            p.check(url.startswith(("http://", "https://")), f"rollout.urls.{i}", url,
                    "must start with http:// or https://")
        self.server.validate(p)
        if self.backend == "torch":
            p.check(not self.urls and not self.server.python, "rollout.backend", self.backend,
                    "rollout.urls / rollout.server are for a served backend: set rollout.backend=openai_server")


@dataclass
class ServerConfig:
    """A generation server that postrl starts (on the trainer's current weights) and stops itself."""

    python: str = ""
    """The python of the server's virtual environment (e.g. the one scripts/setup_vllm_cpu.sh builds); "" = no
    managed server."""
    model_dir: str = ""
    """The model directory the server loads at start; "" = the trainer's current weights, written as an HF
    directory."""
    port: int = 0
    """Port on 127.0.0.1; 0 = a free one."""
    args: list[str] = field(default_factory=list)
    """Extra command-line arguments, e.g. [--dtype, float32, --max-model-len, "1024"]."""
    startup_timeout: float = 600.0
    """Seconds to wait for the server to answer /v1/models after starting."""
    module: str = "vllm.entrypoints.openai.api_server"
    """The module run as ``python -m MODULE --model DIR --port P --served-model-name NAME --host 127.0.0.1``."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables of the server (e.g. VLLM_CPU_KVCACHE_SPACE: "2")."""

    def validate(self, p: Problems) -> None:
        p.at_least("rollout.server.port", self.port, 0)
        p.check(self.port <= 65535, "rollout.server.port", self.port, "must be <= 65535")
        p.check(self.startup_timeout > 0, "rollout.server.startup_timeout", self.startup_timeout, "must be > 0")
        p.check(bool(self.module), "rollout.server.module", self.module, "must not be empty")


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
    executor: str = "local"
    """Where parallel rewards run: local (a process pool of ``workers`` processes) | ray (``workers`` Ray
    actors, with the same timeouts and failure isolation; ``pip install 'postrl[ray]'``; docs/scaling.md)."""
    ray_address: Optional[str] = None
    """executor=ray: the Ray cluster to use (e.g. ``ray://head:10001``, or ``auto`` for the one this machine
    belongs to); None = the Ray instance this process joined, else a new one on this machine."""
    ray_batched: list[str] = field(default_factory=lambda: ["code"])
    """executor=ray: batched rewards (by name) that also run on the actors, each batch cut into ``workers``
    chunks (default: the code reward's sandbox); other batched rewards stay in the trainer's process."""

    def validate(self, p: Problems, cfg: ConfigTree) -> None:
        p.check(self.normalize in SCORING_MODES, "scoring.normalize", self.normalize,
                "must be 'sum_then_normalize' or 'normalize_each_then_sum'")
        p.check(abs(self.failure_score) < float("inf"), "scoring.failure_score", self.failure_score, "must be finite")
        p.check(self.timeout_s > 0, "scoring.timeout_s", self.timeout_s, "must be > 0 seconds")
        p.check(self.workers >= 0, "scoring.workers", self.workers, "must be >= 0 (0 = run in the trainer's process)")
        p.check(self.eps > 0, "scoring.eps", self.eps, "must be > 0")
        if p.choice("scoring.executor", self.executor, REWARD_EXECUTORS) and self.executor == "ray":
            import importlib.util

            p.check(self.workers >= 1, "scoring.workers", self.workers, "must be >= 1 with scoring.executor=ray")
            p.check(importlib.util.find_spec("ray") is not None, "scoring.executor", self.executor,
                    "needs Ray, which is not installed: pip install 'postrl[ray]'")


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
    adv_std_unbiased: bool = False
    """grpo / gfpo: divide by the Bessel-corrected std (n - 1), as TRL does (TRL also uses adv_eps=1e-4);
    default false: the population std (n)."""
    # --- entropy-collapse control (postrl/algorithms/entropy_control.py) ---
    clip_cov_ratio: float = 2e-4
    """clip_cov: share r of the valid tokens whose gradient is detached (Clip-Cov, paper 2e-4)."""
    clip_cov_lb: float = 1.0
    """clip_cov: lower bound omega_low of the covariance of a detachable token."""
    clip_cov_ub: float = 5.0
    """clip_cov: upper bound omega_high of the covariance of a detachable token."""
    kl_cov_ratio: float = 2e-4
    """kl_cov: share k of the valid tokens (largest covariance) that get the KL penalty."""
    kl_cov_coef: float = 1.0
    """kl_cov: weight beta of the |log ratio| penalty on the selected tokens."""
    entropy_top_ratio: float = 0.2
    """top_entropy: share rho of the valid tokens (highest entropy) that get a gradient."""
    # --- ratio and clipping variants (postrl/algorithms/policy_losses.py) ---
    sapo_tau_pos: float = 1.0
    """sapo: gate temperature for positive advantages."""
    sapo_tau_neg: float = 1.05
    """sapo: gate temperature for negative advantages (larger = faster decay)."""
    dppo_divergence: str = "binary_tv"
    """dppo: divergence of the trust region: binary_tv | binary_kl."""
    dppo_delta_low: float = 0.2
    """dppo: trust-region size for negative advantages (paper: 0.2 for TV, 0.05 for KL)."""
    dppo_delta_high: float = 0.2
    """dppo: trust-region size for positive advantages."""
    # --- off-policy REINFORCE family and group shaping (postrl/algorithms/advantages.py) ---
    opmd_tau: float = 1.0
    """opmd: mirror-descent regularisation tau (> 0)."""
    opmd_baseline: str = "mean"
    """opmd: group baseline: mean | logavgexp (tau log mean exp(r / tau))."""
    asymre_baseline_shift: float = -0.1
    """asymre: delta added to the group mean to form the baseline (< 0: positive samples weigh more)."""
    w_reinforce_lambda: float = 0.1
    """w_reinforce: weight lambda of the positive samples (negative samples weigh 1)."""
    passk_k: int = 4
    """passk: the k of the pass@k group reward (1 <= k <= rollout.n; k = 1 is GRPO)."""
    gfpo_k: int = 4
    """gfpo: completions kept per group (2 <= k <= rollout.n; sample rollout.n, train on k)."""
    gfpo_metric: str = "length"
    """gfpo: which completions are kept: length (shortest) | reward_per_token (highest reward / length)."""
    distill_teacher: Optional[str] = None
    """distill: model id/path of the teacher for on-policy distillation (loaded as the KL reference)."""
    ref_reset_every: int = 0
    """ProRL: reset the KL reference to the current policy and the optimizer state every N steps; 0 = off."""
    step_adv_weight: float = 1.0
    """gigpo (multi-turn, docs/agents.md): weight omega of the step-level advantage added to the episode-level
    one (GiGPO eq. 8; the paper uses 1)."""

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
        self._check_round_two(p)
        self._check_combinations(p, cfg)

    def _check_round_two(self, p: Problems) -> None:
        """Ranges of the keys of the methods added by issue 17 (checked whether or not the method is used)."""
        for key in ("clip_cov_ratio", "kl_cov_ratio", "entropy_top_ratio"):
            value = getattr(self, key)
            p.check(0 < value <= 1, f"algo.{key}", value, "must be in (0, 1] (a share of the valid tokens)")
        if p.check(abs(self.clip_cov_lb) < float("inf"), "algo.clip_cov_lb", self.clip_cov_lb, "must be finite"):
            p.check(self.clip_cov_ub > self.clip_cov_lb, "algo.clip_cov_ub", self.clip_cov_ub,
                    f"must be > algo.clip_cov_lb ({self.clip_cov_lb})")
        p.at_least("algo.kl_cov_coef", self.kl_cov_coef, 0)
        p.check(self.sapo_tau_pos > 0, "algo.sapo_tau_pos", self.sapo_tau_pos, "must be > 0")
        p.check(self.sapo_tau_neg > 0, "algo.sapo_tau_neg", self.sapo_tau_neg, "must be > 0")
        p.choice("algo.dppo_divergence", self.dppo_divergence, DPPO_DIVERGENCES)
        tv = self.dppo_divergence == "binary_tv"
        for key in ("dppo_delta_low", "dppo_delta_high"):
            value = getattr(self, key)
            p.check(0 < value <= (1.0 if tv else float("inf")), f"algo.{key}", value,
                    "must be in (0, 1] (a probability difference)" if tv else "must be > 0")
        p.check(0 < self.opmd_tau < float("inf"), "algo.opmd_tau", self.opmd_tau, "must be > 0")
        p.choice("algo.opmd_baseline", self.opmd_baseline, OPMD_BASELINES)
        p.check(abs(self.asymre_baseline_shift) < float("inf"), "algo.asymre_baseline_shift",
                self.asymre_baseline_shift, "must be finite")
        p.check(0 <= self.w_reinforce_lambda <= 1, "algo.w_reinforce_lambda", self.w_reinforce_lambda,
                "must be in [0, 1] (the weight of the positive samples)")
        p.at_least("algo.passk_k", self.passk_k, 1)
        p.at_least("algo.gfpo_k", self.gfpo_k, 1)
        p.choice("algo.gfpo_metric", self.gfpo_metric, GFPO_METRICS)
        p.check(self.distill_teacher is None or bool(self.distill_teacher), "algo.distill_teacher",
                self.distill_teacher, "must be a model id or path, or null")
        p.at_least("algo.ref_reset_every", self.ref_reset_every, 0, " (0 = off)")
        p.at_least("algo.step_adv_weight", self.step_adv_weight, 0)

    def _check_combinations(self, p: Problems, cfg: ConfigTree) -> None:
        """Pieces that are each valid but do not fit together. The rules name built-in methods only; a
        method registered by a user should raise ValueError on inputs it cannot use."""
        refused = [
            (bool(cfg.critic.shared_backbone) and self.advantage != "gae",
             f"critic.shared_backbone=true adds a value head for algo.advantage=gae (PPO); algo.advantage="
             f"{self.advantage} uses no value model, so the head would never be used."),
            (bool(cfg.critic.shared_backbone) and cfg.critic.name_or_path is not None,
             f"critic.shared_backbone=true puts the value head on the policy model; critic.name_or_path="
             f"{cfg.critic.name_or_path!r} names a separate critic model: set one or the other."),
            (self.kl_in_reward and self.kl_coef == 0,
             "algo.kl_in_reward=true needs algo.kl_coef > 0 (the KL penalty it puts into the reward)."),
            (self.kl_target > 0 and self.kl_coef == 0,
             "algo.kl_target (adaptive KL) needs algo.kl_coef > 0 as the starting coefficient."),
            (self.policy_loss in SEQUENCE_LEVEL_LOSSES and self.loss_agg != "seq_mean_token_mean",
             f"algo.policy_loss={self.policy_loss} is a sequence-level objective (it averages over sequences, "
             f"one loss per sequence on every token); use algo.loss_agg=seq_mean_token_mean, not {self.loss_agg}."),
            (self.dual_clip_c > 0 and self.policy_loss not in PPO_CLIP_LOSSES,
             f"algo.dual_clip_c applies to the PPO-clip losses ({', '.join(PPO_CLIP_LOSSES)}) only, "
             f"not algo.policy_loss={self.policy_loss}."),
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
        refused += self._round_two_combinations(cfg)
        from postrl.algorithms import ADVANTAGES

        needs_turns = "turn_ids" in getattr(ADVANTAGES.get(self.advantage), "requires", ())
        env = getattr(cfg, "env", None)
        refused += [
            (needs_turns and not (env and env.name),
             f"algo.advantage={self.advantage} assigns credit over the turns of multi-turn episodes: it needs an "
             "environment (env.name, docs/agents.md); for single-turn training use grpo, rloo, ..."),
            (bool(env and env.name) and self.overlong_buffer > 0,
             "algo.overlong_buffer shapes single completions by length; with env.name (multi-turn episodes) limit "
             "episodes with env.max_episode_tokens instead."),
            (bool(env and env.name) and cfg.rollout.min_new_tokens > 0,
             "rollout.min_new_tokens keeps single completions from ending early; with env.name (multi-turn "
             "episodes) a turn ends by the environment's rules: leave rollout.min_new_tokens at 0."),
        ]
        for bad, message in refused:
            if bad:
                p.add(message)
        for setting, need in PENDING_TRAINER_HOOKS:
            if self._is_set(setting, cfg):
                key = setting.split("=")[0]
                hint = f"choose another {key}" if "=" in setting else f"leave {key} at its default"
                p.add(f"{setting} is not supported by the RL trainer yet: it {need} (issue 17); {hint}.")

    def _is_set(self, setting: str, cfg: ConfigTree) -> bool:
        """Whether a PENDING_TRAINER_HOOKS setting is in use in this config."""
        if setting == "algo.policy_loss=top_entropy":
            return self.policy_loss == "top_entropy"
        if setting == "algo.distill_teacher":
            return self.distill_teacher is not None
        if setting == "algo.ref_reset_every":
            return self.ref_reset_every > 0
        raise KeyError(setting)

    def _round_two_combinations(self, cfg: ConfigTree) -> list[tuple[bool, str]]:
        """The combinations of issue 17's methods that cannot work, each message naming both settings."""
        n = cfg.rollout.n
        bounded = {"passk": "binary 0/1 rewards (the pass@k of a group)",
                   "w_reinforce": "rewards in [0, 1] (mapped to +-1)"}
        return [
            (self.advantage == "passk" and self.passk_k > n,
             f"algo.passk_k={self.passk_k} must be <= rollout.n={n} (pass@k over a group of rollout.n completions)."),
            (self.advantage == "gfpo" and not 2 <= self.gfpo_k <= n,
             f"algo.gfpo_k={self.gfpo_k} must be in [2, rollout.n={n}] with algo.advantage=gfpo (keep k of the "
             f"rollout.n sampled completions; at least 2 to normalise among them)."),
            *[(self.advantage == name and (self.kl_in_reward or self.overlong_buffer > 0),
               f"algo.advantage={name} needs {what}: it cannot take per-token KL rewards (algo.kl_in_reward) or "
               f"overlong shaping (algo.overlong_buffer).") for name, what in bounded.items()],
            (self.adv_std_unbiased and self.advantage not in ("grpo", "gfpo"),
             f"algo.adv_std_unbiased applies to the std of algo.advantage=grpo or gfpo only, not {self.advantage}."),
            (self.adv_std_unbiased and self.advantage in ("grpo", "gfpo") and self.adv_std_scope == "none",
             "algo.adv_std_unbiased has no std to correct with algo.adv_std_scope=none."),
            (self.advantage == "distill" and not (self.kl_in_reward and self.kl_estimator == "k1"),
             "algo.advantage=distill uses the per-token reward -kl_coef * k1(student, teacher): set "
             f"algo.kl_in_reward=true and algo.kl_estimator=k1 (now {str(self.kl_in_reward).lower()} and "
             f"{self.kl_estimator})."),
            (self.advantage == "distill" and self.distill_teacher is None,
             "algo.advantage=distill needs a teacher: set algo.distill_teacher (a model with the same tokenizer)."),
            (self.advantage == "distill" and self.kl_target > 0,
             "algo.kl_target adapts the KL coefficient, but with algo.advantage=distill algo.kl_coef is the "
             "distillation weight; leave algo.kl_target at 0."),
            (self.ref_reset_every > 0 and self.kl_coef == 0,
             "algo.ref_reset_every resets the KL reference, but algo.kl_coef=0 loads none; set algo.kl_coef > 0."),
        ]


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
    shared_backbone: bool = False
    """A value head on the policy model instead of a separate critic model (one backbone, one loss)."""
    value_coef: float = 0.5
    """shared_backbone: weight c1 of the value loss in the joint loss policy_loss + c1 * value_loss."""

    def validate(self, p: Problems, cfg: ConfigTree) -> None:
        p.check(self.lr > 0, "critic.lr", self.lr, "must be > 0")
        p.at_least("critic.value_clip", self.value_clip, 0, " (0 = off)")
        p.at_least("critic.warmup_steps", self.warmup_steps, 0)
        p.check(0 <= self.value_coef < float("inf"), "critic.value_coef", self.value_coef, "must be >= 0 and finite")


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
            # both sizes at once, with a pair that works: the newcomer who shrinks the batch fixes both in one go
            fit_mini = max(d for d in divisors(rollout_batch) if d <= mini)
            fit_micro = max(d for d in divisors(fit_mini) if d <= max(1, self.micro_batch_size))
            micro_note = ("" if not micro_ok or fit_mini % self.micro_batch_size == 0 else
                          f" train.micro_batch_size={self.micro_batch_size} must then divide the mini batch too;")
            p.add(f"train.mini_batch_size={mini} must divide the rollout batch size {rollout_batch} "
                  f"({origin}). Valid values: 0 (= {rollout_batch}), {', '.join(map(str, divisors(rollout_batch)))}."
                  f"{micro_note} e.g. train.mini_batch_size={fit_mini} train.micro_batch_size={fit_micro}.")
        elif micro_ok and mini % self.micro_batch_size:
            source = (f"train.mini_batch_size={mini}" if self.mini_batch_size
                      else f"train.mini_batch_size=0, i.e. the rollout batch {origin}")
            p.add(f"train.micro_batch_size={self.micro_batch_size} must divide the mini batch size "
                  f"{mini} ({source}). Valid values: {', '.join(map(str, divisors(mini)))}.")
