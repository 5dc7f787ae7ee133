"""Multi-turn episodes, token in and token out: a model plays environments, and the result is a rollout batch.

One row of the batch is one episode::

    prompt_ids     = the first observation, rendered with the chat template (+ generation prompt)
    completion_ids = turn 0 sampled ids | delta 1 | turn 1 sampled ids | delta 2 | ... | turn K-1 sampled ids
    attention_mask = 1 on every token above
    loss_mask      = 1 on the sampled ids only (the environment's deltas are never trained on)
    behaviour_logprobs, entropy = the sampler's, 0 on delta tokens
    turn_ids       = k on the sampled ids of turn k, -1 on delta tokens and padding

**Token in, token out.** The ids the sampler returned are stored as they are; nothing sampled is ever
decoded and tokenized again. An observation enters the history as a *delta*: the tokens that the chat
template puts between the end of the model's turn and the start of its next one. The delta is rendered
from a fixed two-message conversation (a user message and an assistant message holding a sentinel) followed
by the observation messages and the generation prompt: everything after the sentinel is the closing of an
assistant turn, the observation and the next generation prompt. Rendering only the new messages behind a
fixed prefix (never the real conversation) means that

* templates that rewrite earlier turns (Qwen3 drops the ``<think>`` block of every assistant turn before the
  last user message, so the re-rendered conversation is not a prefix-extension of what was sampled) cannot
  change the history: the model's earlier turns, thinking included, stay exactly as sampled;
* the end of the assistant turn comes from the template: when the sampled turn ended with an end-of-turn
  token whose text starts the template's closing (``<|im_end|>`` of ``<|im_end|>\\n``), only the rest
  (``\\n``) is added, which is the newline that a re-tokenizing runner loses at every assistant -> tool
  boundary; a turn cut at the per-turn token limit gets the whole closing.

**Episode end.** ``done`` from the environment; ``max_turns`` model turns (truncated); the token budget
(``max_episode_tokens`` completion tokens: a turn is cut at the budget, or the next observation does not
fit: truncated); an environment that raises in ``step`` (the episode ends there, counted as an
``env_error``; the others go on). A cut turn is not sent to the environment. The last observation (after
``done``) is not added to the tokens: nothing would be sampled after it.

**Rewards.** Every step reward sits on the last sampled token of its turn: ``R = last_token_rewards(rewards,
loss_mask) + token_rewards`` with ``rewards[i]`` the reward on the episode's last sampled token and
``token_rewards`` the others, so the existing estimators (a sequence reward ``r_i + sum(token_rewards)``,
or per-token returns) see every step reward once, and the episode's return is ``rewards + token_rewards.sum``.

**Continuous batching.** At most ``max_active`` episodes are decoded together; each loop makes one
``GenerationBackend.generate`` call over the active episodes (one turn each, their whole token history as
the prompt), then steps their environments; finished episodes leave and waiting ones join before the next
call, so a long episode never holds a slot that a new one could use.
"""

from __future__ import annotations

import json
import math
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Optional

import torch
import torch.nn.functional as F

from postrl.rollout.batch import RolloutBatch
from postrl.rollout.generator import SamplingParams

__all__ = ["ChatDelta", "EpisodeBatch", "EpisodeInfo", "EpisodeRunner", "EpisodeTask", "episode_metrics",
           "runner_from_config"]

SENTINEL = "PoStRlAsSiStAnTsEnTiNeL"
END_REASONS = ("done", "max_turns", "token_budget", "env_error", "reset_error")


# --------------------------------------------------------------------------------------------- #
# Rendering observations as deltas
# --------------------------------------------------------------------------------------------- #

def _template_takes(tokenizer: Any, word: str) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = " ".join(template.values())
    return bool(template) and word in template


