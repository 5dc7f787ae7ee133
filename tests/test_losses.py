"""Policy losses, KL estimators and aggregation against hand-worked numbers."""

import math

import torch

from postrl.algorithms.aggregation import token_mean
from postrl.algorithms.kl import kl_k1, kl_k2, kl_k3
from postrl.algorithms.policy_losses import ppo_clip_loss


def _ratios_to_logprobs(ratios):
    old = torch.full((len(ratios),), -1.0)
    return old + torch.log(torch.tensor(ratios)), old


def test_ppo_clip_both_sides():
    # tokens: (A=+1, r=1.5) clipped at 1.2 | (A=+1, r=0.5) unclipped | (A=-1, r=0.5) clipped at 0.8 | (A=-1, r=1.5) unclipped
    lp, old = _ratios_to_logprobs([1.5, 0.5, 0.5, 1.5])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    loss, stats = ppo_clip_loss(lp[None], old[None], adv, eps_low=0.2, eps_high=0.2)
    assert torch.allclose(loss, torch.tensor([[-1.2, -0.5, 0.8, 1.5]]), atol=1e-6)
    assert torch.equal(stats["clipped"], torch.tensor([[1.0, 0.0, 1.0, 0.0]]))


def test_ppo_clip_higher_is_asymmetric():
    # DAPO clip-higher: eps_high 0.28 lets a positive-advantage token's ratio reach 1.28
    lp, old = _ratios_to_logprobs([1.5, 0.5])
    loss, _ = ppo_clip_loss(lp[None], old[None], torch.tensor([[1.0, -1.0]]), eps_low=0.2, eps_high=0.28)
    assert torch.allclose(loss, torch.tensor([[-1.28, 0.8]]), atol=1e-6)


def test_ppo_clip_gradient_is_zero_on_clipped_tokens():
    lp, old = _ratios_to_logprobs([1.5, 1.1])
    lp = lp.clone().requires_grad_(True)
    loss, _ = ppo_clip_loss(lp[None], old[None], torch.tensor([2.0]))  # [B] advantages broadcast
    loss.sum().backward()
    # d/dlp of -(r * A) = -r * A at the unclipped token; 0 at the clipped one
    assert torch.allclose(lp.grad, torch.tensor([0.0, -1.1 * 2.0]), atol=1e-6)


def test_ppo_clip_on_policy_ratio_one_is_plain_policy_gradient():
    lp = torch.tensor([[-0.3, -2.0]], requires_grad=True)
    loss, _ = ppo_clip_loss(lp, lp.detach(), torch.tensor([0.5]))
    assert torch.allclose(loss, torch.tensor([[-0.5, -0.5]]))
    loss.sum().backward()
    assert torch.allclose(lp.grad, torch.tensor([[-0.5, -0.5]]))


def test_token_mean_ignores_padding():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert torch.isclose(token_mean(loss, mask), torch.tensor(7.0 / 3.0))
    assert torch.isclose(token_mean(loss, mask, num_tokens=7.0), torch.tensor(1.0))


def test_token_mean_is_independent_of_micro_batch_split():
    torch.manual_seed(0)
    loss = torch.randn(6, 5)
    mask = (torch.rand(6, 5) > 0.3).float()
    whole = token_mean(loss, mask)
    n = float(mask.sum())
    parts = sum(token_mean(loss[i:i + 2], mask[i:i + 2], num_tokens=n) for i in range(0, 6, 2))
    assert torch.isclose(whole, parts, atol=1e-6)


def test_kl_estimators_by_hand():
    # p(token) = 0.5 under the policy, 0.25 under the reference: log r = log(0.25/0.5) = -log 2
    lp, ref = torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25]))
    ln2 = math.log(2.0)
    assert torch.allclose(kl_k1(lp, ref), torch.tensor([ln2]))
    assert torch.allclose(kl_k2(lp, ref), torch.tensor([0.5 * ln2 ** 2]))
    assert torch.allclose(kl_k3(lp, ref), torch.tensor([0.5 + ln2 - 1.0]))
    assert torch.equal(kl_k3(lp, lp), torch.zeros(1))
