"""Issue 17's objectives against numbers worked out by hand from the papers' definitions, and gradients where a
method is defined by its gradient (entropy control, GMPO, SAPO, DPPO, TOPR, the REINFORCE family, pass@k, GFPO,
distillation, ProRL resets, the shared-backbone loss, TRL's GRPO normalisation)."""

import math

import pytest
import torch

from postrl.algorithms import ADVANTAGES, POLICY_LOSSES
from postrl.algorithms.advantages import (
    asymre_advantages,
    distillation_advantages,
    gfpo_advantages,
    gfpo_select,
    grpo_advantages,
    opmd_advantages,
    passk_advantages,
    w_reinforce_advantages,
)
from postrl.algorithms.aggregation import seq_mean_token_mean
from postrl.algorithms.entropy_control import (
    clip_cov_loss,
    kl_cov_loss,
    token_covariance,
    top_entropy_loss,
    top_entropy_mask,
)
from postrl.algorithms.kl_control import kl_penalty_rewards, last_reference_reset, reference_reset_due
from postrl.algorithms.policy_losses import dppo_divergence, dppo_loss, gmpo_loss, ppo_clip_loss, sapo_loss, topr_loss
from postrl.algorithms.value_losses import shared_backbone_loss
from postrl.config import AlgoConfig

D = torch.float64


def cfg(**kw) -> AlgoConfig:
    return AlgoConfig(**{"adv_eps": 0.0, **kw})


def t(x, dtype=D) -> torch.Tensor:
    return torch.tensor(x, dtype=dtype)


def _from_log_ratios(log_ratios, old=-1.0):
    """Current log-probs with the given log-ratios against old = -1 everywhere (differentiable)."""
    lr = t(log_ratios)
    old_lp = torch.full_like(lr, old)
    return (old_lp + lr).requires_grad_(True), old_lp


# ------------------------------------------------------------------------------------------------------------------
# TRL-matching GRPO normalisation (Bessel std)
# ------------------------------------------------------------------------------------------------------------------


