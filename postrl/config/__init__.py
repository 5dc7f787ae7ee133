"""Typed configuration for postrl: a dataclass tree loaded from YAML, a mapping or a ``Config``.

Usage::

    cfg = load_config("recipes/quickstart.yaml", ["train.lr=1e-5", "rollout.n=4"])
    cfg = load_config({"preference": {"loss": "ipo", "beta": 0.5}}, ["train.lr=1e-6"])
    cfg.train.lr, cfg.rollout_batch_size, cfg.resolved_mini_batch_size
    check_command(cfg, "dpo")  # the rules that depend on the command

Every field has a default, so ``load_config(None)`` gives a runnable config.
Loading is strict and fails fast: unknown keys (with a "did you mean"
suggestion), wrong types, unknown method names and inconsistent values raise
:class:`ConfigError` before any model is loaded.

Modules
-------
``common``      model, data, eval, run: the sections every command reads
``rl``          rollout, rewards, scoring, algo, critic, train: ``postrl train``
``preference``  preference: ``postrl dpo`` and ``postrl rm`` (the loss and its parameters too)
``sft``         sft: ``postrl sft``
``pipeline``    stages: ``postrl pipeline``
``schema``      ``Config`` (the whole tree), :func:`validate`, :func:`check_command`
``loader``      :func:`load_config`, overrides, strict typing, :func:`from_dict` / :func:`to_dict`
``checks``      :class:`ConfigError` and the ``Problems`` list each section's ``validate`` adds to

Each section class has ``validate(problems, cfg)``: it checks its own keys and the rules that tie them
to other sections (``algo`` checks the method names against the registries of :mod:`postrl.algorithms`
and refuses combinations that do not fit together). :func:`validate` runs them all.

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

from .checks import ConfigError, Problems
from .common import (
    ANSWER_EXTRACTIONS,
    DATA_SOURCES,
    DEVICE_PATTERN,
    DTYPES,
    DataConfig,
    EvalConfig,
    LoraConfig,
    ModelConfig,
    RunConfig,
)
from .loader import MOVED_KEYS, from_dict, load_config, save_config, to_dict
from .pipeline import STAGE_KINDS, StageSpec
from .preference import PreferenceConfig
from .rl import (
    ADV_STD_SCOPES,
    LR_SCHEDULES,
    TIS_MODES,
    AlgoConfig,
    CriticConfig,
    RewardSpec,
    RolloutConfig,
    ScoringConfig,
    TrainConfig,
)
from .schema import COMMANDS, Config, check_command, validate
from .env import EnvConfig
from .sft import SFTConfig

__all__ = [
    "ADV_STD_SCOPES",
    "ANSWER_EXTRACTIONS",
    "COMMANDS",
    "DATA_SOURCES",
    "DEVICE_PATTERN",
    "DTYPES",
    "LR_SCHEDULES",
    "MOVED_KEYS",
    "STAGE_KINDS",
    "TIS_MODES",
    "AlgoConfig",
    "Config",
    "ConfigError",
    "CriticConfig",
    "DataConfig",
    "EvalConfig",
    "LoraConfig",
    "ModelConfig",
    "PreferenceConfig",
    "Problems",
    "RewardSpec",
    "RolloutConfig",
    "RunConfig",
    "SFTConfig",
    "EnvConfig",
    "ScoringConfig",
    "StageSpec",
    "TrainConfig",
    "check_command",
    "from_dict",
    "load_config",
    "save_config",
    "to_dict",
    "validate",
]
