"""Policy losses, TIS weights, KL estimators and aggregation against hand-worked numbers."""

import math

import pytest
import torch

from postrl.algorithms import LOSS_AGGREGATIONS, POLICY_LOSSES
from postrl.algorithms import policy_losses as pl_module
from postrl.algorithms.aggregation import (
    seq_mean_token_mean,
    seq_mean_token_sum,
    seq_mean_token_sum_norm,
    token_mean,
)
from postrl.algorithms.kl import kl_k1, kl_k2, kl_k3
from postrl.algorithms.policy_losses import cispo_loss, gspo_loss, ppo_clip_loss, reinforce_loss, tis_weights
from postrl.config import AlgoConfig

BUILTIN_LOSSES = ("ppo_clip", "gspo", "cispo", "reinforce", "gmpo", "sapo", "dppo", "topr")
# the token-selecting losses of postrl.algorithms.entropy_control (not zero_at_zero_advantage: batch-wide selection)
ENTROPY_CONTROL_LOSSES = ("clip_cov", "kl_cov", "top_entropy")
BUILTIN_AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")


def cfg(**kw) -> AlgoConfig:
    return AlgoConfig(**{"clip_eps_low": 0.2, "clip_eps_high": 0.2, "dual_clip_c": 0.0, **kw})


def _ratios_to_logprobs(ratios, old_value=-1.0):
    """Log-probs with exp(lp - old) == ratios exactly (old = -1 everywhere), shape [1, T]."""
    old = torch.full((1, len(ratios)), old_value, dtype=torch.float64)
    return old + torch.log(torch.tensor([ratios], dtype=torch.float64)), old


def _ones(x):
    return torch.ones_like(x)


# --------------------------------------------------------------------------------------------------------------
# ppo_clip
# --------------------------------------------------------------------------------------------------------------


def test_ppo_clip_both_sides():
    # tokens: (A=+1, r=1.5) clipped at 1.2 | (A=+1, r=0.5) unclipped
    #         (A=-1, r=0.5) clipped at 0.8 | (A=-1, r=1.5) unclipped
    # loss = max(-r A, -clip(r) A) by token: -1.2 | -0.5 | +0.8 | +1.5
    lp, old = _ratios_to_logprobs([1.5, 0.5, 0.5, 1.5])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=torch.float64)
    loss, stats = ppo_clip_loss(lp, old, adv, _ones(lp), cfg())
    assert torch.allclose(loss, torch.tensor([[-1.2, -0.5, 0.8, 1.5]], dtype=torch.float64), atol=1e-12)
    assert torch.equal(stats["clipped"], torch.tensor([[1.0, 0.0, 1.0, 0.0]], dtype=torch.float64))
    assert torch.equal(stats["clipped_high"], torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64))
    assert torch.equal(stats["clipped_low"], torch.tensor([[0.0, 0.0, 1.0, 0.0]], dtype=torch.float64))
    assert torch.equal(stats["dual_clipped"], torch.zeros_like(lp))


def test_ppo_clip_higher_is_asymmetric():
    # DAPO clip-higher: eps_high 0.28 lets a positive-advantage token's ratio reach 1.28; eps_low stays 0.2
    lp, old = _ratios_to_logprobs([1.5, 0.5])
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    loss, _ = ppo_clip_loss(lp, old, adv, _ones(lp), cfg(clip_eps_high=0.28))
    assert torch.allclose(loss, torch.tensor([[-1.28, 0.8]], dtype=torch.float64), atol=1e-12)


def test_ppo_clip_higher_keeps_gradient_between_the_bounds():
    # r = 1.25, A = +1: with eps_high = 0.2 the token is clipped (1.25 > 1.2) -> gradient 0;
    # with eps_high = 0.28 it is not (1.25 < 1.28) -> d(-r A)/dlp = -r A = -1.25
    for eps_high, grad in ((0.2, 0.0), (0.28, -1.25)):
        lp, old = _ratios_to_logprobs([1.25])
        lp.requires_grad_(True)
        loss, stats = ppo_clip_loss(lp, old, torch.tensor([1.0], dtype=torch.float64), _ones(lp),
                                    cfg(clip_eps_high=eps_high))
        loss.sum().backward()
        assert torch.allclose(lp.grad, torch.tensor([[grad]], dtype=torch.float64), atol=1e-12)
        assert float(stats["clipped"]) == (1.0 if grad == 0.0 else 0.0)


