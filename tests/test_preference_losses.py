"""Preference losses, the Bradley-Terry loss and online pair selection against hand-worked numbers."""

import math

import pytest
import torch

from postrl.algorithms.preference import (
    PREFERENCE_LOSSES,
    PairLogps,
    UnpairedLogps,
    best_worst_pair,
    bradley_terry_loss,
    implicit_reward_margins,
    rso_accept,
    rso_pair,
)
from postrl.config import PreferenceConfig

ALL = ("dpo", "ipo", "cdpo", "robust_dpo", "simpo", "orpo", "kto", "slic")

# Constants used below:  log(1 + e^-1) = 0.3132617 = -log sigmoid(1),  log(1 + e) = 1.3132617 = -log sigmoid(-1)
NLS1 = math.log1p(math.exp(-1.0))
NLS_1 = math.log1p(math.exp(1.0))


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def pairs(chosen, rejected, ref_chosen=None, ref_rejected=None, chosen_len=None, rejected_len=None):
    n = len(chosen)
    return PairLogps(t(*chosen), t(*rejected), t(*(chosen_len or [1.0] * n)), t(*(rejected_len or [1.0] * n)),
                     None if ref_chosen is None else t(*ref_chosen), None if ref_rejected is None else t(*ref_rejected))


def cfg(**kw):
    return PreferenceConfig(**kw)


# Pair 1: chosen -2 vs ref -3 (log-ratio +1), rejected -4 vs ref -3 (log-ratio -1): h = 2.
# Pair 2: every log-prob equal to its reference: h = 0.
REF_PAIRS = dict(chosen=[-2.0, -1.0], rejected=[-4.0, -5.0], ref_chosen=[-3.0, -1.0], ref_rejected=[-3.0, -5.0])


def test_registry_has_every_loss_and_flags():
    assert set(ALL) <= set(PREFERENCE_LOSSES)
    for name in ("simpo", "orpo", "slic"):
        assert PREFERENCE_LOSSES[name].needs_reference is False
    for name in ("dpo", "ipo", "cdpo", "robust_dpo", "kto"):
        assert PREFERENCE_LOSSES[name].needs_reference is True
    assert PREFERENCE_LOSSES["kto"].unpaired and not PREFERENCE_LOSSES["dpo"].unpaired
    with pytest.raises(KeyError, match="Did you mean 'simpo'"):
        PREFERENCE_LOSSES.get_fn("simp")


def test_dpo():
    # beta = 0.5: pair 1 beta*h = 1 -> -log sigmoid(1) = 0.3132617; pair 2 h = 0 -> log 2 = 0.6931472.
    # rewards/chosen = beta * (+1, 0) = (0.5, 0); rewards/rejected = beta * (-1, 0) = (-0.5, 0).
    loss, st = PREFERENCE_LOSSES["dpo"](pairs(**REF_PAIRS), cfg(beta=0.5))
    assert loss.tolist() == pytest.approx([0.3132617, 0.6931472], abs=1e-7)
    assert st["rewards/chosen"].tolist() == pytest.approx([0.5, 0.0])
    assert st["rewards/rejected"].tolist() == pytest.approx([-0.5, 0.0])
    assert st["margins"].tolist() == pytest.approx([1.0, 0.0])
    assert st["accuracy"].tolist() == [1.0, 0.0]  # a zero margin is not counted as correct


def test_dpo_gradient():
    # d/d pi(y_w) of -log sigmoid(beta h) = -beta * sigmoid(-beta h) = -0.5 * 0.2689414 = -0.1344707 at beta h = 1.
    lp = pairs(**REF_PAIRS)
    lp.chosen.requires_grad_(True)
    PREFERENCE_LOSSES["dpo"](lp, cfg(beta=0.5))[0].sum().backward()
    assert lp.chosen.grad.tolist() == pytest.approx([-0.1344707, -0.25], abs=1e-7)


def test_dpo_needs_reference():
    with pytest.raises(ValueError, match="needs reference log-probs"):
        PREFERENCE_LOSSES["dpo"](pairs([-1.0], [-2.0]), cfg())


def test_implicit_reward_margins():
    assert implicit_reward_margins(pairs(**REF_PAIRS), 0.5).tolist() == pytest.approx([1.0, 0.0])


def test_ipo():
    # IPO eq. 17 with summed log-probs: (h - 1/(2 tau))^2. tau = 0.5: (2 - 1)^2 = 1 and (0 - 1)^2 = 1.
    # tau = 0.25: target 2 -> (2 - 2)^2 = 0 and (0 - 2)^2 = 4.
    loss, _ = PREFERENCE_LOSSES["ipo"](pairs(**REF_PAIRS), cfg(beta=0.5))
    assert loss.tolist() == pytest.approx([1.0, 1.0])
    loss, _ = PREFERENCE_LOSSES["ipo"](pairs(**REF_PAIRS), cfg(beta=0.25))
    assert loss.tolist() == pytest.approx([0.0, 4.0])


