"""PPO with a learned critic: the clipped value loss by hand, and the critic path through the trainer."""

import pytest
import torch
from conftest import read_metrics
from safetensors.torch import load_file

from postrl.algorithms.value_losses import clipped_value_loss
from postrl.trainer import train
from postrl.run.checkpoint import latest_checkpoint, load_trainer_state


def test_clipped_value_loss_by_hand():
    # token 1: v=1.0, v_old=0.5, R=0:  (1-0)^2 = 1  vs  v_clip=0.7 -> 0.49  -> 0.5 * 1 = 0.5 (unclipped wins)
    # token 2: v=0.9, v_old=0.5, R=1:  (0.9-1)^2 = 0.01  vs  v_clip=0.7 -> 0.09 -> 0.5 * 0.09 = 0.045 (clipped wins)
    v = torch.tensor([[1.0, 0.9]], requires_grad=True)
    loss, clipped = clipped_value_loss(v, torch.tensor([[0.5, 0.5]]), torch.tensor([[0.0, 1.0]]), clip=0.2)
    assert torch.allclose(loss, torch.tensor([[0.5, 0.045]]))
    assert clipped.tolist() == [[0.0, 1.0]]
    loss.sum().backward()
    # d/dv 0.5 (v - R)^2 = v - R = 1 on token 1; the clipped branch is constant in v on token 2
    assert torch.allclose(v.grad, torch.tensor([[1.0, 0.0]]))
    plain, _ = clipped_value_loss(v.detach(), torch.tensor([[0.5, 0.5]]), torch.tensor([[0.0, 1.0]]), clip=0.0)
    assert torch.allclose(plain, torch.tensor([[0.5, 0.005]]))


PPO = ("algo.advantage=gae", "algo.gamma=1.0", "algo.lam=0.95", "critic.lr=1e-3", "run.threads=1")


def test_ppo_with_critic_learns_values_and_warms_up(tiny_config):
    cfg = tiny_config(*PPO, "critic.warmup_steps=2", "train.steps=5", "rollout.n=4", "rollout.max_new_tokens=2")
    run_dir, results = train(cfg)
    rows = read_metrics(run_dir)
    assert [r["policy_frozen"] for r in rows] == [1, 1, 0, 0, 0]
    assert all(r["value_loss"] >= 0 for r in rows)
    # the zero-initialised value head starts at 0 and moves towards the returns
    assert rows[0]["values_mean"] == 0.0 and rows[-1]["values_mean"] != 0.0
    state = load_trainer_state(latest_checkpoint(run_dir / "checkpoints"))["job"]  # the RL trainer's own state
    assert "critic" in state and "critic_optimizer" in state
    # during warm-up the policy did not move
    assert results["nonfinite_steps"] == 0


def test_ppo_with_critic_resumes_exactly(tiny_config):
    straight, _ = train(tiny_config(*PPO, "train.steps=4", "rollout.n=4", "run.name=straight"))
    split, _ = train(tiny_config(*PPO, "train.steps=2", "rollout.n=4", "run.name=split"))
    train(tiny_config(*PPO, "train.steps=4", "rollout.n=4", "run.name=split"), resume=split)
    a = load_file(str(latest_checkpoint(straight / "checkpoints") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(split / "checkpoints") / "model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    ca = load_trainer_state(latest_checkpoint(straight / "checkpoints"))["job"]["critic"]
    cb = load_trainer_state(latest_checkpoint(split / "checkpoints"))["job"]["critic"]
    for k in ca:
        assert torch.allclose(ca[k], cb[k], atol=1e-6), k
    assert [r["value_loss"] for r in read_metrics(straight)] == pytest.approx(
        [r["value_loss"] for r in read_metrics(split)], abs=1e-6)


def test_ppo_with_critic_learns_the_copy_task(tiny_config):
    """Chance (~1/51) to ~0.9 with GAE advantages from a learned critic, whose values track the returns."""
    cfg = tiny_config(*PPO, "critic.lr=2e-3", "rollout.n=8", "train.prompts_per_step=16", "train.micro_batch_size=128",
                      "train.lr=2e-3", "train.steps=150", "eval.after=true", "run.seed=0")
    run_dir, results = train(cfg)
    rows = read_metrics(run_dir)
    assert sum(r["reward_mean"] for r in rows[:5]) / 5 < 0.15
    assert sum(r["reward_mean"] for r in rows[-10:]) / 10 >= 0.85
    assert results["eval_after"]["accuracy"] >= 0.9
    assert sum(r["values_mean"] for r in rows[-10:]) / 10 > 0.5  # V(s) learned the high success rate


def test_critic_value_loss_falls_on_a_fixed_batch(tiny_config):
    """The critic's regression through the trainer's own update_critic: on a fixed batch whose returns depend
    on the prompt (1 for even digits, 0 for odd), repeated updates drive the value loss far down.

    (Fresh rollouts of a frozen chance-level policy are no test of this: with ~2% successes the loss of
    any predictor stays near p(1 - p), so its trajectory is noise.)"""
    from postrl.trainer.rl import RLTrainer

    trainer = RLTrainer(tiny_config(*PPO, "critic.value_clip=0", "critic.lr=3e-3"))  # rollout batch 4 x 4 = 16
    tok = trainer.tokenizer
    prompts = [tok(f"copy {d}")["input_ids"] for d in range(8)] * 2
    ids = torch.tensor([[tok(str(d))["input_ids"][-1], tok.eos_token_id] for d in range(8)] * 2)
    mask = torch.ones_like(ids)
    target = torch.tensor([float(d % 2 == 0) for d in range(8)] * 2)[:, None].expand(-1, 2).contiguous()
    zeros = torch.zeros_like(target)
    losses = [trainer.update_critic(prompts, ids, mask, mask.float(), zeros, target, step)["value_loss"]
              for step in range(30)]
    assert losses[0] == pytest.approx(0.25, abs=0.02)  # zero-initialised head: 0.5 * mean(R^2) = 0.5 * 0.5
    assert sum(losses[-3:]) / 3 < 0.1 * losses[0], losses
