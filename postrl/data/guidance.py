"""Guidance for prompts the model cannot solve yet (``data.guidance: {name: ..., ...}``).

GRPO learns nothing from a group whose completions all fail. Three published answers, each using a
reference solution (a field of the data, or ``field: answer`` for the ground-truth answer itself):

| name | paper | what changes | what is trained |
| --- | --- | --- | --- |
| ``prefix_hint`` | QuestA, Li et al. 2025 (arXiv 2507.13266) | the first ``share`` of the reference solution is appended to the question (``template``); the share decays linearly from ``start`` to ``end`` over ``decay_steps`` | the hinted prompts, as ordinary rollouts |
| ``guide`` | Guide-GRPO, Nath et al. 2025 (arXiv 2506.13923) | a group whose completions are all wrong gets ``guided`` of its completions regenerated with a hint (the first ``share`` of the reference) in the prompt | the guided completions as if sampled from the prompt without the hint: the update's ratio is π_θ(o \\| q) / π_old(o \\| q, hint) |
| ``luffy`` | LUFFY, Yan et al. 2025 (arXiv 2504.14945) | ``traces`` of each group's ``rollout.n`` completions are the reference solution (an off-policy teacher trace) or, with ``teacher``, completions sampled from a teacher model (right ones first); the rest are sampled | one group advantage over on- and off-policy completions together (mixed-policy GRPO, eq. 4); on teacher tokens the clipped ratio is replaced by the shaped probability f(π_θ) = π_θ / (π_θ + γ) (eq. 6, the teacher's probability taken as 1, no clipping) |

The held-out evaluation never sees a hint. A training set where some sample has no reference (an empty or
missing ``field``) is refused when the trainer starts (:meth:`Guidance.check`), naming the field.

The hinted and teacher rows carry ``metadata["hint"]`` / ``metadata["teacher"]``: prompt samplers leave them
out of their statistics (:func:`postrl.data.samplers.is_guided`).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from typing import Any, Callable, Sequence

from .base import DataError, Sample, check_keyword_args

GUIDANCE: dict[str, type] = {}
HINT_UNITS = ("char", "word", "line")


def register_guidance(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        cls.name = name
        GUIDANCE[name] = cls
        return cls
    return deco


def reference_text(sample: Any, field: str) -> str:
    """The reference solution of a sample: ``sample.answer`` for ``field == "answer"``, else
    ``sample.metadata[field]`` (as text; "" when absent)."""
    if field == "answer":
        return str(getattr(sample, "answer", "") or "")
    value = (getattr(sample, "metadata", None) or {}).get(field)
    return "" if value is None else str(value)


def check_reference(samples: Sequence[Any], field: str, method: str) -> None:
    """Raise :class:`DataError` naming ``field`` when a sample has no reference solution."""
    missing = [s for s in samples if not reference_text(s, field).strip()]
    if missing:
        first = getattr(missing[0], "uid", "?")
        raise DataError(
            f"data.guidance {method} needs the reference field {field!r} in every training sample, but "
            f"{len(missing)} of {len(samples)} have none (first: {first!r}). Add a {field!r} field to the data "
            f"(JSONL: a {field!r} key next to prompt/answer), point data.guidance.field at the field that holds "
            "the solution, or use field: answer to hint with the ground-truth answer.")


def hint_prefix(reference: str, share: float, unit: str = "char") -> str:
    """The first ``floor(share * L)`` units of ``reference`` (L = its number of characters, words or lines),
    right-stripped; "" for share 0."""
    if unit == "char":
        pieces = list(reference)
    elif unit == "word":
        pieces = re.findall(r"\s*\S+", reference)
    elif unit == "line":
        pieces = reference.splitlines(keepends=True)
    else:
        raise ValueError(f"unknown hint unit {unit!r}; valid: {', '.join(HINT_UNITS)}")
    m = int(math.floor(max(0.0, min(1.0, share)) * len(pieces) + 1e-9))
    return "".join(pieces[:m]).strip()


def linear_share(step: int, start: float, end: float, decay_steps: int) -> float:
    """QuestA's decaying hint share at a step: ``start + (end - start) * min(step / decay_steps, 1)``
    (``decay_steps`` 0: always ``start``)."""
    if decay_steps <= 0:
        return float(start)
    return float(start + (end - start) * min(step / decay_steps, 1.0))


def hinted_sample(sample: Sample, hint: str, template: str) -> Sample:
    """A copy of ``sample`` whose question carries the hint (``template`` with ``{question}`` and ``{hint}``);
    its uid is new (prompts are rendered and cached by uid), the original's uid is ``metadata["orig_uid"]``."""
    meta = {**sample.metadata, "hint": hint, "orig_uid": sample.metadata.get("orig_uid", sample.uid)}
    return dataclasses.replace(sample, question=template.format(question=sample.question, hint=hint),
                               metadata=meta, uid=f"{sample.uid}#hint:{len(hint)}")