class ChatDelta:
    """Renders messages with the tokenizer's chat template: the first prompt of an episode, and the token
    delta that appends observation messages after a sampled assistant turn (see the module docstring)."""

    def __init__(self, tokenizer: Any, chat_template_kwargs: Optional[dict[str, Any]] = None):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("multi-turn episodes need a tokenizer with a chat template")
        self.tokenizer = tokenizer
        self.kwargs = dict(chat_template_kwargs or {})
        self.base = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": SENTINEL}]
        self.template_renders_tools = _template_takes(tokenizer, "tools")

    def render(self, messages: list[dict], add_generation_prompt: bool, tools: Optional[list[dict]] = None) -> str:
        kwargs = dict(self.kwargs)
        if tools and self.template_renders_tools:
            kwargs["tools"] = tools
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False, **kwargs)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def prompt(self, messages: list[dict], tools: Optional[list[dict]] = None) -> tuple[list[int], str]:
        """Token ids and text of the first prompt (the template's own BOS, if any, comes from the template)."""
        text = self.render(messages, True, tools)
        return self.encode(text), text

    def delta_text(self, messages: list[dict]) -> str:
        """What the template writes after an assistant turn's content: its closing, ``messages`` and the next
        generation prompt."""
        text = self.render(self.base + list(messages), True)
        at = text.find(SENTINEL)
        if at < 0:
            raise ValueError("the chat template dropped the assistant message; cannot render observation deltas")
        return text[at + len(SENTINEL):]

    def delta(self, messages: list[dict], last_token: Optional[int], ended_turn: bool) -> list[int]:
        """Token ids to append after a sampled turn. ``ended_turn``: the turn stopped at an end-of-turn token
        ``last_token`` (else it was cut and needs the template's whole closing)."""
        text = self.delta_text(messages)
        if ended_turn and last_token is not None:
            eos_text = self.tokenizer.decode([last_token], skip_special_tokens=False)
            if eos_text and text.startswith(eos_text):
                text = text[len(eos_text):]
        return self.encode(text)


# --------------------------------------------------------------------------------------------- #
# The batch of episodes
# --------------------------------------------------------------------------------------------- #

@dataclass
class EpisodeTask:
    """What one group of episodes starts from: a data sample (or None) and the environment seed."""

    sample: Any = None
    seed: Optional[int] = None


@dataclass
class EpisodeInfo:
    """What happened in one episode (also the transcript for reports)."""

    turns: int = 0
    end: str = ""  # one of END_REASONS
    truncated: bool = False
    success: bool = False
    episode_return: float = 0.0
    turn_rewards: list[float] = field(default_factory=list)
    tool_calls: int = 0
    tool_errors: int = 0
    invalid_actions: int = 0
    env_errors: int = 0
    error: str = ""
    sampled_tokens: int = 0
    env_tokens: int = 0
    segments: list[tuple[str, int, int]] = field(default_factory=list)  # (sampled | env, start, end) in completion
    messages: list[dict] = field(default_factory=list)  # observations and the model's decoded turns
    final_info: dict = field(default_factory=dict)


@dataclass
class EpisodeBatch(RolloutBatch):
    """A :class:`RolloutBatch` of episodes with the turn structure the turn-level estimators need.

    ``turn_ids [B, T]`` long: k on the sampled tokens of turn k, -1 elsewhere. ``anchor_ids [B, K]`` long: an
    id of the state each turn started from (equal ids = equal state key within a group; -1 past the
    episode's turns). ``episodes``: one :class:`EpisodeInfo` per row."""

    turn_ids: Optional[torch.Tensor] = None
    anchor_ids: Optional[torch.Tensor] = None
    episodes: list[EpisodeInfo] = field(default_factory=list)

    def validate(self) -> None:
        super().validate()
        B, T = self.completion_ids.shape
        if self.turn_ids is not None:
            if tuple(self.turn_ids.shape) != (B, T) or self.turn_ids.dtype != torch.long:
                raise ValueError(f"EpisodeBatch.turn_ids must be a long tensor [B, T] = [{B}, {T}], got "
                                 f"{self.turn_ids.dtype} {list(self.turn_ids.shape)}")
            if bool(((self.turn_ids >= 0) != (self.loss_mask > 0)).any()):
                raise ValueError("EpisodeBatch.turn_ids must be >= 0 exactly on the sampled (loss_mask) tokens")
        if self.anchor_ids is not None and (self.anchor_ids.dim() != 2 or self.anchor_ids.shape[0] != B):
            raise ValueError(f"EpisodeBatch.anchor_ids must be [B, K] with B={B}, got {list(self.anchor_ids.shape)}")
        if self.episodes and len(self.episodes) != B:
            raise ValueError(f"EpisodeBatch.episodes has {len(self.episodes)} entries, expected B={B}")

    @classmethod
    def _wrap(cls, base: RolloutBatch, **extra: Any) -> "EpisodeBatch":
        return cls(**{f.name: getattr(base, f.name) for f in fields(RolloutBatch)}, **extra)

    def select(self, rows: list[int]) -> "EpisodeBatch":
        idx = torch.as_tensor(rows, dtype=torch.long)
        return EpisodeBatch._wrap(
            super().select(rows), turn_ids=None if self.turn_ids is None else self.turn_ids[idx],
            anchor_ids=None if self.anchor_ids is None else self.anchor_ids[idx],
            episodes=[self.episodes[i] for i in rows] if self.episodes else [])

    @staticmethod
    def concat(parts: list["EpisodeBatch"], pad_id: int) -> "EpisodeBatch":
        base = RolloutBatch.concat(parts, pad_id)
        width = base.completion_ids.shape[1]
        turn_ids = anchor_ids = None
        if all(getattr(p, "turn_ids", None) is not None for p in parts):
            turn_ids = torch.cat([F.pad(p.turn_ids, (0, width - p.turn_ids.shape[1]), value=-1) for p in parts])
        if all(getattr(p, "anchor_ids", None) is not None for p in parts):
            k = max(p.anchor_ids.shape[1] for p in parts)
            anchor_ids = torch.cat([F.pad(p.anchor_ids, (0, k - p.anchor_ids.shape[1]), value=-1) for p in parts])
        episodes = [e for p in parts for e in (getattr(p, "episodes", None) or [])]
        return EpisodeBatch._wrap(base, turn_ids=turn_ids, anchor_ids=anchor_ids,
                                  episodes=episodes if len(episodes) == len(base) else [])


