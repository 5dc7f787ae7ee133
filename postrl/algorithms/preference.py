"""Preference losses: pure functions over per-sequence log-probs of chosen / rejected completions.

Notation: for a pair (x, y_w, y_l), ``pi(y)`` is the policy's *summed* log-prob of completion y given
x, ``ref(y)`` the reference model's, ``|y|`` the number of completion tokens, ``avg(y) = pi(y) / |y|``,
``h = (pi(y_w) - ref(y_w)) - (pi(y_l) - ref(y_l))`` the log-ratio difference, ``s = sigmoid``,
``sg`` a stop-gradient.

==============  ============================================================  ==========================================
name            per-pair loss (minimised)                                     paper
==============  ============================================================  ==========================================
``dpo``         ``-log s(beta h)``                                            Rafailov et al. 2023, arXiv:2305.18290, eq. 7
``ipo``         ``(h - 1 / (2 beta))^2`` (beta is the paper's tau; summed     Azar et al. 2023, arXiv:2310.12036, eq. 17
                log-probs, see :func:`ipo_loss`)
``cdpo``        ``-(1 - eps) log s(beta h) - eps log s(-beta h)``             Mitchell 2023, "A note on DPO with noisy
                                                                              preferences" (conservative DPO)
``robust_dpo``  ``[(1 - eps)(-log s(beta h)) - eps(-log s(-beta h))]          Chowdhury et al. 2024, arXiv:2403.00409,
                / (1 - 2 eps)``                                               Sec. 3 (unbiased loss, flip rate eps)
``simpo``       ``-log s(beta avg(y_w) - beta avg(y_l) - gamma)``; no         Meng et al. 2024, arXiv:2405.14734, eq. 6
                reference
``orpo``        ``-avg(y_w) + lambda (-log s(log odds(y_w) - log odds(y_l)))``  Hong et al. 2024, arXiv:2403.07691, eqs.
                with ``odds(y) = P / (1 - P)``, ``P = exp(avg(y))``; no       6-7
                reference
``kto``         unpaired: ``lambda_y - v(x, y)`` with                         Ethayarajh et al. 2024, arXiv:2402.01306,
                ``v = lambda_D s(beta (r - z0))`` (desirable) or              eq. 8
                ``lambda_U s(beta (z0 - r))`` (undesirable),
                ``r = pi(y) - ref(y)``, ``z0 = sg(max(0, mean(pi(y') -
                ref(y'))))`` over mismatched pairs (x, y')
``slic``        ``max(0, delta - pi(y_w) + pi(y_l)) - lambda pi(y_w)``;       Zhao et al. 2023 (SLiC-HF),
                no reference                                                  arXiv:2305.10425, Sec. 2
==============  ============================================================  ==========================================

Signatures (AReaL style, no model inside)::

    fn(lp: PairLogps, cfg: PreferenceConfig) -> (losses [B], stats)    # paired losses
    fn(lp: UnpairedLogps, cfg: PreferenceConfig) -> (losses [B], stats)  # kto (fn.unpaired = True)

``stats`` maps names to per-pair tensors ``[B]`` (detached): every paired loss returns
``rewards/chosen``, ``rewards/rejected``, ``margins`` (= chosen - rejected reward) and ``accuracy``
(1 where the margin is > 0). For the reference-based losses the reward is DPO's implicit reward
``beta (pi(y) - ref(y))``, so ``margins = beta h``. ``fn.needs_reference`` says whether the trainer must
provide reference log-probs; the reference-free ones (simpo, orpo, slic) never load or run a reference.

The trainer's reduction is the mean of ``losses`` over the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import Registry

PREFERENCE_LOSSES = Registry("preference loss", "preference.loss")
register_preference_loss = PREFERENCE_LOSSES.register


@dataclass
class PairLogps:
    """Per-pair sequence log-probs, all ``[B]``.

    chosen / rejected:          summed policy log-probs of the completion tokens (differentiable).
    chosen_len / rejected_len:  completion token counts (float).
    ref_chosen / ref_rejected:  summed reference log-probs (None for reference-free losses).
    """

    chosen: Tensor
    rejected: Tensor
    chosen_len: Tensor
    rejected_len: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None


@dataclass
class UnpairedLogps:
    """KTO inputs, all ``[B]``: one completion per example, labelled desirable or undesirable.

    logps / ref_logps:          summed policy / reference log-probs of the example's completion.
    desirable:                  bool, True for desirable examples.
    kl_logps / kl_ref_logps:    summed policy / reference log-probs of a *mismatched* completion y'
                                under the example's prompt (for the reference point z0).
    """

    logps: Tensor
    ref_logps: Tensor
    desirable: Tensor
    kl_logps: Tensor
    kl_ref_logps: Tensor


def _stats(reward_c: Tensor, reward_r: Tensor) -> dict[str, Tensor]:
    reward_c, reward_r = reward_c.detach(), reward_r.detach()
    margins = reward_c - reward_r
    return {"rewards/chosen": reward_c, "rewards/rejected": reward_r, "margins": margins,
            "accuracy": (margins > 0).to(reward_c.dtype)}


def _need_ref(lp: PairLogps, name: str) -> tuple[Tensor, Tensor]:
    if lp.ref_chosen is None or lp.ref_rejected is None:
        raise ValueError(f"preference loss {name!r} needs reference log-probs (ref_chosen, ref_rejected)")
    return lp.ref_chosen, lp.ref_rejected


def _implicit(lp: PairLogps, beta: float, name: str) -> tuple[Tensor, Tensor, Tensor]:
    """(beta * chosen log-ratio, beta * rejected log-ratio, h)."""
    ref_c, ref_r = _need_ref(lp, name)
    log_ratio_c, log_ratio_r = lp.chosen - ref_c, lp.rejected - ref_r
    return beta * log_ratio_c, beta * log_ratio_r, log_ratio_c - log_ratio_r


def implicit_reward_margins(lp: PairLogps, beta: float) -> Tensor:
    """``beta * h``, DPO's implicit reward margin (Rafailov et al. 2023, eq. 5), ``[B]``; held-out accuracy
    is the fraction of pairs where it is > 0."""
    return _implicit(lp, beta, "implicit reward")[2] * beta


@register_preference_loss("dpo")
def dpo_loss(lp: PairLogps, cfg) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO, Rafailov et al. 2023, "Direct Preference Optimization", arXiv:2305.18290, eq. 7.

    ``loss = -log sigmoid(beta h)`` with ``h = (pi(y_w) - ref(y_w)) - (pi(y_l) - ref(y_l))`` on summed
    log-probs (TRL's ``loss_type="sigmoid"``).
    """
    reward_c, reward_r, h = _implicit(lp, cfg.beta, "dpo")
    return -F.logsigmoid(cfg.beta * h), _stats(reward_c, reward_r)