def test_ppo_clip_gradient_is_zero_on_clipped_tokens():
    lp, old = _ratios_to_logprobs([1.5, 1.1])
    lp.requires_grad_(True)
    loss, _ = ppo_clip_loss(lp, old, torch.tensor([2.0], dtype=torch.float64), _ones(lp), cfg())  # [B] advantages
    loss.sum().backward()
    # d/dlp of -(r * A) = -r * A at the unclipped token (-1.1 * 2 = -2.2); 0 at the clipped one (1.5 > 1.2)
    assert torch.allclose(lp.grad, torch.tensor([[0.0, -2.2]], dtype=torch.float64), atol=1e-12)


def test_ppo_clip_on_policy_ratio_one_is_plain_policy_gradient():
    lp = torch.tensor([[-0.3, -2.0]], requires_grad=True)
    loss, _ = ppo_clip_loss(lp, lp.detach(), torch.tensor([0.5]), _ones(lp), cfg())
    assert torch.allclose(loss, torch.tensor([[-0.5, -0.5]]))
    loss.sum().backward()
    assert torch.allclose(lp.grad, torch.tensor([[-0.5, -0.5]]))


def test_ppo_dual_clip_bounds_negative_advantage_loss():
    # c = 3. Objective for A < 0: max(min(rA, clip(r)A), cA); loss = min(ppo_loss, -cA) = min(ppo_loss, c|A|).
    #  tok 0: A=-1, r=4   ppo_loss = max(4, 1.2) = 4 > c|A| = 3  -> loss 3, dual-clipped, gradient 0
    #  tok 1: A=-1, r=2   ppo_loss = max(2, 1.2) = 2 < 3         -> loss 2, gradient d(r|A|)/dlp = r|A| = 2
    #  tok 2: A=+1, r=4   ppo_loss = -min(4, 1.2) = -1.2          -> unchanged (dual clip only for A < 0), grad 0
    #  tok 3: A=-2, r=0.5 ppo_loss = max(1.0, 1.6) = 1.6 < 6     -> clipped low, unchanged, gradient 0
    #  tok 4: A=-0.5, r=5 ppo_loss = max(2.5, 0.6) = 2.5 > 1.5   -> loss 1.5, dual-clipped, gradient 0
    lp, old = _ratios_to_logprobs([4.0, 2.0, 4.0, 0.5, 5.0])
    lp.requires_grad_(True)
    adv = torch.tensor([[-1.0, -1.0, 1.0, -2.0, -0.5]], dtype=torch.float64)
    loss, stats = ppo_clip_loss(lp, old, adv, _ones(lp), cfg(dual_clip_c=3.0))
    assert torch.allclose(loss, torch.tensor([[3.0, 2.0, -1.2, 1.6, 1.5]], dtype=torch.float64), atol=1e-12)
    assert torch.equal(stats["dual_clipped"], torch.tensor([[1.0, 0.0, 0.0, 0.0, 1.0]], dtype=torch.float64))
    assert torch.equal(stats["clipped"], torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]], dtype=torch.float64))
    loss.sum().backward()
    assert torch.allclose(lp.grad, torch.tensor([[0.0, 2.0, 0.0, 0.0, 0.0]], dtype=torch.float64), atol=1e-12)


def test_ppo_dual_clip_off_leaves_loss_unbounded():
    # same token 0 as above (A=-1, r=4) without dual clip: loss r|A| = 4, gradient 4
    lp, old = _ratios_to_logprobs([4.0])
    lp.requires_grad_(True)
    loss, stats = ppo_clip_loss(lp, old, torch.tensor([-1.0], dtype=torch.float64), _ones(lp), cfg(dual_clip_c=0.0))
    assert torch.allclose(loss, torch.tensor([[4.0]], dtype=torch.float64))
    loss.sum().backward()
    assert torch.allclose(lp.grad, torch.tensor([[4.0]], dtype=torch.float64))
    assert float(stats["dual_clipped"]) == 0.0


