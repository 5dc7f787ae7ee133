"""KL coefficient controllers and the KL-in-reward penalty, against numbers worked out by hand."""

import io
import math

import pytest
import torch

from postrl.algorithms import KL_ESTIMATORS
from postrl.algorithms.kl_control import (
    AdaptiveKLController,
    FixedKLController,
    build_kl_controller,
    kl_penalty_rewards,
)
from postrl.config import AlgoConfig


def test_adaptive_controller_two_steps_by_hand():
    # Ziegler et al. 2019 Sec. 2.2: e = clip(KL/target - 1, -0.2, 0.2); beta *= 1 + e * n_steps / horizon
    ctl = AdaptiveKLController(init_coef=0.1, target=1.0, horizon=100)
    # step 1: KL 1.1 -> e = 0.1; mult = 1 + 0.1 * 10 / 100 = 1.01 -> 0.101
    ctl.update(1.1, n_steps=10)
    assert ctl.value == pytest.approx(0.101, abs=1e-12)
    # step 2: KL 0.95 -> e = -0.05; mult = 1 - 0.05 * 20 / 100 = 0.99 -> 0.101 * 0.99 = 0.09999
    ctl.update(0.95, n_steps=20)
    assert ctl.value == pytest.approx(0.09999, abs=1e-12)


def test_adaptive_controller_clips_the_proportional_error_at_plus_minus_0_2():
    ctl = AdaptiveKLController(init_coef=1.0, target=2.0, horizon=10)
    ctl.update(10.0, n_steps=1)  # e = 10/2 - 1 = 4 -> clipped to 0.2; mult = 1 + 0.2/10 = 1.02
    assert ctl.value == pytest.approx(1.02, abs=1e-12)
    ctl.update(0.0, n_steps=1)  # e = -1 -> clipped to -0.2; mult = 0.98
    assert ctl.value == pytest.approx(1.02 * 0.98, abs=1e-12)
    ctl.update(float("nan"), n_steps=1)  # a broken measurement leaves the coefficient as it was
    assert ctl.value == pytest.approx(1.02 * 0.98, abs=1e-12)


def test_fixed_controller_stays_fixed():
    ctl = FixedKLController(0.05)
    for kl in (0.0, 1.0, 100.0):
        ctl.update(kl, n_steps=1000)
    assert ctl.value == 0.05


def test_state_round_trip_continues_the_coefficient():
    ctl = AdaptiveKLController(0.2, target=0.5, horizon=50)
    ctl.update(0.6, n_steps=5)  # e = 0.2 -> 0.2 * 1.02 = 0.204
    buf = io.BytesIO()
    torch.save(ctl.state_dict(), buf)  # what the trainer checkpoints
    buf.seek(0)
    resumed = AdaptiveKLController(0.2, target=0.5, horizon=50)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.value == ctl.value == pytest.approx(0.204)
    ctl.update(0.4, n_steps=5)
    resumed.update(0.4, n_steps=5)
    assert resumed.value == ctl.value

    fixed = FixedKLController(0.3)
    other = FixedKLController(0.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.3


def test_build_kl_controller_follows_the_config():
    fixed = build_kl_controller(AlgoConfig(kl_coef=0.1))
    assert isinstance(fixed, FixedKLController) and fixed.value == 0.1
    adaptive = build_kl_controller(AlgoConfig(kl_coef=0.1, kl_target=6.0, kl_horizon=1000))
    assert isinstance(adaptive, AdaptiveKLController)
    assert (adaptive.value, adaptive.target, adaptive.horizon) == (0.1, 6.0, 1000)


def test_controller_arguments_are_checked():
    with pytest.raises(ValueError, match="target KL > 0"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
    with pytest.raises(ValueError, match="horizon > 0"):
        AdaptiveKLController(0.1, target=1.0, horizon=0)
    with pytest.raises(ValueError, match=">= 0"):
        FixedKLController(-1.0)


def test_kl_penalty_rewards_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, float("nan")]])  # garbage at the padding position
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    # k1 = logp - logp_ref = [0.5, -1.0]; reward = -0.1 * k1 = [-0.05, 0.1]; padding exactly 0
    out = kl_penalty_rewards(logprobs, ref, mask, 0.1, KL_ESTIMATORS.get_fn("k1"))
    assert torch.allclose(out, torch.tensor([[-0.05, 0.1, 0.0]]), atol=1e-7)
    assert out[0, 2].item() == 0.0 and not out.requires_grad
    # k3 = exp(d) - d - 1 with d = logp_ref - logp = [-0.5, 1.0]:
    #   exp(-0.5) + 0.5 - 1 = 0.10653066;  e - 2 = 0.71828183
    out = kl_penalty_rewards(logprobs, ref, mask, 0.1, "k3")
    expected = torch.tensor([[-0.1 * (math.exp(-0.5) - 0.5), -0.1 * (math.e - 2.0), 0.0]])
    assert torch.allclose(out, expected, atol=1e-7)
    with pytest.raises(ValueError, match="same shape"):
        kl_penalty_rewards(logprobs, ref[:, :2], mask, 0.1, "k1")
