"""Advantage estimators against numbers worked out by hand from the papers' definitions."""

import math

import pytest
import torch

from postrl.algorithms import ADVANTAGES, KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES
from postrl.algorithms.advantages import grpo, grpo_advantages
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
    assert ADVANTAGES.get_fn("grpo") is grpo  # the registered uniform-signature estimator; maths in grpo_advantages
    assert POLICY_LOSSES.get_fn("ppo_clip") is ppo_clip_loss
    assert LOSS_AGGREGATIONS.get_fn("token_mean") is token_mean
    assert KL_ESTIMATORS.get_fn("k3") is kl_k3
    with pytest.raises(KeyError, match=r"Did you mean 'grpo'\?.*Valid: .*grpo"):
        ADVANTAGES.get_fn("grp")


# --------------------------------------------------------------------------------------------- #
# The estimators of the field, through the uniform signature fn(rewards, mask, n, cfg, ...)
# --------------------------------------------------------------------------------------------- #

from postrl.algorithms import advantages as adv_mod  # noqa: E402
from postrl.algorithms.advantages import (  # noqa: E402
    bnpo_advantages,
    bnpo_beta_params,
    discounted_returns,
    gae_advantages_and_returns,
    last_token_rewards,
    masked_whiten,
)
from postrl.config import AlgoConfig  # noqa: E402

ALL_ESTIMATORS = {"grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "remax", "bnpo", "gae",
                  "passk", "gfpo", "opmd", "asymre", "w_reinforce", "distill"}
PI = math.pi


def cfg(**kw) -> AlgoConfig:
    return AlgoConfig(**{"adv_eps": 0.0, **kw})


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def test_every_published_estimator_is_registered_and_declares_its_inputs():
    assert {n for n, f in ADVANTAGES.items() if f.__module__ == adv_mod.__name__} == ALL_ESTIMATORS
    assert ADVANTAGES.get_fn("gae").requires == ("values",)
    assert ADVANTAGES.get_fn("remax").requires == ("baseline_rewards",)
    assert ADVANTAGES.get_fn("distill").requires == ("token_rewards",)
    for name in ALL_ESTIMATORS - {"gae", "remax", "distill"}:
        assert ADVANTAGES.get_fn(name).requires == ()
    for name in ALL_ESTIMATORS:
        doc = ADVANTAGES.get_fn(name).__doc__
        assert "arXiv:" in doc, name  # every estimator names its paper
    table = adv_mod.__doc__.split("Every registered estimator")[0]
    for name in ALL_ESTIMATORS:
        assert f"``{name}``" in table, name


def test_grpo_registered_broadcasts_over_the_mask_with_the_configured_std_scope():
    # one group {1, 0}: mean 0.5, population std 0.5 -> +-1 (eps 0); the second completion has 1 token
    mask = t([[1, 1, 1], [1, 0, 0]])
    out = ADVANTAGES.get_fn("grpo")(t([1.0, 0.0]), mask, 2, cfg())
    assert torch.equal(out, t([[1, 1, 1], [-1, 0, 0]]))
    out = ADVANTAGES.get_fn("grpo")(t([1.0, 0.0]), mask, 2, cfg(adv_std_scope="none"))
    assert torch.equal(out, t([[0.5, 0.5, 0.5], [-0.5, 0, 0]]))


def test_dr_grpo_subtracts_the_group_mean_only():
    # {1,0,0,0}: mean 1/4 -> 3/4, -1/4, -1/4, -1/4 (no division by std = sqrt(3)/4)
    mask = t([[1, 1], [1, 0], [1, 1], [0, 0]])
    out = ADVANTAGES.get_fn("dr_grpo")(t([1, 0, 0, 0]), mask, 4, cfg())
    assert torch.equal(out, t([[0.75, 0.75], [-0.25, 0], [-0.25, -0.25], [0, 0]]))


