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

    prompts:        the rendered prompt text of each completion (chat template applied).
    completions:    the decoded completion text.
    completion_ids: the completion token ids exactly as sampled (no re-tokenization).
    samples:        the :class:`postrl.data.Sample` of each completion: ``answer`` is the
                    ground truth; ``metadata`` carries task-specific fields (test cases,
                    database path, references, ...).
    """

    prompts: list[str]
    completions: list[str]
    completion_ids: list[list[int]]
    samples: list[Any]

    def __post_init__(self) -> None:
        n = len(self.completions)
        for name in ("prompts", "completion_ids", "samples"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"RewardBatch: {name} has {len(getattr(self, name))} entries, "
                                 f"completions has {n}; they must be equal")

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
    """A registered reward: the callable and how the pipeline should call it."""

    name: str
    fn: Callable[..., Any]
    batched: bool = False
    parallel: bool = False

    @property
    def is_class(self) -> bool:
        return isinstance(self.fn, type)


RewardValue = "float | Scored | None"
BatchedFn = Callable[..., Sequence[Any]]
