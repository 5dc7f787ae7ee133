"""Credit assignment across turns (postrl/algorithms/turn_advantages.py), against hand-worked numbers."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from postrl.algorithms import ADVANTAGES
from postrl.algorithms.turn_advantages import (
    broadcast_turns,
    discounted_turn_returns,
    episode_returns,
    gigpo_step_advantages,
    turn_rewards,
)
from postrl.config.rl import AlgoConfig

CFG = AlgoConfig(adv_std_scope="none", adv_eps=1e-6, gamma=1.0)


def episodes(spec: list[list[tuple[int, float]]], env_tokens: int = 2):
    """Rows from ``[[(sampled tokens of turn 0, its reward), (turn 1 ...)], ...]`` laid out as the episode
    runner does: ``env_tokens`` environment tokens between turns, each turn's reward on its last token, the
    episode's last reward in ``rewards`` and the others in ``token_rewards``."""
    T = max(sum(n for n, _ in ep) + env_tokens * (len(ep) - 1) for ep in spec)
    B = len(spec)
    mask = torch.zeros(B, T)
    turn_ids = torch.full((B, T), -1, dtype=torch.long)
    R = torch.zeros(B, T)
    for i, ep in enumerate(spec):
        pos = 0
        for k, (n, r) in enumerate(ep):
            if k:
                pos += env_tokens
            mask[i, pos:pos + n] = 1
            turn_ids[i, pos:pos + n] = k
            R[i, pos + n - 1] = r
            pos += n
    last = (torch.arange(T) * mask).argmax(1)
    rewards = R[torch.arange(B), last].clone()
    token_rewards = R.clone()
    token_rewards[torch.arange(B), last] = 0
    return rewards, mask, token_rewards, turn_ids


def per_turn(adv: torch.Tensor, turn_ids: torch.Tensor) -> list[list[float]]:
    """The (single) advantage value of each turn of each row, checking it is constant over the turn."""
    out = []
    for a, t in zip(adv, turn_ids):
        row = []
        for k in range(int(t.max()) + 1):
            vals = a[t == k]
            assert torch.allclose(vals, vals[0].expand_as(vals)), "a turn's tokens must share one advantage"
            row.append(round(float(vals[0]), 6))
        out.append(row)
    return out


def test_turn_rewards_and_returns_by_hand():
    rewards, mask, tr, tid = episodes([[(2, 0.0), (1, 0.5), (3, 1.0)], [(1, -1.0)]])
    r, valid = turn_rewards(rewards, mask, tr, tid)
    assert r.tolist() == [[0.0, 0.5, 1.0], [-1.0, 0.0, 0.0]]
    assert valid.tolist() == [[True, True, True], [True, False, False]]
    assert episode_returns(rewards, mask, tr).tolist() == [1.5, -1.0]
    # gamma = 0.5: G_2 = 1, G_1 = 0.5 + 0.5 * 1 = 1, G_0 = 0 + 0.5 * 1 = 0.5
    assert discounted_turn_returns(r, valid, 0.5).tolist() == [[0.5, 1.0, 1.0], [-1.0, 0.0, 0.0]]
    b = broadcast_turns(torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]]), tid)
    assert b[0].tolist() == [1, 1, 0, 0, 2, 0, 0, 3, 3, 3]
    assert b[1].tolist() == [4] + [0] * 9


def test_episode_grpo_and_rloo_broadcast_the_return_to_every_turn():
    # returns 1.5, 0, 0.5, 0 (group of 4): mean 0.5, population std sqrt((1 + .25 + 0 + .25) / 4) = sqrt(.375)
    rewards, mask, tr, tid = episodes([[(2, 0.5), (1, 1.0)], [(1, 0.0)], [(1, 0.0), (2, 0.5)], [(3, 0.0)]])
    adv = ADVANTAGES["episode_grpo"](rewards, mask, 4, CFG, token_rewards=tr)
    assert per_turn(adv, tid) == [[1.0, 1.0], [-0.5], [0.0, 0.0], [-0.5]]
    assert (adv[mask == 0] == 0).all()
    std = 0.375 ** 0.5
    adv = ADVANTAGES["episode_grpo"](rewards, mask, 4, replace(CFG, adv_std_scope="group"), token_rewards=tr)
    assert per_turn(adv, tid)[0] == [pytest.approx(1.0 / (std + 1e-6), abs=1e-5)] * 2
    # RLOO: 1.5 - (0 + 0.5 + 0) / 3 = 4/3; 0 - (1.5 + 0.5 + 0) / 3 = -2/3; 0.5 - 1.5 / 3 = 0
    adv = ADVANTAGES["episode_rloo"](rewards, mask, 4, CFG, token_rewards=tr)
    assert per_turn(adv, tid) == [[round(4 / 3, 6)] * 2, [round(-2 / 3, 6)], [0.0, 0.0], [round(-2 / 3, 6)]]


def test_episode_grpo_equals_grpo_on_the_sequence_reward():
    rewards, mask, tr, tid = episodes([[(2, 0.5), (1, 1.0)], [(1, 0.0)], [(1, 0.2), (2, 0.5)], [(3, 0.0)]])
    cfg = replace(CFG, adv_std_scope="group")
    assert torch.allclose(ADVANTAGES["episode_grpo"](rewards, mask, 2, cfg, token_rewards=tr),
                          ADVANTAGES["grpo"](rewards, mask, 2, cfg, token_rewards=tr))