def test_cdpo_label_smoothing():
    # beta h = 1, eps = 0.1: 0.9 * 0.3132617 + 0.1 * 1.3132617 = 0.2819355 + 0.1313262 = 0.4132617;
    # h = 0: 0.9 log 2 + 0.1 log 2 = log 2. eps = 0 is plain DPO.
    c = cfg(beta=0.5, label_smoothing=0.1, loss="cdpo")
    loss, st = PREFERENCE_LOSSES["cdpo"](pairs(**REF_PAIRS), c)
    assert loss.tolist() == pytest.approx([0.9 * NLS1 + 0.1 * NLS_1, math.log(2)], abs=1e-9)
    assert loss[0].item() == pytest.approx(0.4132617, abs=1e-7)
    dpo = PREFERENCE_LOSSES["dpo"](pairs(**REF_PAIRS), cfg(beta=0.5))[0]
    assert PREFERENCE_LOSSES["cdpo"](pairs(**REF_PAIRS), cfg(beta=0.5))[0].tolist() == pytest.approx(dpo.tolist())
    assert st["margins"].tolist() == pytest.approx([1.0, 0.0])


def test_robust_dpo():
    # ((1 - 0.1) * 0.3132617 - 0.1 * 1.3132617) / (1 - 0.2) = (0.2819355 - 0.1313262) / 0.8 = 0.1882617;
    # h = 0: (0.9 - 0.1) log 2 / 0.8 = log 2.
    c = cfg(beta=0.5, label_smoothing=0.1, loss="robust_dpo")
    loss, _ = PREFERENCE_LOSSES["robust_dpo"](pairs(**REF_PAIRS), c)
    assert loss.tolist() == pytest.approx([0.1882617, math.log(2)], abs=1e-7)
    with pytest.raises(ValueError, match="label_smoothing < 0.5"):
        PREFERENCE_LOSSES["robust_dpo"](pairs(**REF_PAIRS), cfg(beta=0.5, label_smoothing=0.5))


def test_simpo_reference_free():
    # chosen: -2 over 4 tokens -> avg -0.5; rejected: -6 over 3 tokens -> avg -2. beta = 2, gamma = 1:
    # 2 * -0.5 - 2 * -2 - 1 = -1 + 4 - 1 = 2 -> -log sigmoid(2) = log(1 + e^-2) = 0.1269280.
    lp = pairs([-2.0], [-6.0], chosen_len=[4.0], rejected_len=[3.0])  # no reference log-probs at all
    loss, st = PREFERENCE_LOSSES["simpo"](lp, cfg(beta=2.0, simpo_gamma=1.0))
    assert loss.item() == pytest.approx(0.1269280, abs=1e-7)
    assert st["rewards/chosen"].item() == pytest.approx(-1.0)
    assert st["rewards/rejected"].item() == pytest.approx(-4.0)
    assert st["margins"].item() == pytest.approx(3.0)


def test_orpo_reference_free():
    # chosen: 2 tokens of prob 0.5 -> avg log p = log 0.5, odds 0.5/0.5 = 1, log odds 0;
    # rejected: 3 tokens of prob 0.2 -> avg log 0.2, odds 0.2/0.8 = 1/4, log odds -log 4.
    # log odds ratio = log 4 -> L_OR = -log sigmoid(log 4) = -log(4/5) = 0.2231436; NLL = -log 0.5 = 0.6931472.
    # lambda = 0.1: 0.6931472 + 0.0223144 = 0.7154615.
    lp = pairs([2 * math.log(0.5)], [3 * math.log(0.2)], chosen_len=[2.0], rejected_len=[3.0])
    loss, st = PREFERENCE_LOSSES["orpo"](lp, cfg(orpo_lambda=0.1))
    assert loss.item() == pytest.approx(0.7154615, abs=1e-7)
    assert st["margins"].item() == pytest.approx(math.log(4))
    assert st["accuracy"].item() == 1.0


def test_slic_reference_free():
    # delta = 1, lambda = 0.1. Pair 1: hinge max(0, 1 + (-3) ... ) = max(0, 1 - (-3) + (-3.5)) = 0.5, plus
    # -0.1 * (-3) = 0.3 -> 0.8. Pair 2: hinge max(0, 1 - (-1) + (-5)) = 0, plus 0.1 -> 0.1.
    lp = pairs([-3.0, -1.0], [-3.5, -5.0])
    loss, st = PREFERENCE_LOSSES["slic"](lp, cfg(slic_delta=1.0, slic_lambda=0.1))
    assert loss.tolist() == pytest.approx([0.8, 0.1])
    assert st["margins"].tolist() == pytest.approx([0.5, 4.0])