def test_grpo_unbiased_std_matches_trl():
    # {1, 0}: mean 0.5; Bessel std sqrt((0.25 + 0.25) / 1) = 0.707107 -> +-0.5 / 0.707107 = +-0.707107 (eps 0)
    adv = grpo_advantages(t([1.0, 0.0], torch.float32), 2, eps=0.0, unbiased=True)
    assert torch.allclose(adv, t([math.sqrt(0.5), -math.sqrt(0.5)], torch.float32), atol=1e-6)
    # {1, 0, 0, 0}: mean 1/4, Bessel var (9/16 + 3 * 1/16) / 3 = 1/4 -> std 1/2 -> 1.5, -0.5 each
    # (population std sqrt(3)/4 gives sqrt(3), -1/sqrt(3): the ratio is sqrt((n-1)/n) = sqrt(3/4))
    adv = grpo_advantages(t([1.0, 0.0, 0.0, 0.0], torch.float32), 4, eps=0.0, unbiased=True)
    assert torch.allclose(adv, t([1.5, -0.5, -0.5, -0.5], torch.float32), atol=1e-6)
    pop = grpo_advantages(t([1.0, 0.0, 0.0, 0.0], torch.float32), 4, eps=0.0)
    assert torch.allclose(adv, pop * math.sqrt(3 / 4), atol=1e-6)
    # TRL's eps 1e-4: 0.75 / (0.5 + 1e-4)
    adv = ADVANTAGES["grpo"](t([1.0, 0.0, 0.0, 0.0], torch.float32), torch.ones(4, 2), 4,
                             cfg(adv_eps=1e-4, adv_std_unbiased=True))
    assert torch.allclose(adv[0], torch.full((2,), 0.75 / (0.5 + 1e-4)), atol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# pass@k training
# ------------------------------------------------------------------------------------------------------------------


def test_passk_advantages_by_hand():
    # N = 4, k = 2.
    # group [1, 0, 0, 0]: N_neg = 3, R = 1 - C(3,2)/C(4,2) = 1 - 3/6 = 1/2, sigma = sqrt(1/4) = 1/2
    #   A_pos = (1 - 1/2) / (1/2) = 1;  A_neg = (1 - 1/2 - C(2,1)/C(3,1)) / (1/2) = (1/2 - 2/3) * 2 = -1/3
    # group [1, 1, 0, 0]: N_neg = 2, R = 1 - C(2,2)/6 = 5/6, sigma = sqrt(5/36) = sqrt(5)/6
    #   A_pos = (1/6) / (sqrt(5)/6) = 1/sqrt(5);  A_neg = (1/6 - C(1,1)/C(3,1)) / (sqrt(5)/6) = -1/sqrt(5)
    # group [1, 1, 1, 0]: N_neg = 1 < k: every pair has a right member, R = 1, sigma = 0 -> all 0
    # group [0, 0, 0, 0]: R = 0, sigma = 0 -> all 0
    r = t([1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0], torch.float32)
    s5 = 1 / math.sqrt(5)
    expected = [1, -1 / 3, -1 / 3, -1 / 3, s5, s5, -s5, -s5, 0, 0, 0, 0, 0, 0, 0, 0]
    assert torch.allclose(passk_advantages(r, 4, 2), t(expected, torch.float32), atol=1e-6)
    # each group's advantages sum to 0 here (1 - 3 * 1/3 = 0; 2 s5 - 2 s5 = 0)


def test_passk_with_k_1_is_grpo_and_refuses_non_binary_rewards():
    r = t([1, 0, 0, 0, 1, 1, 0, 1], torch.float32)
    assert torch.allclose(passk_advantages(r, 4, 1), grpo_advantages(r, 4, eps=0.0), atol=1e-6)
    with pytest.raises(ValueError, match="binary rewards"):
        passk_advantages(t([1, 0.5], torch.float32), 2, 1)
    with pytest.raises(ValueError, match="k=3"):
        passk_advantages(t([1, 0], torch.float32), 2, 3)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    out = ADVANTAGES["passk"](t([1, 0], torch.float32), mask, 2, cfg(passk_k=1))
    assert torch.equal(out, torch.tensor([[1.0, 1.0], [-1.0, 0.0]]))  # broadcast, 0 at padding
    with pytest.raises(ValueError, match="per-token rewards"):
        ADVANTAGES["passk"](t([1, 0], torch.float32), mask, 2, cfg(), token_rewards=torch.zeros(2, 2))


def test_passk_estimator_counts_partial_credit_as_a_fail_like_eval_pass_at_k():
    # reasoning-gym gives "5.0" for 5 a score of 1/3: not a pass, as postrl eval counts pass@k. Group of 4 with
    # rewards [1, 1/3, 0.5, 0] = passes [1, 0, 0, 0], k = 2: A_pos = 1, A_neg = -1/3 (by hand above)
    mask = torch.ones(4, 2)
    out = ADVANTAGES["passk"](t([1.0, 1 / 3, 0.5, 0.0], torch.float32), mask, 4, cfg(passk_k=2))
    assert torch.allclose(out[:, 0], t([1.0, -1 / 3, -1 / 3, -1 / 3], torch.float32), atol=1e-6)
    assert torch.equal(out[:, 0], out[:, 1])
    with pytest.raises(ValueError, match="rewards in \\[0, 1\\]"):
        ADVANTAGES["passk"](t([1.5, 0.0], torch.float32), torch.ones(2, 1), 2, cfg(passk_k=1))


# ------------------------------------------------------------------------------------------------------------------
# GFPO
# ------------------------------------------------------------------------------------------------------------------


def test_gfpo_keeps_the_shortest_and_normalises_among_them():
    # one group of 4: rewards [1, 0, 1, 0], lengths [5, 2, 3, 9], k = 2
    # shortest two: rows 1 (2 tokens) and 2 (3 tokens) -> rewards {0, 1}: mean 1/2, std 1/2 -> -1, +1; others 0
    r, lengths = t([1, 0, 1, 0], torch.float32), t([5, 2, 3, 9], torch.float32)
    assert gfpo_select(r, lengths, 4, 2, "length").tolist() == [1, 2]
    assert torch.equal(gfpo_advantages(r, lengths, 4, 2, "length", eps=0.0), t([0, -1, 1, 0], torch.float32))
    # reward per token: r / len = [0.2, 0, 0.333, 0] -> rows 2 and 0, both right: std 0 -> advantage 0 (eps 0)
    assert gfpo_select(r, lengths, 4, 2, "reward_per_token").tolist() == [0, 2]
    assert torch.equal(gfpo_advantages(r, lengths, 4, 2, "reward_per_token", eps=0.0), torch.zeros(4))
    # rewards [1, 0, 0.5, 0.2], lengths [10, 1, 2, 1]: r / len = [0.1, 0, 0.25, 0.2] -> rows 2, 3 (0.5, 0.2):
    # mean 0.35, std 0.15 -> +1, -1
    adv = gfpo_advantages(t([1, 0, 0.5, 0.2], torch.float32), t([10, 1, 2, 1], torch.float32), 4, 2,
                          "reward_per_token", eps=0.0)
    assert torch.allclose(adv, t([0, 0, 1, -1], torch.float32), atol=1e-6)


def test_gfpo_ties_empty_rows_and_the_registered_estimator():
    # ties keep the earlier completion; a row of length 0 (filtered out of the loss) ranks last
    assert gfpo_select(t([0, 1, 0, 1]), t([3, 3, 3, 3]), 4, 2).tolist() == [0, 1]
    assert gfpo_select(t([0, 1, 0, 1]), t([0, 4, 3, 5]), 4, 2).tolist() == [1, 2]
    # two groups of 3, k = 2; lengths come from the mask: group 0 lengths [3, 1, 2] keeps rows 1, 2 (rewards 1, 0)
    # -> +1, -1; group 1 lengths [1, 1, 3] keeps rows 3, 4 (rewards 0, 1) -> -1, +1
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 0, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.float32)
    out = ADVANTAGES["gfpo"](t([1, 1, 0, 0, 1, 1], torch.float32), mask, 3, cfg(gfpo_k=2))
    assert torch.equal(out[:, 0], t([0, 1, -1, -1, 1, 0], torch.float32))
    assert torch.equal(out * (1 - mask), torch.zeros_like(out))


