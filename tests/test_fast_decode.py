"""postrl's own decode forward (postrl/models/fast_llama.py) and continuous batching give the same results as
the transformers forward and the plain chunked decode.

- fused logits == transformers logits (1e-5, fp32) on tiny Llama, Qwen2 (q/k/v bias) and Qwen3 (q/k norm) models,
  prefill of left-padded prompts of different lengths + several decode steps;
- Generator(decode="fused") == Generator(decode="transformers"): greedy and seeded sampled tokens identical,
  log-probs and entropies to 1e-5, rows finishing early;
- continuous batching (finished rows refilled with waiting prompts) == the whole batch at once == chunks;
- weights changed in place after a generate are used by the next generate;
- oneDNN's prepacked linear layers (CPU, fp32) == F.linear, repacked after the weights change, freed after a
  generate;
- unsupported models (PEFT / LoRA layers, other architectures, sliding windows) fall back to transformers.
"""

import pytest
import torch
from torch import nn
from transformers import (DynamicCache, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from postrl.models import fast_llama
from postrl.models.fast_llama import FusedLlama, prepack_available, supports, unsupported_reason
from postrl.rollout.generator import Generator, SamplingParams

VOCAB, PAD, EOS = 40, 0, 1


def _tiny(family: str, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD,
                  eos_token_id=EOS, bos_token_id=None)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **common))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=False, **common))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=16, tie_word_embeddings=False, **common))
    with torch.no_grad():  # random (not default-initialised) biases and norm weights, so that they are checked
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name else 0.0))
    return model.eval()


@pytest.fixture(scope="module")
def llama():
    return _tiny("llama")


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [5, 6, 7, 8, 9, 10, 11], [20], [21, 22, 23]]


def _left_pad(prompts):
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    attn = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], attn[i, width - len(p):] = torch.tensor(p), 1
    return ids, attn


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_fused_logits_equal_transformers_through_prefill_and_decode(family):
    model = _tiny(family)
    assert supports(model) == family
    fused = FusedLlama(model)
    ids, attn = _left_pad(PROMPTS)
    B = len(PROMPTS)
    with torch.inference_mode():
        cache = fused.new_cache(B, ids.shape[1] + 8)
        mine = fused.prefill(cache, torch.arange(B), ids, attn)
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        hf_cache = {Generator(model, EOS, PAD)._cache_kw: DynamicCache()}  # `cache` or `past_key_values`
        ref = model(input_ids=ids, attention_mask=attn, position_ids=positions, use_cache=True,
                    **hf_cache).logits[:, -1]
        assert ref.abs().max() > 0.1  # not a degenerate model
        assert torch.allclose(mine, ref, atol=1e-5, rtol=0)
        pos = positions[:, -1:]
        gen = torch.Generator().manual_seed(0)
        for _ in range(6):
            tok = torch.randint(2, VOCAB, (B,), generator=gen)  # not argmax: every row takes other paths
            attn, pos = torch.cat([attn, attn.new_ones(B, 1)], -1), pos + 1
            ref = model(input_ids=tok[:, None], attention_mask=attn, position_ids=pos, use_cache=True,
                        **hf_cache).logits[:, -1]
            mine = fused.decode(cache, tok)
            assert torch.allclose(mine, ref, atol=1e-5, rtol=0)


