"""RolloutBatch: construction from a generation, row selection and concatenation (padding, group ids,
counters), shape checks that name the field, and a loss mask that is independent of the attention mask."""

from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from postrl.rollout.batch import RolloutBatch
from postrl.rollout.generator import Generation

PAD = 0


def generation(lengths: list[int], width: int, first_id: int = 10) -> Generation:
    """Completions of the given lengths, padded to ``width``: row b holds ids first_id + 10 b + t, log-prob
    -(b + 1) / 10 and entropy (b + 1) / 100 at every real token."""
    B = len(lengths)
    ids = torch.full((B, width), PAD, dtype=torch.long)
    mask = torch.zeros((B, width), dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, :n] = first_id + 10 * b + torch.arange(n)
        mask[b, :n] = 1
    lp = -(torch.arange(B, dtype=torch.float32)[:, None] + 1) / 10 * mask
    ent = (torch.arange(B, dtype=torch.float32)[:, None] + 1) / 100 * mask
    truncated = torch.tensor([n == width for n in lengths])
    return Generation([[1, 2 + b] for b in range(B)], ids, mask, lp, truncated, width, ent)


def batch(lengths: list[int], width: int, group_size: int, tag: str = "a", version: int = 0,
          first_id: int = 10) -> RolloutBatch:
    """A scored batch: rewards 0.5 * row, one component, failures, errors and statuses named after ``tag``."""
    B = len(lengths)
    samples = [SimpleNamespace(question=f"{tag}{b // group_size}", answer="") for b in range(B)]
    out = RolloutBatch.from_generation(generation(lengths, width, first_id), samples,
                                       [f"{tag}-prompt{b}" for b in range(B)], [f"{tag}{b}" for b in range(B)],
                                       group_size, policy_version=version)
    out.rewards = 0.5 * torch.arange(B, dtype=torch.float64)
    out.components = {"task": [float(b) for b in range(B)]}
    out.failed = {"task": [b == 0 for b in range(B)]}
    out.correct = [b % 2 == 1 for b in range(B)]
    out.reward_errors = Counter({("task", "timeout"): 1})
    out.reward_statuses = Counter({("task", f"ok-{tag}"): B})
    out.validate()
    return out


def test_from_generation_fills_rows_and_groups():
    b = batch([2, 3, 1, 3], width=3, group_size=2, version=7)
    assert len(b) == 4 and b.group_size == 2
    assert b.group_ids.tolist() == [0, 0, 1, 1]  # row g * n + j is in group g
    assert b.policy_version.tolist() == [7, 7, 7, 7]
    assert b.lengths.tolist() == [2, 3, 1, 3]
    assert b.truncated.tolist() == [False, True, False, True]
    assert b.prompt_ids == [[1, 2], [1, 3], [1, 4], [1, 5]]
    assert torch.equal(b.loss_mask, b.attention_mask.float()) and b.loss_mask.dtype == torch.float32
    assert b.entropy is not None and b.decode_steps == 3
    fresh = RolloutBatch.from_generation(generation([1, 1], 1), ["s", "s"], ["p", "p"], ["x", "y"], 2, 0)
    assert fresh.rewards.tolist() == [0.0, 0.0] and fresh.correct == [False, False] and fresh.components == {}
    no_entropy = RolloutBatch.from_generation(generation([1, 1], 1), ["s", "s"], ["p", "p"], ["x", "y"], 1, 0,
                                              with_entropy=False)
    assert no_entropy.entropy is None and no_entropy.group_ids.tolist() == [0, 1]
    with pytest.raises(ValueError, match="not groups of group_size=3"):
        RolloutBatch.from_generation(generation([1, 1], 1), ["s", "s"], ["p", "p"], ["x", "y"], 3, 0)


def test_loss_mask_is_independent_of_attention_mask():
    b = batch([3, 2], width=3, group_size=1)
    b.loss_mask[0, 1] = 0.0  # e.g. a tool-output token: attended to, not trained on
    b.validate()
    assert b.attention_mask[0].tolist() == [1, 1, 1] and b.loss_mask[0].tolist() == [1.0, 0.0, 1.0]
    assert b.lengths.tolist() == [3, 2]  # lengths count attended tokens, not trained ones
    picked = b.select([0])
    assert picked.loss_mask[0].tolist() == [1.0, 0.0, 1.0] and picked.attention_mask[0].tolist() == [1, 1, 1]
    b.loss_mask[1, 2] = 1.0  # padding cannot be trained on
    with pytest.raises(ValueError, match="loss_mask marks positions where attention_mask is 0"):
        b.validate()


