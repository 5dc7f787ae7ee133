"""The whole configuration tree, and the two entry points that check it.

:func:`validate` runs every section's own ``validate`` (its keys and the rules that tie them to other
sections) and raises one :class:`ConfigError` listing all problems. :func:`check_command` adds the few
rules that depend on which command runs the config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .checks import Problems
from .common import DataConfig, EvalConfig, ModelConfig, RunConfig
from .pipeline import StageSpec, validate_stages
from .preference import PreferenceConfig
from .rl import AlgoConfig, CriticConfig, RewardSpec, RolloutConfig, ScoringConfig, TrainConfig, validate_rewards
from .env import EnvConfig
from .sft import SFTConfig

COMMANDS = ("train", "grpo", "rl", "sft", "dpo", "rm", "pipeline", "eval")
"""The names :func:`check_command` knows: the CLI's subcommands and the stage kinds of ``postrl pipeline``."""


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
    env: EnvConfig = field(default_factory=EnvConfig)
    """Multi-turn environment (agents): empty name = single-turn training (docs/agents.md)."""
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


def validate(cfg: Config) -> None:
    """Check value ranges, registered method names and cross-section consistency; raise
    :class:`ConfigError` listing every problem.

    Each section checks itself (``section.validate(problems, cfg)``), the ``rewards`` and ``stages`` lists
    their entries. Not checked here: reward names (postrl.rewards resolves them when a trainer starts),
    reasoning_gym task names (the data source), rollout backend and tracker names (their factories), and
    rules that depend on the command (:func:`check_command`).
    """
    p = Problems()
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if dataclasses.is_dataclass(section):
            section.validate(p, cfg)
    validate_rewards(p, cfg.rewards)
    validate_stages(p, cfg.stages)
    p.raise_if_any()


def check_command(cfg: Config, command: str) -> None:
    """The rules that depend on the command running ``cfg`` (one of :data:`COMMANDS`); raise
    :class:`ConfigError` listing the problems. Call it after :func:`validate` (``load_config`` does that)."""
    if command not in COMMANDS:
        raise ValueError(f"check_command: unknown command {command!r}; expected one of {', '.join(COMMANDS)}")
    # imported here: postrl.algorithms imports torch, which loading a config does not otherwise need
    from postrl.algorithms.preference import PREFERENCE_LOSSES

    p = Problems()
    pf = cfg.preference
    if command == "rm" and pf.online:
        p.add("preference.online applies to postrl dpo, not postrl rm; set preference.online=false")
    if command == "dpo" and pf.online and getattr(PREFERENCE_LOSSES.get(pf.loss), "unpaired", False):
        p.add(f"preference.online builds chosen/rejected pairs; preference.loss={pf.loss} is for offline unpaired "
              "data. Use a paired loss (dpo, ipo, ...) online.")
    p.raise_if_any(f"Invalid config for postrl {command}")