def test_decode_writes_a_common_column_without_an_indexed_write(llama):
    """Rows that all write the same cache column (left-padded prompts, no refills) take the strided copy; a cache
    whose rows end at different columns (a refilled row) takes the indexed write. Both are checked for values
    against transformers by the tests above and the continuous-batching tests; this checks which one runs."""
    from torch.profiler import ProfilerActivity, profile

    fused = FusedLlama(llama)
    ids, attn = _left_pad(PROMPTS)
    B = len(PROMPTS)

    def index_writes(cache) -> int:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fused.decode(cache, torch.full((B,), 5))
        return sum(e.count for e in prof.key_averages() if e.key == "aten::index_put_")

    with torch.inference_mode():
        cache = fused.new_cache(B, ids.shape[1] + 8)
        fused.prefill(cache, torch.arange(B), ids, attn)
        assert index_writes(cache) == 0
        cache.put(0, cache.k[:, 1, :, :3].clone(), cache.v[:, 1, :, :3].clone())  # row 0 now ends at column 3
        assert index_writes(cache) >= 2 * len(fused.layers)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_shared_prompt_attention_equals_per_row_caches(family):
    """Cascade attention (each distinct prompt's keys / values once, FusedLlama.prefill(shared=True)) gives
    the logits of the per-row cache through prefill, decode steps and rows leaving the batch (compact)."""
    model = _tiny(family)
    fused = FusedLlama(model)
    distinct = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    expand = torch.tensor([0, 1, 2, 0, 0, 1, 2, 2, 0])  # uneven groups, interleaved rows
    ids, attn = _left_pad(distinct)
    B = len(expand)
    with torch.inference_mode():
        plain = fused.new_cache(B, ids.shape[1] + 8)
        shared = fused.new_cache(B, 9, positions=ids.shape[1] + 8)
        a = fused.prefill(plain, torch.arange(B), ids, attn, expand)
        b = fused.prefill(shared, torch.arange(B), ids, attn, expand, shared=True)
        assert shared.pk.shape[1] == 3 and shared.span == 0  # the prompts once; the rows hold no prompt column
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
        gen = torch.Generator().manual_seed(0)
        for step in range(7):
            tok = torch.randint(2, VOCAB, (plain.batch,), generator=gen)
            a, b = fused.decode(plain, tok), fused.decode(shared, tok)
            assert a.abs().max() > 0.1 and torch.allclose(a, b, atol=1e-5, rtol=0), step
            if step in (2, 4):  # rows leave: the last rows move into their places, in both caches alike
                keep = torch.ones(plain.batch, dtype=torch.bool)
                keep[[0, 3] if step == 2 else [1]] = False
                assert torch.equal(plain.compact(keep), shared.compact(keep))
        with pytest.raises(ValueError, match="shared"):
            shared.put(0, plain.k[:, 0, :, :2], plain.v[:, 0, :, :2])
        with pytest.raises(ValueError, match="every row"):
            fused.prefill(fused.new_cache(B, 4), torch.arange(2), ids[:2], attn[:2], shared=True)


def _prefilled(fused, ids, attn, B):
    cache = fused.new_cache(B, ids.shape[1] + 2)
    fused.prefill(cache, torch.arange(B), ids, attn)
    return cache


