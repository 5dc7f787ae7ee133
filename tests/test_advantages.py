"""Advantage estimators against numbers worked out by hand from the papers' definitions."""

import math

import pytest
import torch

from postrl.algorithms import ADVANTAGES, KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES
from postrl.algorithms.advantages import grpo_advantages
from postrl.algorithms.aggregation import token_mean
from postrl.algorithms.kl import kl_k3
from postrl.algorithms.policy_losses import ppo_clip_loss


def test_grpo_advantages_two_groups_of_two():
    # group {1, 0}: mean 0.5, population std 0.5 -> (+-0.5) / (0.5 + eps)
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=2, eps=1e-6)
    expected = 0.5 / (0.5 + 1e-6)
    assert torch.allclose(adv, torch.tensor([expected, -expected, -expected, expected]), atol=1e-7)


def test_grpo_advantages_one_right_out_of_four():
    # {1,0,0,0}: mean 1/4, std sqrt((9/16 + 3/16)/4) = sqrt(3)/4 -> +sqrt(3), -1/sqrt(3)
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), group_size=4, eps=0.0)
    s3 = math.sqrt(3.0)
    assert torch.allclose(adv, torch.tensor([s3, -1 / s3, -1 / s3, -1 / s3]), atol=1e-6)
    assert abs(float(adv.sum())) < 1e-6


def test_grpo_equal_rewards_give_zero_advantage():
    adv = grpo_advantages(torch.tensor([0.7, 0.7, 0.7, 0.0, 1.0, 0.5]), group_size=3, eps=1e-6)
    assert torch.equal(adv[:3], torch.zeros(3))
    # second group {0, 1, 0.5}: mean 0.5, std sqrt(1/6)
    std = math.sqrt(1 / 6)
    assert torch.allclose(adv[3:], torch.tensor([-0.5, 0.5, 0.0]) / (std + 1e-6), atol=1e-6)


def test_grpo_std_scopes():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0])
    assert torch.allclose(grpo_advantages(r, 2, std_scope="none"), torch.tensor([0.5, -0.5, 0.0, 0.0]))
    # batch std of {1,0,1,1}: mean 0.75, var (1/16*3 + 9/16)/4 = 3/16 -> std sqrt(3)/4
    batch_std = math.sqrt(3) / 4
    expected = torch.tensor([0.5, -0.5, 0.0, 0.0]) / batch_std
    assert torch.allclose(grpo_advantages(r, 2, eps=0.0, std_scope="batch"), expected, atol=1e-6)
    with pytest.raises(ValueError, match="std_scope"):
        grpo_advantages(r, 2, std_scope="bogus")


def test_grpo_rejects_bad_shapes():
    with pytest.raises(ValueError, match="groups of 3"):
        grpo_advantages(torch.zeros(4), group_size=3)
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        grpo_advantages(torch.zeros(2, 2), group_size=2)


def test_registries_name_the_methods_and_reject_unknown_names():
    assert ADVANTAGES.get_fn("grpo") is grpo_advantages
    assert POLICY_LOSSES.get_fn("ppo_clip") is ppo_clip_loss
    assert LOSS_AGGREGATIONS.get_fn("token_mean") is token_mean
    assert KL_ESTIMATORS.get_fn("k3") is kl_k3
    with pytest.raises(KeyError, match=r"Did you mean 'grpo'\?.*Valid: grpo"):
        ADVANTAGES.get_fn("grp")
