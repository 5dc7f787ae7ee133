"""The ``env`` section: multi-turn environments (agents) for ``postrl train`` and ``postrl eval``.

With ``env.name`` empty (the default) training is single-turn, as before. With a name, every rollout row is
one *episode*: the model acts, the environment (or a tool) answers, until the environment says done, the turn
limit or the episode's token budget is reached (see ``postrl/rollout/episodes.py`` and docs/agents.md)::

    env:
      name: maze                 # a registered environment, or "package.module:Class"
      size: 4                    # keys that are not fields below go into kwargs (like rewards entries)
      max_turns: 8
      tools: [calculator]        # tools the model may call (Hermes <tool_call> format), optional

Environment and tool names are resolved by :mod:`postrl.envs` when a trainer builds the episode runner (the
config stays below the environments in the layering), so an unknown name fails there, listing the valid ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from .checks import ConfigTree, Problems


@dataclass
class EnvConfig:
    """A multi-turn environment: what to build for each episode and when an episode stops."""

    name: str = ""
    """Registered environment name (``postrl.envs.ENVS``) or ``module:Class``; empty = single-turn training."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the environment's constructor. Keys written next to ``name`` in YAML that are not
    fields here are put into ``kwargs``."""
    tools: list[Any] = field(default_factory=list)
    """Tools the model may call: names (``calculator``) or ``{name: ..., kwargs...}`` mappings. With tools the
    environment is wrapped so that a tool call is answered by a ``tool`` message and any other action goes to
    the environment."""
    max_turns: int = 8
    """Model turns per episode; an episode still running after this many turns ends truncated."""
    max_tokens_per_turn: int = 0
    """Tokens the model may sample in one turn; 0 = rollout.max_new_tokens."""
    max_episode_tokens: int = 1024
    """Tokens of one episode after its first observation (sampled + environment tokens); the episode ends
    truncated when the next turn or observation would not fit."""
    max_active: int = 0
    """Episodes decoded together (continuous batching: a finished episode leaves, a waiting one joins);
    0 = all episodes of the step at once."""
    success_threshold: float = 1.0
    """An episode counts as a success (``correct``) when its environment reports ``info["success"]`` or,
    if it does not, when its return reaches this value."""

    _extra_keys_into: ClassVar[str] = "kwargs"

    @property
    def enabled(self) -> bool:
        return bool(self.name)

    def validate(self, p: Problems, cfg: ConfigTree) -> None:
        p.at_least("env.max_turns", self.max_turns, 1)
        p.at_least("env.max_tokens_per_turn", self.max_tokens_per_turn, 0, " (0 = rollout.max_new_tokens)")
        p.at_least("env.max_episode_tokens", self.max_episode_tokens, 1)
        p.at_least("env.max_active", self.max_active, 0, " (0 = every episode of the step at once)")
        for i, tool in enumerate(self.tools):
            ok = isinstance(tool, str) and tool or isinstance(tool, dict) and isinstance(tool.get("name"), str)
            p.check(bool(ok), f"env.tools.{i}", tool, "must be a tool name or a mapping with a 'name' key")
        if self.tools and not self.name:
            p.add("env.tools needs an environment (env.name), e.g. env.name=tool_task for question-answering "
                  "with tools.")
        per_turn = self.max_tokens_per_turn or getattr(getattr(cfg, "rollout", None), "max_new_tokens", 0)
        if self.name and per_turn > self.max_episode_tokens:
            p.add(f"env.max_episode_tokens={self.max_episode_tokens} is smaller than one turn's budget "
                  f"({per_turn} tokens: env.max_tokens_per_turn or rollout.max_new_tokens).")