def test_select_takes_rows_of_every_field_and_keeps_counters():
    b = batch([2, 3, 1, 3, 2, 2], width=3, group_size=2)
    b.baseline_rewards = [9.0, 9.0, 8.0, 8.0, 7.0, 7.0]
    b.token_rewards = torch.arange(18, dtype=torch.float32).view(6, 3) * b.attention_mask
    s = b.select([4, 5, 0, 1])  # groups 2 and 0
    assert s.texts == ["a4", "a5", "a0", "a1"] and s.prompt_texts == ["a-prompt4", "a-prompt5", "a-prompt0",
                                                                       "a-prompt1"]
    assert [x.question for x in s.samples] == ["a2", "a2", "a0", "a0"]
    assert s.prompt_ids == [b.prompt_ids[i] for i in (4, 5, 0, 1)]
    assert torch.equal(s.completion_ids, b.completion_ids[[4, 5, 0, 1]])
    assert torch.equal(s.behaviour_logprobs, b.behaviour_logprobs[[4, 5, 0, 1]])
    assert torch.equal(s.entropy, b.entropy[[4, 5, 0, 1]])
    assert torch.equal(s.token_rewards, b.token_rewards[[4, 5, 0, 1]])
    assert s.rewards.tolist() == [2.0, 2.5, 0.0, 0.5] and s.rewards.dtype == torch.float64
    assert s.components == {"task": [4.0, 5.0, 0.0, 1.0]} and s.failed == {"task": [False, False, True, False]}
    assert s.correct == [False, True, False, True] and s.baseline_rewards == [7.0, 7.0, 9.0, 9.0]
    assert s.group_ids.tolist() == [0, 0, 1, 1] and s.group_size == 2  # renumbered: row g * n + j in group g
    assert s.reward_errors == b.reward_errors and s.reward_statuses == b.reward_statuses  # counted over all rows
    assert s.completion_ids.shape[1] == 3  # same width


