"""Every speed-up of the rollout and update path gives the same results as the plain version.

- preallocated KV cache == transformers' DynamicCache, token for token (sampling, EOS, dropped rows);
- inverse-CDF sampling picks the token whose CDF interval holds u, and has the multinomial's distribution;
- log-probs via logsumexp == log_softmax + gather (values and gradients, 1e-5);
- length-sorted micro batches give the same accumulated gradient as the unsorted ones (1e-5).
"""

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from conftest import update_grads
from postrl.models.loading import load_model_and_tokenizer
from postrl.models.logprobs import completion_logprobs, token_logprobs
from postrl.rollout.generator import Generator, PreallocatedLayer, SamplingParams, sample_inverse_cdf, unique_rows
from postrl.trainer.rl import RLTrainer, length_sorted_order

PROMPTS = ["copy 7", "what is 12 + 30?", "a", "tell me: 9 - 4 ="]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tok, _ = load_model_and_tokenizer(str(tiny_model_dir), device="cpu")
    model.eval()
    return model, tok


def _ids(tok, texts):
    return [tok(t)["input_ids"] for t in texts]


# ----- KV cache ---------------------------------------------------------------------------------------------------


def test_preallocated_layer_matches_dynamic_layer_through_updates_and_row_drops():
    torch.manual_seed(0)
    pre, dyn = PreallocatedLayer(capacity=9), DynamicLayer()
    for step, q in enumerate([5, 1, 1, 1, 1]):
        k, v = torch.randn(4 if step < 2 else 3, 2, q, 8), torch.randn(4 if step < 2 else 3, 2, q, 8)
        if step == 2:  # row 1 finished: both drop it
            keep = torch.tensor([0, 2, 3])
            pre.batch_select_indices(keep)
            dyn.batch_select_indices(keep)
        pk, pv = pre.update(k, v)
        dk, dv = dyn.update(k, v)
        assert torch.equal(pk, dk) and torch.equal(pv, dv)
        assert pre.get_seq_length() == dyn.get_seq_length()
    with pytest.raises(ValueError, match="capacity 9"):
        pre.update(torch.randn(3, 2, 1, 8), torch.randn(3, 2, 1, 8))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_preallocated_cache_generation_equals_dynamic_cache_token_for_token(tiny, temperature):
    model, tok = tiny
    prompts = _ids(tok, PROMPTS) * 3
    params = SamplingParams(max_new_tokens=20, temperature=temperature)
    # tokens of a free run as extra EOS ids, so that rows finish at different steps and are dropped from the batch
    probe = Generator(model, tok.eos_token_id, tok.pad_token_id, sampler="multinomial").generate(prompts, params,
                                                                                                  seed=3)
    eos = [tok.eos_token_id, int(probe.completion_ids[0, 4]), int(probe.completion_ids[1, 9])]
    outs = [Generator(model, eos, tok.pad_token_id, kv_cache=kv, sampler="multinomial").generate(prompts, params,
                                                                                                   seed=3)
            for kv in ("preallocated", "dynamic")]
    a, b = outs
    assert 0 < int(a.lengths.min()) < 20  # some rows really finished early
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.completion_mask, b.completion_mask)
    assert torch.allclose(a.logprobs, b.logprobs, atol=1e-6) and torch.allclose(a.entropy, b.entropy, atol=1e-5)
    assert torch.equal(a.truncated, b.truncated)


def test_unique_rows_maps_each_prompt_to_its_first_copy():
    assert unique_rows([[1, 2], [3], [1, 2], [3], [4]]) == ([0, 1, 4], [0, 1, 0, 1, 2])
    assert unique_rows([[5]]) == ([0], [0])