def test_rloo_uses_the_mean_of_the_other_completions():
    # group {1,0,0,0}: 1 - (0+0+0)/3 = 1;  0 - (1+0+0)/3 = -1/3
    # group {1,1,0,0}: 1 - (1+0+0)/3 = 2/3; 0 - (1+1+0)/3 = -2/3   (= 4/3 * (r - 1/2))
    mask = torch.ones(8, 2)
    mask[1, 1] = 0
    out = ADVANTAGES.get_fn("rloo")(t([1, 0, 0, 0, 1, 1, 0, 0]), mask, 4, cfg())
    per_seq = t([1, -1 / 3, -1 / 3, -1 / 3, 2 / 3, 2 / 3, -2 / 3, -2 / 3])
    expected = per_seq[:, None].expand(8, 2).clone()
    expected[1, 1] = 0
    assert torch.allclose(out, expected, atol=1e-7)
    assert out[1, 1].item() == 0.0
    with pytest.raises(ValueError, match="rloo needs a group of at least 2"):
        ADVANTAGES.get_fn("rloo")(t([1, 0]), torch.ones(2, 1), 1, cfg())


def test_reinforce_pp_discounted_returns_with_kl_token_rewards_then_global_whitening():
    # completion 1 (3 tokens): KL token rewards -0.1, -0.2, -0.4; outcome 1 on the last token
    #   r = [-0.1, -0.2, 0.6]; gamma 0.5:
    #   G_2 = 0.6;  G_1 = -0.2 + 0.5 * 0.6 = 0.1;  G_0 = -0.1 + 0.5 * 0.1 = -0.05
    # completion 2 (1 token, then padding whose token rewards are garbage): outcome 0, KL -0.2 -> G_0 = -0.2
    rewards = t([1.0, 0.0])
    mask = t([[1, 1, 1], [1, 0, 0]])
    token_rewards = t([[-0.1, -0.2, -0.4], [-0.2, 5.0, 5.0]])
    per_token = t([[-0.1, -0.2, 0.6], [-0.2, 0.0, 0.0]])
    assert torch.allclose(adv_mod._per_token_rewards("x", rewards, mask, token_rewards), per_token)
    returns = discounted_returns(per_token, mask, gamma=0.5)
    assert torch.allclose(returns, t([[-0.05, 0.1, 0.6], [-0.2, 0.0, 0.0]]), atol=1e-7)
    # whitening over the 4 valid tokens {-0.05, 0.1, 0.6, -0.2}: mean 0.45/4 = 0.1125,
    # deviations -0.1625, -0.0125, 0.4875, -0.3125 -> population var 0.361875/4 = 0.09046875
    std = math.sqrt(0.09046875)
    expected = t([[-0.1625 / std, -0.0125 / std, 0.4875 / std], [-0.3125 / std, 0.0, 0.0]])
    out = ADVANTAGES.get_fn("reinforce_pp")(rewards, mask, 1, cfg(gamma=0.5), token_rewards=token_rewards)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.equal(out[1, 1:], torch.zeros(2))


def test_reinforce_pp_baseline_centres_on_the_group_then_whitens_over_the_batch():
    # group {1, 0} -> centred outcomes {+0.5, -0.5}; lengths 2 and 1; gamma 1, no KL
    #   token returns: [0.5, 0.5] and [-0.5]
    #   batch over valid tokens: mean 1/6; deviations 1/3, 1/3, -2/3; var (1/9+1/9+4/9)/3 = 2/9, std sqrt(2)/3
    #   -> (1/3)/(sqrt(2)/3) = 1/sqrt(2),  (-2/3)/(sqrt(2)/3) = -sqrt(2)
    # (the batch mean is subtracted again, as OpenRLHF / verl do; dividing by the std only would give
    #  0.5/std(..) != 1/sqrt(2))
    mask = t([[1, 1, 0], [1, 0, 0]])
    out = ADVANTAGES.get_fn("reinforce_pp_baseline")(t([1.0, 0.0]), mask, 2, cfg())
    r2 = math.sqrt(2.0)
    assert torch.allclose(out, t([[1 / r2, 1 / r2, 0.0], [-r2, 0.0, 0.0]]), atol=1e-6)
    with pytest.raises(ValueError, match="reinforce_pp_baseline needs a group of at least 2"):
        ADVANTAGES.get_fn("reinforce_pp_baseline")(t([1.0]), t([[1.0]]), 1, cfg())


