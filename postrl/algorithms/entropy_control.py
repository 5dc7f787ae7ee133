"""Entropy-collapse control: policy losses that act on a few chosen tokens.

=================  ====================================================================  ==============================
name               per-token loss (minimised)                                            paper
=================  ====================================================================  ==============================
``clip_cov``       ``ppo_clip``; a random ``clip_cov_ratio`` share of the tokens whose    Clip-Cov, Cui et al. 2025,
                   covariance ``(A - mean A)(logp - mean logp)`` lies in                  arXiv:2505.22617
                   ``(clip_cov_lb, clip_cov_ub)`` is detached (no gradient)
``kl_cov``         ``-rho A``, plus ``kl_cov_coef * |logp - logp_old|`` on the top        KL-Cov, same paper
                   ``kl_cov_ratio`` share of the tokens by that covariance
``top_entropy``    ``ppo_clip`` on the top ``entropy_top_ratio`` share of the tokens by   Wang et al. 2025, "Beyond the
                   the policy's entropy, 0 on the others (needs ``entropy=``)             80/20 Rule", arXiv:2506.01939
=================  ====================================================================  ==============================

Why (Cui et al.): under a policy-gradient step the entropy changes by about
``-Cov(log pi(a), pi(a) A(a))``, so a few confident tokens with a large advantage drive the entropy
down; taking the gradient away from (Clip-Cov) or anchoring (KL-Cov) the tokens with the largest
covariance between log-prob and advantage keeps the policy exploring. Wang et al. find that the
high-entropy minority ("forking") tokens carry the useful gradient and train on them alone.

All three select tokens **within the tensors they are given**: the trainer calls a policy loss per
micro batch, so the covariance means, the token counts and the entropy threshold are those of the
micro batch (as verl's implementations, which also work per micro batch). ``train.micro_batch_size``
is therefore not only a memory knob with these losses, and they do not set
``zero_at_zero_advantage`` (skipping a zero-advantage row would change the selection in the
other rows). The selection carries no gradient.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .policy_losses import _ratio, _token_advantages, ppo_clip_loss
from .registry import register_policy_loss

__all__ = ["clip_cov_loss", "kl_cov_loss", "token_covariance", "top_entropy_loss", "top_entropy_mask"]


def token_covariance(logprobs: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """Per-token centred product ``(A_t - mean A) (logp_t - mean logp)``, means over the valid tokens
    (Cui et al. 2025, arXiv:2505.22617, the token-wise covariance that Clip-Cov and KL-Cov rank by). No gradient; 0 at padding.
    Shapes: ``logprobs, advantages, mask [B, T] -> [B, T]``.
    """
    with torch.no_grad():
        adv = _token_advantages(advantages, logprobs).expand_as(logprobs).detach().double()
        lp = logprobs.detach().double()
        valid = mask > 0
        n = valid.sum()
        if int(n) == 0:
            return torch.zeros_like(logprobs)
        adv_mean = adv[valid].mean()
        lp_mean = lp[valid].mean()
        cov = (adv - adv_mean) * (lp - lp_mean)
        return torch.where(valid, cov, torch.zeros_like(cov)).to(logprobs.dtype)


def top_entropy_mask(entropy: Tensor, mask: Tensor, ratio: float) -> Tensor:
    """``I[H_t >= tau_rho]``, Wang et al. 2025 (arXiv:2506.01939), the indicator of their objective: 1 on
    the ``k = ceil(ratio * N)`` valid tokens of highest entropy (``N`` valid tokens; ties at the
    threshold are all kept), 0 elsewhere and at padding. ``ratio = 1`` keeps every valid token.
    Shapes: ``entropy, mask [B, T] -> [B, T]`` (float 0/1, no gradient).
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"top-entropy ratio must be in (0, 1], got {ratio}")
    if entropy.shape != mask.shape:
        raise ValueError(f"entropy {tuple(entropy.shape)} must have the mask's shape {tuple(mask.shape)}")
    with torch.no_grad():
        valid = mask > 0
        n = int(valid.sum())
        out = torch.zeros_like(mask, dtype=entropy.dtype)
        if n == 0:
            return out
        k = min(n, max(1, math.ceil(ratio * n - 1e-9)))
        threshold = torch.topk(entropy.detach()[valid], k).values.min()
        return (valid & (entropy.detach() >= threshold)).to(entropy.dtype)


