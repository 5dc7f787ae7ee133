"""PPO with a value head on the policy's own backbone (critic.shared_backbone; issue 17).

The head and the log-probs come from one forward pass; the joint loss is PPO's eq. 9 (Schulman et al. 2017,
arXiv:1707.06347): policy loss + c1 * value loss, one backward through the shared backbone.
"""

from __future__ import annotations

import pytest
import torch

from conftest import read_metrics
from postrl.algorithms.value_losses import clipped_value_loss
from postrl.models.logprobs import completion_logprobs, completion_logprobs_and_values
from postrl.models.value import ValueHead, ValueModel
from postrl.trainer import train

PPO_SHARED = ["algo.advantage=gae", "algo.gamma=1.0", "algo.lam=1.0", "critic.shared_backbone=true",
              "critic.value_coef=0.5"]


@pytest.fixture
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def _batch():
    prompts = [[5, 6, 7], [8, 9]]
    ids = torch.tensor([[10, 11, 12], [13, 14, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return prompts, ids, mask


def test_one_forward_gives_the_policy_log_probs_and_the_separate_critics_values(model):
    model.eval()
    head = ValueHead(model)
    torch.nn.init.normal_(head.head.weight, std=0.1)
    torch.nn.init.constant_(head.head.bias, 0.25)
    prompts, ids, mask = _batch()
    lp, ent, values = completion_logprobs_and_values(model, head, prompts, ids, mask, 0, temperature=0.7,
                                                     with_entropy=True)
    lp_ref, ent_ref = completion_logprobs(model, prompts, ids, mask, 0, temperature=0.7, with_entropy=True)
    assert torch.allclose(lp, lp_ref, atol=1e-5) and torch.allclose(ent, ent_ref, atol=1e-5)
    # the same numbers as a separate ValueModel holding the same backbone and head weights
    critic = ValueModel(model)
    critic.head.load_state_dict(head.head.state_dict())
    assert torch.allclose(values, critic(prompts, ids, mask, 0), atol=1e-6)
    assert values[1, 2] == 0 and values[0, 0] != 0  # 0 at padding


def test_a_zero_initialised_head_starts_every_value_at_zero(model):
    prompts, ids, mask = _batch()
    values = completion_logprobs_and_values(model, ValueHead(model), prompts, ids, mask, 0)[2]
    assert torch.equal(values, torch.zeros_like(values))


def test_the_joint_gradient_is_the_policy_gradient_plus_c1_times_the_value_gradient(model):
    """d(L_pi + c1 L_V)/d theta for a backbone weight, against the two gradients taken apart."""
    head = ValueHead(model)
    torch.nn.init.normal_(head.head.weight, std=0.1)
    prompts, ids, mask = _batch()
    m = mask.float()
    returns, old_v = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]), torch.zeros(2, 3)
    w = model.get_decoder().layers[0].mlp.down_proj.weight

    def grads(c_pi: float, c_v: float) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        lp, _, v = completion_logprobs_and_values(model, head, prompts, ids, mask, 0)
        policy = -(lp * m).sum() / m.sum()
        value = (clipped_value_loss(v, old_v, returns, 0.2)[0] * m).sum() / m.sum()
        (c_pi * policy + c_v * value).backward()
        return w.grad.clone()

    joint, g_pi, g_v = grads(1.0, 0.5), grads(1.0, 0.0), grads(0.0, 1.0)
    assert g_v.abs().max() > 1e-6 and g_pi.abs().max() > 1e-6
    assert torch.allclose(joint, g_pi + 0.5 * g_v, atol=1e-6)


def test_ppo_with_a_shared_backbone_trains_one_model_and_logs_the_value_fit(tiny_config):
    run_dir, res = train(tiny_config(*PPO_SHARED, "train.steps=3", "critic.warmup_steps=1"))
    rows = read_metrics(run_dir)
    assert [r["policy_frozen"] for r in rows] == [1, 0, 0]  # warm-up: the value loss alone
    for r in rows:
        assert r["value_loss"] >= 0 and 0 <= r["value_clip_frac"] <= 1
    assert rows[0]["values_mean"] == 0.0  # the zero-initialised head
    assert rows[-1]["values_mean"] != 0.0  # ... has moved
    assert res["steps"] == 3


def test_a_shared_backbone_run_resumes_exactly(tiny_config):
    opts = (*PPO_SHARED, "train.lr=1e-3")
    straight, _ = train(tiny_config(*opts, "train.steps=4", "train.save_every=0", "run.name=straight"))
    split, _ = train(tiny_config(*opts, "train.steps=2", "run.name=split"))
    train(tiny_config(*opts, "train.steps=4", "run.name=split"), resume=split)
    a, b = read_metrics(straight), read_metrics(split)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for key in ("reward_mean", "loss", "value_loss", "values_mean", "returns_mean", "grad_norm"):
            assert x[key] == pytest.approx(y[key], abs=1e-6), (x["step"], key)
    assert len({r["values_mean"] for r in a}) > 1


def test_recomputed_old_logprobs_and_values_come_from_one_pass(tiny_config, monkeypatch):
    """With truncated importance sampling the trainer recomputes the old log-probs; with a shared value head the
    rollout-time values come from that same no-grad pass (one decoder pass per micro batch, not two)."""
    import postrl.trainer.rl as rl

    calls = []
    real = rl.completion_logprobs_and_values

    def spy(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(rl, "completion_logprobs_and_values", spy)
    forwards = []
    real_plain = rl.completion_logprobs
    monkeypatch.setattr(rl, "completion_logprobs", lambda *a, **k: forwards.append(1) or real_plain(*a, **k))
    run_dir, _ = train(tiny_config(*PPO_SHARED, "train.steps=2", "algo.tis_mode=clamp", "algo.tis_cap=2.0",
                                   "train.micro_batch_size=8"))
    no_grad = [c for c in calls if not c]
    assert len(no_grad) == 2 * 2 and not forwards  # 2 micro batches of 8 rows x 2 steps; no separate log-prob pass
    for r in read_metrics(run_dir):  # the recomputed log-probs are the sampler's: ratio 1
        assert r["tis/ratio_mean"] == pytest.approx(1.0, abs=1e-4) and r["values_mean"] == r["values_mean"]