@pytest.mark.skipif(not prepack_available(), reason="this torch build has no oneDNN prepacked linear")
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_prepacked_linear_layers_equal_f_linear_and_follow_weight_updates(family, monkeypatch):
    """The oneDNN path (weights reordered once per generate; by default for float32 CPU models from
    PREPACK_MIN_HIDDEN up) gives F.linear's logits; after an in-place weight update, refresh() packs the new
    weights (a stale packed copy would keep the old logits); release() frees the copies."""
    model = _tiny(family)
    assert not FusedLlama(model).prepack  # hidden size 64: F.linear is faster there
    packed, plain = FusedLlama(model, prepack=True), FusedLlama(model, prepack=False)
    assert packed.prepack and not plain.prepack
    assert packed._head_packed is not None and "qkv_p" in packed._fused[0] and "qkv_p" not in plain._fused[0]
    ids, attn = _left_pad(PROMPTS)
    B = len(PROMPTS)
    packed_products = []
    real_linear = fast_llama._linear

    def spy(x, w, b, packed_w):
        packed_products.append(packed_w is not None)
        return real_linear(x, w, b, packed_w)

    monkeypatch.setattr(fast_llama, "_linear", spy)

    def run(fused):
        packed_products.clear()
        cache = fused.new_cache(B, ids.shape[1] + 4)
        out = [fused.prefill(cache, torch.arange(B), ids, attn)]
        for t in range(3):
            out.append(fused.decode(cache, torch.full((B,), 5 + t)))
        return torch.stack(out)

    with torch.inference_mode():
        before = run(packed)
        assert packed_products and all(packed_products)  # every product of the packed decoder used its copy
        assert before.abs().max() > 0.1 and torch.allclose(before, run(plain), atol=1e-5, rtol=0)
        assert not any(packed_products)  # ... and none of the plain one's
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        packed.refresh(), plain.refresh()
        after = run(packed)
        assert (after - before).abs().max() > 1e-2  # the update changes the logits ...
        assert torch.allclose(after, run(plain), atol=1e-5, rtol=0)  # ... and the packed path sees it
    # the packed decoder keeps no concatenated q|k|v / gate|up copy beside its packed ones
    assert "qkv_w" not in packed._fused[0] and "gu_w" not in packed._fused[0] and "qkv_w" in plain._fused[0]
    for fused in (packed, plain):  # release() frees every copy; the next prefill (or decode) copies again
        fused.release()
        assert fused._head_packed is None and not {"qkv_w", "gu_w", "qkv_p", "gu_p", "o_p", "down_p"} & set(
            fused._fused[0])
    with torch.inference_mode():
        assert torch.allclose(run(packed), after, atol=1e-5, rtol=0)
        assert torch.allclose(run(plain), after, atol=1e-5, rtol=0)
        assert packed_products and not any(packed_products)  # the plain one refreshed without packing
        cache = _prefilled(packed, ids, attn, B)
        packed.release()  # between the prefill and a decode step
        assert torch.allclose(packed.decode(cache, torch.full((B,), 5)), plain.decode(
            _prefilled(plain, ids, attn, B), torch.full((B,), 5)), atol=1e-5, rtol=0)
    monkeypatch.setattr(fast_llama, "PREPACK_MIN_HIDDEN", 64)  # the default for this model's size
    gen = Generator(model, [EOS], PAD, decode="fused")
    gen.generate([[5, 6, 7]], SamplingParams(max_new_tokens=3), seed=0)
    assert gen._fused.prepack and gen._fused._head_packed is None  # freed after the generate


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generation_with_and_without_shared_prompt_attention(llama, temperature, monkeypatch):
    params = SamplingParams(max_new_tokens=14, temperature=temperature)
    prompts = [p for p in PROMPTS[:3] for _ in range(4)]  # GRPO's layout: each prompt n times in a row
    used = []
    real = FusedLlama.prefill

    def spy(self, *args, shared=False, **kw):
        used.append(shared)
        return real(self, *args, shared=shared, **kw)

    monkeypatch.setattr(FusedLlama, "prefill", spy)
    a, b = (Generator(llama, [EOS, 3, 4], PAD, decode="fused", shared_prompt_attention=on).generate(
        prompts, params, seed=5) for on in (True, False))
    assert used == [True, False]  # one prefill per generate: the shared cache with the option, per-row without
    assert 0 < int(a.lengths.min()) < 14 or temperature == 0
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.completion_mask, b.completion_mask)
    assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5) and torch.allclose(a.entropy, b.entropy, atol=1e-5)


def _pair(model, **kw):
    return [Generator(model, [EOS, 3, 4], PAD, decode=d, **kw) for d in ("fused", "transformers")]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (1.0, 1.0), (0.8, 0.9)])
def test_fused_generation_equals_transformers(family, temperature, top_p, llama):
    model = llama if family == "llama" else _tiny("qwen2")
    params = SamplingParams(max_new_tokens=14, temperature=temperature, top_p=top_p)
    a, b = (g.generate(PROMPTS * 2, params, seed=7) for g in _pair(model))
    assert 0 < int(a.lengths.min()) < 14 or temperature == 0  # EOS ids 3 and 4: rows finish at different steps
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.completion_mask, b.completion_mask)
    assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5) and torch.allclose(a.entropy, b.entropy, atol=1e-5)
    assert torch.equal(a.truncated, b.truncated) and a.decode_steps == b.decode_steps