def episode_metrics(batch: EpisodeBatch) -> dict[str, float]:
    """Means over the batch's episodes: success rate, return, turns, tool calls and errors, tokens, and the
    fraction of each way an episode ended (``episodes/end/<reason>``)."""
    eps = batch.episodes
    if not eps:
        return {}
    n = len(eps)
    out = {
        "episodes/success_rate": sum(e.success for e in eps) / n,
        "episodes/return_mean": sum(e.episode_return for e in eps) / n,
        "episodes/turns_mean": sum(e.turns for e in eps) / n,
        "episodes/tool_calls_mean": sum(e.tool_calls for e in eps) / n,
        "episodes/tool_call_frac": sum(e.tool_calls > 0 for e in eps) / n,
        "episodes/tool_errors": float(sum(e.tool_errors for e in eps)),
        "episodes/env_errors": float(sum(e.env_errors for e in eps)),
        "episodes/invalid_actions_mean": sum(e.invalid_actions for e in eps) / n,
        "episodes/truncated_frac": sum(e.truncated for e in eps) / n,
        "episodes/sampled_tokens_mean": sum(e.sampled_tokens for e in eps) / n,
        "episodes/env_tokens_mean": sum(e.env_tokens for e in eps) / n,
    }
    ends = Counter(e.end for e in eps)
    out.update({f"episodes/end/{r}": ends.get(r, 0) / n for r in END_REASONS})
    return out


# --------------------------------------------------------------------------------------------- #
# The runner
# --------------------------------------------------------------------------------------------- #

class _Episode:
    """Mutable state of one running episode."""

    def __init__(self, row: int, group: int, task: EpisodeTask):
        self.row, self.group, self.task = row, group, task
        self.env: Any = None
        self.prompt_ids: list[int] = []
        self.prompt_text = ""
        self.ids: list[int] = []
        self.loss: list[int] = []
        self.logprobs: list[float] = []
        self.entropy: list[float] = []
        self.turn_of: list[int] = []
        self.rewards: dict[int, float] = {}  # completion position -> reward
        self.anchors: list[Any] = []
        self.last_action = ""
        self.finished = False
        self.info = EpisodeInfo()

    def add(self, ids: list[int], sampled: bool, logprobs=None, entropy=None, turn: int = -1) -> None:
        start = len(self.ids)
        self.ids.extend(ids)
        self.loss.extend([1 if sampled else 0] * len(ids))
        self.logprobs.extend(logprobs if logprobs is not None else [0.0] * len(ids))
        self.entropy.extend(entropy if entropy is not None else [0.0] * len(ids))
        self.turn_of.extend([turn if sampled else -1] * len(ids))
        if ids:
            self.info.segments.append(("sampled" if sampled else "env", start, len(self.ids)))
        if sampled:
            self.info.sampled_tokens += len(ids)
        else:
            self.info.env_tokens += len(ids)

    def finish(self, end: str, truncated: bool = False) -> None:
        self.finished = True
        self.info.end, self.info.truncated = end, truncated
        if self.env is not None and hasattr(self.env, "close"):
            try:
                self.env.close()
            except Exception:  # noqa: BLE001 - closing must not fail an episode
                pass