def teacher_sample(sample: Sample) -> Sample:
    """A copy of ``sample`` marking the rows of its teacher traces (``metadata["teacher"]``)."""
    meta = {**sample.metadata, "teacher": True, "orig_uid": sample.metadata.get("orig_uid", sample.uid)}
    return dataclasses.replace(sample, metadata=meta, uid=f"{sample.uid}#teacher")


def pick_teacher_traces(correct: Sequence[bool], candidates: int, traces: int) -> list[int]:
    """Which teacher candidates become traces: ``correct`` holds ``candidates`` entries per prompt, group-major;
    for each prompt the ``traces`` kept are its right candidates in sampled order, then (when fewer are right)
    its wrong ones in sampled order. Returns row indices into ``correct``, group-major."""
    if candidates < traces or len(correct) % candidates:
        raise ValueError(f"pick_teacher_traces: {len(correct)} candidates in groups of {candidates}, {traces} kept")
    rows = []
    for g in range(0, len(correct), candidates):
        group = range(g, g + candidates)
        rows += ([i for i in group if correct[i]] + [i for i in group if not correct[i]])[:traces]
    return rows


def luffy_shaped_loss(logprobs, advantages, gamma: float):
    """LUFFY's per-token loss on off-policy tokens (eq. 6 with the teacher probability 1):
    ``-f(π_θ) · A`` with ``f(p) = p / (p + γ)``, ``p = exp(logprobs)``; its gradient is
    ``-A · γ p / (p + γ)^2 · ∇log p``, which keeps low-probability teacher tokens learning (a plain ratio
    would weight them by p). ``[B, T]`` tensors in, ``[B, T]`` out."""
    import torch

    p = torch.exp(logprobs)
    return -(p / (p + gamma)) * advantages


def _check(ok: bool, key: str, value: Any, requirement: str) -> None:
    if not ok:
        raise DataError(f"data.guidance.kwargs.{key}={value!r}: {requirement}")


class Guidance:
    """No guidance: ``prepare`` returns the prompts unchanged."""

    name = "none"
    field = ""
    counters: tuple[str, ...] = ()

    def __init__(self, source: Any, seed: int = 0, group_size: int = 1, total_steps: int = 1):
        self.seed, self.group_size, self.total_steps = int(seed), int(group_size), int(total_steps)
        self._step: dict[str, float] = {}

    def check(self, samples: Sequence[Any]) -> None:
        if self.field:
            check_reference(samples, self.field, self.name)

    def prepare(self, samples: list[Any], step: int) -> list[Any]:
        return samples

    def metrics(self) -> dict[str, float]:
        out, self._step = self._step, {}
        for key in self.counters:
            out.setdefault(key, 0.0)
        return out

    def count(self, key: str, value: float = 1.0) -> None:
        self._step[key] = self._step.get(key, 0.0) + value


register_guidance("none")(Guidance)