def test_fused_generation_with_the_multinomial_sampler_draws_in_prompt_order(llama):
    """Finished rows leave the fused batch by moving the last rows into their places; the shared random
    stream is still drawn in prompt order, as the transformers path draws it."""
    params = SamplingParams(max_new_tokens=14, temperature=1.0)
    a, b = (g.generate(PROMPTS * 3, params, seed=2) for g in _pair(llama, sampler="multinomial"))
    assert 0 < int(a.lengths.min()) < 14
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_fused_generation_without_shared_prefill_and_in_chunks(llama):
    params = SamplingParams(max_new_tokens=10, temperature=1.0)
    a, b = (g.generate(PROMPTS * 2, params, seed=3, batch_size=5) for g in _pair(llama, share_prefill=False))
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_continuous_batching_equals_whole_batch_and_chunks(llama, temperature):
    """Refilling finished rows with waiting prompts gives every prompt the tokens it gets in one big batch
    (fused) and in chunks (transformers forward, same per-row random streams)."""
    prompts = [p for p in PROMPTS for _ in range(3)]  # groups of 3 (shared prefill of refilled rows too)
    params = SamplingParams(max_new_tokens=12, temperature=temperature)
    probe = Generator(llama, EOS, PAD, continuous_batching=True).generate(prompts, params, seed=5)
    # tokens of a free run as extra EOS ids: rows finish at different steps and their places are refilled
    eos = [EOS, int(probe.completion_ids[0, 2]), int(probe.completion_ids[9, 6])]
    cont = Generator(llama, eos, PAD, continuous_batching=True)
    fused = cont.fused_decoder()
    prefilled = []
    prefill = fused.prefill
    fused.prefill = lambda cache, rows, ids, attn, expand=None, shared=False: (
        prefilled.append(ids.shape[0]), prefill(cache, rows, ids, attn, expand, shared))[1]
    a = cont.generate(prompts, params, seed=5, batch_size=4)
    del fused.prefill
    assert sum(prefilled) == len(PROMPTS) - 1  # each distinct prompt once (the first and fourth are the same)
    whole = cont.generate(prompts, params, seed=5)
    chunks = Generator(llama, eos, PAD, decode="transformers", continuous_batching=True).generate(
        prompts, params, seed=5, batch_size=4)
    assert int(a.lengths.min()) < 12 and int(a.lengths.max()) == 12  # rows finish early and are refilled
    chunk_steps = chunks.decode_steps
    for other in (whole, chunks):
        assert torch.equal(a.completion_ids, other.completion_ids)
        assert torch.equal(a.completion_mask, other.completion_mask)
        assert torch.allclose(a.logprobs, other.logprobs, atol=1e-5)
        assert torch.allclose(a.entropy, other.entropy, atol=1e-5)
        assert torch.equal(a.truncated, other.truncated)
    assert a.decode_steps < chunk_steps  # the refilled batch needs fewer decode steps than 5 chunks


def test_fused_decode_uses_weights_changed_in_place(llama):
    model = _tiny("llama", seed=1)
    fused_gen, ref_gen = _pair(model)
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    before = fused_gen.generate(PROMPTS, params)
    # fused AdamW updates the weights in place without bumping their version counters
    opt = torch.optim.AdamW(model.parameters(), lr=0.3, fused=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    after, ref = fused_gen.generate(PROMPTS, params), ref_gen.generate(PROMPTS, params)
    assert not torch.equal(before.completion_ids, after.completion_ids)
    assert torch.equal(after.completion_ids, ref.completion_ids)
    assert torch.allclose(after.logprobs, ref.logprobs, atol=1e-5)
    with torch.no_grad():  # and writes through .data, which no counter sees either
        for p in model.parameters():
            p.data.mul_(-1.0)
    again, ref = fused_gen.generate(PROMPTS, params), ref_gen.generate(PROMPTS, params)
    assert torch.equal(again.completion_ids, ref.completion_ids)
    assert torch.allclose(again.logprobs, ref.logprobs, atol=1e-5)


def test_unsupported_models_fall_back_to_transformers(llama):
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
    assert supports(gpt2) is None and "GPT2LMHeadModel" in unsupported_reason(gpt2)
    mistral = MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                               sliding_window=16)).eval()
    assert supports(mistral) is None and "sliding" in unsupported_reason(mistral)
    mistral.config.sliding_window = None
    assert supports(mistral) == "mistral"

    class LoraLinear(nn.Linear):  # what PEFT does: a projection that is more than its weight
        pass

    model = _tiny("llama", seed=2)
    proj = model.model.layers[0].self_attn.q_proj
    lora = LoraLinear(proj.in_features, proj.out_features, bias=False)
    lora.weight = proj.weight
    model.model.layers[0].self_attn.q_proj = lora
    assert supports(model) is None
    auto = Generator(model, EOS, PAD)
    assert auto.fused_decoder() is None
    out = auto.generate(PROMPTS, SamplingParams(max_new_tokens=4, temperature=0.0))  # the transformers forward
    assert out.completion_ids.shape[0] == len(PROMPTS)
    with pytest.raises(ValueError, match="decode='fused' cannot run this model"):
        Generator(model, EOS, PAD, decode="fused").generate(PROMPTS, SamplingParams(max_new_tokens=2))