@register_preference_loss("ipo")
def ipo_loss(lp: PairLogps, cfg) -> tuple[Tensor, dict[str, Tensor]]:
    """IPO, Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", arXiv:2310.12036, eq. 17: ``loss = (h - 1 / (2 tau))^2`` with ``tau = preference.beta``.

    postrl uses ``h`` on *summed* log-probs, as eq. 17 is written. TRL (``loss_type="ipo"``) instead
    divides each log-ratio by its completion length (a per-token average) before the difference; with
    summed log-probs the target ``1/(2 tau)`` is a whole-sequence margin, so pick tau accordingly.
    """
    reward_c, reward_r, h = _implicit(lp, cfg.beta, "ipo")
    return (h - 1.0 / (2.0 * cfg.beta)) ** 2, _stats(reward_c, reward_r)


@register_preference_loss("cdpo")
def cdpo_loss(lp: PairLogps, cfg) -> tuple[Tensor, dict[str, Tensor]]:
    """Conservative DPO, Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO":
    DPO with label smoothing ``eps = preference.label_smoothing`` (each label flipped with probability eps),
    ``loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``."""
    reward_c, reward_r, h = _implicit(lp, cfg.beta, "cdpo")
    eps = cfg.label_smoothing
    z = cfg.beta * h
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z), _stats(reward_c, reward_r)