class _Hints(Guidance):
    def __init__(self, source, seed, group_size, total_steps, field: str, template: str, unit: str):
        super().__init__(source, seed, group_size, total_steps)
        _check(isinstance(field, str) and bool(field), "field", field, "must name a data field (or 'answer')")
        _check(unit in HINT_UNITS, "unit", unit, f"must be one of {', '.join(HINT_UNITS)}")
        try:
            template.format(question="q", hint="h")
            ok = "{hint}" in template and "{question}" in template
        except (KeyError, IndexError, ValueError):
            ok = False
        _check(ok, "template", template, "must contain {question} and {hint} and no other placeholder")
        self.field, self.template, self.unit = field, template, unit

    def hinted(self, sample: Sample, share: float) -> Sample | None:
        """The hinted copy of ``sample`` at ``share``, or None when the hint is empty."""
        hint = hint_prefix(reference_text(sample, self.field), share, self.unit)
        return hinted_sample(sample, hint, self.template) if hint else None


@register_guidance("prefix_hint")
class PrefixHint(_Hints):
    """QuestA (Li et al. 2025, arXiv 2507.13266): question augmentation with a partial solution. At step t
    each training prompt (with probability ``prob``, drawn per step and prompt) becomes
    ``template.format(question=q, hint=first share(t) of the reference)`` with
    ``share(t) = start + (end - start) * min(t / decay_steps, 1)`` (``decay_steps`` 0 = ``train.steps``, so
    a run resumed with a larger ``train.steps`` continues on the longer schedule; set it to keep it fixed);
    rollouts, rewards and the update then treat it as an ordinary prompt. The paper trains with 50% then
    25% partial solutions on hard problems."""

    def __init__(self, source: Any, seed: int = 0, group_size: int = 1, total_steps: int = 1,
                 field: str = "solution", start: float = 0.5, end: float = 0.0, decay_steps: int = 0,
                 prob: float = 1.0, unit: str = "char", template: str = "{question}\npartial solution: {hint}"):
        super().__init__(source, seed, group_size, total_steps, field, template, unit)
        _check(0 <= start <= 1, "start", start, "must be in [0, 1]")
        _check(0 <= end <= 1, "end", end, "must be in [0, 1]")
        _check(isinstance(decay_steps, int) and decay_steps >= 0, "decay_steps", decay_steps,
               "must be an int >= 0 (0 = train.steps)")
        _check(0 <= prob <= 1, "prob", prob, "must be in [0, 1]")
        self.start, self.end, self.prob = float(start), float(end), float(prob)
        self.decay_steps = decay_steps or self.total_steps

    def share(self, step: int) -> float:
        return linear_share(step, self.start, self.end, self.decay_steps)

    def prepare(self, samples: list[Any], step: int) -> list[Any]:
        import numpy as np

        share = self.share(step)
        rng = np.random.default_rng([self.seed % 2**32, 7, step])
        coins = rng.random(len(samples))
        out = []
        for s, coin in zip(samples, coins):
            h = self.hinted(s, share) if coin < self.prob else None
            out.append(h if h is not None else s)
        hinted = sum(o is not s for o, s in zip(out, samples))
        self._step["guidance/hint_share"] = share
        self._step["guidance/hinted_frac"] = hinted / max(len(samples), 1)
        return out