def test_turn_returns_credit_only_later_rewards_with_a_leave_one_out_baseline():
    # episode 0: rewards [0, 0, 1] (gamma 0.5 -> returns-to-go [0.25, 0.5, 1]), return 1
    # episode 1: rewards [0.5, 0] (-> [0.5, 0]), return 0.5
    # baselines: episode 0 -> mean of the others' returns = 0.5; episode 1 -> 1
    rewards, mask, tr, tid = episodes([[(1, 0.0), (2, 0.0), (1, 1.0)], [(2, 0.5), (1, 0.0)]])
    adv = ADVANTAGES["turn_returns"](rewards, mask, 2, replace(CFG, gamma=0.5), token_rewards=tr, turn_ids=tid)
    assert per_turn(adv, tid) == [[-0.25, 0.0, 0.5], [-0.5, -1.0]]
    assert (adv[tid < 0] == 0).all()
    # gamma = 1 and one turn each: RLOO
    rewards, mask, tr, tid = episodes([[(2, 1.0)], [(1, 0.0)], [(3, 0.5)]])
    adv = ADVANTAGES["turn_returns"](rewards, mask, 3, CFG, token_rewards=tr, turn_ids=tid)
    assert torch.allclose(adv, ADVANTAGES["rloo"](rewards, mask, 3, CFG))


def test_turn_returns_do_not_depend_on_how_long_the_other_episodes_ran():
    """The bias of per-turn-index baselines: there, episode 0's late turns are judged against whoever else
    reached the same turn index. Here, giving episode 1 more turns with the same return changes nothing."""
    cfg = replace(CFG, gamma=0.9)
    a = episodes([[(1, 0.0), (1, 0.0), (1, 1.0)], [(1, 0.0), (1, 0.0)], [(1, 0.0)]])
    b = episodes([[(1, 0.0), (1, 0.0), (1, 1.0)], [(1, 0.0), (1, 0.0), (1, 0.0), (1, 0.0)], [(1, 0.0)]])
    adv_a = per_turn(ADVANTAGES["turn_returns"](a[0], a[1], 3, cfg, token_rewards=a[2], turn_ids=a[3]), a[3])
    adv_b = per_turn(ADVANTAGES["turn_returns"](b[0], b[1], 3, cfg, token_rewards=b[2], turn_ids=b[3]), b[3])
    assert adv_a[0] == adv_b[0] == [0.81, 0.9, 1.0]
    # what a per-turn-index mean baseline would give episode 0's turn 2: it is the only one there -> 0
    index_mean = torch.tensor([[0.81, 0.9, 1.0]]) - torch.tensor([[0.81 / 3, 0.9 / 2, 1.0]])
    assert float(index_mean[0, 2]) == 0.0


def test_gigpo_hand_worked():
    # Two episodes of one group. States: episode 0 goes s0 -> s1 -> goal (rewards 0, 1); episode 1 bumps a
    # wall in s0 (s0 -> s0), then s0 -> s1 -> fails (rewards 0, 0, 0). gamma = 1.
    #   returns-to-go:    ep0 [1, 1]           ep1 [0, 0, 0]
    #   step groups:      s0 = {ep0 t0: 1, ep1 t0: 0, ep1 t1: 0} mean 1/3
    #                     s1 = {ep0 t1: 1, ep1 t2: 0}            mean 1/2
    #   A^S:              ep0 [2/3, 1/2]       ep1 [-1/3, -1/3, -1/2]
    #   A^E (mean only):  ep0 +1/2             ep1 -1/2
    rewards, mask, tr, tid = episodes([[(2, 0.0), (1, 1.0)], [(1, 0.0), (1, 0.0), (2, 0.0)]])
    anchors = torch.tensor([[0, 1, -1], [0, 0, 1]])
    r, valid = turn_rewards(rewards, mask, tr, tid)
    step = gigpo_step_advantages(discounted_turn_returns(r, valid, 1.0), valid, anchors, 2)
    assert torch.allclose(step, torch.tensor([[2 / 3, 0.5, 0.0], [-1 / 3, -1 / 3, -0.5]]))
    adv = ADVANTAGES["gigpo"](rewards, mask, 2, CFG, token_rewards=tr, turn_ids=tid, anchor_ids=anchors)
    assert per_turn(adv, tid) == [[round(0.5 + 2 / 3, 6), 1.0], [round(-0.5 - 1 / 3, 6), round(-0.5 - 1 / 3, 6), -1.0]]
    # weight w: A^E + w A^S
    cfg = replace(CFG)
    cfg.step_adv_weight = 0.5  # not a config field yet: read with getattr, default 1
    adv = ADVANTAGES["gigpo"](rewards, mask, 2, cfg, token_rewards=tr, turn_ids=tid, anchor_ids=anchors)
    assert per_turn(adv, tid)[0] == [round(0.5 + 1 / 3, 6), 0.75]


def test_gigpo_std_normalisation_singletons_and_groups_apart():
    # step group {1, 0} -> centred +-0.5, population std 0.5 -> +-1; a state seen once -> 0
    ret = torch.tensor([[1.0, 3.0], [0.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    valid = torch.tensor([[True, True], [True, False], [True, True], [True, True]])
    anchors = torch.tensor([[0, 1], [0, -1], [0, 2], [0, 2]])  # rows 2-3 are another group: anchor 0 apart
    step = gigpo_step_advantages(ret, valid, anchors, 2, normalize_std=True, eps=0.0)
    assert step.tolist() == [[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]


def test_turn_estimators_refuse_single_turn_batches():
    rewards, mask, tr, tid = episodes([[(2, 1.0)], [(1, 0.0)]])
    with pytest.raises(ValueError, match="turn_ids"):
        ADVANTAGES["turn_returns"](rewards, mask, 2, CFG)
    with pytest.raises(ValueError, match="anchor_ids"):
        ADVANTAGES["gigpo"](rewards, mask, 2, CFG, turn_ids=tid)
    assert ADVANTAGES["gigpo"].requires == ("turn_ids", "anchor_ids")
    assert ADVANTAGES["turn_returns"].requires == ("turn_ids",)