def _state_key(info: dict, obs: list[dict]) -> str:
    if "state_key" in info:
        return repr(info["state_key"])
    return json.dumps(obs, sort_keys=True, default=str)


def _check_step(out: Any) -> tuple[list[dict], float, bool, dict]:
    if not isinstance(out, (tuple, list)) or len(out) != 4:
        raise TypeError(f"step() must return (observation messages, reward, done, info), got {type(out).__name__}")
    obs, reward, done, info = out
    if isinstance(obs, str):
        obs = [{"role": "user", "content": obs}]
    if obs is None:
        obs = []
    if not isinstance(obs, list) or not all(isinstance(m, dict) and "role" in m for m in obs):
        raise TypeError("step() observation must be a list of messages {'role': ..., 'content': ...}")
    reward = float(reward)
    if not math.isfinite(reward):
        raise ValueError(f"step() returned a non-finite reward {reward}")
    return obs, reward, bool(done), dict(info or {})


class EpisodeRunner:
    """Plays episodes of an environment with a generation backend and returns an :class:`EpisodeBatch`.

    ``make_env()`` builds a fresh environment per episode. ``sampling`` gives temperature / top-p / top-k
    (its ``max_new_tokens`` is ignored: ``max_tokens_per_turn`` applies). ``system_prompt`` is put in
    front of the first observation when that has no system message; with tools (an environment that has a
    ``tools`` list of :class:`postrl.envs.tools.Tool`) the schemas go to the chat template's ``tools``, or,
    when the template does not render tools, their description is added to the system message.
    ``success_threshold``: an episode without ``info["success"]`` succeeds when it ended ``done`` with a
    return at least this. ``batch_size`` is passed to ``generate`` (a memory knob).
    """

    def __init__(self, backend: Any, tokenizer: Any, make_env: Callable[[], Any], *, max_turns: int = 8,
                 max_tokens_per_turn: int = 64, max_episode_tokens: int = 1024, max_active: int = 0,
                 sampling: Optional[SamplingParams] = None, system_prompt: Optional[str] = None,
                 success_threshold: float = 1.0, chat_template_kwargs: Optional[dict[str, Any]] = None,
                 batch_size: int = 0, with_entropy: Optional[bool] = None):
        if max_turns < 1 or max_tokens_per_turn < 1 or max_episode_tokens < 1 or max_active < 0:
            raise ValueError("EpisodeRunner: max_turns, max_tokens_per_turn and max_episode_tokens must be >= 1, "
                             "max_active >= 0")
        self.backend, self.tokenizer, self.make_env = backend, tokenizer, make_env
        self.max_turns, self.max_tokens_per_turn = max_turns, max_tokens_per_turn
        self.max_episode_tokens, self.max_active = max_episode_tokens, max_active
        self.sampling = sampling or SamplingParams()
        self.system_prompt, self.success_threshold = system_prompt, success_threshold
        self.render = ChatDelta(tokenizer, chat_template_kwargs)
        self.batch_size = batch_size
        self.with_entropy = getattr(backend, "reports_entropy", True) if with_entropy is None else with_entropy
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.generate_calls: list[int] = []  # episodes decoded together in each generate call of the last run

    # ----- one episode's steps -----------------------------------------------------------------------
    def _start(self, ep: _Episode) -> None:
        try:
            ep.env = self.make_env()
            obs, info = ep.env.reset(sample=ep.task.sample, seed=ep.task.seed)
            obs = [{"role": "user", "content": obs}] if isinstance(obs, str) else list(obs)
            info = dict(info or {})
        except Exception as exc:  # noqa: BLE001 - a broken environment costs its episode, not the step
            ep.info.env_errors += 1
            ep.info.error = f"reset: {type(exc).__name__}: {exc}"[:500]
            ep.prompt_ids, ep.prompt_text = self.render.prompt([{"role": "user", "content": ""}])
            ep.finish("reset_error")
            return
        messages = list(obs)
        tools = [t.schema for t in getattr(ep.env, "tools", None) or []]
        system = self.system_prompt
        if tools and not self.render.template_renders_tools:
            from postrl.envs.tools import format_tool_prompt  # the environments' layer, below this one

            system = ((system + "\n\n") if system else "") + format_tool_prompt(ep.env.tools)
        if system:
            if messages and messages[0].get("role") == "system":
                messages[0] = {**messages[0], "content": system + "\n\n" + str(messages[0].get("content", ""))}
            else:
                messages.insert(0, {"role": "system", "content": system})
        ep.prompt_ids, ep.prompt_text = self.render.prompt(messages, tools or None)
        ep.info.messages = list(messages)
        ep.anchors.append(_state_key(info, obs))

    def _budget(self, ep: _Episode) -> int:
        return min(self.max_tokens_per_turn, self.max_episode_tokens - len(ep.ids))

    def _after_turn(self, ep: _Episode, ids: list[int], logprobs: list[float], entropy: list[float],
                    stopped: bool) -> None:
        """Record a sampled turn, step the environment, append the observation delta (or end the episode)."""
        budget = self._budget(ep)
        cut = len(ids) > budget
        if cut:
            ids, logprobs, entropy = ids[:budget], logprobs[:budget], entropy[:budget]
        turn = ep.info.turns
        ep.add(ids, True, logprobs, entropy, turn)
        action = self.tokenizer.decode(ids, skip_special_tokens=True)
        ep.last_action = action
        ep.info.messages.append({"role": "assistant", "content": action})
        ended_turn = stopped and not cut
        if not ended_turn and len(ep.ids) >= self.max_episode_tokens:
            ep.info.turn_rewards.append(0.0)
            ep.info.turns += 1
            ep.finish("token_budget", truncated=True)
            return
        try:
            obs, reward, done, info = _check_step(ep.env.step(action))
        except Exception as exc:  # noqa: BLE001 - counted, the episode ends, training goes on
            ep.info.env_errors += 1
            ep.info.error = f"step {turn}: {type(exc).__name__}: {exc}"[:500]
            ep.info.turn_rewards.append(0.0)
            ep.info.turns += 1
            ep.finish("env_error")
            return
        ep.info.turns += 1
        ep.info.turn_rewards.append(reward)
        ep.rewards[len(ep.ids) - 1] = ep.rewards.get(len(ep.ids) - 1, 0.0) + reward
        ep.info.tool_calls += int(info.get("tool_calls", 0) or 0)
        ep.info.tool_errors += int(info.get("tool_errors", 0) or 0)
        ep.info.invalid_actions += bool(info.get("invalid", False))
        ep.info.final_info = {k: v for k, v in info.items() if k != "state_key"}
        if obs:
            ep.info.messages.extend(obs)
        if done:
            ep.finish("done")
            return
        if ep.info.turns >= self.max_turns:
            ep.finish("max_turns", truncated=True)
            return
        delta = self.render.delta(obs, ids[-1] if ids else None, ended_turn)
        if len(ep.ids) + len(delta) + 1 > self.max_episode_tokens:
            ep.finish("token_budget", truncated=True)
            return
        ep.add(delta, False)
        ep.anchors.append(_state_key(info, obs))

    # ----- the loop ------------------------------------------------------------------------------------
    def run(self, tasks: Sequence[EpisodeTask], group_size: int, seed: int = 0,
            policy_version: int = 0) -> EpisodeBatch:
        """``group_size`` episodes for every task (rows group-major, ``group_ids`` = task index); generation
        seeded from ``seed`` (one stream per generate call)."""
        if group_size < 1 or not tasks:
            raise ValueError("EpisodeRunner.run needs at least one task and group_size >= 1")
        episodes = [_Episode(g * group_size + j, g, t) for g, t in enumerate(tasks) for j in range(group_size)]
        waiting, active = deque(episodes), []
        self.generate_calls = []
        decode_steps, call = 0, 0
        while waiting or active:
            while waiting and (self.max_active == 0 or len(active) < self.max_active):
                ep = waiting.popleft()
                self._start(ep)
                if not ep.finished:
                    active.append(ep)
            if not active:
                continue
            budgets = [self._budget(ep) for ep in active]
            params = SamplingParams(max(budgets), self.sampling.temperature, self.sampling.top_p, self.sampling.top_k)
            gen = self.backend.generate([ep.prompt_ids + ep.ids for ep in active], params,
                                        seed=(int(seed) * 1_000_003 + call) % 2**62, batch_size=self.batch_size)
            self.generate_calls.append(len(active))
            decode_steps += int(gen.decode_steps)
            call += 1
            lengths = gen.completion_mask.sum(-1).tolist()
            for r, ep in enumerate(active):
                n = int(lengths[r])
                self._after_turn(ep, gen.completion_ids[r, :n].tolist(), gen.logprobs[r, :n].tolist(),
                                 gen.entropy[r, :n].tolist(), stopped=not bool(gen.truncated[r]))
            active = [ep for ep in active if not ep.finished]
        return self._batch(episodes, group_size, policy_version, decode_steps)

    def _batch(self, episodes: list[_Episode], group_size: int, policy_version: int,
               decode_steps: int) -> EpisodeBatch:
        B = len(episodes)
        T = max(1, max(len(ep.ids) for ep in episodes))
        K = max(1, max(ep.info.turns for ep in episodes))
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        attn = torch.zeros((B, T), dtype=torch.long)
        loss = torch.zeros((B, T), dtype=torch.float32)
        lps = torch.zeros((B, T), dtype=torch.float32)
        ent = torch.zeros((B, T), dtype=torch.float32)
        turn_ids = torch.full((B, T), -1, dtype=torch.long)
        step_rewards = torch.zeros((B, T), dtype=torch.float32)
        anchor_ids = torch.full((B, K), -1, dtype=torch.long)
        rewards = torch.zeros(B, dtype=torch.float64)
        anchor_index: dict[tuple[int, str], int] = {}
        for i, ep in enumerate(episodes):
            n = len(ep.ids)
            if n:
                ids[i, :n] = torch.tensor(ep.ids, dtype=torch.long)
                attn[i, :n] = 1
                loss[i, :n] = torch.tensor(ep.loss, dtype=torch.float32)
                lps[i, :n] = torch.tensor(ep.logprobs, dtype=torch.float32)
                ent[i, :n] = torch.tensor(ep.entropy, dtype=torch.float32)
                turn_ids[i, :n] = torch.tensor(ep.turn_of, dtype=torch.long)
            for pos, r in ep.rewards.items():
                step_rewards[i, pos] += r
            sampled = [p for p in range(n) if ep.loss[p]]
            if sampled:  # the reward on the last sampled token is the row's reward, the rest token rewards
                rewards[i] = float(step_rewards[i, sampled[-1]])
                step_rewards[i, sampled[-1]] = 0.0
            for k, key in enumerate(ep.anchors[:ep.info.turns]):
                anchor_ids[i, k] = anchor_index.setdefault((ep.group, key), len(anchor_index))
            info = ep.info
            info.episode_return = float(sum(info.turn_rewards))
            if "success" in info.final_info and info.end == "done":
                info.success = bool(info.final_info["success"])
            else:
                info.success = info.end == "done" and info.episode_return >= self.success_threshold
        with_ent = self.with_entropy
        batch = EpisodeBatch(
            samples=[ep.task.sample if ep.task.sample is not None else ep.task for ep in episodes],
            prompt_ids=[ep.prompt_ids for ep in episodes],
            prompt_texts=[ep.prompt_text for ep in episodes],
            completion_ids=ids, attention_mask=attn, loss_mask=loss, behaviour_logprobs=lps,
            entropy=ent if with_ent else None,
            truncated=torch.tensor([ep.info.truncated for ep in episodes], dtype=torch.bool),
            group_ids=torch.arange(B) // group_size,
            policy_version=torch.full((B,), int(policy_version), dtype=torch.long),
            texts=[ep.last_action for ep in episodes], rewards=rewards, token_rewards=step_rewards,
            correct=[ep.info.success for ep in episodes], decode_steps=decode_steps,
            turn_ids=turn_ids, anchor_ids=anchor_ids, episodes=[ep.info for ep in episodes],
        )
        return batch