@pytest.mark.parametrize("kv", ["preallocated", "dynamic"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_shared_prefill_generation_equals_full_prefill(tiny, kv, temperature):
    """A group (each prompt repeated, interleaved with other prompts of other lengths) gives the same tokens,
    log-probs and entropies whether each distinct prompt is prefilled once or once per copy."""
    model, tok = tiny
    base = _ids(tok, PROMPTS)
    prompts = [p for p in base for _ in range(4)] + base  # groups of 4, then one more copy of each, unordered
    params = SamplingParams(max_new_tokens=16, temperature=temperature)
    probe = Generator(model, tok.eos_token_id, tok.pad_token_id).generate(prompts, params, seed=5)
    eos = [tok.eos_token_id, int(probe.completion_ids[0, 3]), int(probe.completion_ids[2, 7])]
    a, b = (Generator(model, eos, tok.pad_token_id, kv_cache=kv, share_prefill=share).generate(prompts, params, seed=5)
            for share in (True, False))
    assert 0 < int(a.lengths.min()) < 16  # rows finish at different steps (dropped from the decode batch)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.completion_mask, b.completion_mask)
    assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5) and torch.allclose(a.entropy, b.entropy, atol=1e-5)
    assert torch.equal(a.truncated, b.truncated)


def test_generator_rejects_unknown_cache_and_sampler(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="kv_cache='static'.*preallocated"):
        Generator(model, tok.eos_token_id, tok.pad_token_id, kv_cache="static")
    with pytest.raises(ValueError, match="sampler='gumbel'.*inverse_cdf"):
        Generator(model, tok.eos_token_id, tok.pad_token_id, sampler="gumbel")


# ----- sampling ---------------------------------------------------------------------------------------------------


def test_inverse_cdf_picks_the_interval_that_holds_u():
    # cdf = [1/8, 1/8, 5/8, 1] (exact in binary): [0, 1/8) -> 0, token 1 has no mass, [1/8, 5/8) -> 2, [5/8, 1) -> 3
    probs = torch.tensor([[0.125, 0.0, 0.5, 0.375]]).repeat(6, 1)
    u = torch.tensor([0.0, 0.0625, 0.125, 0.6, 0.625, 0.999])
    assert sample_inverse_cdf(probs, u).tolist() == [0, 0, 2, 2, 3, 3]
    # unnormalised weights are scaled by their total, as torch.multinomial does: [2, 0, 6] / 8
    assert sample_inverse_cdf(torch.tensor([[2.0, 0.0, 6.0]] * 2), torch.tensor([0.2, 0.25])).tolist() == [0, 2]


def test_inverse_cdf_has_the_multinomial_distribution():
    probs = torch.tensor([0.05, 0.0, 0.5, 0.15, 0.3])
    g = torch.Generator().manual_seed(0)
    n = 40_000
    draws = sample_inverse_cdf(probs.expand(n, -1), torch.rand(n, generator=g))
    freq = torch.bincount(draws, minlength=5).float() / n
    assert freq[1] == 0
    assert torch.allclose(freq, probs, atol=0.01)  # 4 sigma of a binomial at p=0.5 is ~0.01


def test_inverse_cdf_generation_is_seeded_and_logprobs_match_training_forward(tiny):
    model, tok = tiny
    gen = Generator(model, tok.eos_token_id, tok.pad_token_id)  # defaults: preallocated cache, inverse CDF
    prompts = _ids(tok, PROMPTS) * 2
    params = SamplingParams(max_new_tokens=10, temperature=0.7)
    a, b = gen.generate(prompts, params, seed=9), gen.generate(prompts, params, seed=9)
    assert torch.equal(a.completion_ids, b.completion_ids)
    with torch.no_grad():
        lp, _ = completion_logprobs(model, prompts, a.completion_ids, a.completion_mask, tok.pad_token_id, 0.7)
    assert torch.allclose(lp, a.logprobs, atol=1e-5)


# ----- log-probs --------------------------------------------------------------------------------------------------


def test_token_logprobs_equal_log_softmax_gather_values_and_gradients():
    torch.manual_seed(0)
    logits = (3 * torch.randn(3, 7, 50)).requires_grad_(True)
    ids = torch.randint(0, 50, (3, 7))
    weights = torch.randn(3, 7)
    fast = token_logprobs(logits, ids)
    (g_fast,) = torch.autograd.grad((fast * weights).sum(), logits)
    ref = torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), logits)
    assert torch.allclose(fast, ref, atol=1e-5) and torch.allclose(g_fast, g_ref, atol=1e-5)


