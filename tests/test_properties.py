"""Properties the papers' definitions imply, checked on random data."""

import torch

from postrl.algorithms.advantages import grpo_advantages, rloo_advantages
from postrl.algorithms.aggregation import token_mean
from postrl.algorithms.kl import kl_k1, kl_k2, kl_k3


def test_grpo_advantages_have_zero_mean_per_group():
    torch.manual_seed(0)
    r = torch.rand(6 * 5)
    adv = grpo_advantages(r, group_size=5).view(6, 5)
    assert torch.allclose(adv.mean(dim=1), torch.zeros(6), atol=1e-6)
    # a group of size 1 has no relative signal: advantage 0
    assert torch.equal(grpo_advantages(torch.tensor([0.3, 0.9]), group_size=1), torch.zeros(2))


def test_rloo_baseline_excludes_the_sample_itself():
    torch.manual_seed(1)
    r = torch.rand(4 * 3, requires_grad=True)
    adv = rloo_advantages(r, 4)
    # A_i = r_i - mean_{j != i} r_j  =>  dA_i/dr_i = 1 and dA_i/dr_j = -1/(n-1) within the group, 0 outside
    jac = torch.autograd.functional.jacobian(lambda x: rloo_advantages(x, 4), r.detach())
    block = torch.full((4, 4), -1 / 3) + torch.eye(4) * (1 + 1 / 3)
    expected = torch.block_diag(block, block, block)
    assert torch.allclose(jac, expected, atol=1e-6)
    assert torch.allclose(adv.view(3, 4).sum(1), torch.zeros(3), atol=1e-6)


def test_kl_estimators_signs_and_unbiasedness_on_policy_samples():
    torch.manual_seed(2)
    p = torch.softmax(torch.randn(10), -1)  # policy
    q = torch.softmax(torch.randn(10), -1)  # reference
    exact = float((p * (p.log() - q.log())).sum())
    tokens = torch.multinomial(p, 400_000, replacement=True)
    lp, lq = p.log()[tokens], q.log()[tokens]
    k1, k2, k3 = kl_k1(lp, lq), kl_k2(lp, lq), kl_k3(lp, lq)
    assert (k2 >= 0).all() and (k3 >= 0).all()  # k1 can be negative per sample, k2/k3 cannot
    assert (k1 < 0).any()
    # k1 and k3 are unbiased for KL(p || q) on samples from p; they agree in expectation
    assert abs(float(k1.mean()) - exact) < 0.01 and abs(float(k3.mean()) - exact) < 0.01


def test_token_mean_gradient_is_independent_of_the_micro_batch_split():
    torch.manual_seed(3)
    logits = torch.randn(6, 5, requires_grad=True)
    mask = (torch.rand(6, 5) > 0.3).float()
    mask[:, 0] = 1
    weights = torch.randn(6, 5)

    def grad(splits):
        logits.grad = None
        n = float(mask.sum())
        for rows in splits:
            token_mean((logits[rows] * weights[rows]), mask[rows], num_tokens=n).backward()
        return logits.grad.clone()

    whole = grad([slice(0, 6)])
    for splits in ([slice(0, 2), slice(2, 4), slice(4, 6)], [slice(0, 1), slice(1, 6)]):
        assert torch.allclose(grad(splits), whole, atol=1e-7)
