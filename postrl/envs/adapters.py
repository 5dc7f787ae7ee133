"""Adapters to environment libraries, so their environments run through postrl's episode runner.

==================  ==============================================================================================
name                library and what the adapter does
==================  ==============================================================================================
``textarena``       TextArena (``pip install textarena``): a single-player game (``env_id``, e.g.
                    ``GuessTheNumber-v0``, ``TowerOfHanoi-v0``, ``FrozenLake-v0``, ``Minesweeper-v0``,
                    ``Sudoku-v0``, ``Mastermind-v0``...). Always its ``-raw`` variant (incremental observations,
                    no prompt-formatting wrapper); the game's messages since the last turn become one user
                    message; the reward is the game's reward from ``close()`` at the end. TextArena seeds
                    Python's global ``random``: the adapter gives each episode a ``random`` state of its own and
                    puts the caller's state back after every call, so concurrent episodes do not disturb each
                    other and runs stay reproducible.
``skyrl_gym``       SkyRL-Gym (``pip install skyrl-gym``): ``skyrl_gym.make(env_id, env_config, extras)`` per
                    episode with ``extras["reward_spec"]["ground_truth"] = sample.answer`` (and the sample's
                    metadata as ``extra_info``); ``init(prompt)`` / ``step(text)`` map onto reset / step.
``reasoning_gym``   a reasoning-gym task as a single-turn environment: the question of the episode's sample
                    (or an entry generated from the seed), one answer, scored by reasoning-gym's own scorer.
==================  ==============================================================================================

GEM (``gem-llm``) is not adapted: it pins ``reasoning-gym==0.1.23`` and ``nltk==3.9.1``, which would
downgrade what postrl installs. The libraries are optional (``pip install 'postrl[agents]'``); building an
adapter without its library raises :class:`~postrl.envs.base.EnvError` naming the package.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Optional

from postrl.data.answers import extract_answer

from .base import EnvError, register_env, user

__all__ = ["ReasoningGymEnv", "SkyRLGymEnv", "TextArenaEnv"]


@register_env("textarena")
class TextArenaEnv:
    """One TextArena single-player game (see the module docstring). ``env_id`` with or without ``-raw``."""

    def __init__(self, env_id: str = "GuessTheNumber-v0", env_kwargs: Optional[dict[str, Any]] = None):
        try:
            import textarena  # noqa: F401
            from textarena.envs.registration import ENV_REGISTRY
        except ImportError:
            raise EnvError("the textarena environment needs the textarena package: pip install 'postrl[agents]' "
                           "(or textarena)") from None
        raw = env_id if env_id.endswith("-raw") else env_id + "-raw"
        if raw not in ENV_REGISTRY:
            close = sorted(k[:-4] for k in ENV_REGISTRY if k.endswith("-raw") and k.split("-")[0] == env_id.split("-")[0])
            raise EnvError(f"textarena: unknown env_id {env_id!r}" + (f"; variants: {', '.join(close)}" if close
                                                                       else ""))
        self.env_id, self.env_kwargs = raw, dict(env_kwargs or {})
        self._state = random.Random(0).getstate()
        self.env = None

    @contextmanager
    def _own_random(self):
        outer = random.getstate()
        random.setstate(self._state)
        try:
            yield
        finally:
            self._state = random.getstate()
            random.setstate(outer)

    def _observe(self) -> str:
        pid, obs = self.env.get_observation()
        self.pid = pid
        parts = [msg for sender, msg, *_ in obs if sender != pid]
        return "\n".join(str(p) for p in parts)

    def reset(self, sample: Any = None, seed: Optional[int] = None):
        import textarena as ta

        self._state = random.Random(seed).getstate()
        with self._own_random():
            self.env = ta.make(self.env_id, **self.env_kwargs)
            try:
                self.env.reset(num_players=1, seed=seed)
            except Exception as exc:  # noqa: BLE001 - a multi-player game, or one that needs downloads
                raise EnvError(f"textarena: {self.env_id} cannot start as a single-player game offline "
                               f"({type(exc).__name__}: {exc})") from None
            text = self._observe()
        return user(text), {}

    def step(self, action: str):
        with self._own_random():
            done, info = self.env.step(action)
            if not done:
                return user(self._observe()), 0.0, False, {}
            rewards, game_info = self.env.close()
        reward = float((rewards or {}).get(self.pid, 0.0))
        reason = (game_info or {}).get(self.pid, {}).get("reason", "")
        return [], reward, True, {"reason": reason}

    def close(self) -> None:
        self.env = None


@register_env("skyrl_gym")
class SkyRLGymEnv:
    """A SkyRL-Gym environment (``env_id``, e.g. ``gsm8k``, ``gsm8k_multi_turn``) built per episode from
    the episode's sample (see the module docstring)."""

    def __init__(self, env_id: str = "gsm8k", env_config: Optional[dict[str, Any]] = None,
                 extras: Optional[dict[str, Any]] = None, prompt_template: str = "{question}"):
        try:
            import skyrl_gym
        except ImportError:
            raise EnvError("the skyrl_gym environment needs the skyrl-gym package: pip install 'postrl[agents]' "
                           "(or skyrl-gym)") from None
        if env_id not in skyrl_gym.registry:
            raise EnvError(f"skyrl_gym: unknown env_id {env_id!r}; registered: {', '.join(sorted(skyrl_gym.registry))}")
        self.env_id, self.env_config, self.extras = env_id, env_config, dict(extras or {})
        self.template = prompt_template
        self.env = None

    def reset(self, sample: Any = None, seed: Optional[int] = None):
        import skyrl_gym

        if sample is None:
            raise EnvError("skyrl_gym: reset needs a data sample (question and ground truth); use a data source")
        extras = {"reward_spec": {"method": "rule", "ground_truth": sample.answer},
                  "extra_info": dict(getattr(sample, "metadata", {}) or {}), **self.extras}
        self.env = skyrl_gym.make(self.env_id, env_config=self.env_config, extras=extras)
        prompt = user(self.template.format(question=sample.question))
        obs, info = self.env.init(prompt)
        return list(obs), dict(info or {})

    def step(self, action: str):
        out = self.env.step(action)
        return list(out.get("observations") or []), float(out["reward"]), bool(out["done"]), \
            dict(out.get("metadata") or {})

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None


