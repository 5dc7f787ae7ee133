"""Environments for multi-turn agents: the protocol, tools, built-in games and adapters to libraries.

- :mod:`.base`: the :class:`Environment` protocol (``reset`` / ``step`` over chat messages), the registry
  (:func:`register_env`, ``module:Class``) and :func:`env_factory` (one environment per episode);
- :mod:`.tools`: tools with JSON schemas, Hermes ``<tool_call>`` parsing, :class:`ToolEnv`, the built-in
  calculator, python (sandbox), sql (read-only SQLite) and search (BM25) tools;
- :mod:`.games`: maze (full / partial), guess-the-number, twenty questions, Wordle, arithmetic, qa;
- :mod:`.chess_endgame`: KQ/KR vs K against Stockfish;
- :mod:`.adapters`: TextArena, SkyRL-Gym, reasoning-gym.

The episode runner that plays them with a model lives in :mod:`postrl.rollout.episodes`; docs/agents.md
shows how to write an environment and a tool.
"""

from .base import ENVS, EnvError, Environment, TextEnv, build_env, env_factory, register_env, resolve_env, user
from .tools import TOOLS, Tool, ToolCall, ToolEnv, build_tools, calculate, parse_tool_calls, register_tool
from . import adapters, chess_endgame, games  # noqa: F401,E402  (register the built-in environments)

__all__ = [
    "ENVS", "EnvError", "Environment", "TOOLS", "TextEnv", "Tool", "ToolCall", "ToolEnv", "build_env",
    "build_tools", "calculate", "env_factory", "parse_tool_calls", "register_env", "register_tool",
    "resolve_env", "user",
]