# ------------------------------------------------------------------------------------------------------------------
# Off-policy REINFORCE family: OPMD, AsymRE, W-REINFORCE, TOPR
# ------------------------------------------------------------------------------------------------------------------


def test_opmd_advantages_by_hand():
    # group [1, 0, 0, 1], tau = 1. mean baseline 0.5 -> (+-0.5) / (1 + 1) = +-0.25
    r = t([1, 0, 0, 1], torch.float32)
    assert torch.allclose(opmd_advantages(r, 4, 1.0, "mean"), t([0.25, -0.25, -0.25, 0.25], torch.float32))
    # logavgexp: b = log((e + 1 + 1 + e) / 4) = log((e + 1) / 2) = 0.620115
    # -> (1 - 0.620115) / 2 = 0.189943 and (0 - 0.620115) / 2 = -0.310057
    adv = opmd_advantages(r, 4, 1.0, "logavgexp")
    assert torch.allclose(adv, t([0.189943, -0.310057, -0.310057, 0.189943], torch.float32), atol=1e-6)
    # tau -> 0 makes logavgexp the max (b = 1); large tau makes it the mean
    assert torch.allclose(opmd_advantages(r, 4, 1e-3, "logavgexp") * (1 + 1e-3), t([0, -1, -1, 0], torch.float32),
                          atol=1e-2)