# --------------------------------------------------------------------------------------------------------------
# gspo
# --------------------------------------------------------------------------------------------------------------


def _gspo_batch():
    # row 0: 3 valid tokens, log-ratios [0.1, -0.2, 0.4]   -> mean 0.1   -> s_0 = e^0.1   = 1.105171
    # row 1: 2 valid tokens, log-ratios [0.2, -0.3] + pad  -> mean -0.05 -> s_1 = e^-0.05 = 0.951229
    #        (the padding token's log-ratio 5.0 must not count)
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, 0.0]], dtype=torch.float64)
    log_ratio = torch.tensor([[0.1, -0.2, 0.4], [0.2, -0.3, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    return (old + log_ratio).requires_grad_(True), old, mask


def test_gspo_sequence_ratio_clipping_and_gradient_by_hand():
    lp, old, mask = _gspo_batch()
    s0, s1 = math.exp(0.1), math.exp(-0.05)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)  # [B], broadcast over each row's tokens
    loss, stats = gspo_loss(lp, old, adv, mask, cfg(clip_eps_low=0.1, clip_eps_high=0.1))
    # the token ratio s_it has the value s_i on every token of row i (padding excluded from the mean)
    assert torch.allclose(stats["ratio"], torch.tensor([[s0] * 3, [s1, s1, 0.0]], dtype=torch.float64), atol=1e-12)
    # row 0: A=+1, s_0 = 1.105 > 1 + 0.1 -> clipped: loss -1.1 on every token, no gradient
    # row 1: A=-1, s_1 = 0.951 in [0.9, 1.1] -> unclipped: loss -A s_1 = 0.951229
    assert torch.allclose(loss[0], torch.full((3,), -1.1, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(loss[1, :2], torch.full((2,), s1, dtype=torch.float64), atol=1e-12)
    assert torch.equal(stats["clipped"], torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64))
    # seq_mean_token_mean: (mean(-1.1, -1.1, -1.1) + mean(s1, s1)) / 2 = (-1.1 + 0.951229) / 2 = -0.074385
    total = seq_mean_token_mean(loss, mask, num_seqs=2)
    assert math.isclose(float(total.detach()), (-1.1 + s1) / 2, abs_tol=1e-12)
    total.backward()
    # d total / d lp_1t = (1/G)(1/|y_1|) * (-A_1) * s_1 = (1/2)(1/2)(0.951229) = 0.237807 on row 1's valid tokens;
    # 0 on the clipped row 0 and on the padding token
    assert torch.allclose(lp.grad, torch.tensor([[0.0, 0.0, 0.0], [s1 / 4, s1 / 4, 0.0]], dtype=torch.float64),
                          atol=1e-12)


def test_gspo_lower_clip_with_negative_advantage():
    # one row, log-ratios [-0.3, -0.1] -> s = e^-0.2 = 0.818731 < 1 - 0.1; A = -1 -> clipped: loss = -(-1)(0.9) = 0.9
    old = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    lp = (old + torch.tensor([[-0.3, -0.1]], dtype=torch.float64)).requires_grad_(True)
    loss, stats = gspo_loss(lp, old, torch.tensor([-1.0], dtype=torch.float64), _ones(lp),
                            cfg(clip_eps_low=0.1, clip_eps_high=0.1))
    assert torch.allclose(loss, torch.tensor([[0.9, 0.9]], dtype=torch.float64), atol=1e-12)
    assert torch.equal(stats["clipped"], torch.ones_like(lp))
    loss.sum().backward()
    assert torch.equal(lp.grad, torch.zeros_like(lp))


def test_gspo_matches_the_papers_sequence_objective_value_and_gradient():
    # eq. 5 with eq. 7 computed directly (s_i differentiable through all its tokens) vs GSPO-token + seq_mean_token_mean
    torch.manual_seed(0)
    B, T = 6, 7
    old = -torch.rand(B, T, dtype=torch.float64) * 3
    lp0 = old + 0.05 * torch.randn(B, T, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.float64)
    for i, n in enumerate([7, 5, 3, 1, 6, 2]):
        mask[i, n:] = 0.0
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0], dtype=torch.float64)
    eps_low, eps_high = 0.01, 0.02  # small, so that some sequences are clipped and some are not

    lp_a = lp0.clone().requires_grad_(True)
    loss_tok, stats = gspo_loss(lp_a, old, adv, mask, cfg(clip_eps_low=eps_low, clip_eps_high=eps_high))
    ours = seq_mean_token_mean(loss_tok, mask, num_seqs=B)
    ours.backward()

    lp_b = lp0.clone().requires_grad_(True)
    s = torch.exp(((lp_b - old) * mask).sum(-1) / mask.sum(-1))
    paper = -torch.minimum(s * adv, s.clamp(1 - eps_low, 1 + eps_high) * adv).mean()
    paper.backward()

    clipped_rows = stats["clipped"].amax(-1)
    assert 0 < float(clipped_rows.sum()) < B  # both cases are exercised
    assert torch.allclose(ours, paper, atol=1e-12)
    assert torch.allclose(lp_a.grad, lp_b.grad, atol=1e-12)


# --------------------------------------------------------------------------------------------------------------
# cispo
# --------------------------------------------------------------------------------------------------------------


def test_cispo_values_and_stop_gradient_weight():
    # old = -1, ratios r = [1.5, 0.5, 1.0], A = [1, -1, 2], eps 0.2/0.2 -> w = clip(r, 0.8, 1.2) = [1.2, 0.8, 1.0]
    # logp = -1 + ln r = [-0.594535, -1.693147, -1.0]
    # loss = -w A logp = [-1.2*1*(-0.594535), -0.8*(-1)*(-1.693147), -1*2*(-1)] = [0.713442, -1.354518, 2.0]
    # gradient = -w A (w is detached: no d w / d logp term) = [-1.2, 0.8, -2.0]; no token loses its gradient
    lp, old = _ratios_to_logprobs([1.5, 0.5, 1.0])
    lp.requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, 2.0]], dtype=torch.float64)
    loss, stats = cispo_loss(lp, old, adv, _ones(lp), cfg())
    expected = [-1.2 * 1 * (-1 + math.log(1.5)), -0.8 * (-1) * (-1 + math.log(0.5)), -1.0 * 2 * (-1.0)]
    assert torch.allclose(loss, torch.tensor([expected], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(loss, torch.tensor([[0.713442, -1.354518, 2.0]], dtype=torch.float64), atol=1e-6)
    assert torch.equal(stats["clipped"], torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64))
    loss.sum().backward()
    assert torch.allclose(lp.grad, torch.tensor([[-1.2, 0.8, -2.0]], dtype=torch.float64), atol=1e-12)


def test_cispo_upper_bound_only_as_in_the_paper():
    # clip_eps_low = 1 -> lower bound 0 never binds: w = min(r, 1 + eps_high) = [min(0.5, 3), min(5, 3)] = [0.5, 3]
    # gradient -w A with A = [-1, 1] -> [0.5, -3.0]
    lp, old = _ratios_to_logprobs([0.5, 5.0])
    lp.requires_grad_(True)
    loss, stats = cispo_loss(lp, old, torch.tensor([[-1.0, 1.0]], dtype=torch.float64), _ones(lp),
                             cfg(clip_eps_low=1.0, clip_eps_high=2.0))
    loss.sum().backward()
    assert torch.allclose(lp.grad, torch.tensor([[0.5, -3.0]], dtype=torch.float64), atol=1e-12)
    assert torch.equal(stats["clipped"], torch.tensor([[0.0, 1.0]], dtype=torch.float64))


# --------------------------------------------------------------------------------------------------------------
# reinforce
# --------------------------------------------------------------------------------------------------------------


def test_reinforce_is_minus_advantage_times_logprob():
    # loss = -A logp = [-(1)(-0.5), -(-0.5)(-2.0)] = [0.5, -1.0]; gradient -A = [-1.0, 0.5]; old log-probs ignored
    lp = torch.tensor([[-0.5, -2.0]], requires_grad=True)
    old = torch.tensor([[-3.0, 1.0]])
    loss, stats = reinforce_loss(lp, old, torch.tensor([[1.0, -0.5]]), _ones(lp), cfg())
    assert torch.allclose(loss, torch.tensor([[0.5, -1.0]]))
    assert torch.equal(stats["clipped"], torch.zeros_like(lp))
    loss.sum().backward()
    assert torch.allclose(lp.grad, torch.tensor([[-1.0, 0.5]]))


# --------------------------------------------------------------------------------------------------------------
# all losses: registry, uniform signature, zero_at_zero_advantage
# --------------------------------------------------------------------------------------------------------------


def _random_batch(seed=0, B=4, T=6):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    lp = (old + 0.7 * torch.randn(B, T, generator=g, dtype=torch.float64)).requires_grad_(True)
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[1, 4:] = 0.0
    mask[3, 2:] = 0.0
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T) * mask
    return lp, old, adv, mask


