"""What a reward sees inside `postrl train`: the rendered prompt *text* (and its token ids separately).

Regression: the RL trainer used to pass the prompts' token-id lists as ``RewardBatch.prompts``, so the
``reward_model`` reward's default template ``"{prompt}{completion}"`` scored strings like ``"[2, 18, ...]7"``.
"""

from __future__ import annotations

import json

from postrl.rewards.reward_model import RewardModelReward
from postrl.trainer.rl import train
from tests.test_reward_model import build_seq_cls_rm


def test_reward_model_reward_scores_prompt_text_in_training(tiny_config, copy_task, tmp_path, monkeypatch):
    rm_dir = build_seq_cls_rm(tmp_path / "rm", seed=0)
    seen: list[str] = []
    original = RewardModelReward._text

    def text(self, scorer, prompt, completion, sample):
        out = original(self, scorer, prompt, completion, sample)
        seen.append(out)
        return out

    monkeypatch.setattr(RewardModelReward, "_text", text)
    spec = json.dumps([{"name": "reward_model", "kwargs": {"path": str(rm_dir)}}])
    run_dir, res = train(tiny_config("train.steps=1", "run.threads=1", f"rewards={spec}"))
    assert seen, "the reward model scored nothing"
    prompts = {json.loads(line)["prompt"] for line in copy_task.read_text().splitlines()}
    for scored in seen:
        assert not scored.startswith("["), scored  # not a list of token ids
        # the default template: rendered prompt text (with the tokenizer's formatting) + completion text
        assert any(p in scored for p in prompts), scored
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "reward/reward_model" in rows[0]