def test_asymre_and_w_reinforce_by_hand():
    # AsymRE: group [1, 0, 0, 1], shift -0.1 -> baseline 0.5 - 0.1 = 0.4 -> 0.6, -0.4
    assert torch.allclose(asymre_advantages(t([1, 0, 0, 1], torch.float32), 4, -0.1),
                          t([0.6, -0.4, -0.4, 0.6], torch.float32), atol=1e-6)
    # W-REINFORCE, lambda 0.1: r = [1, 0, 0.75, 0.5] -> s = 2r - 1 = [1, -1, 0.5, 0] -> [0.1, -1, 0.05, 0]
    assert torch.allclose(w_reinforce_advantages(t([1, 0, 0.75, 0.5], torch.float32), 0.1),
                          t([0.1, -1, 0.05, 0], torch.float32), atol=1e-7)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        w_reinforce_advantages(t([1.5], torch.float32))
    mask = torch.ones(2, 1)
    assert torch.allclose(ADVANTAGES["w_reinforce"](t([1, 0], torch.float32), mask, 2, cfg(w_reinforce_lambda=0.1)),
                          torch.tensor([[0.1], [-1.0]]))


def test_topr_weights_and_gradient_by_hand():
    # old = -1. row 0: A = +1 (positive: weight 1). row 1: A = -1, log-ratios [-0.4, -0.3] -> sequence ratio
    # e^-0.7 = 0.496585 < 1 -> weight 0.496585. row 2: A = -1, log-ratios [0.5, 0.1] -> ratio e^0.6 > 1 ->
    # truncated to 1. loss_t = -w A logp_t; d loss_t / d logp_t = -w A (w detached):
    #   row 0: -1, -1;  row 1: 0.496585, 0.496585;  row 2: 1, 1
    lp, old = _from_log_ratios([[0.3, 0.2], [-0.4, -0.3], [0.5, 0.1]])
    adv = t([1.0, -1.0, -1.0])
    loss, stats = topr_loss(lp, old, adv, torch.ones_like(lp), cfg())
    w1 = math.exp(-0.7)
    expected = [[-(-0.7), -(-0.8)], [w1 * (-1.4), w1 * (-1.3)], [1 * (-0.5), 1 * (-0.9)]]  # -w A logp
    assert torch.allclose(loss, t(expected), atol=1e-12)
    assert torch.equal(stats["clipped"], t([[0, 0], [0, 0], [1, 1]]))
    loss.sum().backward()
    assert torch.allclose(lp.grad, t([[-1, -1], [w1, w1], [1, 1]]), atol=1e-12)


# ------------------------------------------------------------------------------------------------------------------
# GMPO, SAPO, DPPO
# ------------------------------------------------------------------------------------------------------------------