@pytest.mark.parametrize("name", BUILTIN_LOSSES)
def test_every_loss_is_registered_with_the_uniform_signature(name):
    fn = POLICY_LOSSES.get_fn(name)
    assert fn.__module__ == pl_module.__name__
    lp, old, adv, mask = _random_batch()
    loss, stats = fn(lp, old, adv, mask, cfg(dual_clip_c=3.0))
    assert loss.shape == lp.shape and torch.isfinite(loss).all()
    assert stats["clipped"].shape == lp.shape
    assert all(v.shape == lp.shape and not v.requires_grad for v in stats.values())
    assert torch.equal(stats["clipped"] * (1 - mask), torch.zeros_like(mask))  # 0 at padding
    loss.sum().backward()  # differentiable
    assert torch.isfinite(lp.grad).all()


@pytest.mark.parametrize("name", BUILTIN_LOSSES)
def test_zero_at_zero_advantage_is_true_and_exact(name):
    fn = POLICY_LOSSES.get_fn(name)
    assert fn.zero_at_zero_advantage is True
    lp, old, adv, mask = _random_batch(seed=1)
    adv = adv.clone()
    adv[0] = 0.0  # row 0: advantage exactly 0 on every token
    adv[2] = 0.0
    for c in (0.0, 3.0):
        lp.grad = None
        # tiny GSPO-style eps, large PPO-style eps, asymmetric: the claim must hold for any clip setting
        for eps in ((0.2, 0.28), (3e-4, 4e-4), (1.0, 5.0)):
            loss, _ = fn(lp, old, adv, mask, cfg(clip_eps_low=eps[0], clip_eps_high=eps[1], dual_clip_c=c))
            assert torch.equal(loss[[0, 2]], torch.zeros_like(loss[[0, 2]]))
            lp.grad = None
            loss.sum().backward()
            assert torch.equal(lp.grad[[0, 2]], torch.zeros_like(lp.grad[[0, 2]]))
            assert lp.grad[[1, 3]].abs().sum() > 0  # the other rows do train


