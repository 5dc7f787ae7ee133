"""Advantage estimators: rewards (and values) -> per-token advantages.

=========================  ============================================================  ==========================
name                       advantage of token t of completion i (group g of size n)      paper
=========================  ============================================================  ==========================
``grpo``                   (r_i - mean_g r) / (std_g r + eps), std scope from            DeepSeekMath, Shao et al.
                           algo.adv_std_scope (group | batch | none)                     2024, arXiv:2402.03300,
                                                                                         Sec. 4.1.2
``dr_grpo``                r_i - mean_g r                                                Dr. GRPO, Liu et al. 2025,
                                                                                         arXiv:2503.20783, Sec. 3.1
``rloo``                   r_i - 1/(n-1) sum_{j != i} r_j = n/(n-1) (r_i - mean_g r)     RLOO, Ahmadian et al. 2024,
                                                                                         arXiv:2402.14740, Sec. 3;
                                                                                         Kool et al. 2019
``reinforce_pp``           whiten_batch(G_t), G_t = sum_{s>=t} gamma^(s-t) r_s with      REINFORCE++, Hu 2025,
                           r_s = token_rewards_s (+ r_i on the last valid token)         arXiv:2501.03262, eqs. 8-10
``reinforce_pp_baseline``  as reinforce_pp with the outcome r_i - mean_g r               same paper ("w/ baseline");
                                                                                         OpenRLHF reinforce_baseline
``remax``                  r_i - r(greedy completion of the same prompt)                 ReMax, Li et al. 2023,
                                                                                         arXiv:2310.10505, Alg. 1
``bnpo``                   (r_i - p_g) / f_Beta(p_g; alpha, beta), p_g = mean_g r;       BNPO, Xiao et al. 2025,
                           alpha = 1 + a/3, beta = 1 + b/3, Beta(a, b) fit to the p_g    arXiv:2506.02864, Sec. 3
``gae``                    sum_l (gamma lam)^l delta_{t+l},                              GAE, Schulman et al. 2016,
                           delta_t = r_t + gamma V_{t+1} - V_t (optional whitening)      arXiv:1506.02438, eq. 16
``passk``                  analytic pass@k group advantage: (1 - R) / sigma for a right   Pass@k Training, Chen et
                           completion, (1 - R - C(N_neg-1, k-1)/C(N-1, k-1)) / sigma     al. 2025, arXiv:2508.10751,
                           for a wrong one, R = 1 - C(N_neg, k)/C(N, k)
``gfpo``                   GRPO over the k kept completions of each group (shortest, or  GFPO, Shrivastava et al.
                           highest reward per token), 0 for the filtered ones            2025, arXiv:2508.09726
``opmd``                   (r_i - b_g) / (1 + tau), b_g = mean_g r or                    OPMD (Trinity-RFT), Yao et
                           tau log(1/n sum_j exp(r_j / tau))                             al. 2025, arXiv:2509.24203,
                                                                                         Sec. 2.2; Kimi k1.5
``asymre``                 r_i - (mean_g r + delta), delta < 0                           AsymRE, Arnal et al. 2025,
                                                                                         arXiv:2506.20520
``w_reinforce``            +lambda (right) / -1 (wrong), from s = 2 r - 1                W-REINFORCE, Zhu et al.
                                                                                         2025, arXiv:2506.01347
``distill``                token_rewards_t = log pi_teacher - log pi_student (k1 KL in   On-policy distillation,
                           the reward with the teacher as the reference)                 arXiv:2306.13649
=========================  ============================================================  ==========================

Every registered estimator has one signature (pure function over tensors + config)::

    fn(rewards [B], mask [B, T], group_size, cfg: AlgoConfig, *,
       token_rewards=None [B, T], values=None [B, T], baseline_rewards=None [B], state=None dict) -> [B, T]

``rewards`` are laid out group by group (``B = groups * group_size``; completions ``g*n .. g*n+n-1``
share a prompt). The result is exactly 0 wherever ``mask == 0``. ``token_rewards`` are per-token
reward terms, e.g. ``-kl_coef * kl`` when ``algo.kl_in_reward`` (see :mod:`postrl.algorithms.kl_control`).
The maths lives in small pure helpers with explicit arguments (``grpo_advantages``,
``gae_advantages_and_returns``, ...), which the unit tests check against hand-worked numbers.

Conventions shared by the estimators:

* **Outcome estimators** (``grpo``, ``dr_grpo``, ``rloo``, ``remax``) give one number per completion,
  broadcast over its valid tokens. With ``token_rewards`` they use the KL-shaped *sequence* reward
  ``r_i + sum_t token_rewards_{i,t}`` (the KL-shaped reward of the whole completion treated as one
  action, as in Ahmadian et al. 2024; verl's outcome estimators likewise sum ``token_level_rewards``).
  ``bnpo`` refuses ``token_rewards``: its Beta normalisation needs success rates in [0, 1].
* **Token-level estimators** (``reinforce_pp``, ``reinforce_pp_baseline``, ``gae``) build per-token
  rewards: ``token_rewards`` on valid tokens plus the outcome reward on the last valid token.
  Time runs over *valid* tokens only: a masked position inside a sequence (e.g. an environment
  observation in a multi-turn episode) is skipped, neither discounted nor bootstrapped from,
  as verl's ``compute_gae_advantage_return`` does ("skip values and TD-error on observation tokens").
* **Whitening** is over all valid tokens of the batch, with the population std:
  ``(x - mean) / (std + algo.adv_eps)``.

Estimators declare extra inputs they require in ``fn.requires`` (e.g. ``("values",)`` for
``gae``), so a trainer can check a config before it starts; a missing one raises ``ValueError``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

# ``cfg: AlgoConfig`` is postrl.config.AlgoConfig (the algo section); algorithms never import the config
# (the config validates names against these registries), so the annotation stays a string.

from postrl.data.base import CORRECT_EPS

from .registry import register_advantage

if TYPE_CHECKING:  # annotations only: postrl.config imports the registries of this package
    from postrl.config.rl import AlgoConfig

__all__ = [
    "asymre_advantages",
    "bnpo_advantages",
    "distillation_advantages",
    "gfpo_advantages",
    "gfpo_select",
    "opmd_advantages",
    "passk_advantages",
    "w_reinforce_advantages",
    "bnpo_beta_params",
    "discounted_returns",
    "dr_grpo_advantages",
    "gae_advantages_and_returns",
    "grpo_advantages",
    "last_token_rewards",
    "masked_whiten",
    "remax_advantages",
    "rloo_advantages",
]

BNPO_MAX_WEIGHT = 1e6
"""Cap on BNPO's normaliser 1 / f_Beta(p), as in the reference implementation (changyi7231/BNPO)."""