def test_token_logprobs_gradient_is_onehot_minus_softmax_in_float64():
    # d/dz_j log softmax(z)_t = [j == t] - softmax(z)_j, checked numerically (gradcheck) and by hand on 3 words
    logits = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 5, 2], [1, 1, 4]])
    assert torch.autograd.gradcheck(lambda z: token_logprobs(z, ids), (logits,))
    z = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(token_logprobs(z, torch.tensor([2])).sum(), z)
    e = torch.exp(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    assert torch.allclose(g[0], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64) - e / e.sum())


def test_completion_logprobs_same_with_and_without_entropy_path(tiny):
    model, tok = tiny
    prompts = _ids(tok, PROMPTS)
    out = Generator(model, tok.eos_token_id, tok.pad_token_id).generate(prompts, SamplingParams(8, 1.0), seed=1)
    with torch.no_grad():
        fast, none = completion_logprobs(model, prompts, out.completion_ids, out.completion_mask, tok.pad_token_id)
        full, ent = completion_logprobs(model, prompts, out.completion_ids, out.completion_mask, tok.pad_token_id,
                                        with_entropy=True)
    assert none is None and ent is not None
    assert torch.allclose(fast, full, atol=1e-5)


# ----- update: length-sorted micro batches ------------------------------------------------------------------------


def test_length_sorted_order_is_stable_ascending():
    assert length_sorted_order(torch.tensor([5, 2, 5, 1, 2])).tolist() == [3, 1, 4, 0, 2]
    with pytest.raises(ValueError, match="1-D tensor"):
        length_sorted_order(torch.zeros(2, 2))


def test_length_sorted_micro_batches_give_the_same_gradient(tiny_config):
    cfg = tiny_config("rollout.max_new_tokens=8", "train.micro_batch_size=2", "rollout.temperature=1.5")
    trainer = RLTrainer(cfg)
    trainer.skip_zero_advantage = False
    batch = trainer.rollout(0)
    lengths = batch.lengths
    assert len(set(lengths.tolist())) > 1  # varied lengths, so sorting really reorders the micro batches
    assert not torch.equal(length_sorted_order(lengths), torch.arange(len(lengths)))
    batch.rewards = torch.tensor([float(i % 3) for i in range(len(batch))], dtype=torch.float64)  # non-zero advantages
    sorted_grads = update_grads(trainer, batch, sort_micro_batches=True)
    plain_grads = update_grads(trainer, batch, sort_micro_batches=False)
    assert sorted_grads and len(sorted_grads) == len(plain_grads)
    scale = max(float(g.abs().max()) for g in plain_grads)
    assert scale > 0
    for a, b in zip(sorted_grads, plain_grads):
        assert torch.allclose(a, b, atol=1e-5 * scale, rtol=1e-5)
    trainer.close()


def test_fused_adamw_takes_the_same_steps_as_the_per_tensor_loop():
    """build_optimizer picks torch's fused AdamW kernel on CPU; ten steps with weight decay and a schedule give
    the same weights as the per-tensor loop (foreach=False) to float rounding."""
    from types import SimpleNamespace

    from postrl.run.optim import adamw_implementation, build_optimizer

    torch.manual_seed(0)
    shapes = [(64, 48), (48,), (7, 3, 5)]
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(10)]
    train = SimpleNamespace(lr=1e-2, adam_betas=[0.9, 0.95], weight_decay=0.1, lr_schedule="cosine", warmup_steps=2)

    def run(fast: bool) -> list[torch.Tensor]:
        params = [torch.nn.Parameter(t.clone()) for t in start]
        if fast:
            assert adamw_implementation(params) == {"fused": True}
            opt, sched = build_optimizer(params, train, total_steps=10)
            assert opt.defaults["fused"] is True
        else:
            opt = torch.optim.AdamW(params, lr=train.lr, betas=tuple(train.adam_betas),
                                    weight_decay=train.weight_decay, foreach=False)
            from postrl.run.optim import lr_lambda
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("cosine", 2, 10))
        for g in grads:
            for p, gi in zip(params, g):
                p.grad = gi.clone()
            opt.step()
            sched.step()
        return [p.detach() for p in params]

    fast, loop = run(True), run(False)
    for a, b in zip(fast, loop):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-6)
    assert max(float((a - s).abs().max()) for a, s in zip(fast, start)) > 1e-2  # the weights moved
    assert adamw_implementation([torch.nn.Parameter(torch.zeros(2, dtype=torch.long), requires_grad=False)]) == {}