@register_guidance("guide")
class GuideHints(_Hints):
    """Guide-GRPO (Nath et al. 2025, "Adaptive Guidance Accelerates Reinforcement Learning of Reasoning
    Models", arXiv 2506.13923): when every completion of a group is wrong, ``guided`` of its completions are
    replaced by completions sampled with the hint (the first ``share`` of the reference solution) in the
    prompt. They are trained on the prompt *without* the hint: the rollout keeps the hinted sampler's
    log-probs as behaviour log-probs, so the policy ratio is π_θ(o | q) / π_old(o | q, hint), the paper's
    off-policy correction, with the same clipping. The other ``rollout.n - guided`` (failed) completions
    stay, so a guided success has failures to be compared with (``guided`` 0 = ``rollout.n // 2``)."""

    counters = ("guidance/failed_groups",)

    def __init__(self, source: Any, seed: int = 0, group_size: int = 2, total_steps: int = 1,
                 field: str = "solution", share: float = 0.5, guided: int = 0, unit: str = "char",
                 template: str = "{question}\npartial solution: {hint}"):
        super().__init__(source, seed, group_size, total_steps, field, template, unit)
        _check(0 < share <= 1, "share", share, "must be in (0, 1]")
        guided = guided or max(1, group_size // 2)
        _check(isinstance(guided, int) and 1 <= guided <= group_size, "guided", guided,
               f"must be an int in [1, rollout.n={group_size}] (0 = rollout.n // 2)")
        self.share, self.guided = float(share), int(guided)


@register_guidance("luffy")
class TeacherTraces(Guidance):
    """LUFFY (Yan et al. 2025, "Learning to Reason under Off-Policy Guidance", arXiv 2504.14945):
    ``traces`` of every group's ``rollout.n`` completions are the reference solution (tokenized once, with
    the end-of-sequence token), the others are sampled. The group advantage is taken over all ``rollout.n``
    rewards (mixed-policy GRPO). On teacher tokens the policy loss is :func:`luffy_shaped_loss` with
    ``gamma`` (the paper's γ = 0.1) instead of the clipped ratio.

    With ``teacher`` (a model id or path with the policy's tokenizer) the traces are sampled from that model
    instead of read from the data: ``teacher_samples`` candidates per prompt at ``teacher_temperature``, of
    which the ``traces`` kept are the right ones first (:func:`pick_teacher_traces`; the paper's traces are
    verified solutions of a stronger model). The data then needs no reference field."""

    off_policy_shaping = True

    def __init__(self, source: Any, seed: int = 0, group_size: int = 2, total_steps: int = 1,
                 field: str = "solution", traces: int = 1, gamma: float = 0.1, teacher: str | None = None,
                 teacher_temperature: float = 1.0, teacher_samples: int = 0):
        super().__init__(source, seed, group_size, total_steps)
        _check(isinstance(field, str) and bool(field), "field", field, "must name a data field (or 'answer')")
        _check(isinstance(traces, int) and 1 <= traces < group_size, "traces", traces,
               f"must be an int in [1, rollout.n - 1 = {group_size - 1}] (at least one completion is sampled)")
        _check(gamma > 0, "gamma", gamma, "must be > 0")
        _check(teacher is None or (isinstance(teacher, str) and bool(teacher.strip())), "teacher", teacher,
               "must be a model id or path (a model with the policy's tokenizer), or null for the data's traces")
        _check(isinstance(teacher_temperature, (int, float)) and teacher_temperature >= 0, "teacher_temperature",
               teacher_temperature, "must be >= 0 (0 = greedy)")
        _check(isinstance(teacher_samples, int) and (teacher_samples == 0 or teacher_samples >= traces),
               "teacher_samples", teacher_samples, f"must be 0 (= traces) or an int >= traces = {traces}")
        self.traces, self.gamma = int(traces), float(gamma)
        self.teacher, self.teacher_temperature = teacher, float(teacher_temperature)
        self.teacher_samples = int(teacher_samples or traces)
        # traces sampled from a teacher model need no reference in the data (check() skips an empty field)
        self.reference_field = field
        self.field = "" if teacher else field

    def text(self, sample: Any) -> str:
        return reference_text(sample, self.reference_field)

    def shape(self, loss_tok, logprobs, advantages, off_rows):
        """``loss_tok [B, T]`` with the rows where ``off_rows [B]`` is True replaced by the shaped loss."""
        import torch

        shaped = luffy_shaped_loss(logprobs, advantages, self.gamma)
        return torch.where(off_rows.to(loss_tok.device)[:, None], shaped, loss_tok)


def guidance_parameters(cls: type) -> dict[str, Any]:
    skip = ("self", "source", "seed", "group_size", "total_steps")
    return {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items() if n not in skip}


def build_guidance(name: str, kwargs: dict[str, Any], source: Any, seed: int, group_size: int,
                   total_steps: int) -> Guidance:
    """The guidance method ``name`` with ``kwargs``, checked against ``source.train`` (the reference field
    must be present in every sample); unknown names and keys raise :class:`DataError` naming the valid ones."""
    if name not in GUIDANCE:
        raise DataError(f"unknown guidance method {name!r}; valid: {', '.join(GUIDANCE)}")
    cls = GUIDANCE[name]
    check_keyword_args("data.guidance", name, kwargs, guidance_parameters(cls))
    g = cls(source, seed=seed, group_size=group_size, total_steps=total_steps, **kwargs)
    g.check(source.train)
    return g