# --------------------------------------------------------------------------------------------- #
# Pure helpers: the maths, explicit arguments, no config
# --------------------------------------------------------------------------------------------- #


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must have shape [B], got {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"batch of {rewards.numel()} rewards does not split into groups of {group_size}")
    return rewards.view(-1, group_size)


def grpo_advantages(rewards: Tensor, group_size: int, eps: float = 1e-6, std_scope: str = "group",
                    unbiased: bool = False) -> Tensor:
    """GRPO outcome advantages, DeepSeekMath (arXiv:2402.03300) Sec. 4.1.2:
    ``A_i = (r_i - mean(r_group)) / (std(r_group) + eps)``.

    ``std_scope``: ``"group"`` (the paper), ``"batch"`` (std over the whole
    batch, as in REINFORCE++-baseline / Dr. GRPO discussions) or ``"none"``
    (no division). By default the std is the population std (divide by n), so a group of
    two rewards {0, 1} gets advantages {-1, +1}. ``unbiased=True`` divides by n - 1 (Bessel), which is
    what TRL's ``GRPOTrainer`` does (``torch.std``, with ``eps = 1e-4``): its advantages are the
    population-std ones times ``sqrt((n - 1) / n)`` up to the eps (``{0, 1}`` -> ``{-0.7071, +0.7071}``).
    A group whose rewards are all equal gets advantage 0 for every member.

    Shapes: ``rewards [B] -> [B]``.
    """
    groups = _groups(rewards.float(), group_size)
    centered = groups - groups.mean(dim=1, keepdim=True)
    if unbiased and (group_size < 2 if std_scope == "group" else rewards.numel() < 2):
        raise ValueError("the unbiased (Bessel) std needs at least 2 rewards per group (rollout.n >= 2)")
    if std_scope == "group":
        scale = groups.std(dim=1, unbiased=unbiased, keepdim=True)
    elif std_scope == "batch":
        scale = rewards.float().std(unbiased=unbiased).expand_as(groups)
    elif std_scope == "none":
        return centered.reshape(-1)
    else:
        raise ValueError(f"std_scope={std_scope!r}; valid: group, batch, none")
    denom = scale + eps
    # all-equal rewards with eps = 0: 0/0 -> 0 (the documented "advantage 0"), not nan
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.where(denom > 0, centered / safe, torch.zeros_like(centered)).reshape(-1)