def test_builtin_losses_are_all_registered():
    mine = {n for n, f in POLICY_LOSSES.items() if getattr(f, "__module__", "") == pl_module.__name__}
    assert mine == set(BUILTIN_LOSSES)
    from postrl.algorithms import entropy_control

    theirs = {n for n, f in POLICY_LOSSES.items() if getattr(f, "__module__", "") == entropy_control.__name__}
    assert theirs == set(ENTROPY_CONTROL_LOSSES)


@pytest.mark.parametrize("name", ENTROPY_CONTROL_LOSSES)
def test_entropy_control_losses_have_the_uniform_signature_and_do_not_claim_zero_skipping(name):
    fn = POLICY_LOSSES.get_fn(name)
    assert fn.zero_at_zero_advantage is False
    lp, old, adv, mask = _random_batch()
    extra = {"entropy": torch.rand_like(lp)} if "entropy" in getattr(fn, "requires", ()) else {}
    loss, stats = fn(lp, old, adv, mask, cfg(dual_clip_c=3.0), **extra)
    assert loss.shape == lp.shape and torch.isfinite(loss).all()
    assert all(v.shape == lp.shape and not v.requires_grad for v in stats.values())
    assert torch.equal(stats["clipped"] * (1 - mask), torch.zeros_like(mask))
    loss.sum().backward()
    assert torch.isfinite(lp.grad).all()