def runner_from_config(env_cfg: Any, rollout_cfg: Any, backend: Any, tokenizer: Any, *,
                       system_prompt: Optional[str] = None,
                       chat_template_kwargs: Optional[dict[str, Any]] = None) -> EpisodeRunner:
    """The runner of a config: the environment (and tools) of ``env_cfg`` (an ``EnvConfig``, built here so a bad
    name fails now), sampling from ``rollout_cfg`` (``temperature``, ``top_p``, ``top_k``, ``batch_size``;
    ``max_new_tokens`` is the per-turn limit unless ``env.max_tokens_per_turn`` is set)."""
    from postrl.envs import env_factory  # the environments' layer, below this one

    r = rollout_cfg
    return EpisodeRunner(
        backend, tokenizer, env_factory(env_cfg), max_turns=env_cfg.max_turns,
        max_tokens_per_turn=env_cfg.max_tokens_per_turn or r.max_new_tokens,
        max_episode_tokens=env_cfg.max_episode_tokens, max_active=env_cfg.max_active,
        sampling=SamplingParams(r.max_new_tokens, r.temperature, r.top_p, r.top_k), system_prompt=system_prompt,
        success_threshold=env_cfg.success_threshold, chat_template_kwargs=chat_template_kwargs,
        batch_size=r.batch_size)
