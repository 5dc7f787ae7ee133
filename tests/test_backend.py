"""Generation backends: the torch backend samples exactly what the generator samples, owns the model's
train/eval mode while generating, and the factory picks backends by name and rejects unknown ones."""

import pytest
import torch

from postrl.config import ConfigError
from postrl.models.loading import load_model_and_tokenizer
from postrl.rollout import (
    BACKENDS,
    Generation,
    GenerationBackend,
    Generator,
    SamplingParams,
    TorchBackend,
    build_backend,
    eos_token_ids,
    register_backend,
)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tok, _ = load_model_and_tokenizer(str(tiny_model_dir), device="cpu")
    return model, tok


def _prompts(tok) -> list[list[int]]:
    return [tok(t)["input_ids"] for t in ("copy 7", "what is 12 + 30?", "a", "copy 7", "9 - 4 =", "a")]


@pytest.mark.parametrize("params, seed, batch_size", [
    (SamplingParams(max_new_tokens=10, temperature=0.0), None, 0),  # greedy
    (SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9), 3, 0),
    (SamplingParams(max_new_tokens=10, temperature=1.0, top_k=5), 4, 4),  # chunked: 4 + 2 sequences
])
def test_torch_backend_equals_the_generator(tiny, params, seed, batch_size):
    model, tok = tiny
    model.eval()
    backend = build_backend("torch", model, tok)
    ref = Generator(model, eos_token_ids(model, tok), tok.pad_token_id).generate(_prompts(tok), params, seed=seed,
                                                                                 batch_size=batch_size)
    out = backend.generate(_prompts(tok), params, seed=seed, batch_size=batch_size)
    assert isinstance(out, Generation) and out.prompt_ids == ref.prompt_ids
    assert torch.equal(out.completion_ids, ref.completion_ids)  # token for token
    assert torch.equal(out.completion_mask, ref.completion_mask)
    assert torch.equal(out.logprobs, ref.logprobs)  # log-prob for log-prob
    assert torch.equal(out.entropy, ref.entropy) and torch.equal(out.truncated, ref.truncated)
    assert out.decode_steps == ref.decode_steps


def test_torch_backend_generates_in_eval_mode_and_restores_the_mode(tiny):
    model, tok = tiny
    backend = build_backend("torch", model, tok)
    modes = []
    # on the embedding: the fused decode path (postrl/models/fast_llama.py) calls it, not model.forward
    hook = model.get_input_embeddings().register_forward_pre_hook(lambda module, args: modes.append(module.training))
    try:
        for training in (True, False):
            model.train(training)
            modes.clear()
            backend.generate(_prompts(tok), SamplingParams(max_new_tokens=3), seed=0)
            assert modes and not any(modes)  # every forward pass in eval mode
            assert model.training is training and all(m.training is training for m in model.modules())
        model.train()
        with pytest.raises(ValueError, match="non-empty"):  # restored also when generate fails
            backend.generate([[]], SamplingParams(max_new_tokens=3))
        assert model.training
    finally:
        hook.remove()
        model.eval()


def test_torch_backend_interface(tiny):
    model, tok = tiny
    backend = build_backend("torch", model, tok, kv_cache="dynamic", sampler="multinomial")
    assert isinstance(backend, TorchBackend) and isinstance(backend, GenerationBackend)
    assert backend.name == "torch" and backend.reports_entropy
    assert (backend.generator.kv_cache, backend.generator.sampler) == ("dynamic", "multinomial")
    assert backend.generator.pad_id == tok.pad_token_id
    assert backend.generator.eos.tolist() == eos_token_ids(model, tok)
    backend.sync_weights(model)  # the same object: nothing to copy
    with pytest.raises(ValueError, match="model object it was built with"):
        backend.sync_weights(torch.nn.Linear(1, 1))
    backend.close()


def test_unknown_backend_or_option_is_a_config_error(tiny):
    model, tok = tiny
    with pytest.raises(ConfigError, match=r"Unknown generation backend 'vllm' for rollout\.backend\. Valid: .*torch"):
        build_backend("vllm", model, tok)
    with pytest.raises(ConfigError, match="Did you mean 'torch'"):
        build_backend("torhc", model, tok)
    with pytest.raises(ConfigError, match=r"unknown options 'temperature'; valid: kv_cache, sampler, share_prefill"):
        build_backend("torch", model, tok, temperature=0.5)
    with pytest.raises(ConfigError, match="unknown options 'pad_token_id'"):
        build_backend("torch", model, tok, pad_token_id=3)


class DummyBackend:
    """Answers every prompt with the same token; records what the factory gave it."""

    name = "dummy"
    reports_entropy = False

    def __init__(self, model, eos_token_ids, pad_token_id, token: int = 5):
        self.model, self.eos, self.pad, self.token = model, eos_token_ids, pad_token_id, token
        self.synced, self.closed = 0, False

    def generate(self, prompt_token_ids, params, seed=None, batch_size=0) -> Generation:
        B = len(prompt_token_ids)
        ids = torch.full((B, 1), self.token, dtype=torch.long)
        return Generation([list(p) for p in prompt_token_ids], ids, torch.ones_like(ids), torch.zeros(B, 1),
                          torch.ones(B, dtype=torch.bool), 1, torch.zeros(B, 1))

    def sync_weights(self, model) -> None:
        self.synced += 1

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def dummy_registered():
    register_backend("dummy")(DummyBackend)
    yield
    BACKENDS.pop("dummy")


def test_a_registered_backend_is_picked_by_name(tiny, dummy_registered):
    model, tok = tiny
    backend = build_backend("dummy", model, tok, token=7)
    assert isinstance(backend, DummyBackend) and isinstance(backend, GenerationBackend)
    assert backend.eos == eos_token_ids(model, tok) and backend.pad == tok.pad_token_id  # computed by the factory
    out = backend.generate([[1, 2], [3]], SamplingParams(max_new_tokens=4))
    assert out.completion_ids.tolist() == [[7], [7]] and not backend.reports_entropy
    with pytest.raises(ConfigError, match="Valid: dummy, .*torch"):
        build_backend("nope", model, tok)
    with pytest.raises(ValueError, match="already registered"):
        register_backend("dummy")(DummyBackend)


def test_the_dummy_backend_is_gone_after_its_test(tiny):
    assert "dummy" not in BACKENDS and "torch" in BACKENDS
