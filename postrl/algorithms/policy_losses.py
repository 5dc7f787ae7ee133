"""Policy losses: per-token loss terms, to be aggregated by ``aggregation``.

``rho_t = exp(logp_t - logp_old_t)`` is the token ratio against the policy that produced the batch,
``s_i = exp(mean_t (logp_t - logp_old_t))`` the length-normalised sequence ratio of completion i,
``sg`` a stop-gradient (``.detach()``).

=============  ==================================================================  =============================
name           per-token loss (minimised)                                          paper
=============  ==================================================================  =============================
``ppo_clip``   ``-min(rho A, clip(rho, 1-eps_low, 1+eps_high) A)``;                PPO (arXiv:1707.06347) eq. 7;
               with ``dual_clip_c = c > 1`` and ``A < 0``: ``min(that, -c A)``     clip-higher: DAPO
                                                                                   (arXiv:2503.14476) eq. 10;
                                                                                   dual-clip: Ye et al.
                                                                                   (arXiv:1912.09729)
``gspo``       ``-min(s_it A, clip(s_it, 1-eps_low, 1+eps_high) A)`` with          GSPO (arXiv:2507.18071)
               ``s_it = sg(s_i) * pi_t / sg(pi_t)`` (value ``s_i``)                eqs. 5-7, GSPO-token (Sec. 4.3)
``cispo``      ``-sg(clip(rho, 1-eps_low, 1+eps_high)) A logp``                    MiniMax-M1 (arXiv:2506.13585)
                                                                                   eqs. 4-5
``reinforce``  ``-A logp``                                                         Williams (1992); RLOO
                                                                                   (arXiv:2402.14740)
``gmpo``       ``-A_i exp(1/|o_i| sum_t l_t)``, ``l_t`` = log-ratio clipped to     GMPO (arXiv:2507.20673)
               ``[-eps_low, eps_high]`` in the advantage's direction (sequence)
``sapo``       ``-(4 / tau) sigmoid(tau (rho - 1)) A``, ``tau`` = ``sapo_tau_pos``  SAPO (arXiv:2511.20347)
               if ``A > 0`` else ``sapo_tau_neg``
``dppo``       ``-M rho A``, ``M = 0`` where the token's probability left the       DPPO (arXiv:2602.04879)
               trust region (binary TV / KL > delta) in the advantage's direction
``topr``       ``-sg(w_i) A logp``, ``w_i = 1`` if ``A_i >= 0`` else                TOPR (arXiv:2503.14286)
               ``min(pi(y_i) / pi_old(y_i), 1)`` (sequence ratio)
=============  ==================================================================  =============================

Entropy-collapse control (``clip_cov``, ``kl_cov``, ``top_entropy``) lives in
:mod:`postrl.algorithms.entropy_control`.

How published methods map onto ``algo.advantage`` + ``algo.policy_loss`` + ``algo.loss_agg``:

* **GRPO** (DeepSeekMath, arXiv:2402.03300, eq. 3) = ``advantage: grpo`` + ``policy_loss: ppo_clip``
  (symmetric eps 0.2) + ``loss_agg: seq_mean_token_mean`` (the paper's ``1/G sum_i 1/|o_i| sum_t``),
  plus ``kl_coef > 0`` with the k3 estimator. postrl's default ``loss_agg: token_mean`` is the
  token-level average that DAPO argues for and most GRPO implementations use.
* **DAPO** (arXiv:2503.14476) = ``advantage: grpo`` + ``policy_loss: ppo_clip`` with
  ``clip_eps_low: 0.2, clip_eps_high: 0.28`` (clip-higher, eq. 10) + ``loss_agg: token_mean``
  (eq. 12) + ``kl_coef: 0`` + ``dynamic_sampling``, ``overlong_buffer`` / ``overlong_filter``
  (see ``shaping``).
* **Dr. GRPO** (arXiv:2503.20783) = ``advantage: dr_grpo`` (no std division) + ``ppo_clip`` +
  ``loss_agg: seq_mean_token_sum_norm`` (divide by a constant generation budget).
* **GSPO** (arXiv:2507.18071) = ``advantage: grpo`` + ``policy_loss: gspo`` + ``loss_agg:
  seq_mean_token_mean`` (reproduces eq. 5's ``1/G sum_i``), with tiny clip ranges such as
  ``clip_eps_low: 3e-4, clip_eps_high: 4e-4``.
* **CISPO** (MiniMax-M1, arXiv:2506.13585) = ``advantage: grpo`` + ``policy_loss: cispo`` +
  ``loss_agg: token_mean`` (eq. 4's ``1/sum_i |o_i|``); the paper bounds the weight from above
  only: set ``clip_eps_low >= 1`` (``1 - eps_low <= 0`` never binds).
* **REINFORCE / RLOO** (arXiv:2402.14740) = ``advantage: rloo`` (or any estimator) +
  ``policy_loss: reinforce``: the plain on-policy gradient, no ratio, so it is only correct with
  one optimizer update per rollout batch (``train.epochs: 1`` and mini batch = rollout batch).
  REINFORCE++ (arXiv:2501.03262) keeps the PPO clip: ``advantage: reinforce_pp`` + ``ppo_clip``.

Signature shared by every loss (pure function, AReaL style)::

    fn(logprobs [B, T],      # current policy log-probs of the sampled tokens (differentiable)
       old_logprobs [B, T],  # log-probs of the policy that produced the batch ("old" / proximal)
       advantages [B, T],    # token-level advantages, 0 at padding ([B] is broadcast over tokens)
       mask [B, T],          # float, 1 on completion tokens
       cfg: AlgoConfig,      # clip_eps_low, clip_eps_high, dual_clip_c, ...
    ) -> (loss_tokens [B, T], stats)

``loss_tokens`` is not masked: the aggregation (``algo.loss_agg``) applies the mask.
``stats`` maps names to per-token float tensors ``[B, T]`` (0 at padding); every loss returns
at least ``clipped`` (1 where the loss's clip was active) so the trainer can log a clip fraction.

A loss whose value and gradient are exactly 0 wherever the advantage is 0 sets
``fn.zero_at_zero_advantage = True``; the trainer then skips the forward/backward of sequences
whose advantages are all 0 (same gradient, less compute). All the losses of this module qualify; the
token-selecting ones of :mod:`.entropy_control` do not.

A loss that needs more than the five positional inputs declares them in ``fn.requires`` and takes
them as keyword arguments: ``top_entropy`` has ``requires = ("entropy",)`` and is called with
``entropy=[B, T]`` (the per-token entropy of the training forward pass). Losses without ``requires``
are called with the five positional arguments only.

Truncated importance sampling against the *behaviour* policy (the rollout engine, whose
log-probs can differ from the trainer's even at equal weights) is separate and composes with any
loss: :func:`tis_weights` gives per-token weights the trainer multiplies ``loss_tokens`` by.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import register_policy_loss

LOG_RATIO_CLAMP = 20.0
"""|log ratio| is clamped to this before exp(), so a badly diverged token cannot overflow."""

TIS_MODES = ("off", "clamp", "mask")


def _token_advantages(advantages: Tensor, like: Tensor) -> Tensor:
    """``[B]`` (one per sequence) -> ``[B, 1]`` (broadcasts over tokens); ``[B, T]`` as is."""
    if advantages.dim() == 1:
        return advantages[:, None]
    if advantages.shape != like.shape:
        raise ValueError(f"advantages {tuple(advantages.shape)} must be [B] or [B, T] = {tuple(like.shape)}")
    return advantages


def _ratio(logprobs: Tensor, old_logprobs: Tensor) -> Tensor:
    return torch.exp((logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


@register_policy_loss("ppo_clip")
def ppo_clip_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, cfg
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate, PPO (Schulman et al. 2017, arXiv:1707.06347) eq. 7, as a loss.

    ``loss_t = -min(rho_t A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) A_t)``,
    ``rho_t = exp(logprobs_t - old_logprobs_t)``, with ``eps_low = cfg.clip_eps_low`` and
    ``eps_high = cfg.clip_eps_high`` (decoupled bounds: DAPO "clip-higher", arXiv:2503.14476
    eq. 10, uses 0.2 / 0.28).

    Dual clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL",
    arXiv:1912.09729, "dual-clip PPO"), on when ``cfg.dual_clip_c = c > 1``: for ``A_t < 0`` the objective
    is ``max(min(rho A, clip(rho) A), c A)``, i.e. the loss is bounded from above,
    ``loss_t = min(ppo_loss_t, -c A_t) = min(ppo_loss_t, c |A_t|)``. Without it a token whose
    ratio has grown far above 1 while its advantage is negative gets a loss ``|A| rho`` and a
    gradient that grow without bound; with it such tokens (``rho > c``) contribute the constant
    ``c |A|`` and no gradient. Positive-advantage tokens are unchanged.

    Stats (float 0/1 per token, 0 at padding): ``clipped`` (the clipped PPO term is the active
    one: gradient 0), split into ``clipped_high`` (``A > 0``, ``rho > 1 + eps_high``) and
    ``clipped_low`` (``A < 0``, ``rho < 1 - eps_low``); ``dual_clipped`` (``A < 0``,
    ``rho > c``: gradient 0); and ``ratio``.
    """
    adv = _token_advantages(advantages, logprobs)
    ratio = _ratio(logprobs, old_logprobs)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high)
    loss = torch.maximum(unclipped, clipped)  # = -min(rho A, clip(rho) A)
    m = mask.to(logprobs.dtype)
    is_clipped = clipped > unclipped
    stats = {
        "clipped": is_clipped.to(m.dtype) * m,
        "clipped_high": (is_clipped & (adv > 0)).to(m.dtype) * m,
        "clipped_low": (is_clipped & (adv < 0)).to(m.dtype) * m,
        "ratio": ratio.detach() * m,
    }
    c = float(getattr(cfg, "dual_clip_c", 0.0) or 0.0)
    if c > 1.0:
        bound = -c * adv  # = c |A| > 0 where A < 0; constant, so no gradient
        dual = (adv < 0) & (loss > bound)
        loss = torch.where(dual, bound, loss)
        stats["dual_clipped"] = dual.to(m.dtype) * m
    else:
        stats["dual_clipped"] = torch.zeros_like(m)
    return loss, stats