@register_preference_loss("robust_dpo")
def robust_dpo_loss(lp: PairLogps, cfg) -> tuple[Tensor, dict[str, Tensor]]:
    """Robust DPO, Chowdhury et al. 2024, "Provably Robust DPO", arXiv:2403.00409, Sec. 3: the unbiased
    estimate of the clean DPO loss under label-flip rate ``eps = preference.label_smoothing < 0.5``,
    ``loss = [(1 - eps) (-log sigmoid(beta h)) - eps (-log sigmoid(-beta h))] / (1 - 2 eps)``."""
    reward_c, reward_r, h = _implicit(lp, cfg.beta, "robust_dpo")
    eps = cfg.label_smoothing
    if not 0 <= eps < 0.5:
        raise ValueError(f"robust_dpo needs 0 <= label_smoothing < 0.5, got {eps}")
    z = cfg.beta * h
    loss = ((1.0 - eps) * -F.logsigmoid(z) - eps * -F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
    return loss, _stats(reward_c, reward_r)


@register_preference_loss("simpo")
def simpo_loss(lp: PairLogps, cfg) -> tuple[Tensor, dict[str, Tensor]]:
    """SimPO, Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    arXiv:2405.14734, eq. 6: ``loss = -log sigmoid(beta/|y_w| pi(y_w) - beta/|y_l| pi(y_l) - gamma)``,
    ``gamma = preference.simpo_gamma``. No reference model. Rewards are ``beta * avg(y)``."""
    reward_c = cfg.beta * lp.chosen / lp.chosen_len.clamp(min=1)
    reward_r = cfg.beta * lp.rejected / lp.rejected_len.clamp(min=1)
    return -F.logsigmoid(reward_c - reward_r - cfg.simpo_gamma), _stats(reward_c, reward_r)


def _log1mexp(a: Tensor) -> Tensor:
    """``log(1 - exp(a))`` for ``a < 0``, stable (Maechler 2012); ``a`` is clamped just below 0."""
    a = a.clamp(max=-1e-6)
    return torch.where(a > -math.log(2.0), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


@register_preference_loss("orpo")
def orpo_loss(lp: PairLogps, cfg) -> tuple[Tensor, dict[str, Tensor]]:
    """ORPO, Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
    arXiv:2403.07691, eqs. 6-7: ``loss = L_SFT + lambda L_OR`` with ``L_SFT = -avg(y_w)`` (per-token NLL of
    the chosen completion), ``L_OR = -log sigmoid(log odds(y_w) - log odds(y_l))``,
    ``log odds(y) = avg(y) - log(1 - exp(avg(y)))`` (odds of the length-averaged likelihood, eq. 4),
    ``lambda = preference.orpo_lambda``. No reference model. Rewards are ``avg(y)``; the margin is the
    log odds ratio."""
    avg_c = lp.chosen / lp.chosen_len.clamp(min=1)
    avg_r = lp.rejected / lp.rejected_len.clamp(min=1)
    log_odds_ratio = (avg_c - _log1mexp(avg_c)) - (avg_r - _log1mexp(avg_r))
    loss = -avg_c + cfg.orpo_lambda * -F.logsigmoid(log_odds_ratio)
    stats = _stats(avg_c, avg_r)
    stats["margins"] = log_odds_ratio.detach()
    stats["accuracy"] = (log_odds_ratio.detach() > 0).to(avg_c.dtype)
    return loss, stats


@register_preference_loss("slic")
def slic_loss(lp: PairLogps, cfg) -> tuple[Tensor, dict[str, Tensor]]:
    """SLiC-HF, Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback",
    arXiv:2305.10425, Sec. 2: rank calibration hinge on sequence log-likelihoods plus a cross-entropy
    regularizer, ``loss = max(0, delta - pi(y_w) + pi(y_l)) - lambda pi(y_w)`` with
    ``delta = preference.slic_delta`` and ``lambda = preference.slic_lambda``. The paper regularizes towards
    an SFT target ``y_ref``; postrl uses the chosen completion as that target (SLiC-HF's "direct" variant
    on human-feedback pairs). No reference model; rewards are the summed log-probs."""
    hinge = torch.relu(cfg.slic_delta - lp.chosen + lp.rejected)
    return hinge - cfg.slic_lambda * lp.chosen, _stats(lp.chosen, lp.rejected)


@register_preference_loss("kto")
def kto_loss(lp: UnpairedLogps, cfg) -> tuple[Tensor, dict[str, Tensor]]:
    """KTO, Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
    arXiv:2402.01306, eq. 8: ``loss = lambda_y - v(x, y)`` per example with ``r = pi(y) - ref(y)``,
    ``v = lambda_D sigmoid(beta (r - z0))`` for desirable and ``lambda_U sigmoid(beta (z0 - r))`` for
    undesirable examples. The reference point ``z0 = max(0, mean_B(pi(y') - ref(y')))`` estimates
    ``KL(pi || ref)`` from mismatched pairs (x, y') of the batch and is detached (no gradient), as in the
    paper's implementation. Stats: ``rewards`` (``beta r``), ``kl`` (z0), ``accuracy`` (1 where the sign
    of ``r - z0`` agrees with the label)."""
    z0 = (lp.kl_logps - lp.kl_ref_logps).mean().clamp(min=0).detach()
    r = lp.logps - lp.ref_logps
    desirable = lp.desirable.bool()
    v = torch.where(desirable, cfg.kto_lambda_d * torch.sigmoid(cfg.beta * (r - z0)),
                    cfg.kto_lambda_u * torch.sigmoid(cfg.beta * (z0 - r)))
    lam = torch.where(desirable, torch.full_like(r, cfg.kto_lambda_d), torch.full_like(r, cfg.kto_lambda_u))
    right = torch.where(desirable, r > z0, r < z0)
    stats = {"rewards": (cfg.beta * r).detach(), "kl": z0.expand_as(r), "accuracy": right.to(r.dtype)}
    return lam - v, stats


for _fn, _ref, _unpaired in ((dpo_loss, True, False), (ipo_loss, True, False), (cdpo_loss, True, False),
                             (robust_dpo_loss, True, False), (simpo_loss, False, False), (orpo_loss, False, False),
                             (slic_loss, False, False), (kto_loss, True, True)):
    _fn.needs_reference = _ref
    _fn.unpaired = _unpaired


# ------------------------------------------------------------------------------------------------------------
# Reward models and online pair selection
# ------------------------------------------------------------------------------------------------------------


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | None = None
                       ) -> tuple[Tensor, dict[str, Tensor]]:
    """Reward-model loss under the Bradley-Terry model (Bradley & Terry 1952; Ouyang et al. 2022,
    arXiv:2203.02155, eq. 1): ``loss = -log sigmoid(r_c - r_r - m)``, with the optional per-pair margin
    ``m`` of Llama 2 (Touvron et al. 2023, arXiv:2307.09288, eq. 2; 0 when None). Shapes ``[B]``.
    Stats: ``accuracy`` (1 where ``r_c > r_r``) and ``margins`` (``r_c - r_r``)."""
    diff = r_chosen - r_rejected
    target = diff if margin is None else diff - margin
    d = diff.detach()
    return -F.logsigmoid(target), {"margins": d, "accuracy": (d > 0).to(d.dtype),
                                   "rewards/chosen": r_chosen.detach(), "rewards/rejected": r_rejected.detach()}


def best_worst_pair(rewards: Sequence[float]) -> tuple[int, int] | None:
    """Indices ``(chosen, rejected)`` of the highest and lowest reward (first occurrence of each), or None
    when all rewards are equal (a tie carries no preference)."""
    if len(rewards) < 2:
        return None
    hi = max(range(len(rewards)), key=lambda i: (rewards[i], -i))
    lo = min(range(len(rewards)), key=lambda i: (rewards[i], i))
    return None if rewards[hi] == rewards[lo] else (hi, lo)


def rso_accept(rewards: Sequence[float], beta: float, num_samples: int,
               uniform: Callable[[], float]) -> list[int]:
    """Statistical rejection sampling, Liu et al. 2023, "Statistical Rejection Sampling Improves Preference
    Optimization", arXiv:2309.06657, Algorithm 1: draw from ``pi_r(y) ~ pi(y) exp(r(y) / beta)`` using
    candidates sampled from ``pi``. Passes over the remaining candidates in order, accepting candidate j when
    ``u < exp((r_j - r_max) / beta)`` (``r_max`` over the candidates not yet accepted, ``u = uniform()``),
    until ``num_samples`` are accepted or none remain. Returns the accepted indices in acceptance order."""
    if beta <= 0:
        raise ValueError(f"rso beta must be > 0, got {beta}")
    remaining = list(range(len(rewards)))
    accepted: list[int] = []
    target = min(num_samples, len(remaining))
    while len(accepted) < target:
        r_max = max(rewards[i] for i in remaining)
        taken = []
        for i in remaining:
            if uniform() < math.exp((rewards[i] - r_max) / beta):
                accepted.append(i)
                taken.append(i)
                if len(accepted) == target:
                    break
        remaining = [i for i in remaining if i not in taken]
    return accepted


def rso_pair(rewards: Sequence[float], beta: float, uniform: Callable[[], float]) -> tuple[int, int] | None:
    """Two candidates accepted by :func:`rso_accept`, the higher-reward one as chosen; None on a tie."""
    acc = rso_accept(rewards, beta, 2, uniform)
    if len(acc) < 2 or rewards[acc[0]] == rewards[acc[1]]:
        return None
    a, b = acc
    return (a, b) if rewards[a] > rewards[b] else (b, a)