def dr_grpo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective",
    arXiv:2503.20783, Sec. 3.1): ``A_i = r_i - mean(r_group)``; the division by the group std
    is removed (it biases learning towards too-easy and too-hard questions).

    Shapes: ``rewards [B] -> [B]``.
    """
    groups = _groups(rewards.float(), group_size)
    return (groups - groups.mean(dim=1, keepdim=True)).reshape(-1)


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """REINFORCE Leave-One-Out (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for
    free!"; Ahmadian et al. 2024, "Back to Basics", arXiv:2402.14740, Sec. 3):
    ``A_i = r_i - 1/(n-1) * sum_{j != i} r_j``, which equals ``n/(n-1) * (r_i - mean(r_group))``.

    Needs ``group_size >= 2`` (the baseline of a completion is the mean of the others).

    Shapes: ``rewards [B] -> [B]``.
    """
    if group_size < 2:
        raise ValueError(f"rloo needs a group of at least 2 completions per prompt (rollout.n >= 2), got {group_size}")
    groups = _groups(rewards.float(), group_size)
    loo_mean = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - loo_mean).reshape(-1)


def remax_advantages(rewards: Tensor, baseline_rewards: Tensor) -> Tensor:
    """ReMax (Li et al. 2023, arXiv:2310.10505, Algorithm 1): the baseline of a sampled completion
    is the reward of the greedy completion of the same prompt, ``A_i = r_i - r(greedy_i)``.

    Shapes: ``rewards, baseline_rewards [B] -> [B]``.
    """
    if rewards.shape != baseline_rewards.shape:
        raise ValueError(f"remax: baseline_rewards {tuple(baseline_rewards.shape)} must match rewards "
                         f"{tuple(rewards.shape)} (one greedy reward per completion, repeated over its group)")
    return rewards.float() - baseline_rewards.to(rewards.device).float()


def bnpo_beta_params(group_means: Tensor) -> dict[str, float] | None:
    """BNPO's choice of the normalising Beta(alpha, beta) (Xiao et al. 2025, arXiv:2506.02864, Sec. 3).

    The success rates ``p(q)`` of the batch's prompts are modelled as ``Beta(a, b)``, fitted by the
    method of moments on the group means: with ``mu`` and ``var`` their mean and (unbiased, n-1)
    variance, ``k = mu (1 - mu) / var - 1``, ``a = k mu``, ``b = k (1 - mu)``. The variance-minimising
    normaliser is then ``alpha = 1 + a/3``, ``beta = 1 + b/3``; both are clamped to >= 1, exactly as
    the authors' implementation (changyi7231/BNPO, ``recipe/bnpo/src/bnpo_ray_trainer.py``,
    ``compute_bnpo_outcome_advantage``) does.

    Returns ``None`` when the batch cannot fit a Beta: fewer than 2 groups, or all success rates
    equal (variance 0; the reference code would divide by zero there).
    """
    p = group_means.double().flatten()
    if p.numel() < 2:
        return None
    mu, var = float(p.mean()), float(p.var(unbiased=True))
    if not (math.isfinite(var) and var > 0.0):
        return None
    k = mu * (1.0 - mu) / var - 1.0
    a, b = k * mu, k * (1.0 - mu)
    return {"alpha": max(1.0 + a / 3.0, 1.0), "beta": max(1.0 + b / 3.0, 1.0),
            "a": a, "b": b, "mean": mu, "var": var}


def bnpo_advantages(rewards: Tensor, group_size: int, alpha: float, beta: float,
                    max_weight: float = BNPO_MAX_WEIGHT) -> Tensor:
    """BNPO outcome advantages (Xiao et al. 2025, arXiv:2506.02864, Sec. 3):
    ``A_i = (r_i - p) / f_N(p; alpha, beta)`` with ``p`` the group's mean reward (the Monte Carlo
    estimate of the prompt's success probability) and ``f_N`` the Beta density
    ``p^(alpha-1) (1-p)^(beta-1) / B(alpha, beta)``. ``1 / f_N`` is capped at ``max_weight``
    (reference implementation). ``alpha = beta = 1`` is REINFORCE with the group-mean baseline;
    ``alpha = beta = 3/2`` is GRPO up to the constant ``pi / 8`` (``f_N = 8/pi * sqrt(p (1-p))``).

    Shapes: ``rewards [B] -> [B]``; rewards must lie in [0, 1].
    """
    groups = _groups(rewards.float(), group_size).double()
    p = groups.mean(dim=1, keepdim=True)
    log_beta_fn = math.lgamma(alpha) + math.lgamma(beta) - math.lgamma(alpha + beta)
    am1 = torch.tensor(alpha - 1.0, dtype=p.dtype, device=p.device)
    bm1 = torch.tensor(beta - 1.0, dtype=p.dtype, device=p.device)
    log_density = torch.xlogy(am1, p) + torch.xlogy(bm1, 1.0 - p) - log_beta_fn  # xlogy(0, 0) = 0
    weight = torch.exp(-log_density).clamp(max=max_weight)  # density 0 (p at an edge) -> weight = cap
    return ((groups - p) * weight).reshape(-1).float()


def last_token_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """Place each completion's outcome reward on its last valid token.

    Shapes: ``rewards [B], mask [B, T] -> [B, T]`` (0 elsewhere; a row without valid tokens gets none).
    """
    valid = mask > 0
    T = mask.shape[1]
    positions = torch.arange(T, device=mask.device).expand_as(valid)
    last = torch.where(valid, positions, torch.full_like(positions, -1)).max(dim=1).values
    out = torch.zeros(valid.shape, dtype=torch.float32, device=mask.device)
    rows = torch.nonzero(last >= 0).flatten()
    out[rows, last[rows]] = rewards.to(mask.device).float()[rows]
    return out


def discounted_returns(token_rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """``G_t = sum_{s >= t} gamma^(s - t) r_s`` over the valid tokens of each row (REINFORCE++,
    arXiv:2501.03262 eq. 8 with a discount). Masked positions are skipped (no reward, no discount
    step) and get return 0.

    Shapes: ``token_rewards, mask [B, T] -> [B, T]``.
    """
    valid = mask > 0
    r = token_rewards.float()
    running = torch.zeros(r.shape[0], dtype=torch.float32, device=r.device)
    out = torch.zeros_like(r)
    for t in reversed(range(r.shape[1])):
        v = valid[:, t]
        running = torch.where(v, r[:, t] + gamma * running, running)
        out[:, t] = torch.where(v, running, torch.zeros_like(running))
    return out


def masked_whiten(x: Tensor, mask: Tensor, eps: float, shift_mean: bool = True) -> Tensor:
    """``(x - mean) / (std + eps)`` with mean and population std over the valid tokens of the
    whole batch (``shift_mean=False``: ``x / (std + eps)``). 0 where ``mask == 0``.

    Shapes: ``x, mask [B, T] -> [B, T]``.
    """
    valid = mask > 0
    if not bool(valid.any()):
        return torch.zeros_like(x, dtype=torch.float32)
    xs = x.float()[valid]
    mean = xs.mean()
    scale = float(xs.std(unbiased=False)) + eps
    if scale == 0.0:  # all valid values equal and eps = 0: centred values are 0, avoid 0/0
        scale = 1.0
    out = ((x.float() - mean) if shift_mean else x.float()) / scale
    return torch.where(valid, out, torch.zeros_like(out))


def gae_advantages_and_returns(token_rewards: Tensor, values: Tensor, mask: Tensor,
                               gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016, arXiv:1506.02438, eq. 16):
    ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = sum_{l >= 0} (gamma lam)^l delta_{t+l}``,
    with ``V = 0`` after the last valid token (the episode ends there). ``returns = A + V``
    (the critic's regression target, TD(lambda) return).

    ``token_rewards`` is the full per-token reward (outcome already on the last token).
    Masked positions are skipped: ``V_{t+1}`` is the value of the next *valid* token, as in verl's
    ``compute_gae_advantage_return``. Advantages and returns are 0 where ``mask == 0``. No whitening.

    Shapes: ``token_rewards, values, mask [B, T] -> (advantages [B, T], returns [B, T])``.
    """
    if values.shape != token_rewards.shape or mask.shape != token_rewards.shape:
        raise ValueError(f"gae: token_rewards {tuple(token_rewards.shape)}, values {tuple(values.shape)} and "
                         f"mask {tuple(mask.shape)} must have the same shape [B, T]")
    valid = mask > 0
    r, v_all = token_rewards.float(), values.float()
    zero = torch.zeros(r.shape[0], dtype=torch.float32, device=r.device)
    next_value, running = zero, zero
    adv = torch.zeros_like(r)
    for t in reversed(range(r.shape[1])):
        v = valid[:, t]
        delta = r[:, t] + gamma * next_value - v_all[:, t]
        a_t = delta + gamma * lam * running
        running = torch.where(v, a_t, running)
        next_value = torch.where(v, v_all[:, t], next_value)
        adv[:, t] = torch.where(v, a_t, zero)
    returns = torch.where(valid, adv + v_all, torch.zeros_like(adv))
    return adv, returns


# --------------------------------------------------------------------------------------------- #
# Registered estimators: the uniform signature
# --------------------------------------------------------------------------------------------- #