# -max(-r*0, -clip(r)*0) == 0 for every finite r; the dual bound -c*0 == 0 too; the gradient is r*A == 0.
ppo_clip_loss.zero_at_zero_advantage = True


@register_policy_loss("gspo")
def gspo_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, cfg
) -> tuple[Tensor, dict[str, Tensor]]:
    """Group Sequence Policy Optimization, Zheng et al. 2025 (arXiv:2507.18071), eqs. 5-7, in its
    GSPO-token form (Sec. 4.3).

    Sequence ratio (eq. 7), the geometric mean of the token ratios over the valid tokens:
    ``s_i = (pi(y_i|x) / pi_old(y_i|x))^(1/|y_i|) = exp(1/|y_i| sum_t mask_t (logp_t - logp_old_t))``.
    Eq. 5 maximises ``1/G sum_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)``: clipping
    acts on whole sequences. Here every token t of completion i carries

        ``loss_t = -min(s_it A_t, clip(s_it, 1 - eps_low, 1 + eps_high) A_t)``,
        ``s_it = sg[s_i] * pi_t / sg[pi_t] = exp(sg[log s_i] + logp_t - sg[logp_t])``,

    whose value is ``s_i`` and whose gradient w.r.t. ``logp_t`` is ``s_i`` (GSPO-token). With
    ``loss_agg: seq_mean_token_mean`` and a sequence-level advantage (``A_t = A_i``) the loss is
    ``-1/G sum_i min(s_i A_i, clip(s_i) A_i)`` and its gradient is the paper's (eq. 10)
    ``-1/G sum_i s_i A_i 1/|y_i| sum_t grad logp_t`` on unclipped sequences, 0 on clipped ones.
    Token-level advantages give GSPO-token proper. Other aggregations reweight the sequences
    (``token_mean`` by their length).

    ``eps_low = cfg.clip_eps_low``, ``eps_high = cfg.clip_eps_high`` bound a *per-token average*
    log-ratio, so they must be far smaller than PPO's: the paper uses 3e-4 and 4e-4. With the PPO
    defaults (0.2) almost nothing is ever clipped.

    Stats: ``clipped`` (1 on every token of a clipped sequence), ``ratio`` (``s_i`` broadcast).
    """
    adv = _token_advantages(advantages, logprobs)
    m = mask.to(logprobs.dtype)
    lengths = m.sum(-1).clamp(min=1.0)
    token_log_ratio = torch.where(m > 0, logprobs.detach() - old_logprobs, torch.zeros_like(m))  # padding ignored
    seq_log_ratio = token_log_ratio.sum(-1) / lengths  # log s_i, [B]
    seq_log_ratio = seq_log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    s_tok = torch.exp(logprobs - logprobs.detach() + seq_log_ratio[:, None])  # value s_i, d/dlogp_t = s_i
    unclipped = -adv * s_tok
    clipped = -adv * s_tok.clamp(1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high)
    loss = torch.maximum(unclipped, clipped)
    stats = {"clipped": (clipped > unclipped).to(m.dtype) * m, "ratio": s_tok.detach() * m}
    return loss, stats


