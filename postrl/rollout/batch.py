"""The rollout batch: what a trainer sees of one step's sampled and scored completions.

One row per completion. With B rows and T the longest completion (in tokens):

    per row         samples, prompt_ids, prompt_texts, texts, correct      lists of B
                    components[name], failed[name], baseline_rewards         lists of B
                    truncated [B] bool, group_ids [B] long, policy_version [B] long, rewards [B] float
    per token       completion_ids [B, T] long       sampled (or environment) token ids, ``pad_id`` after the end
                    attention_mask [B, T] long       1 = a real completion token (sampled, or inserted by an env)
                    loss_mask      [B, T] float      1 = sampled by the policy and trained on (a subset of the above)
                    behaviour_logprobs [B, T] float  the sampler's log-prob of each token (0 at padding)
                    entropy        [B, T] float      the sampler's entropy per position, None when not reported
                    token_rewards  [B, T] float      per-token rewards (e.g. an environment's), None when none
    per batch       reward_errors, reward_statuses   Counters over everything sampled (also rows dropped later)
                    sampling_tries, groups_dropped, decode_steps

A fresh batch holds ``group_size`` completions per prompt, group-major: row ``g * group_size + j`` is
completion ``j`` of group ``g`` (``group_ids[row] == g``). :meth:`RolloutBatch.select` and
:meth:`RolloutBatch.concat` keep that layout when they take whole groups.

The token ids are exactly the sampled ones (nothing is re-tokenized); stages add fields (rewards,
components) to the batch, they do not rebuild it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F

from postrl.rollout.generator import Generation

_ROW_LISTS = ("samples", "prompt_ids", "prompt_texts", "texts", "correct")  # always lists of B
_ROW_TENSORS = ("truncated", "group_ids", "policy_version", "rewards")  # [B]
_TOKEN_TENSORS = ("completion_ids", "attention_mask", "loss_mask", "behaviour_logprobs")  # [B, T]
_OPTIONAL_TOKEN_TENSORS = ("entropy", "token_rewards")  # [B, T] or None
_DTYPES = {"completion_ids": "long", "attention_mask": "long", "group_ids": "long", "policy_version": "long",
           "truncated": "bool", "loss_mask": "float", "behaviour_logprobs": "float", "entropy": "float",
           "token_rewards": "float", "rewards": "float"}
_PAD_VALUES = {"attention_mask": 0, "loss_mask": 0.0, "behaviour_logprobs": 0.0, "entropy": 0.0,
               "token_rewards": 0.0}  # completion_ids: pad_id


def _dtype_ok(t: torch.Tensor, kind: str) -> bool:
    if kind == "float":
        return t.is_floating_point()
    return t.dtype == (torch.long if kind == "long" else torch.bool)


def _renumber(group_ids: torch.Tensor) -> torch.Tensor:
    """Group ids ``[B]`` renumbered 0, 1, ... in order of first appearance: ``[3, 3, 7, 7] -> [0, 0, 1, 1]``."""
    index: dict[int, int] = {}
    return torch.tensor([index.setdefault(g, len(index)) for g in group_ids.tolist()], dtype=torch.long)


@dataclass
class RolloutBatch:
    """B sampled completions with everything the update and the logs need (see the module docstring for
    the shape of every field). Checked on construction (:meth:`validate`); call :meth:`validate` again
    after replacing fields."""

    # ----- per row ---------------------------------------------------------------------------------------
    samples: list[Any]
    prompt_ids: list[list[int]]
    prompt_texts: list[str]
    completion_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long
    loss_mask: torch.Tensor  # [B, T] float
    behaviour_logprobs: torch.Tensor  # [B, T] float
    entropy: Optional[torch.Tensor]  # [B, T] float, or None
    truncated: torch.Tensor  # [B] bool
    group_ids: torch.Tensor  # [B] long
    policy_version: torch.Tensor  # [B] long
    texts: list[str]
    rewards: torch.Tensor  # [B] float: the total reward of each completion (float64: as the rewards returned it)
    token_rewards: Optional[torch.Tensor] = None  # [B, T] float, or None
    components: dict[str, list[float]] = field(default_factory=dict)  # reward name -> B values
    failed: dict[str, list[bool]] = field(default_factory=dict)  # reward name -> B flags (scoring failed)
    correct: list[bool] = field(default_factory=list)
    baseline_rewards: Optional[list[float]] = None  # ReMax: the reward of the prompt's greedy completion
    # ----- per batch -------------------------------------------------------------------------------------
    reward_errors: Counter = field(default_factory=Counter)  # (reward name, error kind) -> count
    reward_statuses: Counter = field(default_factory=Counter)  # (reward name, status) -> count
    sampling_tries: int = 1  # rollout batches sampled for this one (dynamic sampling draws more)
    groups_dropped: int = 0  # groups sampled but not kept (dynamic sampling)
    decode_steps: int = 0  # forward passes of the sampler

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when a per-row field does not have B entries, a ``[B, T]``
        tensor has another shape than ``completion_ids``, a tensor has the wrong dtype, or the loss mask
        marks a position that the attention mask does not."""
        if self.completion_ids.dim() != 2:
            raise ValueError(f"RolloutBatch.completion_ids must be [B, T], got shape "
                             f"{list(self.completion_ids.shape)}")
        B, T = self.completion_ids.shape
        rows = {name: getattr(self, name) for name in _ROW_LISTS}
        rows.update({f"components[{k!r}]": v for k, v in self.components.items()})
        rows.update({f"failed[{k!r}]": v for k, v in self.failed.items()})
        if self.baseline_rewards is not None:
            rows["baseline_rewards"] = self.baseline_rewards
        for name, values in rows.items():
            if len(values) != B:
                raise ValueError(f"RolloutBatch.{name} has {len(values)} entries, expected B={B} (one per row)")
        shapes = {name: (B,) for name in _ROW_TENSORS}
        shapes.update({name: (B, T) for name in _TOKEN_TENSORS + _OPTIONAL_TOKEN_TENSORS})
        for name, shape in shapes.items():
            t = getattr(self, name)
            if t is None and name in _OPTIONAL_TOKEN_TENSORS:
                continue
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"RolloutBatch.{name} must be a tensor of shape {list(shape)}, got {type(t).__name__}")
            if tuple(t.shape) != shape:
                raise ValueError(f"RolloutBatch.{name} has shape {list(t.shape)}, expected {list(shape)} "
                                 f"(B={B} rows, T={T} tokens)")
            if not _dtype_ok(t, _DTYPES[name]):
                raise ValueError(f"RolloutBatch.{name} must be a {_DTYPES[name]} tensor, got {t.dtype}")
        if bool(((self.loss_mask != 0) & (self.attention_mask == 0)).any()):
            raise ValueError("RolloutBatch.loss_mask marks positions where attention_mask is 0 (padding); "
                             "only real completion tokens can be trained on")

    # ----- construction ----------------------------------------------------------------------------------
    @classmethod
    def from_generation(cls, gen: Generation, samples: list[Any], prompt_texts: list[str], texts: list[str],
                        group_size: int, policy_version: int, with_entropy: bool = True) -> "RolloutBatch":
        """A batch of the completions in ``gen`` (B rows, ``group_size`` consecutive rows per prompt),
        before scoring: every sampled token is attended to and trained on (``loss_mask`` = the generation's
        mask), rewards are 0, ``correct`` is False, no components. ``samples``, ``prompt_texts`` and
        ``texts`` (the decoded completions) have one entry per row. ``with_entropy=False`` (a backend with
        ``reports_entropy`` False) leaves ``entropy`` None instead of the generation's zeros."""
        B = gen.completion_ids.shape[0]
        if group_size < 1 or B % group_size:
            raise ValueError(f"RolloutBatch.from_generation: {B} rows are not groups of group_size={group_size}")
        return cls(
            samples=list(samples), prompt_ids=[list(p) for p in gen.prompt_ids], prompt_texts=list(prompt_texts),
            completion_ids=gen.completion_ids, attention_mask=gen.completion_mask,
            loss_mask=gen.completion_mask.float(), behaviour_logprobs=gen.logprobs,
            entropy=gen.entropy if with_entropy else None, truncated=gen.truncated.bool(),
            group_ids=torch.arange(B) // group_size, policy_version=torch.full((B,), int(policy_version)),
            texts=list(texts), rewards=torch.zeros(B, dtype=torch.float64), correct=[False] * B,
            decode_steps=gen.decode_steps,
        )

    # ----- shape ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        """Completion tokens per row, ``[B]`` long (from ``attention_mask``)."""
        return self.attention_mask.sum(-1)

    @property
    def group_size(self) -> int:
        """Rows per group (every group has the same number; ``ValueError`` otherwise); 0 for an empty batch."""
        sizes = Counter(self.group_ids.tolist())
        if not sizes:
            return 0
        if len(set(sizes.values())) > 1:
            raise ValueError(f"RolloutBatch: groups of different sizes {sorted(set(sizes.values()))}")
        return len(self) // len(sizes)

    # ----- rows ----------------------------------------------------------------------------------------
    def select(self, rows: list[int]) -> "RolloutBatch":
        """The given rows of every per-row field (same width T; group ids renumbered 0, 1, ... in order of
        first appearance, so selecting whole groups keeps row ``g * n + j`` in group ``g``). The batch
        counters are kept: they count everything that was sampled, including the rows left out."""
        idx = torch.as_tensor(rows, dtype=torch.long)

        def pick(values):
            return None if values is None else [values[i] for i in rows]

        return RolloutBatch(
            samples=pick(self.samples), prompt_ids=pick(self.prompt_ids), prompt_texts=pick(self.prompt_texts),
            completion_ids=self.completion_ids[idx], attention_mask=self.attention_mask[idx],
            loss_mask=self.loss_mask[idx], behaviour_logprobs=self.behaviour_logprobs[idx],
            entropy=None if self.entropy is None else self.entropy[idx], truncated=self.truncated[idx],
            group_ids=_renumber(self.group_ids[idx]), policy_version=self.policy_version[idx],
            texts=pick(self.texts), rewards=self.rewards[idx],
            token_rewards=None if self.token_rewards is None else self.token_rewards[idx],
            components={k: pick(v) for k, v in self.components.items()},
            failed={k: pick(v) for k, v in self.failed.items()}, correct=pick(self.correct),
            baseline_rewards=pick(self.baseline_rewards), reward_errors=Counter(self.reward_errors),
            reward_statuses=Counter(self.reward_statuses), sampling_tries=self.sampling_tries,
            groups_dropped=self.groups_dropped, decode_steps=self.decode_steps,
        )

    @staticmethod
    def concat(parts: list["RolloutBatch"], pad_id: int) -> "RolloutBatch":
        """Stack batches row-wise. ``[B, T]`` tensors are right-padded to the widest part (``completion_ids``
        with ``pad_id``, masks, log-probs, entropy and token rewards with 0); groups stay distinct (each
        part's group ids follow the previous part's); the batch counters are summed. ``entropy`` /
        ``token_rewards`` are None unless every part has them. Parts must have the same reward names
        (``components``, ``failed``) and all or none ``baseline_rewards``."""
        if not parts:
            raise ValueError("RolloutBatch.concat needs at least one batch")
        first = parts[0]
        for p in parts[1:]:
            for name in ("components", "failed"):
                if set(getattr(p, name)) != set(getattr(first, name)):
                    raise ValueError(f"RolloutBatch.concat: the parts have different {name} "
                                     f"({sorted(getattr(first, name))} vs {sorted(getattr(p, name))})")
            if (p.baseline_rewards is None) != (first.baseline_rewards is None):
                raise ValueError("RolloutBatch.concat: some parts have baseline_rewards and some do not")
        width = max(p.completion_ids.shape[1] for p in parts)

        def cat_tokens(name: str) -> Optional[torch.Tensor]:
            tensors = [getattr(p, name) for p in parts]
            if any(t is None for t in tensors):
                return None
            fill = pad_id if name == "completion_ids" else _PAD_VALUES[name]
            return torch.cat([F.pad(t, (0, width - t.shape[1]), value=fill) for t in tensors])

        def cat_rows(values: list[Optional[list]]) -> Optional[list]:
            return None if values[0] is None else [x for v in values for x in v]

        group_ids, offset = [], 0
        for p in parts:
            group_ids.append(p.group_ids + offset)
            offset += int(p.group_ids.max()) + 1 if len(p) else 0
        return RolloutBatch(
            samples=cat_rows([p.samples for p in parts]), prompt_ids=cat_rows([p.prompt_ids for p in parts]),
            prompt_texts=cat_rows([p.prompt_texts for p in parts]), completion_ids=cat_tokens("completion_ids"),
            attention_mask=cat_tokens("attention_mask"), loss_mask=cat_tokens("loss_mask"),
            behaviour_logprobs=cat_tokens("behaviour_logprobs"), entropy=cat_tokens("entropy"),
            truncated=torch.cat([p.truncated for p in parts]), group_ids=_renumber(torch.cat(group_ids)),
            policy_version=torch.cat([p.policy_version for p in parts]), texts=cat_rows([p.texts for p in parts]),
            rewards=torch.cat([p.rewards for p in parts]), token_rewards=cat_tokens("token_rewards"),
            components={k: cat_rows([p.components[k] for p in parts]) for k in first.components},
            failed={k: cat_rows([p.failed[k] for p in parts]) for k in first.failed},
            correct=cat_rows([p.correct for p in parts]),
            baseline_rewards=cat_rows([p.baseline_rewards for p in parts]),
            reward_errors=sum((Counter(p.reward_errors) for p in parts), Counter()),
            reward_statuses=sum((Counter(p.reward_statuses) for p in parts), Counter()),
            sampling_tries=sum(p.sampling_tries for p in parts), groups_dropped=sum(p.groups_dropped for p in parts),
            decode_steps=sum(p.decode_steps for p in parts),
        )