@register_env("reasoning_gym")
class ReasoningGymEnv:
    """A reasoning-gym task as a single-turn environment: the observation is the question, the one action is
    the answer, the reward is reasoning-gym's score of the extracted answer (``answer_extraction``: raw,
    answer_tag, boxed or last_number). The entry is the sample's (a ``reasoning_gym`` data source) or, without
    a sample, generated from ``task`` / ``task_kwargs`` and the episode's seed."""

    def __init__(self, task: Optional[str] = None, task_kwargs: Optional[dict[str, Any]] = None,
                 answer_extraction: str = "answer_tag", prompt_template: str = "{question}",
                 system_prompt: Optional[str] = None):
        self.task, self.task_kwargs = task, dict(task_kwargs or {})
        self.mode, self.template, self.system_prompt = answer_extraction, prompt_template, system_prompt

    def reset(self, sample: Any = None, seed: Optional[int] = None):
        import reasoning_gym

        if sample is not None and getattr(sample, "entry", None):
            self.entry = sample.entry
        elif self.task:
            self.entry = reasoning_gym.create_dataset(self.task, seed=seed or 0, size=1, **self.task_kwargs)[0]
        else:
            raise EnvError("reasoning_gym: give a task (env kwargs) or use a reasoning_gym data source")
        source = (self.entry.get("metadata") or {}).get("source_dataset", self.task)
        self.score = reasoning_gym.get_score_answer_fn(source)
        obs = user(self.template.format(question=self.entry["question"]))
        if self.system_prompt:
            obs = [{"role": "system", "content": self.system_prompt}] + obs
        return obs, {"state_key": "question"}

    def step(self, action: str):
        answer = extract_answer(action, self.mode)
        score = float(self.score(answer, self.entry)) if answer is not None else 0.0
        return [], score, True, {"success": score >= 1.0}