def test_concat_pads_to_the_widest_and_sums_counters():
    a = batch([1, 2], width=2, group_size=2, tag="a", version=3)
    b = batch([4, 1, 3, 2], width=4, group_size=2, tag="b", version=4, first_id=100)
    a.sampling_tries, b.sampling_tries, b.groups_dropped = 1, 1, 2
    c = RolloutBatch.concat([a, b], pad_id=PAD)
    assert len(c) == 6 and c.completion_ids.shape == (6, 4)
    # a's rows are right-padded: pad id, 0 masks, 0 log-probs, 0 entropy
    assert c.completion_ids[0].tolist() == [10, PAD, PAD, PAD] and c.completion_ids[1].tolist() == [20, 21, PAD, PAD]
    assert c.attention_mask[:2].tolist() == [[1, 0, 0, 0], [1, 1, 0, 0]]
    assert c.loss_mask[:2].tolist() == [[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]
    assert c.behaviour_logprobs[1].tolist() == pytest.approx([-0.2, -0.2, 0.0, 0.0])
    assert c.entropy[1].tolist() == pytest.approx([0.02, 0.02, 0.0, 0.0])
    assert torch.equal(c.completion_ids[2:], b.completion_ids)
    assert c.texts == ["a0", "a1", "b0", "b1", "b2", "b3"] and c.correct == a.correct + b.correct
    assert c.components["task"] == [0.0, 1.0, 0.0, 1.0, 2.0, 3.0]
    assert c.rewards.tolist() == [0.0, 0.5, 0.0, 0.5, 1.0, 1.5]
    assert c.group_ids.tolist() == [0, 0, 1, 1, 2, 2] and c.group_size == 2  # the parts' groups stay distinct
    assert c.policy_version.tolist() == [3, 3, 4, 4, 4, 4]
    assert c.truncated.tolist() == a.truncated.tolist() + b.truncated.tolist()
    assert c.reward_errors == Counter({("task", "timeout"): 2})
    assert c.reward_statuses == Counter({("task", "ok-a"): 2, ("task", "ok-b"): 4})
    assert (c.sampling_tries, c.groups_dropped, c.decode_steps) == (2, 2, 6)
    assert c.baseline_rewards is None and c.token_rewards is None


def test_select_then_concat_round_trip():
    b = batch([2, 3, 1, 3, 2, 1], width=3, group_size=2)
    parts = [b.select([0, 1]), b.select([2, 3]), b.select([4, 5])]
    for p in parts:
        p.reward_errors, p.reward_statuses = Counter(), Counter()  # counted once, in b
    c = RolloutBatch.concat(parts, pad_id=PAD)
    for name in ("completion_ids", "attention_mask", "loss_mask", "behaviour_logprobs", "entropy", "truncated",
                 "group_ids", "policy_version", "rewards"):
        assert torch.equal(getattr(c, name), getattr(b, name)), name
    for name in ("samples", "prompt_ids", "prompt_texts", "texts", "components", "failed", "correct"):
        assert getattr(c, name) == getattr(b, name), name


def test_concat_entropy_only_when_every_part_has_it_and_reward_names_must_match():
    a, b = batch([1, 1], 1, 2), batch([1, 1], 1, 2)
    b.entropy = None
    assert RolloutBatch.concat([a, b], PAD).entropy is None
    b.components = {"other": [0.0, 0.0]}
    with pytest.raises(ValueError, match="different components"):
        RolloutBatch.concat([a, b], PAD)
    b.components = dict(a.components)
    b.baseline_rewards = [1.0, 1.0]
    with pytest.raises(ValueError, match="baseline_rewards"):
        RolloutBatch.concat([a, b], PAD)
    with pytest.raises(ValueError, match="at least one"):
        RolloutBatch.concat([], PAD)


@pytest.mark.parametrize("change, message", [
    (lambda b: setattr(b, "texts", b.texts[:-1]), r"RolloutBatch\.texts has 3 entries, expected B=4"),
    (lambda b: setattr(b, "samples", b.samples + ["x"]), r"RolloutBatch\.samples has 5 entries"),
    (lambda b: setattr(b, "correct", []), r"RolloutBatch\.correct has 0 entries"),
    (lambda b: b.components.update(fmt=[1.0]), r"RolloutBatch\.components\['fmt'\] has 1 entries"),
    (lambda b: setattr(b, "baseline_rewards", [0.0]), r"RolloutBatch\.baseline_rewards has 1 entries"),
    (lambda b: setattr(b, "loss_mask", b.loss_mask[:, :2]), r"RolloutBatch\.loss_mask has shape \[4, 2\], "
                                                             r"expected \[4, 3\]"),
    (lambda b: setattr(b, "behaviour_logprobs", b.behaviour_logprobs[:3]), r"RolloutBatch\.behaviour_logprobs has "
                                                                          r"shape \[3, 3\]"),
    (lambda b: setattr(b, "entropy", torch.zeros(4, 5)), r"RolloutBatch\.entropy has shape \[4, 5\]"),
    (lambda b: setattr(b, "token_rewards", torch.zeros(4)), r"RolloutBatch\.token_rewards has shape \[4\]"),
    (lambda b: setattr(b, "rewards", torch.zeros(3)), r"RolloutBatch\.rewards has shape \[3\], expected \[4\]"),
    (lambda b: setattr(b, "group_ids", torch.zeros(4, 1, dtype=torch.long)), r"RolloutBatch\.group_ids has shape"),
    (lambda b: setattr(b, "rewards", [0.0] * 4), r"RolloutBatch\.rewards must be a tensor"),
    (lambda b: setattr(b, "attention_mask", b.attention_mask.float()), r"RolloutBatch\.attention_mask must be a "
                                                                       r"long tensor"),
    (lambda b: setattr(b, "completion_ids", b.completion_ids[0]), r"completion_ids must be \[B, T\]"),
])
def test_shape_errors_name_the_field(change, message):
    b = batch([2, 3, 1, 3], width=3, group_size=2)
    change(b)
    with pytest.raises(ValueError, match=message):
        b.validate()


def test_construction_is_checked_and_group_size_needs_equal_groups():
    b = batch([1, 1, 1], 1, 1)
    fields = {**b.__dict__, "texts": ["only one"]}
    with pytest.raises(ValueError, match=r"RolloutBatch\.texts has 1 entries, expected B=3"):
        RolloutBatch(**fields)
    b.group_ids = torch.tensor([0, 0, 1])
    with pytest.raises(ValueError, match="groups of different sizes"):
        b.group_size
    assert len(b.select([])) == 0 and b.select([]).group_size == 0
