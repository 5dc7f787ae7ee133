"""`postrl train` with a multi-turn environment (env.name): episodes through the episode runner, turn-level
credit, per-episode metrics and a greedy held-out evaluation of episodes."""

from __future__ import annotations

import pytest
import torch

from postrl.config import ConfigError
from postrl.trainer.rl import RLTrainer, train
from tests.conftest import read_metrics

ENV = ("env={name: maze, size: 3, max_turns: 3}", "env.max_episode_tokens=256", "rollout.max_new_tokens=4",
       "run.threads=1", "data.eval_size=4")


@pytest.mark.parametrize("advantage", ["episode_grpo", "gigpo", "grpo"])
def test_training_on_a_multi_turn_environment(tiny_config, advantage):
    run_dir, res = train(tiny_config(*ENV, f"algo.advantage={advantage}", "train.steps=2", "eval.after=true"))
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 1 <= r["episodes/turns_mean"] <= 3 and 0 <= r["episodes/success_rate"] <= 1
        assert r["episodes/sampled_tokens_mean"] > 0 and r["episodes/env_tokens_mean"] > 0
    ev = res["eval_after"]
    assert ev["n"] == 4 and 0 <= ev["accuracy"] <= 1 and 1 <= ev["turns_mean"] <= 3


def test_episode_batch_trains_only_on_sampled_tokens(tiny_config):
    trainer = RLTrainer(tiny_config(*ENV, "algo.advantage=gigpo"))
    try:
        batch = trainer.rollout(0)
        env_tokens = (batch.attention_mask.bool() & (batch.loss_mask == 0))
        assert env_tokens.any(), "observations are in the history but not in the loss"
        assert torch.equal(batch.behaviour_logprobs[env_tokens], torch.zeros(int(env_tokens.sum())))
        assert batch.turn_ids is not None and batch.anchor_ids is not None
        out = trainer.update(batch, 0)
        assert out["updates"] >= 1
    finally:
        trainer.close()


def test_turn_level_estimators_need_an_environment(tiny_config):
    with pytest.raises(ConfigError, match="algo.advantage=gigpo .* needs an environment"):
        tiny_config("algo.advantage=gigpo")
