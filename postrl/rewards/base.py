"""The reward protocol: what a reward receives, what it returns, and how it is registered.

Three shapes of reward, all registered by name with :func:`register_reward` (or named in
a config as ``package.module:function``):

* **per-completion** (the default): ``fn(completion: str, sample: Sample, **kwargs) -> float | Scored``.
  The pipeline calls it once per completion; an exception or a non-finite value gives only
  that completion the failure score. With ``parallel=True`` the calls run in a process pool,
  each with a wall-clock timeout (for slow verifiers; the function must be picklable, i.e.
  defined at module level).
* **batched function** (``batched=True``): ``fn(batch: RewardBatch, **kwargs) -> Sequence[float | Scored | None]``,
  one entry per completion; ``None`` (or a non-finite value) marks that completion failed.
  An exception fails the whole batch for this reward (the other rewards still count).
* **batched class** (``batched=True`` on a class): constructed once per run as
  ``cls(context=RewardContext, **kwargs)``, then called as ``obj(batch)`` like a batched
  function. For rewards with state: reward models, judges, database connections.
* **TRL-style function** (a plain callable passed from Python, see :func:`postrl.rewards.reward_entry`):
  ``fn(prompts, completions, **kwargs) -> list[float | None]``, called once per batch with keyword
  arguments only: ``prompts``, ``completions``, ``completion_ids``, ``prompt_ids``, ``answer``,
  ``question`` and one list per ``Sample.metadata`` key (the dataset's other columns), plus the
  reward's ``kwargs``. ``None`` or a non-finite entry marks that completion failed, as for batched
  functions.

``Scored(score, info)`` lets a reward say *why*: ``info["status"]`` (a short string such as
``"compile_error"`` or ``"timeout"``) is counted per reward in the training log.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class Scored:
    """A reward value with optional per-sample details for logging.

    score: the reward (finite float).
    info:  free-form details; a string under ``"status"`` is counted per reward
           (e.g. ``{"status": "timeout"}``), other keys may be written to sample logs.
    """

    score: float
    info: dict = field(default_factory=dict)


@dataclass
class RewardBatch:
    """The completions of one rollout batch, with everything a reward may need.

    prompts:        the rendered prompt text of each completion (chat template applied), always
                    ``str``: token ids go to ``prompt_ids``.
    completions:    the decoded completion text.
    completion_ids: the completion token ids exactly as sampled (no re-tokenization).
    samples:        the :class:`postrl.data.Sample` of each completion: ``answer`` is the
                    ground truth; ``metadata`` carries task-specific fields (test cases,
                    database path, references, ...).
    prompt_ids:     the prompt token ids the policy was given (None when the caller has none).

    A prompt that is not a ``str`` (e.g. a list of token ids) raises :class:`TypeError`: a reward
    such as a reward model's ``"{prompt}{completion}"`` template would otherwise score the text of
    a Python list.
    """

    prompts: list[str]
    completions: list[str]
    completion_ids: list[list[int]]
    samples: list[Any]
    prompt_ids: Optional[list[list[int]]] = None

    def __post_init__(self) -> None:
        n = len(self.completions)
        for name in ("prompts", "completion_ids", "samples", "prompt_ids"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"RewardBatch: {name} has {len(value)} entries, "
                                 f"completions has {n}; they must be equal")
        for i, prompt in enumerate(self.prompts):
            if not isinstance(prompt, str):
                raise TypeError(
                    f"RewardBatch: prompts[{i}] is a {type(prompt).__name__} ({_short(prompt)}), not str; pass "
                    "the prompt text as prompts= and its token ids as prompt_ids=")

    def __len__(self) -> int:
        return len(self.completions)


@dataclass
class RewardContext:
    """What a batched reward class may use from the run.

    source:    the prompt source (its ``score`` is the task's own verifier).
    tokenizer: the policy's tokenizer (may be None outside training).
    device:    the trainer's device (``torch.device``); reward models run there.
    generate:  optional ``fn(prompts: list[str], max_new_tokens: int) -> list[str]`` that
               samples greedily from a local model (used by local judges).
    """

    source: Any = None
    tokenizer: Any = None
    device: Any = "cpu"
    generate: Optional[Callable[[list[str], int], list[str]]] = None


@dataclass
class RewardEntry:
    """A registered reward: the callable and how the pipeline should call it.

    batched:   called once per batch (``fn(batch, **kwargs)``, or ``obj(batch)`` for a class).
    parallel:  a per-completion function run in the process pool.
    trl_style: a batched function called TRL's way, ``fn(prompts=..., completions=..., **columns)``
               (see :func:`postrl.rewards.trl_arguments`); ``batched`` is then True as well.
    """

    name: str
    fn: Callable[..., Any]
    batched: bool = False
    parallel: bool = False
    trl_style: bool = False

    @property
    def is_class(self) -> bool:
        return isinstance(self.fn, type)


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


RewardValue = "float | Scored | None"
BatchedFn = Callable[..., Sequence[Any]]
