"""The KV-cache generator: exactness against transformers, log-probs, reproducibility."""

import pytest
import torch

from postrl.models.loading import load_model_and_tokenizer
from postrl.models.logprobs import completion_logprobs
from postrl.rollout.generator import Generator, SamplingParams, filter_logits


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tok, _ = load_model_and_tokenizer(str(tiny_model_dir), device="cpu")
    model.eval()
    return model, tok, Generator(model, tok.eos_token_id, tok.pad_token_id)


PROMPTS = ["copy 7", "what is 12 + 30?", "a", "tell me: 9 - 4 ="]


def _ids(tok, texts):
    return [tok(t)["input_ids"] for t in texts]


def test_greedy_matches_transformers_generate_with_left_padding(tiny):
    model, tok, gen = tiny
    prompts = _ids(tok, PROMPTS)
    out = gen.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0.0))
    for i, p in enumerate(prompts):
        ref = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)[0, len(p):]
        mine = out.completion_ids[i][out.completion_mask[i].bool()]
        assert mine.tolist() == ref[: len(mine)].tolist()
        assert len(mine) == len(ref) or ref[len(mine):].eq(tok.pad_token_id).all()


def test_sampler_logprobs_equal_training_forward(tiny):
    model, tok, gen = tiny
    prompts = _ids(tok, PROMPTS) * 2
    out = gen.generate(prompts, SamplingParams(max_new_tokens=10, temperature=0.7), seed=3)
    with torch.no_grad():
        lp, ent = completion_logprobs(model, prompts, out.completion_ids, out.completion_mask,
                                      tok.pad_token_id, temperature=0.7, with_entropy=True)
    assert torch.allclose(lp, out.logprobs, atol=1e-5)
    assert (ent[out.completion_mask.bool()] > 0).all()
    assert (lp[~out.completion_mask.bool()] == 0).all()


def test_seeded_sampling_is_reproducible(tiny):
    _, tok, gen = tiny
    prompts = _ids(tok, PROMPTS) * 4
    params = SamplingParams(max_new_tokens=8, temperature=1.0)
    a, b = gen.generate(prompts, params, seed=11), gen.generate(prompts, params, seed=11)
    c = gen.generate(prompts, params, seed=12)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.completion_ids, c.completion_ids)


def test_finished_sequences_stop_and_are_masked(tiny):
    model, tok, _ = tiny
    # make EOS the argmax after the first generated token of one prompt: treat that token as EOS
    base = Generator(model, tok.eos_token_id, tok.pad_token_id)
    prompts = _ids(tok, PROMPTS)
    free = base.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0.0))
    first = int(free.completion_ids[0, 0])
    gen = Generator(model, [tok.eos_token_id, first], tok.pad_token_id)
    out = gen.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0.0))
    assert out.completion_mask[0].tolist()[:2] == [1, 0]  # stopped right after its EOS token
    assert out.completion_ids[0, 1] == tok.pad_token_id and out.logprobs[0, 1] == 0
    assert not bool(out.truncated[0])
    # dropping the finished row does not change the others
    for i in range(1, len(prompts)):
        n = int(out.lengths[i])
        assert out.completion_ids[i, :n].tolist() == free.completion_ids[i, :n].tolist()


@pytest.mark.parametrize("how", [{"decode": "transformers"}, {"decode": "fused"},
                                 {"decode": "fused", "continuous_batching": True}])
def test_min_new_tokens_holds_back_eos_and_keeps_the_policys_logprobs(tiny, how):
    model, tok, _ = tiny
    prompts = _ids(tok, PROMPTS) * 3
    base = Generator(model, tok.eos_token_id, tok.pad_token_id)
    free = base.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0.0))
    # the first greedy tokens of the prompts are end-of-sequence ids: every greedy row would end at once
    eos = sorted({tok.eos_token_id} | {int(t) for t in free.completion_ids[:, 0]})
    gen = Generator(model, eos, tok.pad_token_id, **how)
    batch = 5 if how.get("continuous_batching") else 0
    greedy = gen.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0.0), batch_size=batch)
    assert (greedy.lengths == 1).all()
    held = gen.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0.0, min_new_tokens=4),
                        batch_size=batch)
    assert (held.lengths >= 4).all()
    assert not torch.isin(held.completion_ids[:, :4], torch.tensor(eos)).any()
    sampled = gen.generate(prompts, SamplingParams(max_new_tokens=6, temperature=1.3, min_new_tokens=5), seed=2,
                           batch_size=batch)
    assert (sampled.lengths >= 5).all()
    assert not torch.isin(sampled.completion_ids[:, :5], torch.tensor(eos)).any()
    # the recorded log-probs are the policy's own (EOS not removed), as the trainer's forward computes them
    with torch.no_grad():
        lp, ent = completion_logprobs(model, prompts, sampled.completion_ids, sampled.completion_mask,
                                      tok.pad_token_id, temperature=1.3, with_entropy=True)
    m = sampled.completion_mask.bool()
    assert (lp[m] - sampled.logprobs[m]).abs().max() < 1e-5
    assert (ent[m] - sampled.entropy[m]).abs().max() < 1e-4


def test_min_new_tokens_above_max_new_tokens_is_refused():
    with pytest.raises(ValueError, match="min_new_tokens=9 must be in \\[0, max_new_tokens=8\\]"):
        SamplingParams(max_new_tokens=8, min_new_tokens=9)


def test_chunked_greedy_equals_unchunked(tiny):
    _, tok, gen = tiny
    prompts = _ids(tok, PROMPTS)
    a = gen.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.0))
    b = gen.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.0), batch_size=3)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_top_k_one_is_greedy(tiny):
    _, tok, gen = tiny
    prompts = _ids(tok, PROMPTS)
    greedy = gen.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.0))
    topk1 = gen.generate(prompts, SamplingParams(max_new_tokens=8, temperature=1.0, top_k=1), seed=5)
    assert torch.equal(greedy.completion_ids, topk1.completion_ids)


def test_filter_logits_top_p_and_top_k_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    # nucleus 0.6: mass before token 2 is 0.5 < 0.6 (keep), before token 3 is 0.8 >= 0.6 (drop)
    assert torch.isinf(filter_logits(logits, top_p=0.6)).tolist() == [[False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, True]]
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True]]
    assert not torch.isinf(filter_logits(logits, top_p=1.0)).any()


def test_empty_prompt_rejected(tiny):
    _, _, gen = tiny
    with pytest.raises(ValueError, match="non-empty"):
        gen.generate([[]], SamplingParams())