# --------------------------------------------------------------------------------------------------------------
# truncated importance sampling
# --------------------------------------------------------------------------------------------------------------


def _tis_batch():
    # u = exp(old - behaviour) = [0.5, 1.0, 3.0 | padding 10.0]; cap 2
    old = torch.zeros(1, 4, requires_grad=True)
    behaviour = -torch.log(torch.tensor([[0.5, 1.0, 3.0, 10.0]]))
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    return old, behaviour, mask


def test_tis_clamp_by_hand():
    old, behaviour, mask = _tis_batch()
    w, stats = tis_weights(old, behaviour, mask, "clamp", 2.0)
    # min(u, 2) = [0.5, 1.0, 2.0]; padding weight 1
    assert torch.allclose(w, torch.tensor([[0.5, 1.0, 2.0, 1.0]]), atol=1e-6)
    assert not w.requires_grad
    assert math.isclose(float(stats["capped_frac"]), 1 / 3, rel_tol=1e-6)  # one of 3 valid tokens above the cap
    assert math.isclose(float(stats["ratio_mean"]), (0.5 + 1.0 + 3.0) / 3, rel_tol=1e-6)
    assert math.isclose(float(stats["ratio_max"]), 3.0, rel_tol=1e-6)  # padding's 10 ignored


def test_tis_mask_by_hand():
    old, behaviour, mask = _tis_batch()
    w, stats = tis_weights(old, behaviour, mask, "mask", 2.0)
    # 1 where u <= 2, else 0: [1, 1, 0]; padding 1
    assert torch.equal(w, torch.tensor([[1.0, 1.0, 0.0, 1.0]]))
    assert math.isclose(float(stats["masked_frac"]), 1 / 3, rel_tol=1e-6)


def test_tis_off_is_ones():
    old, behaviour, mask = _tis_batch()
    w, stats = tis_weights(old, behaviour, mask, "off", 2.0)
    assert torch.equal(w, torch.ones(1, 4)) and stats == {}


def test_tis_rejects_unknown_mode():
    old, behaviour, mask = _tis_batch()
    with pytest.raises(ValueError, match="clamp"):
        tis_weights(old, behaviour, mask, "truncate", 2.0)


# --------------------------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------------------------

AGG_LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
AGG_MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # row 2 is empty (e.g. filtered)


def test_token_mean_by_hand():
    # valid tokens 1, 2, 4: (1 + 2 + 4) / 3 = 7/3; with the mini batch's 7 tokens: 7 / 7 = 1
    assert torch.isclose(token_mean(AGG_LOSS, AGG_MASK), torch.tensor(7.0 / 3.0))
    assert torch.isclose(token_mean(AGG_LOSS, AGG_MASK, num_tokens=7.0, num_seqs=3, max_len=8), torch.tensor(1.0))
    assert float(token_mean(AGG_LOSS, torch.zeros_like(AGG_MASK))) == 0.0  # no valid token: 0, not NaN


def test_seq_mean_token_mean_by_hand():
    # rows: (1 + 2)/2 = 1.5, 4/1 = 4, empty row -> 0 (length guarded to 1); / 3 sequences = 5.5/3
    assert torch.isclose(seq_mean_token_mean(AGG_LOSS, AGG_MASK), torch.tensor(5.5 / 3))
    assert torch.isclose(seq_mean_token_mean(AGG_LOSS, AGG_MASK, num_tokens=3.0, num_seqs=11, max_len=8),
                         torch.tensor(0.5))  # 5.5 / 11