# s_it depends on logp_t alone (the sequence part is detached), so A_t == 0 zeroes token t's value and gradient.
gspo_loss.zero_at_zero_advantage = True


@register_policy_loss("cispo")
def cispo_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, cfg
) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO, MiniMax-M1 (arXiv:2506.13585) Sec. 3.1, eqs. 4-5: clip the importance-sampling
    weight, not the update.

    ``loss_t = -sg(clip(rho_t, 1 - eps_low, 1 + eps_high)) * A_t * logp_t``, so
    ``d loss_t / d logp_t = -w_t A_t`` with ``w_t`` the clipped, detached ratio: every token keeps
    a gradient (PPO's clip zeroes the gradient of clipped tokens), only its weight is bounded.
    The loss *value* is not a surrogate of the return (it contains ``logp``); only its gradient is
    meaningful.

    Config mapping: ``eps_low = cfg.clip_eps_low``, ``eps_high = cfg.clip_eps_high``. The paper
    imposes no lower bound (it sets ``eps_low^IS`` large) and tunes only ``eps_high^IS``; to
    reproduce that set ``clip_eps_low >= 1`` (``1 - eps_low <= 0 < rho`` never binds). With the
    PPO defaults (0.2 / 0.2) the weight is clipped on both sides to [0.8, 1.2].

    Stats: ``clipped`` (1 where the weight was truncated; the token still has a gradient),
    ``ratio``.
    """
    adv = _token_advantages(advantages, logprobs)
    m = mask.to(logprobs.dtype)
    ratio = _ratio(logprobs, old_logprobs).detach()
    weight = ratio.clamp(1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high)
    loss = -weight * adv * logprobs
    stats = {"clipped": (weight != ratio).to(m.dtype) * m, "ratio": ratio * m}
    return loss, stats


cispo_loss.zero_at_zero_advantage = True  # -w * 0 * logp == 0, gradient -w * 0 == 0


@register_policy_loss("reinforce")
def reinforce_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, cfg
) -> tuple[Tensor, dict[str, Tensor]]:
    """Plain policy gradient (REINFORCE, Williams 1992; with a leave-one-out baseline as advantage:
    RLOO, Ahmadian et al. 2024, arXiv:2402.14740): ``loss_t = -A_t * logp_t``.

    No importance ratio: ``old_logprobs`` and ``cfg`` are unused, and the gradient is unbiased only
    on-policy (one optimizer update per rollout batch). Stats: ``clipped`` (always 0), ``ratio``
    (for monitoring how far off-policy the update went).
    """
    adv = _token_advantages(advantages, logprobs)
    m = mask.to(logprobs.dtype)
    loss = -adv * logprobs
    stats = {"clipped": torch.zeros_like(m), "ratio": _ratio(logprobs, old_logprobs).detach() * m}
    return loss, stats


reinforce_loss.zero_at_zero_advantage = True  # -0 * logp == 0, gradient 0


@register_policy_loss("gmpo")
def gmpo_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, cfg
) -> tuple[Tensor, dict[str, Tensor]]:
    """Geometric-Mean Policy Optimization, Zhao et al. 2025 (arXiv:2507.20673), the GMPO objective
    (``J_GMPO``, the paper's main equation):
    the arithmetic mean of the clipped token ratios of GRPO is replaced by their geometric mean,

        ``J_i = |A_i| * sgn(A_i) * (prod_t min(rho_t sgn(A_i), clip(rho_t, e^-eps_low, e^eps_high) sgn(A_i)))^(1/|o_i|)``

    computed in log space: per token ``l_t = sgn(A) min(sgn(A) log rho_t, sgn(A) clip(log rho_t, -eps_low,
    eps_high))`` (the clip binds only in the advantage's direction, as PPO's min does), the sequence ratio
    ``s_i = exp(1/|o_i| sum_t l_t)`` and the loss ``-A_i s_i``. ``eps_low = cfg.clip_eps_low`` and
    ``eps_high = cfg.clip_eps_high`` bound the *log*-ratio (the paper's range ``(e^-0.4, e^0.4)`` is
    ``0.4 / 0.4``). The gradient w.r.t. ``logp_t`` is ``-A_i s_i / |o_i|`` on unclipped tokens and 0 on
    clipped ones: every token of a sequence is scaled by the same geometric-mean ratio, so one
    outlier token cannot dominate (the paper's stability argument).

    Sequence-level like GSPO: every token carries the row's loss ``-A_i s_i``, so
    ``loss_agg: seq_mean_token_mean`` gives ``-1/G sum_i A_i s_i`` (validation requires it).
    ``A_i`` = the mean of the advantages over the row's valid tokens (outcome estimators give one
    value per row). Stats: ``clipped`` (the token's log-ratio was clipped), ``ratio`` (``s_i``).
    """
    adv_tok = _token_advantages(advantages, logprobs)
    m = mask.to(logprobs.dtype)
    lengths = m.sum(-1).clamp(min=1.0)
    adv = (adv_tok.expand_as(logprobs) * m).sum(-1) / lengths  # [B] sequence advantage
    sign = torch.sign(adv)[:, None]
    log_ratio = (logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    clamped = log_ratio.clamp(-cfg.clip_eps_low, cfg.clip_eps_high)
    token_term = sign * torch.minimum(sign * log_ratio, sign * clamped)  # gradient 0 where the clamp binds
    seq_ratio = torch.exp((token_term * m).sum(-1) / lengths)  # s_i, [B]
    loss = (-adv * seq_ratio)[:, None].expand_as(logprobs)
    is_clipped = (sign * clamped < sign * log_ratio) & (m > 0)
    stats = {"clipped": is_clipped.to(m.dtype), "ratio": seq_ratio.detach()[:, None] * m}
    return loss, stats


gmpo_loss.zero_at_zero_advantage = True  # -0 * s_i == 0 and its gradient too


@register_policy_loss("sapo")
def sapo_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, cfg
) -> tuple[Tensor, dict[str, Tensor]]:
    """Soft Adaptive Policy Optimization, Gao et al. 2025 (Qwen; arXiv:2511.20347), the SAPO objective
    and its gate ``f_{i,t}``: the hard clip is replaced by a smooth, temperature-controlled gate of the token ratio,

        ``loss_t = -f(rho_t) A_t``,  ``f(rho) = (4 / tau) sigmoid(tau (rho - 1))``,

    with ``tau = cfg.sapo_tau_pos`` where ``A_t > 0`` and ``cfg.sapo_tau_neg`` otherwise (the paper:
    1.0 and 1.05; a larger ``tau_neg`` damps negative updates faster). The gradient w.r.t. ``logp_t`` is
    ``-A_t rho_t 4 p (1 - p)``, ``p = sigmoid(tau (rho_t - 1))``: exactly the policy gradient at
    ``rho = 1`` (``4 * 1/4 = 1``), decaying smoothly as the ratio leaves 1 instead of dropping to 0 at a
    clip boundary. The paper averages per sequence (``loss_agg: seq_mean_token_mean``).
    ``clip_eps_*`` are not used. Stats: ``clipped`` (always 0: nothing is hard-clipped), ``ratio``,
    ``gate`` (``4 p (1 - p)``, the gradient's attenuation).
    """
    adv = _token_advantages(advantages, logprobs)
    m = mask.to(logprobs.dtype)
    ratio = _ratio(logprobs, old_logprobs)
    tau = torch.where(adv > 0, torch.full_like(ratio, cfg.sapo_tau_pos), torch.full_like(ratio, cfg.sapo_tau_neg))
    p = torch.sigmoid(tau * (ratio - 1.0))
    loss = -(4.0 / tau) * p * adv
    stats = {"clipped": torch.zeros_like(m), "ratio": ratio.detach() * m, "gate": (4.0 * p * (1.0 - p)).detach() * m}
    return loss, stats


sapo_loss.zero_at_zero_advantage = True  # -f(rho) * 0 == 0, gradient 0

DPPO_DIVERGENCES = ("binary_tv", "binary_kl")


def dppo_divergence(logprobs: Tensor, old_logprobs: Tensor, kind: str) -> Tensor:
    """Binary approximations of the divergence between the old and the current policy at the sampled
    token (DPPO, arXiv:2602.04879, "Binary" approximation): with ``p = pi(y_t)``, ``q = pi_old(y_t)`` and the two-outcome
    distributions ``(q, 1 - q)`` and ``(p, 1 - p)``,

    * ``binary_tv``: ``|p - q|``;
    * ``binary_kl``: ``q log(q / p) + (1 - q) log((1 - q) / (1 - p))``.

    No gradient. Shapes: ``[B, T] -> [B, T]``.
    """
    if kind not in DPPO_DIVERGENCES:
        raise ValueError(f"dppo divergence {kind!r} is not valid; choose one of: {', '.join(DPPO_DIVERGENCES)}")
    with torch.no_grad():
        lp = logprobs.detach().double().clamp(max=0.0)
        lq = old_logprobs.detach().double().clamp(max=0.0)
        p, q = lp.exp(), lq.exp()
        if kind == "binary_tv":
            return (p - q).abs().to(logprobs.dtype)
        log1m_p = torch.log1p(-p.clamp(max=1.0 - 1e-15))
        log1m_q = torch.log1p(-q.clamp(max=1.0 - 1e-15))
        kl = q * (lq - lp) + (1.0 - q) * (log1m_q - log1m_p)
        return kl.clamp(min=0.0).to(logprobs.dtype)


@register_policy_loss("dppo")
def dppo_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, cfg
) -> tuple[Tensor, dict[str, Tensor]]:
    """Divergence PPO, Qi et al. 2026, "Rethinking the Trust Region in LLM Reinforcement Learning"
    (arXiv:2602.04879), Binary-TV / Binary-KL variants: PPO's ratio clip is replaced by a trust-region
    *mask* on the policy divergence at the sampled token,

        ``loss_t = -M_t rho_t A_t``,  ``M_t = 0`` if the token left the trust region in the advantage's
        direction: ``A_t > 0`` and ``p > q`` and ``D_t > delta_high``, or ``A_t < 0`` and ``p < q`` and
        ``D_t > delta_low``; else ``M_t = 1``,

    with ``p, q`` the current and old probability of the token, ``D_t`` = :func:`dppo_divergence`
    (``cfg.dppo_divergence``), ``delta_low/high = cfg.dppo_delta_low/high`` (paper: 0.2 for TV,
    0.05 for KL). ``M`` carries no gradient: inside the region the gradient is the plain importance-
    sampled ``-rho A``; a masked token contributes 0. Unlike the ratio clip, a rare token whose
    probability moves from 1e-5 to 1e-4 (ratio 10) stays in the region, while a frequent token moving
    from 0.5 to 0.9 leaves it. ``clip_eps_*`` are not used.
    Stats: ``clipped`` (masked tokens), ``ratio``, ``divergence``.
    """
    adv = _token_advantages(advantages, logprobs)
    m = mask.to(logprobs.dtype)
    ratio = _ratio(logprobs, old_logprobs)
    div = dppo_divergence(logprobs, old_logprobs, cfg.dppo_divergence)
    moved_up = logprobs.detach() > old_logprobs
    moved_down = logprobs.detach() < old_logprobs
    out = ((adv > 0) & moved_up & (div > cfg.dppo_delta_high)) | ((adv < 0) & moved_down & (div > cfg.dppo_delta_low))
    keep = (~out).to(logprobs.dtype)
    loss = -keep * ratio * adv
    stats = {"clipped": out.to(m.dtype) * m, "ratio": ratio.detach() * m, "divergence": div * m}
    return loss, stats


dppo_loss.zero_at_zero_advantage = True  # -M * rho * 0 == 0, gradient 0


@register_policy_loss("topr")
def topr_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, cfg
) -> tuple[Tensor, dict[str, Tensor]]:
    """Tapered Off-Policy REINFORCE, Le Roux et al. 2025 (arXiv:2503.14286), the TOPR gradient
    (``grad J_TOPR``, the paper's defining equation):

        ``grad J = sum_{R(y) >= 0} R(y) grad log pi(y) + sum_{R(y) < 0} clip(pi(y) / mu(y), 0, 1) R(y) grad log pi(y)``

    i.e. plain (SFT-like) REINFORCE on the positive samples, and truncated importance sampling on the
    negative ones, with the *sequence* ratio ``pi(y) / mu(y) = exp(sum_t (logp_t - logp_old_t))`` over
    the completion's valid tokens (``mu`` = the policy that sampled the batch). As a loss:

        ``loss_t = -sg(w_i) A_t logp_t``,  ``w_i = 1`` if ``A_i >= 0`` else ``min(exp(sum_t log rho_t), 1)``

    ``R(y)`` is the advantage (a baseline decides which samples count as negative, as the paper's
    discussion of the REINFORCE baseline shows; ``A_i`` = the row's mean advantage decides the sign). The weight
    only shrinks a negative sample's push-down once the policy already made it less likely than the
    sampler did, so ``log pi(y)`` of a negative cannot be driven to ``-inf`` (the paper's stability
    argument). The loss *value* contains ``logp`` (only its gradient is meaningful), as ``cispo``.
    The paper's objective is the sequence log-likelihood (``loss_agg: seq_mean_token_sum``).
    ``clip_eps_*`` are not used. Stats: ``clipped`` (a negative sample whose weight was truncated
    at 1), ``ratio`` (the sequence ratio), ``weight``.
    """
    adv_tok = _token_advantages(advantages, logprobs)
    m = mask.to(logprobs.dtype)
    lengths = m.sum(-1).clamp(min=1.0)
    seq_adv = (adv_tok.expand_as(logprobs) * m).sum(-1) / lengths
    log_seq_ratio = ((logprobs.detach() - old_logprobs) * m).sum(-1).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    negative = seq_adv < 0
    weight = torch.where(negative, torch.exp(log_seq_ratio.clamp(max=0.0)), torch.ones_like(seq_adv))
    loss = -weight[:, None] * adv_tok * logprobs
    stats = {"clipped": (negative & (log_seq_ratio > 0)).to(m.dtype)[:, None] * m,
             "ratio": torch.exp(log_seq_ratio)[:, None] * m, "weight": weight[:, None] * m}
    return loss, stats


topr_loss.zero_at_zero_advantage = True  # -w * 0 * logp == 0, gradient 0


@torch.no_grad()
def tis_weights(
    old_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, mode: str, cap: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Truncated importance sampling against the behaviour policy (no gradient).

    The rollout engine samples with ``pi_behaviour`` while the trainer computes ``pi_old`` with its
    own kernels; even at equal weights they differ, which makes "on-policy" training silently
    off-policy. Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL
    Training" (Fengyao's blog; verl's ``tis_imp_ratio_cap``) reweight each token's loss by the
    truncated ratio. With ``u_t = exp(old_logprobs_t - behaviour_logprobs_t)``:

    * ``clamp``: ``w_t = min(u_t, cap)`` (TIS);
    * ``mask``:  ``w_t = 1 if u_t <= cap else 0`` (drop tokens the trainer finds far likelier than
      the sampler did; a 0/1 mask, unlike IcePop / MIS which also keep ``u_t`` as the weight);
    * ``off``:   ``w_t = 1``.

    The trainer multiplies the per-token loss by ``w`` (``loss_tokens * w``). Padding gets
    weight 1 (it is masked by the aggregation anyway). Masked tokens stay in the aggregation's
    denominator (``num_tokens``), i.e. they count as zero-loss tokens.

    Returns ``(w [B, T], stats)``; stats (scalars over the valid tokens): ``ratio_mean``,
    ``ratio_max`` and ``capped_frac`` (clamp) or ``masked_frac`` (mask): the fraction with
    ``u_t > cap``; ``{}`` for ``off``.
    """
    if mode not in TIS_MODES:
        raise ValueError(f"tis mode {mode!r} is not valid; choose one of: {', '.join(TIS_MODES)}")
    if mode == "off":
        return torch.ones_like(old_logprobs), {}
    if not cap > 0:
        raise ValueError(f"tis cap must be > 0, got {cap}")
    valid = mask > 0
    log_u = torch.where(valid, old_logprobs - behaviour_logprobs, torch.zeros_like(old_logprobs))
    u = torch.exp(log_u.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    over = (u > cap) & valid
    if mode == "clamp":
        w = u.clamp(max=cap)
    else:
        w = (u <= cap).to(u.dtype)
    n = valid.sum().clamp(min=1)
    stats = {
        "ratio_mean": (u * valid).sum() / n,
        "ratio_max": torch.where(valid, u, torch.zeros_like(u)).max() if u.numel() else u.new_zeros(()),
        ("capped_frac" if mode == "clamp" else "masked_frac"): over.sum() / n,
    }
    return w, stats


def logprob_mismatch(trainer_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor) -> dict[str, float]:
    """How far the sampler's log-probs of the sampled tokens are from the trainer's (no gradient).

    The tokens were drawn from the sampler ``mu``; with ``r_t = exp(trainer_t - sampler_t) = pi(y_t) / mu(y_t)``
    the k3 estimator ``E_mu[r - 1 - log r]`` (Schulman 2020, "Approximating KL divergence") estimates
    ``KL(mu || pi)`` without bias and is never negative. Returns, over the tokens where ``mask > 0``:
    ``kl`` (that mean), ``max_abs`` and ``mean_abs`` (of ``trainer - sampler``); zeros when no token counts.
    Shapes: ``[B, T]`` each.
    """
    valid = mask > 0
    if not bool(valid.any()):
        return {"kl": 0.0, "max_abs": 0.0, "mean_abs": 0.0}
    d = (trainer_logprobs.detach().double() - sampler_logprobs.detach().double())[valid]
    log_r = d.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    kl = (torch.exp(log_r) - 1.0 - log_r).mean()
    return {"kl": float(kl), "max_abs": float(d.abs().max()), "mean_abs": float(d.abs().mean())}
