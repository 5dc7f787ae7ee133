"""The trainer side of issue 17's objectives: the entropy a loss requires, a teacher as the reference of on-policy
distillation, and ProRL reference resets (the pure parts are tested in tests/test_objectives_round_two.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from postrl.config import ConfigError
from postrl.models.tiny import build_tiny_model
from postrl.run.checkpoint import latest_checkpoint, load_trainer_state
from postrl.run.rng import seed_everything
from postrl.trainer.rl import RLTrainer, train
from tests.conftest import read_metrics

FAST = ("run.threads=1", "rollout.max_new_tokens=2")


def test_top_entropy_receives_the_training_forwards_entropy(tiny_config, monkeypatch):
    from postrl.algorithms import POLICY_LOSSES

    seen = []
    original = POLICY_LOSSES["top_entropy"]

    def spy(lp, old_lp, adv, mask, cfg, entropy=None):
        seen.append(entropy)
        return original(lp, old_lp, adv, mask, cfg, entropy=entropy)

    spy.requires = original.requires
    spy.zero_at_zero_advantage = getattr(original, "zero_at_zero_advantage", False)
    monkeypatch.setitem(POLICY_LOSSES, "top_entropy", spy)
    train(tiny_config("algo.policy_loss=top_entropy", "train.steps=1", *FAST))
    assert seen and all(e is not None and not e.requires_grad and torch.isfinite(e).all() for e in seen)
    assert any(float(e.max()) > 0 for e in seen)


def test_distillation_teacher_is_the_reference(tiny_config, tiny_model_dir, tmp_path):
    teacher = build_tiny_model(tmp_path / "teacher", seed=5)  # same character tokenizer, other weights
    seed_everything(0)
    trainer = RLTrainer(tiny_config("algo.advantage=distill", f"algo.distill_teacher={teacher}", "algo.kl_coef=1",
                                    "algo.kl_in_reward=true", "algo.kl_estimator=k1", *FAST))
    try:
        want = load_file(str(teacher / "model.safetensors"))
        got = trainer.ref_model.state_dict()
        assert all(torch.equal(got[k], v) for k, v in want.items())
        out = trainer.update(trainer.rollout(0), 0)
        assert out["updates"] >= 1 and out["kl_ref"] != 0.0  # the student is scored against the teacher
    finally:
        trainer.close()


def test_distillation_teacher_with_another_tokenizer_is_refused(tiny_config, tmp_path):
    teacher = build_tiny_model(tmp_path / "teacher", seed=1, chars="abc")  # another vocabulary
    with pytest.raises(ConfigError, match="another tokenizer"):
        train(tiny_config("algo.advantage=distill", f"algo.distill_teacher={teacher}", "algo.kl_coef=1",
                          "algo.kl_in_reward=true", "algo.kl_estimator=k1", *FAST))


def test_luffy_traces_from_a_teacher_model(tiny_config, tmp_path):
    """LUFFY with data.guidance.kwargs.teacher: the copy task has no reference field, the traces are the teacher
    model's own (greedy) completions, trained as off-policy rows."""
    from postrl.rollout.generator import SamplingParams

    teacher = build_tiny_model(tmp_path / "teacher", seed=5)  # same character tokenizer, other weights
    seed_everything(0)
    trainer = RLTrainer(tiny_config("data.guidance.name=luffy", f"data.guidance.kwargs.teacher={teacher}",
                                    "data.guidance.kwargs.teacher_temperature=0", *FAST))
    try:
        batch = trainer.rollout(0)
        off = (batch.policy_version < 0).nonzero().flatten().tolist()
        assert len(off) == 4 and off == [3, 7, 11, 15]  # one trace per group of 4, last in the group
        assert all(batch.samples[i].metadata["teacher"] for i in off)
        greedy = trainer.teacher_backend.generate([batch.prompt_ids[i] for i in off], SamplingParams(2, 0.0))
        want = [ids[m.bool()].tolist() for ids, m in zip(greedy.completion_ids, greedy.completion_mask)]
        got = [batch.completion_ids[i][batch.attention_mask[i].bool()].tolist() for i in off]
        assert got == want and batch.behaviour_logprobs[off].abs().sum() == 0
        want = load_file(str(teacher / "model.safetensors"))  # the backend samples from the teacher's weights
        got = trainer.teacher_backend.generator.model.state_dict()
        assert all(torch.equal(got[k], v) for k, v in want.items())
        assert not all(torch.equal(trainer.model.state_dict()[k], v) for k, v in want.items())
        out = trainer.update(batch, 0)
        assert out["updates"] >= 1
    finally:
        trainer.close()
    with pytest.raises(ConfigError, match="another tokenizer"):
        other = build_tiny_model(tmp_path / "other", seed=1, chars="abc")
        train(tiny_config("data.guidance.name=luffy", f"data.guidance.kwargs.teacher={other}", *FAST))


def test_prorl_reference_resets_and_resume(tiny_config):
    opts = ("algo.kl_coef=0.1", "algo.ref_reset_every=2", "train.lr=1e-3", *FAST)
    straight, _ = train(tiny_config(*opts, "train.steps=5", "run.name=straight"))
    ref = load_trainer_state(latest_checkpoint(straight / "checkpoints"))["job"]["reference"]
    # the reference is the policy as it was before step 4 (the last reset), not the starting model
    first = read_metrics(straight)
    assert all("kl_ref" in r for r in first)
    start = load_file(str(Path(tiny_config().model.name_or_path) / "model.safetensors"))
    assert any(not torch.equal(ref[k], start[k]) for k in start if k in ref)
    # resumed across a reset: the checkpointed reference makes it exact
    split, _ = train(tiny_config(*opts, "train.steps=3", "run.name=split"))
    train(tiny_config(*opts, "train.steps=5", "run.name=split"), resume=split)
    a = load_file(str(straight / "final" / "model.safetensors"))
    b = load_file(str(split / "final" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert [r["kl_ref"] for r in read_metrics(straight)] == pytest.approx([r["kl_ref"] for r in read_metrics(split)],
                                                                          abs=1e-6)