def test_gmpo_by_hand():
    # eps 0.4 / 0.4 (log space). row 0: A = +1, log-ratios [0.1, 0.5, -0.2] -> A > 0 clips 0.5 to 0.4:
    #   mean(0.1, 0.4, -0.2) = 0.1 -> s_0 = e^0.1 = 1.105171, loss -1.105171 on every token
    # row 1: A = -1, log-ratios [-0.5, 0.2] (+ padding) -> A < 0 clips -0.5 to -0.4: mean(-0.4, 0.2) = -0.1
    #   -> s_1 = e^-0.1 = 0.904837, loss +0.904837
    # seq_mean_token_mean: (-1.105171 + 0.904837) / 2; gradient -A s / |o_i| / G on unclipped tokens, 0 on clipped:
    #   row 0: -1.105171 / 3 / 2 = -0.184195 (tokens 0, 2); row 1: 0.904837 / 2 / 2 = 0.226209 (token 1)
    lp, old = _from_log_ratios([[0.1, 0.5, -0.2], [-0.5, 0.2, 3.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    loss, stats = gmpo_loss(lp, old, t([1.0, -1.0]), mask, cfg(clip_eps_low=0.4, clip_eps_high=0.4))
    s0, s1 = math.exp(0.1), math.exp(-0.1)
    assert torch.allclose(loss[0], torch.full((3,), -s0, dtype=D), atol=1e-12)
    assert torch.allclose(loss[1, :2], torch.full((2,), s1, dtype=D), atol=1e-12)
    assert torch.equal(stats["clipped"], t([[0, 1, 0], [1, 0, 0]]))
    total = seq_mean_token_mean(loss, mask, num_seqs=2)
    assert math.isclose(float(total.detach()), (-s0 + s1) / 2, abs_tol=1e-12)
    total.backward()
    assert torch.allclose(lp.grad, t([[-s0 / 6, 0, -s0 / 6], [0, s1 / 4, 0]]), atol=1e-12)


def test_gmpo_matches_the_papers_product_form_value_and_gradient():
    # J = 1/G sum_i sgn(A_i) |A_i| (prod_t min(rho_t sgn A, clip(rho_t, e^-e1, e^e2) sgn A) sgn A)^(1/|o_i|)
    torch.manual_seed(0)
    B, T = 5, 6
    old = -torch.rand(B, T, dtype=D) * 3
    lp0 = old + 0.3 * torch.randn(B, T, dtype=D)
    mask = torch.ones(B, T, dtype=D)
    for i, n in enumerate([6, 4, 2, 5, 1]):
        mask[i, n:] = 0.0
    adv = t([1.0, -1.0, 0.5, -2.0, 1.5])
    e1, e2 = 0.2, 0.25
    lp_a = lp0.clone().requires_grad_(True)
    loss, _ = gmpo_loss(lp_a, old, adv, mask, cfg(clip_eps_low=e1, clip_eps_high=e2))
    ours = seq_mean_token_mean(loss, mask, num_seqs=B)
    ours.backward()
    lp_b = lp0.clone().requires_grad_(True)
    terms = []
    for i in range(B):
        n = int(mask[i].sum())
        rho = torch.exp(lp_b[i, :n] - old[i, :n])
        sgn = torch.sign(adv[i])
        clipped = rho.clamp(math.exp(-e1), math.exp(e2))
        inner = torch.minimum(rho * sgn, clipped * sgn) * sgn  # the ratio chosen by PPO's min, > 0
        terms.append(adv[i] * torch.prod(inner) ** (1.0 / n))
    paper = -torch.stack(terms).mean()
    paper.backward()
    assert torch.allclose(ours, paper, atol=1e-12)
    assert torch.allclose(lp_a.grad, lp_b.grad, atol=1e-12)


def test_sapo_gate_value_and_gradient_by_hand():
    # loss = -(4/tau) sigmoid(tau (rho - 1)) A, d loss / d logp = -A rho 4 p (1 - p), p = sigmoid(tau (rho - 1))
    # token 0: A = +1, rho = 1, tau_pos = 1: p = 1/2 -> loss -2, gradient -1 (the plain policy gradient)
    # token 1: A = -1, rho = 1.5, tau_neg = 1.05: p = sigmoid(0.525) = 0.628316 -> loss 4/1.05 * 0.628316 = 2.393585,
    #          gradient 1.5 * 4 * 0.628316 * 0.371684 = 1.401210
    # token 2: A = +1, rho = 0.8, tau_pos = 1: p = sigmoid(-0.2) = 0.450166 -> loss -1.800664, gradient -0.792053
    lp, old = _from_log_ratios([[0.0, math.log(1.5), math.log(0.8)]])
    loss, stats = sapo_loss(lp, old, t([[1.0, -1.0, 1.0]]), torch.ones_like(lp),
                            cfg(sapo_tau_pos=1.0, sapo_tau_neg=1.05))
    assert torch.allclose(loss, t([[-2.0, 2.3935854792, -1.8006640108]]), atol=1e-9)
    assert torch.equal(stats["clipped"], torch.zeros_like(lp))
    loss.sum().backward()
    assert torch.allclose(lp.grad, t([[-1.0, 1.4012097349, -0.7920530327]]), atol=1e-9)


def test_dppo_binary_tv_mask_by_hand():
    # delta 0.2. (A, q = old prob, p = new prob):
    #   (+1, 0.6, 0.9): moved up by 0.3 > 0.2 with A > 0 -> masked: loss 0, gradient 0
    #   (+1, 0.6, 0.3): moved down (against A): kept, loss -rho A = -0.5, gradient -0.5
    #   (-1, 0.6, 0.3): moved down by 0.3 with A < 0 -> masked
    #   (-1, 0.6, 0.9): moved up (against A): kept, loss 1.5, gradient 1.5
    #   (+1, 0.01, 0.1): ratio 10 (PPO would clip at 1.2) but TV 0.09 < 0.2: kept, loss -10, gradient -10
    q = t([[0.6, 0.6, 0.6, 0.6, 0.01]])
    p = t([[0.9, 0.3, 0.3, 0.9, 0.1]])
    lp = p.log().requires_grad_(True)
    adv = t([[1.0, 1.0, -1.0, -1.0, 1.0]])
    loss, stats = dppo_loss(lp, q.log(), adv, torch.ones_like(lp), cfg(dppo_delta_low=0.2, dppo_delta_high=0.2))
    assert torch.allclose(loss, t([[0.0, -0.5, 0.0, 1.5, -10.0]]), atol=1e-9)
    assert torch.equal(stats["clipped"], t([[1, 0, 1, 0, 0]]))
    loss.sum().backward()
    assert torch.allclose(lp.grad, t([[0.0, -0.5, 0.0, 1.5, -10.0]]), atol=1e-9)


def test_dppo_binary_kl_divergence_by_hand():
    # q = 0.6, p = 0.9: 0.6 ln(0.6/0.9) + 0.4 ln(0.4/0.1) = -0.243279 + 0.554518 = 0.311239
    d = dppo_divergence(t([[math.log(0.9)]]), t([[math.log(0.6)]]), "binary_kl")
    assert math.isclose(float(d), 0.3112386796, abs_tol=1e-9)
    # with delta 0.05 (the paper's KL setting) the A > 0 token is masked; with delta 0.4 it is not
    lp = t([[math.log(0.9)]]).requires_grad_(True)
    for delta, masked in ((0.05, 1.0), (0.4, 0.0)):
        _, stats = dppo_loss(lp, t([[math.log(0.6)]]), t([[1.0]]), torch.ones(1, 1, dtype=D),
                             cfg(dppo_divergence="binary_kl", dppo_delta_high=delta))
        assert float(stats["clipped"]) == masked


# ------------------------------------------------------------------------------------------------------------------
# Entropy-collapse control: Clip-Cov, KL-Cov, top-entropy tokens
# ------------------------------------------------------------------------------------------------------------------


def _cov_batch():
    # 4 one-token rows: A = [2, -1, 1, -2] (mean 0), logp = [-0.5, -3, -1, -2.5] (mean -1.75)
    # Cov_t = (A_t - 0)(logp_t + 1.75) = [2 * 1.25, -1 * -1.25, 1 * 0.75, -2 * -0.75] = [2.5, 1.25, 0.75, 1.5]
    return t([[-0.5], [-3.0], [-1.0], [-2.5]]), t([[2.0], [-1.0], [1.0], [-2.0]]), torch.ones(4, 1, dtype=D)


def test_token_covariance_by_hand():
    lp, adv, mask = _cov_batch()
    assert torch.allclose(token_covariance(lp, adv, mask), t([[2.5], [1.25], [0.75], [1.5]]), atol=1e-12)
    # padding neither counts in the means nor gets a value
    lp2, adv2 = torch.cat([lp, t([[9.0]])]), torch.cat([adv, t([[9.0]])])
    mask2 = torch.cat([mask, t([[0.0]])])
    assert torch.allclose(token_covariance(lp2, adv2, mask2), t([[2.5], [1.25], [0.75], [1.5], [0.0]]), atol=1e-12)


def test_clip_cov_detaches_the_high_covariance_tokens():
    # on-policy (rho = 1, nothing PPO-clipped); omega = (1, 5): candidates Cov in (1, 5) = tokens 0, 1, 3.
    # clip_cov_ratio 1 -> int(1 * 4) = 4 >= 3 candidates: all three detached. Loss values stay -A = [-2, 1, -1, 2];
    # only token 2 (Cov 0.75) keeps its gradient -rho A = -1.
    lp, adv, mask = _cov_batch()
    lp.requires_grad_(True)
    loss, stats = clip_cov_loss(lp, lp.detach(), adv, mask, cfg(clip_cov_ratio=1.0, clip_cov_lb=1.0, clip_cov_ub=5.0))
    assert torch.allclose(loss, t([[-2.0], [1.0], [-1.0], [2.0]]), atol=1e-12)
    assert torch.equal(stats["cov_detached"], t([[1.0], [1.0], [0.0], [1.0]]))
    loss.sum().backward()
    assert torch.equal(lp.grad, t([[0.0], [0.0], [-1.0], [0.0]]))
    # omega_high = 2: token 0 (2.5) is no candidate any more
    _, stats = clip_cov_loss(lp, lp.detach(), adv, mask, cfg(clip_cov_ratio=1.0, clip_cov_ub=2.0))
    assert torch.equal(stats["cov_detached"], t([[0.0], [1.0], [0.0], [1.0]]))
    # ratio 0.5 -> int(2) = 2 of the 3 candidates, drawn with the generator: never token 2
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        _, stats = clip_cov_loss(lp, lp.detach(), adv, mask, cfg(clip_cov_ratio=0.5), generator=g)
        assert float(stats["cov_detached"].sum()) == 2 and float(stats["cov_detached"][2]) == 0
    # the paper's tiny ratio still detaches one token (max(1, int(r N)))
    _, stats = clip_cov_loss(lp, lp.detach(), adv, mask, cfg())
    assert float(stats["cov_detached"].sum()) == 1


def test_kl_cov_penalises_the_top_covariance_tokens():
    # Cov = [2.5, 1.25, 0.75, 1.5] (from the current log-probs); log-ratios lr = [0.1, 0.2, -0.3, 0.4] (old = lp - lr)
    # kl_cov_ratio 0.5 -> int(0.5 * 4) = 2 tokens: 0 and 3. beta = 1.
    # loss = -e^lr A (+ |lr| on 0 and 3): [-2.210342 + 0.1, 1.221403, -0.740818, 2.983649 + 0.4]
    # gradient -e^lr A (+ sign(lr) on 0 and 3): [-1.210342, 1.221403, -0.740818, 3.983649]
    lp, adv, mask = _cov_batch()
    lr = t([[0.1], [0.2], [-0.3], [0.4]])
    lp.requires_grad_(True)
    loss, stats = kl_cov_loss(lp, lp.detach() - lr, adv, mask, cfg(kl_cov_ratio=0.5, kl_cov_coef=1.0))
    assert torch.allclose(loss, t([[-2.1103418362], [1.2214027582], [-0.7408182207], [3.3836493953]]), atol=1e-9)
    assert torch.equal(stats["clipped"], t([[1.0], [0.0], [0.0], [1.0]]))
    loss.sum().backward()
    assert torch.allclose(lp.grad, t([[-1.2103418362], [1.2214027582], [-0.7408182207], [3.9836493953]]), atol=1e-9)


def test_top_entropy_mask_and_loss():
    # 5 valid tokens, entropies [0.1, 2.0, 0.5, 1.5, 3.0] (+ a padding token with entropy 9)
    # rho 0.4 -> ceil(0.4 * 5) = 2 tokens: 3.0 and 2.0; rho 0.5 -> ceil(2.5) = 3: also 1.5; rho 1: all
    ent = t([[0.1, 2.0, 0.5, 1.5, 3.0, 9.0]])
    mask = t([[1, 1, 1, 1, 1, 0]])
    assert torch.equal(top_entropy_mask(ent, mask, 0.4), t([[0, 1, 0, 0, 1, 0]]))
    assert torch.equal(top_entropy_mask(ent, mask, 0.5), t([[0, 1, 0, 1, 1, 0]]))
    assert torch.equal(top_entropy_mask(ent, mask, 1.0), mask)
    assert torch.equal(top_entropy_mask(t([[1.0, 1.0, 1.0]]), t([[1, 1, 1]]), 0.2), t([[1, 1, 1]]))  # ties kept
    # the loss: PPO-clip on the kept tokens only (on-policy: -A; gradient -A), 0 and no gradient elsewhere
    lp = t([[-1.0] * 6]).requires_grad_(True)
    adv = t([[1.0, -1.0, 2.0, 1.0, -2.0, 5.0]])
    loss, stats = top_entropy_loss(lp, lp.detach(), adv, mask, cfg(entropy_top_ratio=0.4), entropy=ent)
    assert torch.equal(loss, t([[0.0, 1.0, 0.0, 0.0, 2.0, 0.0]]))
    assert torch.equal(stats["selected"], t([[0, 1, 0, 0, 1, 0]]))
    loss.sum().backward()
    assert torch.equal(lp.grad, t([[0.0, 1.0, 0.0, 0.0, 2.0, 0.0]]))
    assert POLICY_LOSSES["top_entropy"].requires == ("entropy",)
    with pytest.raises(ValueError, match="entropy"):
        top_entropy_loss(lp, lp.detach(), adv, mask, cfg())


def test_entropy_control_losses_equal_ppo_when_nothing_is_selected():
    # Clip-Cov with no token in the covariance band is PPO-clip; top_entropy with rho = 1 is PPO-clip
    torch.manual_seed(1)
    lp = (-torch.rand(3, 4, dtype=D)).requires_grad_(True)
    old = lp.detach() + 0.2 * torch.randn(3, 4, dtype=D)
    adv = torch.randn(3, 1, dtype=D).expand(3, 4)
    mask = torch.ones(3, 4, dtype=D)
    ppo, _ = ppo_clip_loss(lp, old, adv, mask, cfg())
    cc, _ = clip_cov_loss(lp, old, adv, mask, cfg(clip_cov_lb=100.0, clip_cov_ub=101.0))
    te, _ = top_entropy_loss(lp, old, adv, mask, cfg(entropy_top_ratio=1.0), entropy=torch.rand(3, 4, dtype=D))
    assert torch.equal(cc, ppo) and torch.equal(te, ppo)


# ------------------------------------------------------------------------------------------------------------------
# On-policy distillation, ProRL resets, the shared-backbone loss
# ------------------------------------------------------------------------------------------------------------------


def test_distillation_advantages_by_hand_and_through_the_kl_reward():
    # A_t = log pi_teacher - log pi_student: student [-1, -2, -0.5], teacher [-0.5, -3, 7] (3rd token is padding)
    # -> [0.5, -1, 0]
    student, teacher = t([[-1.0, -2.0, -0.5]]), t([[-0.5, -3.0, 7.0]])
    mask = t([[1, 1, 0]])
    adv = distillation_advantages(student, teacher, mask)
    assert torch.allclose(adv, t([[0.5, -1.0, 0.0]], torch.float32).to(adv.dtype))
    # the registered estimator: the trainer's KL-in-reward with k1, coefficient 1 and the teacher as reference
    token_rewards = kl_penalty_rewards(student, teacher, mask, 1.0, "k1")
    out = ADVANTAGES["distill"](t([1.0], torch.float32), mask, 1, cfg(), token_rewards=token_rewards)
    assert torch.allclose(out, adv.float())
    with pytest.raises(ValueError, match="token_rewards"):
        ADVANTAGES["distill"](t([1.0], torch.float32), mask, 1, cfg())


def test_prorl_reset_schedule():
    # every 3: resets before steps 3 and 6 (0-based), never before step 0
    assert [reference_reset_due(s, 3) for s in range(8)] == [False, False, False, True, False, False, True, False]
    assert not any(reference_reset_due(s, 0) for s in range(8))
    # resuming before step 7 restores the reference of the reset before step 6; before step 2: the start (0)
    assert [last_reference_reset(s, 3) for s in (0, 2, 3, 5, 7)] == [0, 0, 3, 3, 6]
    assert last_reference_reset(7, 0) == 0
    with pytest.raises(ValueError):
        reference_reset_due(1, -1)


def test_shared_backbone_loss():
    # policy 2.0 + 0.5 * value 4.0 = 4.0; the backbone gets both gradients in one backward
    w = torch.tensor(1.0, requires_grad=True)
    total = shared_backbone_loss(2.0 * w, 4.0 * w ** 2, 0.5)
    assert float(total.detach()) == 4.0
    total.backward()
    assert float(w.grad) == 2.0 + 0.5 * 8.0
    with pytest.raises(ValueError):
        shared_backbone_loss(w, w, -1.0)
