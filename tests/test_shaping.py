"""DAPO shaping: overlong penalty, overlong filter, dynamic-sampling group selection, by hand."""

import pytest
import torch

from postrl.algorithms.shaping import dynamic_sampling_keep, overlong_filter_mask, overlong_penalty


def test_overlong_penalty_by_hand():
    # L_max = 20, L_cache = 5: no penalty up to 15, then (15 - len) / 5, reaching -1 at len == 20, -1 beyond
    lengths = torch.tensor([10, 15, 16, 18, 19, 20, 25])
    expected = torch.tensor([0.0, 0.0, -0.2, -0.6, -0.8, -1.0, -1.0])  # (15-16)/5, (15-18)/5, (15-19)/5, (15-20)/5
    out = overlong_penalty(lengths, max_len=20, buffer=5)
    assert out.dtype == torch.float32
    assert torch.allclose(out, expected, atol=1e-6)


def test_overlong_penalty_scales_with_penalty_factor():
    # penalty 0.5 halves the ramp: len 17 -> (15 - 17)/5 * 0.5 = -0.2; len 20 -> -0.5
    out = overlong_penalty(torch.tensor([12, 17, 20]), max_len=20, buffer=5, penalty=0.5)
    assert torch.allclose(out, torch.tensor([0.0, -0.2, -0.5]), atol=1e-6)


def test_overlong_penalty_accepts_a_list_and_zero_buffer():
    # buffer 0: nothing up to max_len, -penalty beyond (eq. 13's last case)
    assert torch.equal(overlong_penalty([10, 20, 21], max_len=20, buffer=0), torch.tensor([0.0, 0.0, -1.0]))
    # buffer == max_len: the ramp spans the whole budget, len 5 of 10 -> (0 - 5)/10 = -0.5
    assert torch.allclose(overlong_penalty([0, 5, 10], max_len=10, buffer=10), torch.tensor([0.0, -0.5, -1.0]))


def test_overlong_penalty_rejects_bad_buffer():
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(torch.tensor([1]), max_len=10, buffer=11)
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(torch.tensor([1]), max_len=10, buffer=-1)


def test_overlong_filter_mask_zeroes_truncated_rows():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    out = overlong_filter_mask(mask, torch.tensor([False, True, False]))
    assert torch.equal(out, torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    assert out.dtype == mask.dtype
    assert torch.equal(mask[1], torch.ones(3))  # the input is not modified
    assert torch.equal(overlong_filter_mask(mask, torch.zeros(3, dtype=torch.bool)), mask)
    with pytest.raises(ValueError, match="truncated"):
        overlong_filter_mask(mask, torch.tensor([True, False]))


def test_dynamic_sampling_keeps_groups_with_different_rewards():
    # groups of 3: all correct | mixed | all wrong | mixed non-binary
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.25])
    keep = dynamic_sampling_keep(rewards, group_size=3)
    assert keep.dtype == torch.bool
    assert keep.tolist() == [False, True, False, True]
    assert dynamic_sampling_keep(torch.tensor([0.3, 0.3]), 1).tolist() == [False, False]  # a group of one never varies


def test_dynamic_sampling_rejects_bad_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        dynamic_sampling_keep(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="shape"):
        dynamic_sampling_keep(torch.zeros(2, 3), 3)