def kto_inputs(kl_diffs):
    # Example 1 desirable: log-ratio r = -2 - (-3) = +1; example 2 undesirable: r = -4 - (-3) = -1.
    kl_ref = [-3.0 - d for d in kl_diffs]
    return UnpairedLogps(t(-2.0, -4.0), t(-3.0, -3.0), torch.tensor([True, False]), t(-3.0, -3.0), t(*kl_ref))


def test_kto():
    # beta = ln 3 so that sigmoid(beta) = 3/4 and sigmoid(2 beta) = 9/10. lambda_D = 1, lambda_U = 2.
    c = cfg(beta=math.log(3), kto_lambda_d=1.0, kto_lambda_u=2.0)
    # Mismatched log-ratios (0.5, -0.5): mean 0 -> z0 = 0.
    # desirable: 1 - sigmoid(beta * (1 - 0)) = 1 - 3/4 = 0.25; undesirable: 2 - 2 sigmoid(beta (0 + 1)) = 0.5.
    loss, st = PREFERENCE_LOSSES["kto"](kto_inputs([0.5, -0.5]), c)
    assert loss.tolist() == pytest.approx([0.25, 0.5])
    assert st["accuracy"].tolist() == [1.0, 1.0]
    # Mismatched log-ratios (-1, -1): mean -1 is clamped to z0 = 0, same losses.
    assert PREFERENCE_LOSSES["kto"](kto_inputs([-1.0, -1.0]), c)[0].tolist() == pytest.approx([0.25, 0.5])
    # Mismatched log-ratios (1, 1): z0 = 1. desirable: 1 - sigmoid(0) = 0.5; undesirable: 2 - 2 * 9/10 = 0.2.
    loss, st = PREFERENCE_LOSSES["kto"](kto_inputs([1.0, 1.0]), c)
    assert loss.tolist() == pytest.approx([0.5, 0.2])
    assert st["kl"].tolist() == pytest.approx([1.0, 1.0])


def test_kto_reference_point_is_detached():
    inp = kto_inputs([1.0, 1.0])
    inp.kl_logps.requires_grad_(True)
    inp.logps.requires_grad_(True)
    PREFERENCE_LOSSES["kto"](inp, cfg(beta=1.0))[0].sum().backward()
    assert inp.kl_logps.grad is None
    assert inp.logps.grad is not None and inp.logps.grad.abs().sum() > 0


def test_bradley_terry():
    # r_c - r_r = 1 -> -log sigmoid(1) = 0.3132617; with margin 1: -log sigmoid(0) = log 2.
    # Second pair wrongly ordered (r_c - r_r = -1): -log sigmoid(-1) = 1.3132617, accuracy 0.
    loss, st = bradley_terry_loss(t(2.0, 0.0), t(1.0, 1.0))
    assert loss.tolist() == pytest.approx([0.3132617, 1.3132617], abs=1e-7)
    assert st["accuracy"].tolist() == [1.0, 0.0]
    loss, st = bradley_terry_loss(t(2.0), t(1.0), margin=t(1.0))
    assert loss.item() == pytest.approx(math.log(2))
    assert st["margins"].item() == 1.0  # the reported margin is r_c - r_r, without m


def test_best_worst_pair():
    assert best_worst_pair([0.5, 1.0, 1.0, 0.0]) == (1, 3)
    assert best_worst_pair([1.0, 1.0, 1.0]) is None  # a tie carries no preference
    assert best_worst_pair([2.0]) is None


def test_rso_accept_by_hand():
    # rewards (1, 3, 2), beta = 1. First pass, r_max = 3: candidate 0 accepted iff u < e^-2 = 0.135,
    # candidate 1 always (e^0 = 1), candidate 2 iff u < e^-1 = 0.368.
    draws = iter([0.5, 0.9, 0.3])
    assert rso_accept([1.0, 3.0, 2.0], 1.0, 2, lambda: next(draws)) == [1, 2]
    # Candidate 2 rejected (0.5 >= 0.368); second pass over {0, 2} with r_max = 2: candidate 0 iff u < e^-1.
    draws = iter([0.5, 0.9, 0.5, 0.2])
    assert rso_accept([1.0, 3.0, 2.0], 1.0, 2, lambda: next(draws)) == [1, 0]
    draws = iter([0.5, 0.9, 0.5, 0.2])
    assert rso_pair([1.0, 3.0, 2.0], 1.0, lambda: next(draws)) == (1, 0)
    draws = iter([0.0, 0.0])
    assert rso_pair([1.0, 1.0], 1.0, lambda: next(draws)) is None  # tie
