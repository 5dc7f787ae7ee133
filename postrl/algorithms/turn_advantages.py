"""Credit assignment across the turns of multi-turn episodes (agents).

A row of the batch is one episode (postrl/rollout/episodes.py): its sampled tokens carry ``mask = 1`` and
``turn_ids`` = k on the tokens of turn k (-1 on environment tokens and padding). Step rewards sit on the last
sampled token of each turn: ``R = rewards`` on the last valid token ``+ token_rewards``, so the reward of turn
k is the sum of ``R`` over its tokens and the episode's return is ``rewards_i + sum_t token_rewards_{i,t}``.
Groups are consecutive: episodes ``g*n .. g*n+n-1`` started from the same task and seed.

=================  ===========================================================================  ====================
name               advantage of the tokens of turn k of episode i (group g of size n)          source
=================  ===========================================================================  ====================
``episode_grpo``   (G_i - mean_g G) / (std_g G + eps), G_i the episode's return, the same for    DeepSeekMath (GRPO)
                   every turn (std scope ``algo.adv_std_scope``; the trajectory-level baseline   over episodes
                   of verl / SkyRL / TRL multi-turn GRPO)
``episode_rloo``   G_i - mean_{j != i in g} G_j, the same for every turn                         Kool et al. 2019,
                                                                                                 Ahmadian et al. 2024
``turn_returns``   G_{i,k} - mean_{j != i in g} G_j, with G_{i,k} = sum_{l >= k} gamma^(l-k)     REINFORCE with
                   r_{i,l} the discounted return from turn k (``algo.gamma``); divided by the    reward-to-go
                   group's std of G_j unless ``algo.adv_std_scope`` is none
``gigpo``          A^E_i + w A^S_{i,k}: A^E as ``episode_grpo``; A^S = (G_{i,k} - mean of the    GiGPO, Feng et al.
                   returns of every step of the group that starts from the same anchor state)    2025, arXiv:
                   / (their std + eps, unless ``adv_std_scope`` is none); w = ``algo.            2505.10978, eqs. 3,
                   step_adv_weight`` (default 1), gamma = ``algo.gamma``                         5, 6, 7, 8
=================  ===========================================================================  ====================

Why no per-turn-index baseline (docs/agents.md has the worked example): normalising the returns of "turn k"
across the episodes of a group that reached turn k uses a set of episodes chosen by the policy itself (who
stopped before turn k is an action), and includes the episode's own return. The baseline of turn k then
depends on the actions it is meant to judge: with few survivors the advantage of a late turn shrinks to 0
(one survivor: exactly 0, whatever it did), so actions that lengthen an episode escape their penalty, and
the std division inflates the turns of sparse indices. The estimators here use a baseline that does not
depend on episode i's actions: the other episodes' returns (leave-one-out), or, for GiGPO, the returns of
steps taken from the *same state*, which is a state-dependent baseline (any turn index, any episode of the
group; a state visited once gets step advantage 0).

Every estimator has the registry's signature plus the episode fields it needs (declared in ``requires``)::

    fn(rewards [B], mask [B, T], group_size, cfg, *, token_rewards=None [B, T], turn_ids=None [B, T],
       anchor_ids=None [B, K], values=None, baseline_rewards=None, state=None) -> [B, T]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .advantages import grpo_advantages, last_token_rewards, rloo_advantages
from .registry import register_advantage

if TYPE_CHECKING:  # annotations only: postrl.config imports the registries of this package
    from postrl.config.rl import AlgoConfig

__all__ = ["broadcast_turns", "discounted_turn_returns", "episode_returns", "gigpo_step_advantages",
           "turn_rewards"]


# --------------------------------------------------------------------------------------------- #
# Pure helpers
# --------------------------------------------------------------------------------------------- #

def _step_rewards(rewards: Tensor, mask: Tensor, token_rewards: Tensor | None) -> Tensor:
    """``R [B, T]``: the outcome reward on the last valid token plus the valid token rewards."""
    R = last_token_rewards(rewards.to(mask.device).float(), mask)
    if token_rewards is not None:
        if token_rewards.shape != mask.shape:
            raise ValueError(f"token_rewards must have the mask's shape {tuple(mask.shape)}, got "
                             f"{tuple(token_rewards.shape)}")
        tr = token_rewards.to(mask.device).float()
        R = R + torch.where(mask > 0, tr, torch.zeros_like(tr))
    return R


def episode_returns(rewards: Tensor, mask: Tensor, token_rewards: Tensor | None = None) -> Tensor:
    """Undiscounted return of each episode, ``rewards_i + sum of token_rewards_i over valid tokens``.

    Shapes: ``rewards [B], mask [B, T], token_rewards [B, T] -> [B]``."""
    return _step_rewards(rewards, mask, token_rewards).sum(-1)


def turn_rewards(rewards: Tensor, mask: Tensor, token_rewards: Tensor | None, turn_ids: Tensor) -> tuple[Tensor, Tensor]:
    """The reward of each turn (sum of the step rewards over the turn's tokens) and which turns exist.

    Shapes: ``rewards [B], mask, token_rewards, turn_ids [B, T] -> (r [B, K], valid [B, K] bool)`` with ``K``
    the most turns of any row (at least 1)."""
    if turn_ids.shape != mask.shape:
        raise ValueError(f"turn_ids must have the mask's shape {tuple(mask.shape)}, got {tuple(turn_ids.shape)}")
    turn_ids = turn_ids.to(mask.device)
    if bool(((turn_ids >= 0) & (mask <= 0)).any()):
        raise ValueError("turn_ids marks tokens outside the mask; turns are made of sampled (mask = 1) tokens")
    R = _step_rewards(rewards, mask, token_rewards)
    K = max(1, int(turn_ids.max()) + 1) if turn_ids.numel() else 1
    tid = turn_ids.clamp(min=0)
    on = (turn_ids >= 0) & (mask > 0)
    r = torch.zeros((mask.shape[0], K), dtype=torch.float32, device=mask.device)
    r.scatter_add_(1, tid, torch.where(on, R, torch.zeros_like(R)))
    count = torch.zeros((mask.shape[0], K), dtype=torch.long, device=mask.device)
    valid = count.scatter_add_(1, tid, on.long()) > 0  # a turn exists when it has a sampled token
    return r, valid


def discounted_turn_returns(r: Tensor, valid: Tensor, gamma: float) -> Tensor:
    """``G_k = sum_{l >= k} gamma^(l-k) r_l`` over the existing turns of each row (GiGPO eq. 5); 0 where a
    turn does not exist. Shapes: ``r, valid [B, K] -> [B, K]``."""
    out = torch.zeros_like(r, dtype=torch.float32)
    running = torch.zeros(r.shape[0], dtype=torch.float32, device=r.device)
    for k in reversed(range(r.shape[1])):
        running = torch.where(valid[:, k], r[:, k].float() + gamma * running, running)
        out[:, k] = torch.where(valid[:, k], running, torch.zeros_like(running))
    return out


def broadcast_turns(per_turn: Tensor, turn_ids: Tensor) -> Tensor:
    """One value per turn ``[B, K]`` onto the tokens of that turn ``[B, T]``; 0 where ``turn_ids < 0``."""
    tid = turn_ids.to(per_turn.device)
    out = per_turn.float().gather(1, tid.clamp(min=0, max=per_turn.shape[1] - 1))
    return torch.where(tid >= 0, out, torch.zeros_like(out))


def gigpo_step_advantages(returns: Tensor, valid: Tensor, anchor_ids: Tensor, group_size: int,
                          normalize_std: bool = False, eps: float = 1e-6) -> Tensor:
    """GiGPO's step-level relative advantage (Feng et al. 2025, arXiv:2505.10978, eqs. 6-7).

    Within each group of ``group_size`` episodes, the steps (any episode, any turn index) whose anchor id is
    equal form a step group ``G^S(s)``; each step's advantage is its discounted return minus the mean return
    of its step group, divided by the group's population std (+ ``eps``) when ``normalize_std`` (the paper's
    F_norm = std; the authors' default, F_norm = 1, is ``normalize_std=False``). A step group of one step
    gets 0. Shapes: ``returns, valid, anchor_ids [B, K] -> [B, K]`` (0 where ``valid`` is False)."""
    if returns.shape != valid.shape or anchor_ids.shape[0] != returns.shape[0]:
        raise ValueError(f"gigpo: returns {tuple(returns.shape)}, valid {tuple(valid.shape)} and anchor_ids "
                         f"{tuple(anchor_ids.shape)} must be [B, K]")
    B, K = returns.shape
    if group_size < 1 or B % group_size:
        raise ValueError(f"gigpo: {B} episodes do not split into groups of {group_size}")
    anchors = anchor_ids[:, :K].to(returns.device)
    if anchors.shape[1] < K:
        raise ValueError(f"gigpo: anchor_ids has {anchors.shape[1]} turns, the returns {K}")
    if bool((valid & (anchors < 0)).any()):
        raise ValueError("gigpo: every turn needs an anchor id >= 0")
    out = torch.zeros_like(returns, dtype=torch.float32)
    groups = torch.arange(B, device=returns.device) // group_size
    key = groups[:, None].expand(B, K)
    sel = valid.nonzero(as_tuple=False)  # (row, turn) of every step
    if sel.numel() == 0:
        return out
    g, a = key[sel[:, 0], sel[:, 1]], anchors[sel[:, 0], sel[:, 1]]
    pair = torch.stack([g, a], 1)
    uniq, inv = torch.unique(pair, dim=0, return_inverse=True)
    x = returns[sel[:, 0], sel[:, 1]].float()
    count = torch.zeros(len(uniq), device=x.device).scatter_add_(0, inv, torch.ones_like(x))
    mean = torch.zeros(len(uniq), device=x.device).scatter_add_(0, inv, x) / count
    centered = x - mean[inv]
    if normalize_std:
        var = torch.zeros(len(uniq), device=x.device).scatter_add_(0, inv, centered ** 2) / count
        denom = var.sqrt()[inv] + eps
        centered = torch.where(denom > 0, centered / torch.where(denom > 0, denom, torch.ones_like(denom)),
                               torch.zeros_like(centered))
    out[sel[:, 0], sel[:, 1]] = centered
    return out


# --------------------------------------------------------------------------------------------- #
# Registered estimators
# --------------------------------------------------------------------------------------------- #

def _need(name: str, what: str, x: Any) -> Tensor:
    if x is None:
        raise ValueError(f"{name} needs {what}: it credits the turns of multi-turn episodes (env.name set, so the "
                         "rollout is an EpisodeBatch); for single-turn completions use grpo / rloo")
    return x


def _broadcast_rows(adv: Tensor, mask: Tensor) -> Tensor:
    full = adv.float()[:, None].expand(mask.shape)
    return torch.where(mask > 0, full, torch.zeros_like(full))


@register_advantage("episode_grpo")
def episode_grpo(rewards: Tensor, mask: Tensor, group_size: int, cfg: "AlgoConfig", *,
                 token_rewards: Tensor | None = None, turn_ids: Tensor | None = None,
                 anchor_ids: Tensor | None = None, values: Tensor | None = None,
                 baseline_rewards: Tensor | None = None, state: dict[str, Any] | None = None) -> Tensor:
    """GRPO over episodes: the group-normalised episode return, the same on every sampled token of the
    episode (``adv_eps``, ``adv_std_scope``; see the module table)."""
    G = episode_returns(rewards, mask, token_rewards)
    extra = {"unbiased": True} if getattr(cfg, "adv_std_unbiased", False) else {}  # Bessel's std, as grpo
    return _broadcast_rows(grpo_advantages(G, group_size, cfg.adv_eps, cfg.adv_std_scope, **extra), mask)


@register_advantage("episode_rloo")
def episode_rloo(rewards: Tensor, mask: Tensor, group_size: int, cfg: "AlgoConfig", *,
                 token_rewards: Tensor | None = None, turn_ids: Tensor | None = None,
                 anchor_ids: Tensor | None = None, values: Tensor | None = None,
                 baseline_rewards: Tensor | None = None, state: dict[str, Any] | None = None) -> Tensor:
    """RLOO over episodes: episode return minus the mean return of the group's other episodes, the same on
    every sampled token (needs ``group_size >= 2``)."""
    return _broadcast_rows(rloo_advantages(episode_returns(rewards, mask, token_rewards), group_size), mask)


def _loo_baseline(G: Tensor, group_size: int) -> Tensor:
    groups = G.view(-1, group_size)
    return ((groups.sum(1, keepdim=True) - groups) / (group_size - 1)).reshape(-1)


@register_advantage("turn_returns")
def turn_returns(rewards: Tensor, mask: Tensor, group_size: int, cfg: "AlgoConfig", *,
                 token_rewards: Tensor | None = None, turn_ids: Tensor | None = None,
                 anchor_ids: Tensor | None = None, values: Tensor | None = None,
                 baseline_rewards: Tensor | None = None, state: dict[str, Any] | None = None) -> Tensor:
    """Per-turn discounted return-to-go with a leave-one-out baseline: the tokens of turn k of episode i get
    ``(G_{i,k} - mean_{j != i} G_j) / s`` with ``G_{i,k} = sum_{l >= k} gamma^(l-k) r_{i,l}`` (``cfg.gamma``),
    ``G_j`` the other episodes' undiscounted returns and ``s`` the group's (``adv_std_scope: group``) or the
    batch's (``batch``) population std of the returns + ``adv_eps``, or 1 (``none``). A turn is credited only
    with the rewards that follow it; the baseline does not depend on episode i (no per-turn-index statistics).
    Needs ``group_size >= 2``."""
    turn_ids = _need("turn_returns", "turn_ids", turn_ids)
    if group_size < 2:
        raise ValueError(f"turn_returns needs at least 2 episodes per group (rollout.n >= 2), got {group_size}")
    r, valid = turn_rewards(rewards, mask, token_rewards, turn_ids)
    Gk = discounted_turn_returns(r, valid, cfg.gamma)
    G = r.sum(1)
    if G.numel() % group_size:
        raise ValueError(f"turn_returns: {G.numel()} episodes do not split into groups of {group_size}")
    adv = Gk - _loo_baseline(G, group_size)[:, None]
    scope = cfg.adv_std_scope
    if scope == "group":
        scale = G.view(-1, group_size).std(1, unbiased=False).repeat_interleave(group_size)[:, None]
    elif scope == "batch":
        scale = G.std(unbiased=False).expand(G.shape[0])[:, None]
    elif scope == "none":
        scale = None
    else:
        raise ValueError(f"adv_std_scope={scope!r}; valid: group, batch, none")
    if scale is not None:
        denom = scale + cfg.adv_eps
        adv = torch.where(denom > 0, adv / torch.where(denom > 0, denom, torch.ones_like(denom)),
                          torch.zeros_like(adv))
    adv = torch.where(valid, adv, torch.zeros_like(adv))
    return broadcast_turns(adv, turn_ids.to(mask.device))


@register_advantage("gigpo")
def gigpo(rewards: Tensor, mask: Tensor, group_size: int, cfg: "AlgoConfig", *,
          token_rewards: Tensor | None = None, turn_ids: Tensor | None = None,
          anchor_ids: Tensor | None = None, values: Tensor | None = None,
          baseline_rewards: Tensor | None = None, state: dict[str, Any] | None = None) -> Tensor:
    """GiGPO (Feng et al. 2025, "Group-in-Group Policy Optimization for LLM Agent Training",
    arXiv:2505.10978): ``A = A^E + w A^S`` (eq. 8).

    * episode level (eq. 3): the episode's return ``R(tau_i)`` against its group, as ``episode_grpo``
      (``adv_std_scope``: group = the paper's F_norm = std, none = F_norm = 1);
    * step level (eqs. 5-7): each turn's discounted return ``G_{i,k}`` (``cfg.gamma``) against the returns of
      all steps of the group that start from the same anchor state (``anchor_ids``: equal ids = identical
      environment state, from the environment's ``state_key`` or its observation text);
      :func:`gigpo_step_advantages`, normalised by the std when ``adv_std_scope`` is group or batch;
    * ``w = cfg.step_adv_weight`` (1.0 when the config has no such key; the paper uses 1).
    """
    turn_ids = _need("gigpo", "turn_ids", turn_ids)
    anchor_ids = _need("gigpo", "anchor_ids", anchor_ids)
    episode = episode_grpo(rewards, mask, group_size, cfg, token_rewards=token_rewards)
    r, valid = turn_rewards(rewards, mask, token_rewards, turn_ids)
    Gk = discounted_turn_returns(r, valid, cfg.gamma)
    step = gigpo_step_advantages(Gk, valid, anchor_ids.to(mask.device), group_size,
                                 normalize_std=cfg.adv_std_scope != "none", eps=cfg.adv_eps)
    w = float(getattr(cfg, "step_adv_weight", 1.0))
    return episode + w * broadcast_turns(step, turn_ids.to(mask.device))


episode_grpo.requires = ()
episode_rloo.requires = ()
turn_returns.requires = ("turn_ids",)
gigpo.requires = ("turn_ids", "anchor_ids")