@register_policy_loss("clip_cov")
def clip_cov_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, cfg, *,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clip-Cov, Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning Language
    Models" (arXiv:2505.22617), the ``L_Clip-Cov`` objective: the PPO-clip loss (:func:`ppo_clip_loss`, with
    ``clip_eps_low/high`` and ``dual_clip_c``), except that ``max(1, int(r N))`` tokens, drawn uniformly
    at random among the valid tokens with ``omega_low < Cov_t < omega_high`` that the PPO clip did not
    already clip, are detached: their loss keeps its value but has no gradient. ``Cov_t`` =
    :func:`token_covariance`, ``N`` = valid tokens, ``r = cfg.clip_cov_ratio`` (paper 2e-4),
    ``omega = (cfg.clip_cov_lb, cfg.clip_cov_ub)`` (paper (1, 5)). Fewer candidates than
    ``int(r N)``: all are detached. The draw uses ``generator`` (default: torch's global RNG, which
    the run seeds, so a run is reproducible).

    Stats: ``clipped`` (PPO-clipped or detached), ``cov_detached``, ``ratio``.
    """
    loss, stats = ppo_clip_loss(logprobs, old_logprobs, advantages, mask, cfg)
    valid = mask > 0
    cov = token_covariance(logprobs, advantages, mask)
    candidates = valid & (stats["clipped"] == 0) & (cov > cfg.clip_cov_lb) & (cov < cfg.clip_cov_ub)
    idx = torch.nonzero(candidates.flatten()).flatten()
    detach = torch.zeros_like(candidates)
    n_valid = int(valid.sum())
    if len(idx) and n_valid:
        n_sel = max(int(cfg.clip_cov_ratio * n_valid), 1)
        if len(idx) > n_sel:
            perm = torch.randperm(len(idx), generator=generator, device=generator.device if generator else "cpu")
            idx = idx[perm[:n_sel].to(idx.device)]
        detach.view(-1)[idx] = True
    loss = torch.where(detach, loss.detach(), loss)
    m = mask.to(logprobs.dtype)
    stats["cov_detached"] = detach.to(m.dtype)
    stats["clipped"] = ((stats["clipped"] > 0) | detach).to(m.dtype) * m
    return loss, stats


clip_cov_loss.zero_at_zero_advantage = False  # the selection depends on every token of the micro batch


@register_policy_loss("kl_cov")
def kl_cov_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, cfg
) -> tuple[Tensor, dict[str, Tensor]]:
    """KL-Cov, Cui et al. 2025 (arXiv:2505.22617), the ``L_KL-Cov`` objective: the unclipped importance-sampled
    policy gradient ``-rho_t A_t`` on every token, plus a KL penalty to the old policy on the
    ``max(1, int(k N))`` valid tokens of largest :func:`token_covariance` (``k = cfg.kl_cov_ratio``,
    paper 2e-3 / 2e-4 by model size):

        ``loss_t = -rho_t A_t + beta |logp_t - logp_old_t| * [t in top-k Cov]``,  ``beta = cfg.kl_cov_coef``

    (the absolute log-ratio as the KL estimate, as the authors' code; paper ``beta = 1``). Ties in
    the covariance keep the earlier token. ``clip_eps_*`` are not used.
    Stats: ``clipped`` (the penalised tokens), ``ratio``.
    """
    adv = _token_advantages(advantages, logprobs)
    m = mask.to(logprobs.dtype)
    ratio = _ratio(logprobs, old_logprobs)
    loss = -ratio * adv
    valid = mask > 0
    cov = token_covariance(logprobs, advantages, mask)
    selected = torch.zeros_like(valid)
    idx = torch.nonzero(valid.flatten()).flatten()
    if len(idx):
        k = max(1, int(cfg.kl_cov_ratio * len(idx)))
        order = torch.argsort(cov.flatten()[idx], descending=True, stable=True)[:k]
        selected.view(-1)[idx[order]] = True
    penalty = cfg.kl_cov_coef * (logprobs - old_logprobs).abs()
    loss = loss + torch.where(selected, penalty, torch.zeros_like(penalty))
    stats = {"clipped": selected.to(m.dtype), "ratio": ratio.detach() * m}
    return loss, stats


kl_cov_loss.zero_at_zero_advantage = False  # the penalty is not 0 at A = 0, and the selection is batch-wide


@register_policy_loss("top_entropy")
def top_entropy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, cfg, *,
    entropy: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """High-entropy minority tokens, Wang et al. 2025, "Beyond the 80/20 Rule: High-Entropy Minority Tokens
    Drive Effective Reinforcement Learning for LLM Reasoning" (arXiv:2506.01939), their DAPO objective
    with the indicator ``I[H_t >= tau_rho]``: the PPO-clip loss (:func:`ppo_clip_loss`, DAPO's
    clip-higher via ``clip_eps_high``) on the ``entropy_top_ratio`` share of the valid tokens with the
    highest entropy (:func:`top_entropy_mask`; paper ``rho = 0.2``), 0 on the others. The others
    still count in the aggregation's ``num_tokens`` (the paper keeps DAPO's ``1 / sum_i |o_i|``).

    ``entropy [B, T]``: the entropy of the policy's (temperature-scaled) next-token distribution at
    each position, detached here. It is an **extra keyword** beyond the uniform policy-loss
    signature; the trainer passes it to losses whose ``requires`` names ``"entropy"``. Without it
    this loss raises ``ValueError``.
    Stats: ``clipped`` (PPO-clipped among the kept tokens), ``selected``, ``ratio``.
    """
    if entropy is None:
        raise ValueError("algo.policy_loss=top_entropy needs the per-token entropy (entropy=[B, T]); "
                         "the trainer must compute it in the training forward pass and pass it")
    if entropy.shape != logprobs.shape:
        raise ValueError(f"entropy {tuple(entropy.shape)} must have the log-probs' shape {tuple(logprobs.shape)}")
    loss, stats = ppo_clip_loss(logprobs, old_logprobs, advantages, mask, cfg)
    sel = top_entropy_mask(entropy.detach().to(logprobs.dtype), mask, cfg.entropy_top_ratio).to(logprobs.dtype)
    loss = loss * sel
    stats["clipped"] = stats["clipped"] * sel
    stats["selected"] = sel * mask.to(sel.dtype)
    return loss, stats


top_entropy_loss.requires = ("entropy",)
top_entropy_loss.zero_at_zero_advantage = False  # the entropy threshold is over every token of the micro batch