def test_remax_subtracts_the_greedy_completions_reward():
    # r = {1, 0, 1}, greedy rewards of their prompts {0.5, 0.5, 1} -> {0.5, -0.5, 0}
    mask = t([[1, 1], [1, 0], [1, 1]])
    out = ADVANTAGES.get_fn("remax")(t([1, 0, 1]), mask, 1, cfg(), baseline_rewards=t([0.5, 0.5, 1.0]))
    assert torch.equal(out, t([[0.5, 0.5], [-0.5, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="remax needs baseline_rewards.*greedy"):
        ADVANTAGES.get_fn("remax")(t([1, 0, 1]), mask, 1, cfg())
    with pytest.raises(ValueError, match="remax: baseline_rewards"):
        ADVANTAGES.get_fn("remax")(t([1, 0, 1]), mask, 1, cfg(), baseline_rewards=t([0.5]))


def test_bnpo_beta_fit_and_advantages_by_hand():
    # success rates of three prompts (4 completions each): 1/4, 1/2, 3/4
    #   mu = 1/2; unbiased var = (1/16 + 0 + 1/16) / 2 = 1/16
    #   k = mu(1-mu)/var - 1 = (1/4)/(1/16) - 1 = 3;  a = k mu = 3/2 = b
    #   alpha = 1 + a/3 = 3/2 = beta  ->  f(p) = sqrt(p(1-p)) / B(3/2, 3/2) = (8/pi) sqrt(p(1-p))
    #   p = 1/4: f = (8/pi)(sqrt(3)/4) = 2 sqrt(3)/pi -> A = (r - 1/4) pi / (2 sqrt(3))
    #            r = 1: sqrt(3) pi / 8;   r = 0: -pi / (8 sqrt(3))
    #   p = 1/2: f = 4/pi -> A = (r - 1/2) pi/4 = +-pi/8
    rewards = t([1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0])
    s3 = math.sqrt(3.0)
    expected = t([s3 * PI / 8] + [-PI / (8 * s3)] * 3 + [PI / 8] * 2 + [-PI / 8] * 2
                 + [PI / (8 * s3)] * 3 + [-s3 * PI / 8])
    fit = bnpo_beta_params(t([0.25, 0.5, 0.75]))
    assert fit["alpha"] == pytest.approx(1.5) and fit["beta"] == pytest.approx(1.5)
    assert fit["a"] == pytest.approx(1.5) and fit["var"] == pytest.approx(1 / 16)
    assert torch.allclose(bnpo_advantages(rewards, 4, 1.5, 1.5), expected, atol=1e-6)
    # BNPO with alpha = beta = 3/2 is GRPO scaled by pi/8 (the paper's "generalises GRPO")
    assert torch.allclose(expected, grpo_advantages(rewards, 4, eps=0.0) * PI / 8, atol=1e-6)

    state: dict = {}
    mask = torch.ones(12, 2)
    mask[3, 1] = 0
    out = ADVANTAGES.get_fn("bnpo")(rewards, mask, 4, cfg(), state=state)
    assert torch.allclose(out[:, 0], expected, atol=1e-6)
    assert out[3, 1].item() == 0.0
    st = state["bnpo"]
    assert st["alpha"] == pytest.approx(1.5) and st["beta"] == pytest.approx(1.5)
    assert st["estimates"] == 1 and st["fallbacks"] == 0
    assert all(isinstance(v, (int, float)) for v in st.values())  # plain numbers: checkpoint-friendly


def test_bnpo_asymmetric_fit_assigns_a_to_alpha_and_b_to_beta():
    # success rates 1/4, 1/4, 1/2: mu = 1/3; unbiased var = (1/144 + 1/144 + 4/144) / 2 = 1/48
    #   k = (2/9) * 48 - 1 = 29/3;  a = k/3 = 29/9;  b = 2k/3 = 58/9
    #   alpha = 1 + 29/27 = 56/27;  beta = 1 + 58/27 = 85/27
    rewards = t([1, 0, 0, 0, 0, 1, 0, 0, 1, 1, 0, 0])
    fit = bnpo_beta_params(t([0.25, 0.25, 0.5]))
    alpha, beta = 56 / 27, 85 / 27
    assert fit["alpha"] == pytest.approx(alpha) and fit["beta"] == pytest.approx(beta)

    def density(p):  # Beta(alpha, beta) pdf, written out
        log_b = math.lgamma(alpha) + math.lgamma(beta) - math.lgamma(alpha + beta)
        return math.exp((alpha - 1) * math.log(p) + (beta - 1) * math.log(1 - p) - log_b)

    expected = [(r - p) / density(p) for r, p in zip(rewards.tolist(), [0.25] * 8 + [0.5] * 4)]
    out = ADVANTAGES.get_fn("bnpo")(rewards, torch.ones(12, 1), 4, cfg(), state={})
    assert torch.allclose(out[:, 0], t(expected), atol=1e-6)


def test_bnpo_without_a_fit_uses_the_tracked_parameters_and_resumes_them():
    # one group cannot fit a Beta: a fresh run uses alpha = beta = 1, i.e. A = r - p
    state: dict = {}
    out = ADVANTAGES.get_fn("bnpo")(t([1, 0, 0, 0]), torch.ones(4, 1), 4, cfg(), state=state)
    assert torch.allclose(out[:, 0], t([0.75, -0.25, -0.25, -0.25]))
    assert state["bnpo"]["fallbacks"] == 1 and state["bnpo"]["estimates"] == 0
    # a run whose last fit was alpha = beta = 3/2 (e.g. restored from a checkpoint) keeps it:
    # p = 1/2 -> +-pi/8
    resumed = {"bnpo": {"alpha": 1.5, "beta": 1.5, "estimates": 3, "fallbacks": 0}}
    out = ADVANTAGES.get_fn("bnpo")(t([1, 1, 0, 0]), torch.ones(4, 1), 4, cfg(), state=resumed)
    assert torch.allclose(out[:, 0], t([PI / 8, PI / 8, -PI / 8, -PI / 8]), atol=1e-6)
    # every group at the same success rate (variance 0) also keeps the tracked parameters
    assert bnpo_beta_params(t([0.5, 0.5])) is None
    # a group solved every time (p = 1) has advantage exactly 0, not nan (the density there is 0)
    out = ADVANTAGES.get_fn("bnpo")(t([1, 1, 0, 1]), torch.ones(4, 1), 2, cfg(), state=resumed)
    assert torch.equal(out[:2, 0], torch.zeros(2)) and torch.isfinite(out).all()


def test_bnpo_refuses_inputs_outside_its_setting():
    with pytest.raises(ValueError, match=r"bnpo needs rewards in \[0, 1\]"):
        ADVANTAGES.get_fn("bnpo")(t([2.0, 0.0]), torch.ones(2, 1), 2, cfg(), state={})
    with pytest.raises(ValueError, match="bnpo .*per-token rewards.*kl_in_reward=false"):
        ADVANTAGES.get_fn("bnpo")(t([1.0, 0.0]), torch.ones(2, 1), 2, cfg(), token_rewards=torch.zeros(2, 1))
    with pytest.raises(ValueError, match="bnpo needs a group of at least 2"):
        ADVANTAGES.get_fn("bnpo")(t([1.0, 0.0]), torch.ones(2, 1), 1, cfg())


def test_gae_by_hand_on_a_three_token_and_a_padded_two_token_sequence():
    # gamma 0.9, lam 0.5 (gamma*lam = 0.45)
    # seq 1: rewards [0, 0, 1] (outcome 1), values [0.5, 0.6, 0.8], V after the end = 0
    #   delta_2 = 1 + 0 - 0.8 = 0.2;  delta_1 = 0 + 0.9*0.8 - 0.6 = 0.12;  delta_0 = 0 + 0.9*0.6 - 0.5 = 0.04
    #   A_2 = 0.2;  A_1 = 0.12 + 0.45*0.2 = 0.21;  A_0 = 0.04 + 0.45*0.21 = 0.1345
    #   returns = A + V = [0.6345, 0.81, 1.0]
    # seq 2 (length 2; padding value 9.9 and token reward 0.7 must be ignored): outcome 0, KL rewards -0.1, -0.1
    #   delta_1 = -0.1 + 0 - 0.1 = -0.2;  delta_0 = -0.1 + 0.9*0.1 - 0.3 = -0.31
    #   A_1 = -0.2;  A_0 = -0.31 + 0.45*(-0.2) = -0.4;  returns = [-0.1, -0.1]
    rewards = t([1.0, 0.0])
    mask = t([[1, 1, 1], [1, 1, 0]])
    token_rewards = t([[0.0, 0.0, 0.0], [-0.1, -0.1, 0.7]])
    values = t([[0.5, 0.6, 0.8], [0.3, 0.1, 9.9]])
    exp_adv = t([[0.1345, 0.21, 0.2], [-0.4, -0.2, 0.0]])
    exp_ret = t([[0.6345, 0.81, 1.0], [-0.1, -0.1, 0.0]])

    per_token = adv_mod._per_token_rewards("gae", rewards, mask, token_rewards)
    assert torch.allclose(per_token, t([[0, 0, 1], [-0.1, -0.1, 0]]))
    adv, ret = gae_advantages_and_returns(per_token, values, mask, gamma=0.9, lam=0.5)
    assert torch.allclose(adv, exp_adv, atol=1e-6) and torch.allclose(ret, exp_ret, atol=1e-6)
    assert adv[1, 2].item() == 0.0 and ret[1, 2].item() == 0.0

    c = cfg(gamma=0.9, lam=0.5)
    out = ADVANTAGES.get_fn("gae")(rewards, mask, 1, c, token_rewards=token_rewards, values=values)
    assert torch.allclose(out, exp_adv, atol=1e-6)
    # whitening over the 5 valid tokens
    valid = [0.1345, 0.21, 0.2, -0.4, -0.2]
    m = sum(valid) / 5
    s = math.sqrt(sum((v - m) ** 2 for v in valid) / 5)
    out = ADVANTAGES.get_fn("gae")(rewards, mask, 1, cfg(gamma=0.9, lam=0.5, adv_whiten=True, adv_eps=1e-8),
                                   token_rewards=token_rewards, values=values)
    assert torch.allclose(out, torch.where(mask > 0, (exp_adv - m) / (s + 1e-8), torch.zeros(1)), atol=1e-5)
    assert out[1, 2].item() == 0.0

    with pytest.raises(ValueError, match="gae needs values.*critic"):
        ADVANTAGES.get_fn("gae")(rewards, mask, 1, c)


def test_gae_with_gamma_and_lambda_one_is_return_minus_value_and_skips_masked_positions():
    # gamma = lam = 1: A_t = G_t - V_t
    per_token = t([[0.0, 0.5, 1.0]])
    values = t([[0.2, 0.4, 0.1]])
    adv, ret = gae_advantages_and_returns(per_token, values, torch.ones(1, 3), 1.0, 1.0)
    assert torch.allclose(adv, t([[1.5 - 0.2, 1.5 - 0.4, 1.0 - 0.1]]))
    assert torch.allclose(ret, t([[1.5, 1.5, 1.0]]))
    # a masked position inside the sequence (e.g. an environment observation) is skipped:
    # mask [1, 0, 1], gamma 0.5, lam 1, outcome 1 on token 2, V = [0, 5, 0]
    #   delta_2 = 1 - 0 = 1 -> A_2 = 1;  token 1 skipped (its value 5 is not used)
    #   delta_0 = 0 + 0.5 * V_2 - V_0 = 0 -> A_0 = 0 + 0.5 * 1 * A_2 = 0.5
    adv, _ = gae_advantages_and_returns(t([[0, 0, 1]]), t([[0, 5, 0]]), t([[1, 0, 1]]), 0.5, 1.0)
    assert torch.equal(adv, t([[0.5, 0.0, 1.0]]))
    # the same skip for REINFORCE++ returns: G_0 = 0 + 0.5 * 1
    assert torch.equal(discounted_returns(t([[0, 9, 1]]), t([[1, 0, 1]]), 0.5), t([[0.5, 0.0, 1.0]]))


def test_last_token_rewards_and_masked_whiten_edges():
    mask = t([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    out = last_token_rewards(t([2.0, 3.0, 4.0]), mask)
    assert torch.equal(out, t([[0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 4]]))  # a row without tokens gets none
    assert torch.equal(masked_whiten(torch.randn(2, 3), torch.zeros(2, 3), 1e-6), torch.zeros(2, 3))


def _inputs(B=8, T=5, n=4):
    g = torch.Generator().manual_seed(0)
    rewards = (torch.rand(B, generator=g) > 0.5).float()
    rewards[:4] = t([1, 0, 0, 1])  # at least one group with a mixed outcome
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    extra = {"values": torch.randn(B, T, generator=g), "baseline_rewards": torch.full((B,), 0.5), "state": {}}
    return rewards, mask, n, extra


@pytest.mark.parametrize("name", sorted(ALL_ESTIMATORS))
def test_uniform_signature_for_every_estimator(name):
    rewards, mask, n, extra = _inputs()
    fn = ADVANTAGES.get_fn(name)
    if name == "distill":  # its advantages are the KL token rewards; without them it raises
        with pytest.raises(ValueError, match="token_rewards"):
            fn(rewards, mask, n, cfg(), **extra)
        extra = {**extra, "token_rewards": -0.01 * mask}
    out = fn(rewards, mask, n, cfg(adv_eps=1e-6, passk_k=2, gfpo_k=2), **extra)  # k < n: non-zero advantages
    assert out.shape == mask.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert torch.equal(out[mask == 0], torch.zeros(int((mask == 0).sum())))  # exactly 0 on padding
    assert (out[mask > 0] != 0).any()
    # the same call with KL token rewards (0 at padding), except bnpo which refuses them
    token_rewards = -0.01 * mask
    if name in ("bnpo", "passk", "w_reinforce"):  # bounded / binary rewards: they refuse per-token rewards
        with pytest.raises(ValueError):
            fn(rewards, mask, n, cfg(), token_rewards=token_rewards, **extra)
    else:
        extra = {k: v for k, v in extra.items() if k != "token_rewards"}
        out = fn(rewards, mask, n, cfg(adv_eps=1e-6), token_rewards=token_rewards, **extra)
        assert torch.isfinite(out).all() and torch.equal(out[mask == 0], torch.zeros(int((mask == 0).sum())))


def test_outcome_estimators_use_the_kl_shaped_sequence_reward():
    # rloo with token rewards: sequence rewards r_i + sum_t kl_t = {1 - 0.2, 0 - 0.1} = {0.8, -0.1}
    #   -> 0.8 - (-0.1) = 0.9 and -0.1 - 0.8 = -0.9
    mask = t([[1, 1], [1, 0]])
    token_rewards = t([[-0.1, -0.1], [-0.1, 0.0]])
    out = ADVANTAGES.get_fn("rloo")(t([1.0, 0.0]), mask, 2, cfg(), token_rewards=token_rewards)
    assert torch.allclose(out, t([[0.9, 0.9], [-0.9, 0.0]]))


def test_shape_errors_name_the_estimator():
    with pytest.raises(ValueError, match=r"grpo: mask must have shape \[B, T\]"):
        ADVANTAGES.get_fn("grpo")(t([1.0, 0.0]), torch.ones(3, 2), 2, cfg())
    with pytest.raises(ValueError, match="reinforce_pp: token_rewards must have the mask's shape"):
        ADVANTAGES.get_fn("reinforce_pp")(t([1.0, 0.0]), torch.ones(2, 2), 1, cfg(), token_rewards=torch.ones(2, 3))


def test_zero_eps_never_divides_zero_by_zero():
    # algo.adv_eps = 0 is a valid config: an all-equal group still gets advantage 0, not nan
    assert torch.equal(grpo_advantages(t([0.5, 0.5, 1.0, 0.0]), 2, eps=0.0), t([0.0, 0.0, 1.0, -1.0]))
    # one valid token in the batch: its whitened return is 0
    out = ADVANTAGES.get_fn("reinforce_pp")(t([1.0]), t([[1.0, 0.0]]), 1, cfg(adv_eps=0.0))
    assert torch.equal(out, t([[0.0, 0.0]]))
