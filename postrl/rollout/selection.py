"""Rollouts assembled from several generations: SPEED's screening, Guide's regenerated groups, LUFFY's teacher
traces (docs/curricula.md). The maths and the bookkeeping of each method live in :mod:`postrl.data.samplers`
and :mod:`postrl.data.guidance`; this module only builds the step's :class:`RolloutBatch` with the groups
laid out as the update expects (``rollout.n`` consecutive rows per group).

``sample_fn(samples, seed, n=..., gen=None)`` is the trainer's group sampler: ``n`` completions per sample,
decoded and scored, as a :class:`RolloutBatch` (with ``gen`` given, those completions instead of sampled ones).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from postrl.data.guidance import pick_teacher_traces, teacher_sample
from postrl.data.samplers import RolloutLedger, zero_variance
from postrl.rollout.batch import RolloutBatch
from postrl.rollout.generator import Generation

SampleFn = Callable[..., RolloutBatch]


def _group_rows(batch: RolloutBatch) -> dict[int, list[int]]:
    rows: dict[int, list[int]] = {}
    for i, g in enumerate(batch.group_ids.tolist()):
        rows.setdefault(int(g), []).append(i)
    return rows


def merge_groups(a: RolloutBatch, b: RolloutBatch, pad_id: int) -> RolloutBatch:
    """Group ``g`` of the result = group ``g`` of ``a`` followed by group ``g`` of ``b`` (both must have the same
    number of groups, in the same order: the same prompts)."""
    ga, gb = _group_rows(a), _group_rows(b)
    if len(ga) != len(gb):
        raise ValueError(f"merge_groups: {len(ga)} groups and {len(gb)} groups")
    both = RolloutBatch.concat([a, b], pad_id)
    both.group_ids = torch.cat([a.group_ids, b.group_ids])  # the same id for the two halves of a group
    rows = [r for g in sorted(ga) for r in ga[g] + [len(a) + i for i in gb[g]]]
    out = both.select(rows)
    out.sampling_tries, out.groups_dropped = a.sampling_tries, a.groups_dropped
    return out


def _groups_of(batch: RolloutBatch, groups: list[int]) -> list[int]:
    rows = _group_rows(batch)
    return [r for g in groups for r in rows[g]]


def _uniform_groups(batch: RolloutBatch) -> list[bool]:
    rows = _group_rows(batch)
    rewards = batch.rewards.tolist()
    return [max(rewards[i] for i in rows[g]) - min(rewards[i] for i in rows[g]) <= 1e-12 for g in sorted(rows)]


def speed_rollout(sampler: Any, sample_fn: SampleFn, want: int, n: int, seed: int, pad_id: int,
                  ledger: RolloutLedger, draw: Callable[[int], list] | None = None) -> RolloutBatch:
    """SPEED-RL's two phases (arXiv 2506.09016, Alg. 1). Each round reads ``ceil(oversample * missing)``
    candidates from ``sampler``, samples ``sampler.screen`` completions for each and keeps the prompts whose
    screening rewards are not all equal; only those get their other ``n - screen`` completions. Rounds
    repeat until ``want`` groups are kept or ``sampler.max_tries`` rounds are spent; the step trains on the
    groups it has. When no screen passes at all, the first candidate of the last round is completed so that
    the step has a batch (its advantages are 0). ``draw(k)`` gives the candidates (default
    ``sampler.next_batch``; the trainer passes one that also applies prefix hints)."""
    draw = draw or sampler.next_batch
    s = sampler.screen
    parts: list[RolloutBatch] = []
    kept_total, tries, last = 0, 0, None
    while kept_total < want and tries < sampler.max_tries:
        missing = want - kept_total
        cands = draw(max(1, math.ceil(sampler.oversample * missing)))
        try_seed = (seed + 1_000_000_007 * tries) % 2**62
        screen = sample_fn(cands, try_seed, n=s)
        tries += 1
        uniform = _uniform_groups(screen)
        keep = [g for g, u in enumerate(uniform) if not u]
        sampler.record_screen(len(cands), len(keep), len(screen))
        ledger.discarded(rows=s * sum(uniform), groups=sum(uniform))
        keep = keep[:missing]  # screens beyond the batch (oversample > 1) are dropped unused
        last = (cands, screen)
        if keep:
            cont = sample_fn([cands[g] for g in keep], (try_seed + 104_729) % 2**62, n=n - s)
            parts.append(merge_groups(screen.select(_groups_of(screen, keep)), cont, pad_id))
            kept_total += len(keep)
    if not parts:
        cands, screen = last
        cont = sample_fn(cands[:1], (seed + 7_654_321) % 2**62, n=n - s)
        parts.append(merge_groups(screen.select(_groups_of(screen, [0])), cont, pad_id))
        ledger.discarded(rows=-s, groups=-1)  # that screen is trained on after all
    batch = parts[0] if len(parts) == 1 else RolloutBatch.concat(parts, pad_id)
    batch.sampling_tries = tries
    batch.groups_dropped = 0  # SPEED's screened-out prompts are sampler/skipped
    return batch


def guide_failed_groups(batch: RolloutBatch, n: int, guidance: Any, sample_fn: SampleFn,
                        render: Callable[[Any], list[int]], prompt_text: Callable[[list[int]], str], seed: int,
                        pad_id: int, ledger: RolloutLedger) -> RolloutBatch:
    """Guide-GRPO (arXiv 2506.13923): for every group none of whose completions is correct, sample
    ``guidance.guided`` completions with the hint in the prompt and put them in place of as many of the
    group's failed completions, with the prompt *without* the hint as their prompt (``prompt_ids``,
    ``prompt_texts``). The behaviour log-probs stay the hinted sampler's, so the update's ratio corrects for
    the hint. Groups whose sample yields no hint are left as they are."""
    rows = _group_rows(batch)
    failed, hinted = [], []
    for g in sorted(rows):
        if any(batch.correct[i] for i in rows[g]):
            continue
        h = guidance.hinted(batch.samples[rows[g][0]], guidance.share)
        if h is not None:
            failed.append(g)
            hinted.append(h)
    guidance.count("guidance/failed_groups", len(failed))
    if not failed:
        return batch
    m = guidance.guided
    guided = sample_fn(hinted, seed, n=m)
    for i in range(len(guided)):  # train as if the hint were absent
        original = batch.samples[rows[failed[i // m]][0]]
        ids = render(original)
        guided.prompt_ids[i] = ids
        guided.prompt_texts[i] = prompt_text(ids)
    guidance.count("guidance/guided_correct_frac", sum(guided.correct) / len(guided))
    uniform = _uniform_groups(batch)
    ledger.discarded(rows=m * sum(uniform[g] for g in failed), groups=0)
    keep_failed = [rows[g][j] for g in failed for j in range(n - m)]
    parts = []
    others = [r for g in sorted(rows) if g not in set(failed) for r in rows[g]]
    if others:
        parts.append(batch.select(others))
    parts.append(merge_groups(batch.select(keep_failed), guided, pad_id) if n > m else guided)
    out = parts[0] if len(parts) == 1 else RolloutBatch.concat(parts, pad_id)
    out.sampling_tries, out.groups_dropped = batch.sampling_tries, batch.groups_dropped
    return out


def teacher_generation(samples: list[Any], texts: list[str], tokenizer: Any, render: Callable[[Any], list[int]],
                       max_new_tokens: int) -> Generation:
    """A :class:`Generation` holding given completions (teacher traces) for ``samples``: each text tokenized
    once (no special tokens) with the end-of-sequence token appended, cut at ``max_new_tokens`` (then
    ``truncated``); behaviour log-probs 0 (the teacher's probability is taken as 1) and entropy 0."""
    eos = tokenizer.eos_token_id
    rows, truncated = [], []
    for t in texts:
        ids = list(tokenizer(t, add_special_tokens=False)["input_ids"]) + ([eos] if eos is not None else [])
        truncated.append(len(ids) > max_new_tokens)
        rows.append(ids[:max_new_tokens])
    width = max(1, max(len(r) for r in rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    zeros = torch.zeros((len(rows), width), dtype=torch.float32)
    return Generation([render(s) for s in samples], ids, mask, zeros, torch.tensor(truncated), 0, zeros.clone())


def luffy_rollout(samples: list[Any], guidance: Any, sample_fn: SampleFn, tokenizer: Any,
                  render: Callable[[Any], list[int]], max_new_tokens: int, n: int, seed: int,
                  pad_id: int, teacher_fn: Callable[[list[Any], int, int], RolloutBatch] | None = None) -> RolloutBatch:
    """LUFFY's mixed groups (arXiv 2504.14945): ``n - traces`` sampled completions and ``traces`` teacher
    traces per prompt, group-major; the teacher rows have ``policy_version`` -1 (not sampled by any policy)
    and samples marked ``metadata["teacher"]``. The traces are the data's reference solutions, or with
    ``teacher_fn(samples, seed, m)`` (a scored batch of ``m = guidance.teacher_samples`` teacher completions
    per sample) the ``traces`` of them picked by :func:`~postrl.data.guidance.pick_teacher_traces`."""
    k = guidance.traces
    on = sample_fn(samples, seed, n=n - k)
    marked = [teacher_sample(s) for s in samples]
    if teacher_fn is None:
        teachers = [s for s in marked for _ in range(k)]
        gen = teacher_generation(teachers, [guidance.text(s) for s in teachers], tokenizer, render, max_new_tokens)
        off = sample_fn(marked, seed, n=k, gen=gen)
    else:
        m = guidance.teacher_samples
        candidates = teacher_fn(marked, (seed + 3_141_592_653) % 2**62, m)
        guidance.count("guidance/teacher_candidates_correct_frac",
                       sum(candidates.correct) / max(len(candidates), 1))
        off = candidates.select(pick_teacher_traces(candidates.correct, m, k))
        off.behaviour_logprobs = torch.zeros_like(off.behaviour_logprobs)  # the teacher's probability taken as 1
    off.policy_version = torch.full_like(off.policy_version, -1)
    guidance.count("guidance/teacher_correct_frac", sum(off.correct) / max(len(off), 1))
    return merge_groups(on, off, pad_id)


def count_zero_variance(batch: RolloutBatch) -> tuple[int, int, int]:
    """``(groups, zero-variance groups, rows in them)`` of a batch (see :func:`postrl.data.samplers.zero_variance`)."""
    return zero_variance(batch.rewards.tolist(), batch.group_ids.tolist())
