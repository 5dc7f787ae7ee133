"""The environment protocol, the registry and the factory that builds one environment per episode.

An environment talks in chat messages (OpenAI format, ``{"role": ..., "content": ...}``) and text actions::

    obs, info = env.reset(sample=None, seed=None)          # the first observation: a list of messages
    obs, reward, done, info = env.step(action_text)        # after each model turn

``reset`` gets the data sample of the episode (a :class:`postrl.data.Sample`, or None for procedurally
generated environments) and a seed; episodes of one group get the same sample and seed, so they start from
the same state. ``step`` gets the text the model sampled in this turn (special tokens removed) and returns
the observation that follows it (messages, usually one ``user`` or ``tool`` message; ignored when ``done``),
the reward of this step, whether the episode is over, and an info dict. The episode's return is the sum of
its step rewards; a "final reward" is simply the reward of the step that returns ``done=True``.

Keys of ``info`` that postrl reads (all optional):

=================  ===================================================================================
``state_key``      a hashable id of the environment state the next observation shows (reset: the first
                   one). GiGPO groups steps that start from the same state key; without it the
                   observation text is the key.
``success``        bool, in the info of the last step: whether the episode solved its task (else success
                   is ``return >= env.success_threshold``).
``tool_calls``     number of tool calls answered in this step (the tool wrapper sets it).
``tool_errors``    number of malformed or failing tool calls in this step.
``invalid``        True when the action could not be parsed as a move (counted in the episode's info).
=================  ===================================================================================

One instance serves one episode: :func:`env_factory` returns a function that builds a fresh environment for
every episode (seeded by ``reset``). An exception in ``step`` ends that episode with a counted error (see
postrl/rollout/episodes.py); training goes on.

Environments are registered by name with :func:`register_env`, or named in a config as ``module:Class``;
an unknown name raises :class:`postrl.config.ConfigError` listing the registered ones.
"""

from __future__ import annotations

import importlib
import inspect
import random
from collections.abc import Callable
from typing import Any, Optional, Protocol, runtime_checkable

from postrl.algorithms.registry import Registry
from postrl.config import ConfigError

Message = dict[str, Any]
StepResult = tuple[list[Message], float, bool, dict[str, Any]]

__all__ = ["ENVS", "EnvError", "Environment", "Message", "StepResult", "TextEnv", "build_env", "env_factory",
           "register_env", "resolve_env", "user"]


class EnvError(RuntimeError):
    """An environment cannot be built or used (missing dependency, bad arguments)."""


@runtime_checkable
class Environment(Protocol):
    """What the episode runner calls. ``close`` is optional."""

    def reset(self, sample: Any = None, seed: Optional[int] = None) -> tuple[list[Message], dict[str, Any]]:
        ...

    def step(self, action: str) -> StepResult:
        ...


def user(text: str) -> list[Message]:
    """One user message: the usual observation."""
    return [{"role": "user", "content": text}]


class TextEnv:
    """A convenient base class: ``self.rng`` (a ``random.Random`` seeded by ``reset``), ``self.turn`` (steps
    taken), and ``close()`` doing nothing. Subclasses implement ``_reset(sample) -> (text or messages, info)``
    and ``_step(action) -> (text or messages, reward, done, info)``; a plain string becomes one user message.
    """

    def reset(self, sample: Any = None, seed: Optional[int] = None) -> tuple[list[Message], dict[str, Any]]:
        self.rng = random.Random(seed)
        self.turn = 0
        obs, info = self._reset(sample)
        return _as_messages(obs), dict(info or {})

    def step(self, action: str) -> StepResult:
        self.turn += 1
        obs, reward, done, info = self._step(action)
        return _as_messages(obs), float(reward), bool(done), dict(info or {})

    def close(self) -> None:
        pass

    def _reset(self, sample: Any) -> tuple[Any, dict]:
        raise NotImplementedError

    def _step(self, action: str) -> tuple[Any, float, bool, dict]:
        raise NotImplementedError


def _as_messages(obs: Any) -> list[Message]:
    if obs is None:
        return []
    if isinstance(obs, str):
        return user(obs)
    return list(obs)


ENVS = Registry("environment", "env.name")


def register_env(name: str) -> Callable:
    """Class decorator: ``@register_env("maze")`` makes ``env: {name: maze}`` build this class."""
    return ENVS.register(name)


def resolve_env(name: str) -> type:
    """The environment class registered as ``name``, or imported from ``module:Class``."""
    if not isinstance(name, str) or not name:
        raise ConfigError("env.name must be a registered environment name or 'module:Class'")
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"env.name={name!r}: cannot import {attr!r} from {module!r} ({exc})") from None
        return obj
    try:  # the built-in environments are registered by postrl/envs/__init__.py, imported with this module
        return ENVS.get_fn(name)
    except KeyError as exc:
        raise ConfigError(exc.args[0]) from None


def build_env(name: str, kwargs: Optional[dict[str, Any]] = None) -> Any:
    """One environment instance: ``resolve_env(name)(**kwargs)``. Unknown keyword arguments raise
    :class:`ConfigError` naming the valid ones."""
    cls = resolve_env(name)
    kwargs = dict(kwargs or {})
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}
    if params and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = [k for k in kwargs if k not in params]
        if unknown:
            valid = [p for p in params if params[p].kind is not inspect.Parameter.VAR_POSITIONAL]
            raise ConfigError(f"environment {name!r} got unknown arguments {', '.join(map(repr, unknown))}; "
                              f"valid: {', '.join(valid) or 'none'}")
    env = cls(**kwargs)
    for method in ("reset", "step"):
        if not callable(getattr(env, method, None)):
            raise ConfigError(f"environment {name!r} ({type(env).__name__}) has no {method}() method; see "
                              "postrl.envs.Environment")
    return env


def env_factory(cfg: Any) -> Callable[[], Any]:
    """A function that builds a fresh environment for each episode from an ``EnvConfig`` (``name``,
    ``kwargs``, ``tools``). With tools, the environment is wrapped in :class:`postrl.envs.tools.ToolEnv`.
    The first instance is built here, so a bad name or argument fails now, not in the first rollout."""
    from .tools import ToolEnv, build_tools

    name, kwargs, tool_specs = cfg.name, dict(cfg.kwargs), list(getattr(cfg, "tools", []) or [])
    tools = build_tools(tool_specs) if tool_specs else []

    def make() -> Any:
        env = build_env(name, kwargs)
        return ToolEnv(env, tools) if tools else env

    first = make()
    if hasattr(first, "close"):
        first.close()
    return make