def _lora(seed: int, **kw):
    """A tiny llama with rank-2 LoRA adapters on every projection, B randomised (PEFT starts it at 0)."""
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(_tiny("llama", seed=seed), peft.LoraConfig(
        r=2, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"], **kw))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    return wrapped.eval()


@pytest.mark.parametrize("prepack", [False, True])
def test_lora_model_decodes_fused_with_its_adapters_merged(prepack):
    """A PEFT LoRA policy runs the fused path: refresh() merges W + (alpha / r) B A into its copies, so the
    logits equal the PEFT forward's (which computes W x + (alpha / r) B A x) to 1e-5 through prefill and decode;
    with the adapters disabled they are the base model's; an in-place adapter update is followed."""
    if prepack and not prepack_available():
        pytest.skip("this torch build has no oneDNN prepacked linear")
    wrapped = _lora(3)
    assert supports(wrapped) == "llama" and unsupported_reason(wrapped) is None
    fused = FusedLlama(wrapped, prepack=prepack)
    ids, attn = _left_pad(PROMPTS)
    B = len(PROMPTS)
    positions = (attn.cumsum(-1) - 1).clamp(min=0)

    def both(model_fn):
        with torch.inference_mode():
            fused.refresh()
            cache = fused.new_cache(B, ids.shape[1] + 4)
            hf_cache = {Generator(wrapped, EOS, PAD)._cache_kw: DynamicCache()}
            ref = [model_fn(input_ids=ids, attention_mask=attn, position_ids=positions, use_cache=True,
                            **hf_cache).logits[:, -1]]
            mine = [fused.prefill(cache, torch.arange(B), ids, attn)]
            a, pos = attn, positions[:, -1:]
            for t in range(3):
                tok = torch.full((B,), 5 + t)
                a, pos = torch.cat([a, a.new_ones(B, 1)], -1), pos + 1
                ref.append(model_fn(input_ids=tok[:, None], attention_mask=a, position_ids=pos, use_cache=True,
                                    **hf_cache).logits[:, -1])
                mine.append(fused.decode(cache, tok))
        return torch.stack(mine), torch.stack(ref)

    mine, ref = both(wrapped)
    assert torch.allclose(mine, ref, atol=1e-5, rtol=0)
    with wrapped.disable_adapter():
        base_mine, base_ref = both(wrapped)
    assert torch.allclose(base_mine, base_ref, atol=1e-5, rtol=0)
    assert (base_mine - mine).abs().max() > 1e-2  # the adapters change the logits, and the fused path sees it
    with torch.no_grad():  # an optimizer step on the adapters, in place
        for name, p in wrapped.named_parameters():
            if "lora_A" in name:
                p.add_(torch.randn_like(p) * 0.3)
    moved, ref = both(wrapped)
    assert (moved - mine).abs().max() > 1e-2 and torch.allclose(moved, ref, atol=1e-5, rtol=0)


def test_lora_generation_fused_equals_transformers():
    wrapped = _lora(4)
    assert Generator(wrapped, EOS, PAD).fused_decoder() is not None  # decode='auto' picks the fused path
    params = SamplingParams(max_new_tokens=10, temperature=1.0)
    a, b = (g.generate(PROMPTS * 2, params, seed=3) for g in _pair(wrapped))
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.completion_mask, b.completion_mask)
    assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5) and torch.allclose(a.entropy, b.entropy, atol=1e-5)


def test_dora_and_lora_on_the_lm_head_are_not_fused():
    dora = _lora(5, use_dora=True)
    assert supports(dora) is None and "DoRA" in unsupported_reason(dora)
    assert Generator(dora, EOS, PAD).fused_decoder() is None  # decode='auto': the transformers forward
    peft = pytest.importorskip("peft")
    head = peft.get_peft_model(_tiny("qwen2", seed=5), peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    assert supports(head) is None and "LM head" in unsupported_reason(head)


def test_generator_rejects_bad_decode_options(llama):
    with pytest.raises(ValueError, match="decode='fast'"):
        Generator(llama, EOS, PAD, decode="fast")
    with pytest.raises(ValueError, match="continuous_batching needs sampler='inverse_cdf'"):
        Generator(llama, EOS, PAD, sampler="multinomial", continuous_batching=True)
    with pytest.raises(ValueError, match="kv_cache='dynamic'"):
        Generator(llama, EOS, PAD, decode="fused", kv_cache="dynamic")