def _prepare(name: str, rewards: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Check shapes; return rewards as float32 on the mask's device and the bool valid-token mask."""
    if rewards.dim() != 1:
        raise ValueError(f"{name}: rewards must have shape [B], got {tuple(rewards.shape)}")
    if mask.dim() != 2 or mask.shape[0] != rewards.shape[0]:
        raise ValueError(f"{name}: mask must have shape [B, T] with B = {rewards.shape[0]}, got {tuple(mask.shape)}")
    return rewards.to(mask.device).float(), mask > 0


def _check_token_tensor(name: str, what: str, x: Tensor, mask: Tensor) -> Tensor:
    if x.shape != mask.shape:
        raise ValueError(f"{name}: {what} must have the mask's shape {tuple(mask.shape)}, got {tuple(x.shape)}")
    return x.to(mask.device).float()


def _sequence_rewards(name: str, rewards: Tensor, valid: Tensor, token_rewards: Tensor | None) -> Tensor:
    """Outcome reward, plus the sum of the valid per-token reward terms when given (KL-shaped)."""
    if token_rewards is None:
        return rewards
    tr = _check_token_tensor(name, "token_rewards", token_rewards, valid)
    return rewards + torch.where(valid, tr, torch.zeros_like(tr)).sum(dim=1)


def _per_token_rewards(name: str, rewards: Tensor, mask: Tensor, token_rewards: Tensor | None) -> Tensor:
    """``token_rewards`` on valid tokens (0 if None) + the outcome reward on the last valid token."""
    out = last_token_rewards(rewards, mask)
    if token_rewards is not None:
        tr = _check_token_tensor(name, "token_rewards", token_rewards, mask)
        out = out + torch.where(mask > 0, tr, torch.zeros_like(tr))
    return out


def _broadcast(adv: Tensor, valid: Tensor) -> Tensor:
    """One advantage per sequence ``[B]`` -> ``[B, T]``, exactly 0 on masked positions."""
    full = adv.float()[:, None].expand(valid.shape)
    return torch.where(valid, full, torch.zeros_like(full))


@register_advantage("grpo")
def grpo(rewards: Tensor, mask: Tensor, group_size: int, cfg: AlgoConfig, *,
         token_rewards: Tensor | None = None, values: Tensor | None = None,
         baseline_rewards: Tensor | None = None, state: dict[str, Any] | None = None) -> Tensor:
    """GRPO (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, Sec. 4.1.2, outcome supervision):
    ``(r_i - mean_g) / (std_g + adv_eps)`` broadcast over the completion's tokens; the std scope is
    ``cfg.adv_std_scope`` (group | batch | none), the std the population one unless
    ``cfg.adv_std_unbiased`` (Bessel, as TRL; TRL's eps is ``adv_eps = 1e-4``). See :func:`grpo_advantages`."""
    r, valid = _prepare("grpo", rewards, mask)
    r = _sequence_rewards("grpo", r, valid, token_rewards)
    return _broadcast(grpo_advantages(r, group_size, cfg.adv_eps, cfg.adv_std_scope, cfg.adv_std_unbiased), valid)


@register_advantage("dr_grpo")
def dr_grpo(rewards: Tensor, mask: Tensor, group_size: int, cfg: AlgoConfig, *,
            token_rewards: Tensor | None = None, values: Tensor | None = None,
            baseline_rewards: Tensor | None = None, state: dict[str, Any] | None = None) -> Tensor:
    """Dr. GRPO (Liu et al. 2025, arXiv:2503.20783, Sec. 3.1): ``r_i - mean_g``, no std division,
    broadcast over tokens. (The paper's other fix, no per-sequence length normalisation, is the
    loss aggregation's job.) See :func:`dr_grpo_advantages`."""
    r, valid = _prepare("dr_grpo", rewards, mask)
    r = _sequence_rewards("dr_grpo", r, valid, token_rewards)
    return _broadcast(dr_grpo_advantages(r, group_size), valid)


@register_advantage("rloo")
def rloo(rewards: Tensor, mask: Tensor, group_size: int, cfg: AlgoConfig, *,
         token_rewards: Tensor | None = None, values: Tensor | None = None,
         baseline_rewards: Tensor | None = None, state: dict[str, Any] | None = None) -> Tensor:
    """RLOO (Ahmadian et al. 2024, arXiv:2402.14740, Sec. 3; Kool et al. 2019):
    ``r_i - mean of the other n-1 rewards of the group``, broadcast over tokens.
    Needs ``group_size >= 2``. See :func:`rloo_advantages`."""
    r, valid = _prepare("rloo", rewards, mask)
    r = _sequence_rewards("rloo", r, valid, token_rewards)
    return _broadcast(rloo_advantages(r, group_size), valid)


@register_advantage("reinforce_pp")
def reinforce_pp(rewards: Tensor, mask: Tensor, group_size: int, cfg: AlgoConfig, *,
                 token_rewards: Tensor | None = None, values: Tensor | None = None,
                 baseline_rewards: Tensor | None = None, state: dict[str, Any] | None = None) -> Tensor:
    """REINFORCE++ (Hu 2025, arXiv:2501.03262, eqs. 8-10; OpenRLHF ``advantage_estimator=reinforce``).

    Per-token reward ``r_t = token_rewards_t`` (the KL penalty ``-beta KL_t``; 0 if None) plus the
    outcome reward on the last valid token; return ``G_t = sum_{s>=t} gamma^(s-t) r_s``
    (``cfg.gamma``; the paper's eq. 8 is the gamma = 1 case); then global normalisation over all
    valid tokens of the batch: ``(G - mean) / (std + adv_eps)`` (eq. 10). ``group_size`` is not used.
    """
    r, valid = _prepare("reinforce_pp", rewards, mask)
    per_token = _per_token_rewards("reinforce_pp", r, mask, token_rewards)
    returns = discounted_returns(per_token, mask, cfg.gamma)
    return masked_whiten(returns, mask, cfg.adv_eps)


@register_advantage("reinforce_pp_baseline")
def reinforce_pp_baseline(rewards: Tensor, mask: Tensor, group_size: int, cfg: AlgoConfig, *,
                          token_rewards: Tensor | None = None, values: Tensor | None = None,
                          baseline_rewards: Tensor | None = None, state: dict[str, Any] | None = None) -> Tensor:
    """REINFORCE++ w/ baseline (Hu 2025, arXiv:2501.03262, Sec. "REINFORCE++ w/ Baseline";
    OpenRLHF ``advantage_estimator=reinforce_baseline``).

    1. outcome reward minus its group mean, ``r_i - mean_g r`` (outcome rewards only);
    2. the same token-level return as ``reinforce_pp`` (``token_rewards`` + the centred outcome on
       the last valid token, discount ``cfg.gamma``);
    3. global normalisation over the valid tokens of the batch, ``(G - mean) / (std + adv_eps)``.

    Step 3 subtracts the batch mean *again*, as the reference implementations do: OpenRLHF
    ``openrlhf/trainer/ppo_utils/experience_maker.py`` (``compute_advantages_and_returns``: mean and
    population std over all action tokens, for gae / reinforce / reinforce_baseline) and verl
    ``core_algos.compute_reinforce_plus_plus_baseline_outcome_advantage`` (``masked_whiten``, which
    shifts the mean). The batch token-mean is not 0 after step 1 because completions differ in
    length and the KL terms shift it. (ms-swift's documentation instead divides by the std only.)
    OpenRLHF forces gamma = 1 for this variant; here ``cfg.gamma`` (default 1.0) applies.
    Needs ``group_size >= 2``.
    """
    r, valid = _prepare("reinforce_pp_baseline", rewards, mask)
    if group_size < 2:
        raise ValueError("reinforce_pp_baseline needs a group of at least 2 completions per prompt "
                         f"(rollout.n >= 2), got {group_size}; use reinforce_pp for one completion per prompt")
    centered = dr_grpo_advantages(r, group_size)
    per_token = _per_token_rewards("reinforce_pp_baseline", centered, mask, token_rewards)
    returns = discounted_returns(per_token, mask, cfg.gamma)
    return masked_whiten(returns, mask, cfg.adv_eps)


@register_advantage("remax")
def remax(rewards: Tensor, mask: Tensor, group_size: int, cfg: AlgoConfig, *,
          token_rewards: Tensor | None = None, values: Tensor | None = None,
          baseline_rewards: Tensor | None = None, state: dict[str, Any] | None = None) -> Tensor:
    """ReMax (Li et al. 2023, arXiv:2310.10505, Algorithm 1): ``r_i - r(greedy completion)``,
    broadcast over tokens. ``baseline_rewards [B]`` holds, for every completion, the reward of the
    greedy completion of its prompt. See :func:`remax_advantages`."""
    r, valid = _prepare("remax", rewards, mask)
    if baseline_rewards is None:
        raise ValueError("remax needs baseline_rewards: the reward of one greedy (temperature 0) completion per "
                         "prompt, repeated over the prompt's group; the trainer must generate and score it")
    r = _sequence_rewards("remax", r, valid, token_rewards)
    return _broadcast(remax_advantages(r, baseline_rewards.to(r.device)), valid)


remax.requires = ("baseline_rewards",)


@register_advantage("bnpo")
def bnpo(rewards: Tensor, mask: Tensor, group_size: int, cfg: AlgoConfig, *,
         token_rewards: Tensor | None = None, values: Tensor | None = None,
         baseline_rewards: Tensor | None = None, state: dict[str, Any] | None = None) -> Tensor:
    """BNPO, Beta Normalization Policy Optimization (Xiao et al. 2025, arXiv:2506.02864, Sec. 3):
    ``A_i = (r_i - p_g) / f_Beta(p_g; alpha, beta)``, broadcast over tokens, with ``p_g`` the group's
    mean reward and ``alpha = 1 + a/3, beta = 1 + b/3`` from a method-of-moments Beta(a, b) fit of
    the batch's success rates (:func:`bnpo_beta_params`, :func:`bnpo_advantages`).

    As in the paper and the authors' code, (alpha, beta) are re-estimated from every batch. The
    estimate is kept in ``state["bnpo"]`` (plain floats, checkpointed by the trainer): a batch that
    cannot fit a Beta (one group, or every group with the same success rate) reuses the last
    estimate, so a resumed run continues with the same normaliser; before any estimate it is
    alpha = beta = 1 (REINFORCE with the group-mean baseline, which is also what the reference
    code falls back to for a single group).

    Rewards: the paper's setting is binary {0, 1}. Rewards in [0, 1] are used as they are (the
    group mean is still a success rate in [0, 1]; the reference code likewise maps rewards to
    [0, 1] and asserts it); rewards outside [0, 1] raise ``ValueError`` (rescale them with the
    reward weights). ``token_rewards`` (KL in the reward) are refused for the same reason.
    Needs ``group_size >= 2``.
    """
    r, valid = _prepare("bnpo", rewards, mask)
    if token_rewards is not None:
        raise ValueError("bnpo normalises success rates in [0, 1] and cannot take per-token rewards: "
                         "put the KL penalty in the loss (algo.kl_in_reward=false)")
    if group_size < 2:
        raise ValueError(f"bnpo needs a group of at least 2 completions per prompt (rollout.n >= 2), got {group_size}")
    if r.numel() and (float(r.min()) < 0.0 or float(r.max()) > 1.0):
        raise ValueError(f"bnpo needs rewards in [0, 1] (binary in the paper); got min {float(r.min()):g}, "
                         f"max {float(r.max()):g}. Rescale the rewards (rewards[].weight) or use another estimator")
    st = (state if state is not None else {}).setdefault(
        "bnpo", {"alpha": 1.0, "beta": 1.0, "estimates": 0, "fallbacks": 0})
    fit = bnpo_beta_params(_groups(r, group_size).mean(dim=1))
    if fit is None:
        st["fallbacks"] = int(st.get("fallbacks", 0)) + 1
    else:
        st.update(fit)
        st["estimates"] = int(st.get("estimates", 0)) + 1
    return _broadcast(bnpo_advantages(r, group_size, float(st["alpha"]), float(st["beta"])), valid)


@register_advantage("gae")
def gae(rewards: Tensor, mask: Tensor, group_size: int, cfg: AlgoConfig, *,
        token_rewards: Tensor | None = None, values: Tensor | None = None,
        baseline_rewards: Tensor | None = None, state: dict[str, Any] | None = None) -> Tensor:
    """GAE (Schulman et al. 2016, arXiv:1506.02438, eq. 16), as PPO-RLHF uses it: per-token reward
    ``token_rewards`` (0 if None) + the outcome reward on the last valid token,
    ``delta_t = r_t + gamma V_{t+1} - V_t`` (V = 0 after the last valid token),
    ``A_t = sum_l (gamma lam)^l delta_{t+l}`` with ``cfg.gamma``, ``cfg.lam``; whitened over the
    valid tokens of the batch when ``cfg.adv_whiten``. The critic's targets (``A + V`` before
    whitening) come from :func:`gae_advantages_and_returns`."""
    if values is None:
        raise ValueError("gae needs values: per-token critic values V [B, T] (a value model / value head); "
                         "without a critic choose a critic-free estimator (grpo, rloo, reinforce_pp, ...)")
    r, valid = _prepare("gae", rewards, mask)
    per_token = _per_token_rewards("gae", r, mask, token_rewards)
    adv, _ = gae_advantages_and_returns(per_token, _check_token_tensor("gae", "values", values, mask), mask,
                                        cfg.gamma, cfg.lam)
    return masked_whiten(adv, mask, cfg.adv_eps) if cfg.adv_whiten else adv


gae.requires = ("values",)

for _fn in (grpo, dr_grpo, rloo, reinforce_pp, reinforce_pp_baseline, bnpo):
    _fn.requires = ()


# --------------------------------------------------------------------------------------------- #
# Round two (issue 17): group shaping, off-policy REINFORCE baselines, on-policy distillation
# --------------------------------------------------------------------------------------------- #


def _binary_groups(name: str, rewards: Tensor, group_size: int) -> Tensor:
    groups = _groups(rewards.float(), group_size)
    if groups.numel() and not bool(((groups == 0) | (groups == 1)).all()):
        raise ValueError(f"{name} needs binary rewards (0 = wrong, 1 = right), got values in "
                         f"[{float(groups.min()):g}, {float(groups.max()):g}]; use one 0/1 reward (no format bonus, "
                         "no overlong shaping) or another estimator")
    return groups


def passk_advantages(rewards: Tensor, group_size: int, k: int) -> Tensor:
    """Pass@k training, Chen et al. 2025, "Pass@k Training for Adaptively Balancing Exploration and
    Exploitation of Large Reasoning Models" (arXiv:2508.10751), the analytic group advantage of a pass@k reward.

    The reward of a k-subset of the ``N = group_size`` completions is its pass@k (1 if any member is
    right). Over all ``C(N, k)`` subsets, with ``N_neg`` wrong completions in the group:

    * mean group reward ``R = 1 - C(N_neg, k) / C(N, k)``, std ``sigma = sqrt(R (1 - R))``;
    * a right completion is in right subsets only: ``A_pos = (1 - R) / sigma``;
    * a wrong one is in a wrong subset when its ``k - 1`` partners are all wrong:
      ``A_neg = (1 - R - C(N_neg - 1, k - 1) / C(N - 1, k - 1)) / sigma``.

    ``sigma = 0`` (all right, all wrong, or fewer than ``k`` wrong) gives advantage 0 to the whole
    group (the numerators are 0 there too). ``k = 1`` is GRPO with the population std and eps 0.
    Rewards must be binary. Shapes: ``rewards [B] -> [B]``.
    """
    if not 1 <= k <= group_size:
        raise ValueError(f"passk: k={k} must be in [1, group_size={group_size}] (algo.passk_k <= rollout.n)")
    groups = _binary_groups("passk", rewards, group_size)
    n = group_size
    out = torch.zeros_like(groups, dtype=torch.float64)
    for g, row in enumerate(groups):
        n_neg = n - int(row.sum())
        mean = 1.0 - math.comb(n_neg, k) / math.comb(n, k)
        sigma = math.sqrt(max(mean * (1.0 - mean), 0.0))
        if sigma == 0.0:
            continue
        a_pos = (1.0 - mean) / sigma
        a_neg = (1.0 - mean - (math.comb(n_neg - 1, k - 1) / math.comb(n - 1, k - 1) if n_neg >= 1 else 0.0)) / sigma
        out[g] = torch.where(row > 0, torch.full_like(out[g], a_pos), torch.full_like(out[g], a_neg))
    return out.reshape(-1).float()


GFPO_METRICS = ("length", "reward_per_token")


def gfpo_select(rewards: Tensor, lengths: Tensor, group_size: int, k: int, metric: str = "length") -> Tensor:
    """Group Filtered Policy Optimization, Shrivastava et al. 2025 (arXiv:2508.09726): sample
    ``G = group_size`` completions per prompt and keep the ``k`` best of each group by ``metric``:

    * ``"length"``: the ``k`` shortest (GFPO "Shortest k/G");
    * ``"reward_per_token"``: the ``k`` with the highest ``r_i / |o_i|`` (token efficiency).

    Ties keep the earlier completion. A completion of length 0 (empty loss mask, e.g. filtered as
    overlong) ranks last under both metrics. Returns the kept rows, ascending ``[groups * k]`` (long).
    Shapes: ``rewards, lengths [B]``.
    """
    if metric not in GFPO_METRICS:
        raise ValueError(f"gfpo metric {metric!r} is not valid; choose one of: {', '.join(GFPO_METRICS)}")
    if not 1 <= k <= group_size:
        raise ValueError(f"gfpo: k={k} must be in [1, group_size={group_size}] (algo.gfpo_k <= rollout.n)")
    r = _groups(rewards.float(), group_size).double()
    lens = _groups(torch.as_tensor(lengths).to(r.device).float(), group_size).double()
    empty = lens <= 0
    if metric == "length":
        key = torch.where(empty, torch.full_like(lens, math.inf), lens)  # ascending: shortest first
    else:
        key = torch.where(empty, torch.full_like(lens, math.inf), -r / lens.clamp(min=1.0))  # highest r/len first
    order = torch.argsort(key, dim=1, stable=True)[:, :k]
    rows = order + torch.arange(r.shape[0], device=r.device)[:, None] * group_size
    return rows.reshape(-1).sort().values


def gfpo_advantages(rewards: Tensor, lengths: Tensor, group_size: int, k: int, metric: str = "length",
                    eps: float = 1e-6, unbiased: bool = False) -> Tensor:
    """GFPO advantages (arXiv:2508.09726): the kept set ``S`` of each group
    (:func:`gfpo_select`) is normalised on its own, ``A_i = (r_i - mean_S r) / (std_S r + eps)``
    for ``i`` in ``S``, and ``A_i = 0`` for the filtered-out completions. The std is the population
    one unless ``unbiased`` (as :func:`grpo_advantages`). Shapes: ``rewards, lengths [B] -> [B]``.
    """
    keep = gfpo_select(rewards, lengths, group_size, k, metric)
    r = rewards.float()
    kept = r[keep].view(-1, k)
    adv = grpo_advantages(kept.reshape(-1), k, eps, "group", unbiased) if k >= 2 else torch.zeros(kept.numel())
    out = torch.zeros_like(r)
    out[keep] = adv.to(out.dtype)
    return out


OPMD_BASELINES = ("mean", "logavgexp")


def opmd_advantages(rewards: Tensor, group_size: int, tau: float = 1.0, baseline: str = "mean") -> Tensor:
    """OPMD, online policy mirror descent as Trinity-RFT implements it (Yao et al. 2025, "Group-Relative
    REINFORCE Is Secretly an Off-Policy Algorithm", arXiv:2509.24203, Sec. 2.2; after Kimi k1.5,
    arXiv:2501.12599, Sec. 2.3.2).

    The KL-regularised mirror-descent step ``max_pi E[r] - tau KL(pi || pi_old)`` has the solution
    ``pi* ~ pi_old exp(r / tau)``; regressing ``tau log(pi / pi_old)`` on ``r - tau log Z`` gives the
    REINFORCE-like gradient ``(r_i - b) grad log pi(y_i)`` with the log-partition
    ``b = tau log Z`` estimated from the group: ``"logavgexp"``: ``b = tau log(1/n sum_j exp(r_j / tau))``,
    or ``"mean"`` (Kimi's choice): ``b = mean_g r``. Trinity-RFT's loss also divides by ``1 + tau``
    (its regularisation w.r.t. the current policy), folded in here:

        ``A_i = (r_i - b_g) / (1 + tau)``

    to be used with the ratio-free ``reinforce`` loss. Shapes: ``rewards [B] -> [B]``.
    """
    if not tau > 0:
        raise ValueError(f"opmd: tau must be > 0, got {tau}")
    if baseline not in OPMD_BASELINES:
        raise ValueError(f"opmd baseline {baseline!r} is not valid; choose one of: {', '.join(OPMD_BASELINES)}")
    groups = _groups(rewards.float(), group_size).double()
    if baseline == "mean":
        b = groups.mean(dim=1, keepdim=True)
    else:
        b = tau * (torch.logsumexp(groups / tau, dim=1, keepdim=True) - math.log(group_size))
    return ((groups - b) / (1.0 + tau)).reshape(-1).float()


def asymre_advantages(rewards: Tensor, group_size: int, baseline_shift: float = -0.1) -> Tensor:
    """Asymmetric REINFORCE (AsymRE), Arnal et al. 2025, "Asymmetric REINFORCE for off-Policy
    Reinforcement Learning: Balancing positive and negative rewards" (arXiv:2506.20520), as in
    Trinity-RFT: REINFORCE with the baseline moved below the group's mean reward,

        ``A_i = r_i - (mean_g r + delta)``,  ``delta = baseline_shift`` (default -0.1),

    so positive samples weigh more than negative ones (``delta < 0``; the paper shows that a baseline
    below the expected reward keeps off-policy REINFORCE stable). Shapes: ``rewards [B] -> [B]``.
    """
    groups = _groups(rewards.float(), group_size)
    return (groups - (groups.mean(dim=1, keepdim=True) + float(baseline_shift))).reshape(-1)


def w_reinforce_advantages(rewards: Tensor, lam: float = 0.1) -> Tensor:
    """W-REINFORCE, Zhu et al. 2025, "The Surprising Effectiveness of Negative Reinforcement in LLM
    Reasoning" (arXiv:2506.01347), its weighted objective ``L = lambda L_PSR + L_NSR`` with rewards ``+-1``, i.e. the
    REINFORCE loss ``-A log pi(y|x)`` with ``A = +lambda`` for a right completion (positive sample
    reinforcement, down-weighted) and ``A = -1`` for a wrong one (negative sample reinforcement);
    the paper uses ``lambda = 0.1``.

    postrl's rewards in [0, 1] are mapped to the paper's scale ``s = 2 r - 1`` in [-1, 1] (0/1 ->
    -1/+1), then ``A = lambda * s`` where ``s > 0`` and ``A = s`` where ``s <= 0``. No baseline.
    Rewards outside [0, 1] raise ``ValueError``. Shapes: ``rewards [B] -> [B]``.
    """
    r = rewards.float()
    if r.numel() and (float(r.min()) < 0.0 or float(r.max()) > 1.0):
        raise ValueError(f"w_reinforce needs rewards in [0, 1] (it maps them to the paper's -1/+1); got min "
                         f"{float(r.min()):g}, max {float(r.max()):g}")
    s = 2.0 * r - 1.0
    return torch.where(s > 0, float(lam) * s, s)


def distillation_advantages(student_logprobs: Tensor, teacher_logprobs: Tensor, mask: Tensor) -> Tensor:
    """On-policy distillation (Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning
    from Self-Generated Mistakes", arXiv:2306.13649; Thinking Machines, "On-Policy Distillation", 2025):
    the per-token advantage is the negative per-token reverse KL of the sampled token,

        ``A_t = -(log pi_student(y_t) - log pi_teacher(y_t)) = log pi_teacher(y_t) - log pi_student(y_t)``,

    on the student's own samples, no discount (each token is its own return), 0 where ``mask == 0``.
    With a policy-gradient loss this minimises ``KL(pi_student || pi_teacher)`` on the student's
    distribution. Both log-probs are of the same token ids (same tokenizer). Detached.
    Shapes: ``student_logprobs, teacher_logprobs, mask [B, T] -> [B, T]``.
    """
    if student_logprobs.shape != teacher_logprobs.shape or mask.shape != student_logprobs.shape:
        raise ValueError(f"distillation: student {tuple(student_logprobs.shape)}, teacher "
                         f"{tuple(teacher_logprobs.shape)} and mask {tuple(mask.shape)} must have the same shape")
    adv = (teacher_logprobs.detach().float() - student_logprobs.detach().float())
    return torch.where(mask > 0, adv, torch.zeros_like(adv))


@register_advantage("passk")
def passk(rewards: Tensor, mask: Tensor, group_size: int, cfg: AlgoConfig, *,
          token_rewards: Tensor | None = None, values: Tensor | None = None,
          baseline_rewards: Tensor | None = None, state: dict[str, Any] | None = None) -> Tensor:
    """Pass@k training (Chen et al. 2025, arXiv:2508.10751, analytic advantage): each completion's
    advantage under a pass@``cfg.passk_k`` group reward, broadcast over its tokens; refuses KL token rewards.
    See :func:`passk_advantages`.

    A completion *passes* when its reward is ``>= 1 - CORRECT_EPS``, the rule by which ``postrl eval`` counts a
    sample correct for pass@k: partial credit (reasoning-gym scores e.g. ``"5.0"`` for ``5`` as 1/3) is a fail.
    Rewards outside [0, 1] raise ``ValueError`` (a pass needs a scale on which 1 means right)."""
    r, valid = _prepare("passk", rewards, mask)
    if token_rewards is not None:
        raise ValueError("passk needs binary outcome rewards and cannot take per-token rewards: "
                         "put the KL penalty in the loss (algo.kl_in_reward=false)")
    if r.numel() and (float(r.min()) < 0.0 or float(r.max()) > 1.0):
        raise ValueError(f"passk needs rewards in [0, 1] (1 = right; a completion passes at reward >= 1); got min "
                         f"{float(r.min()):g}, max {float(r.max()):g}: use one 0/1 correctness reward or another "
                         f"estimator")
    passed = (r >= 1.0 - CORRECT_EPS).to(r.dtype)
    return _broadcast(passk_advantages(passed, group_size, cfg.passk_k), valid)


@register_advantage("gfpo")
def gfpo(rewards: Tensor, mask: Tensor, group_size: int, cfg: AlgoConfig, *,
         token_rewards: Tensor | None = None, values: Tensor | None = None,
         baseline_rewards: Tensor | None = None, state: dict[str, Any] | None = None) -> Tensor:
    """GFPO (Shrivastava et al. 2025, arXiv:2508.09726): keep the ``cfg.gfpo_k`` best completions
    of each group by ``cfg.gfpo_metric`` (length = loss-mask tokens), normalise their rewards among
    themselves as GRPO does (``adv_eps``, ``adv_std_unbiased``), advantage 0 for the others. See
    :func:`gfpo_advantages`. The filtered completions stay in the batch with advantage 0."""
    r, valid = _prepare("gfpo", rewards, mask)
    r = _sequence_rewards("gfpo", r, valid, token_rewards)
    lengths = valid.sum(dim=1)
    return _broadcast(gfpo_advantages(r, lengths, group_size, cfg.gfpo_k, cfg.gfpo_metric, cfg.adv_eps,
                                      cfg.adv_std_unbiased), valid)


@register_advantage("opmd")
def opmd(rewards: Tensor, mask: Tensor, group_size: int, cfg: AlgoConfig, *,
         token_rewards: Tensor | None = None, values: Tensor | None = None,
         baseline_rewards: Tensor | None = None, state: dict[str, Any] | None = None) -> Tensor:
    """OPMD (Trinity-RFT; Yao et al. 2025, arXiv:2509.24203, Sec. 2.2): ``(r_i - b_g) / (1 + tau)`` with
    ``tau = cfg.opmd_tau`` and ``b_g`` the group mean or ``tau`` log-avg-exp (``cfg.opmd_baseline``),
    broadcast over tokens. See :func:`opmd_advantages`."""
    r, valid = _prepare("opmd", rewards, mask)
    r = _sequence_rewards("opmd", r, valid, token_rewards)
    return _broadcast(opmd_advantages(r, group_size, cfg.opmd_tau, cfg.opmd_baseline), valid)


@register_advantage("asymre")
def asymre(rewards: Tensor, mask: Tensor, group_size: int, cfg: AlgoConfig, *,
           token_rewards: Tensor | None = None, values: Tensor | None = None,
           baseline_rewards: Tensor | None = None, state: dict[str, Any] | None = None) -> Tensor:
    """AsymRE (Arnal et al. 2025, arXiv:2506.20520; Trinity-RFT): ``r_i - (mean_g r + delta)`` with
    ``delta = cfg.asymre_baseline_shift``, broadcast over tokens. See :func:`asymre_advantages`."""
    r, valid = _prepare("asymre", rewards, mask)
    r = _sequence_rewards("asymre", r, valid, token_rewards)
    return _broadcast(asymre_advantages(r, group_size, cfg.asymre_baseline_shift), valid)


@register_advantage("w_reinforce")
def w_reinforce(rewards: Tensor, mask: Tensor, group_size: int, cfg: AlgoConfig, *,
                token_rewards: Tensor | None = None, values: Tensor | None = None,
                baseline_rewards: Tensor | None = None, state: dict[str, Any] | None = None) -> Tensor:
    """W-REINFORCE (Zhu et al. 2025, arXiv:2506.01347, ``lambda L_PSR + L_NSR``): ``+lambda`` for a right completion,
    ``-1`` for a wrong one (rewards in [0, 1] mapped to ``2 r - 1``), ``lambda = cfg.w_reinforce_lambda``,
    broadcast over tokens. Refuses KL token rewards. See :func:`w_reinforce_advantages`."""
    r, valid = _prepare("w_reinforce", rewards, mask)
    if token_rewards is not None:
        raise ValueError("w_reinforce maps rewards in [0, 1] to +-1 and cannot take per-token rewards: "
                         "put the KL penalty in the loss (algo.kl_in_reward=false)")
    return _broadcast(w_reinforce_advantages(r, cfg.w_reinforce_lambda), valid)


@register_advantage("distill")
def distill(rewards: Tensor, mask: Tensor, group_size: int, cfg: AlgoConfig, *,
            token_rewards: Tensor | None = None, values: Tensor | None = None,
            baseline_rewards: Tensor | None = None, state: dict[str, Any] | None = None) -> Tensor:
    """On-policy distillation (arXiv:2306.13649; Thinking Machines 2025): ``A_t = token_rewards_t``,
    which with the teacher as the KL reference, ``algo.kl_in_reward: true``, ``kl_estimator: k1`` and
    ``kl_coef: 1`` is ``-(log pi_student - log pi_teacher)`` per token, as
    :func:`distillation_advantages`. No discount, no baseline; the outcome ``rewards`` are not used
    (they are only logged). Raises ``ValueError`` without ``token_rewards``."""
    r, valid = _prepare("distill", rewards, mask)
    if token_rewards is None:
        raise ValueError("distill needs token_rewards = -kl_coef * k1(student, teacher): set algo.kl_in_reward=true, "
                         "algo.kl_estimator=k1 and the teacher as the reference model (algo.distill_teacher)")
    tr = _check_token_tensor("distill", "token_rewards", token_rewards, mask)
    return torch.where(valid, tr, torch.zeros_like(tr))


for _fn in (passk, gfpo, opmd, asymre, w_reinforce):
    _fn.requires = ()
distill.requires = ("token_rewards",)