def test_seq_mean_token_sum_by_hand():
    # row sums 3, 4, 0 -> 7 / 3 sequences
    assert torch.isclose(seq_mean_token_sum(AGG_LOSS, AGG_MASK), torch.tensor(7.0 / 3))
    assert torch.isclose(seq_mean_token_sum(AGG_LOSS, AGG_MASK, num_tokens=3.0, num_seqs=2, max_len=8),
                         torch.tensor(3.5))


def test_seq_mean_token_sum_norm_by_hand():
    # Dr. GRPO: 7 / (num_seqs * max_len) = 7 / (3 * 8); default max_len = padded width 3 -> 7 / 9
    assert torch.isclose(seq_mean_token_sum_norm(AGG_LOSS, AGG_MASK, num_tokens=3.0, num_seqs=3, max_len=8),
                         torch.tensor(7.0 / 24))
    assert torch.isclose(seq_mean_token_sum_norm(AGG_LOSS, AGG_MASK), torch.tensor(7.0 / 9))


@pytest.mark.parametrize("name", BUILTIN_AGGS)
def test_aggregation_is_independent_of_micro_batch_split(name):
    fn = LOSS_AGGREGATIONS.get_fn(name)
    torch.manual_seed(0)
    B, T = 7, 6
    loss = torch.randn(B, T, dtype=torch.float64)
    lengths = torch.tensor([6, 1, 3, 0, 5, 2, 4])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.float64)  # right-padded rows, one empty
    norms = {"num_tokens": float(mask.sum()), "num_seqs": B, "max_len": 10}
    whole = fn(loss, mask, **norms)
    for splits in ([0, 2, 4, 6, 7], [0, 1, 4, 7], [0, 7], list(range(8))):
        parts = 0.0
        for a, b in zip(splits[:-1], splits[1:]):
            width = max(1, int(mask[a:b].sum(-1).max()))  # like the trainer: drop all-padding columns
            parts = parts + fn(loss[a:b, :width], mask[a:b, :width], **norms)
        assert torch.isclose(whole, parts, atol=1e-12), (name, splits)


@pytest.mark.parametrize("name", BUILTIN_AGGS)
def test_every_aggregation_is_registered_with_the_uniform_signature(name):
    fn = LOSS_AGGREGATIONS.get_fn(name)
    loss = torch.randn(3, 4, requires_grad=True)
    out = fn(loss, torch.ones(3, 4), num_tokens=12.0, num_seqs=3, max_len=4)
    assert out.dim() == 0
    out.backward()
    assert loss.grad is not None
    with pytest.raises(TypeError):  # normalisers are keyword-only
        fn(loss, torch.ones(3, 4), 12.0, 3, 4)


def test_aggregations_agree_when_all_rows_are_full_length():
    # every row has T valid tokens and max_len = T: all four normalisations are the plain mean
    loss = torch.randn(4, 5, dtype=torch.float64)
    mask = torch.ones(4, 5, dtype=torch.float64)
    norms = {"num_tokens": 20.0, "num_seqs": 4, "max_len": 5}
    mean = loss.mean()
    for name in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
        assert torch.isclose(LOSS_AGGREGATIONS.get_fn(name)(loss, mask, **norms), mean, atol=1e-12)
    assert torch.isclose(seq_mean_token_sum(loss, mask, **norms), mean * 5, atol=1e-12)


# --------------------------------------------------------------------------------------------------------------
# KL
# --------------------------------------------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    # p(token) = 0.5 under the policy, 0.25 under the reference: log r = log(0.25/0.5) = -log 2
    lp, ref = torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25]))
    ln2 = math.log(2.0)
    assert torch.allclose(kl_k1(lp, ref), torch.tensor([ln2]))
    assert torch.allclose(kl_k2(lp, ref), torch.tensor([0.5 * ln2 ** 2]))
    assert torch.allclose(kl_k3(lp, ref), torch.tensor([0.5 + ln2 - 1.0]))
    assert torch.equal(kl_k3(lp, lp), torch.zeros(1))
