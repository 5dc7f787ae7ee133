"""LoRA adapters through PEFT: the policy trains low-rank adapters, the base weights stay frozen.

LoRA (Hu et al. 2021, arXiv:2106.09685) replaces the update of a weight ``W [out, in]`` by a low-rank one:
a targeted layer computes ``W x + (alpha / r) B A x`` with ``A [r, in]`` (random init) and ``B [out, r]``
(zero init, so training starts from the base model exactly). Only ``A`` and ``B`` train, so the optimizer
state and the gradients are those of the adapters, and the base model needs no second copy:

- the **reference** of a KL term (``postrl train``) and of DPO (``postrl dpo``) is the policy with its adapter
  disabled (:class:`ReferenceView`, PEFT's ``disable_adapter()``), which *is* the base model;
- a **checkpoint** holds the adapter (``adapter_config.json``, ``adapter_model.safetensors``) and the
  tokenizer; resuming loads the base model from ``model.name_or_path`` and the adapter from the checkpoint;
- ``RUN_DIR/final`` holds the adapter and ``final/merged/``, the base model with ``(alpha / r) B A`` added to
  each targeted weight (:func:`save_merged`), a plain model directory for ``from_pretrained`` and serving.

A directory that holds an adapter (``adapter_config.json``, no ``config.json``) also loads as a model
(:func:`load_adapter_dir`, used by :func:`postrl.models.loading.load_model_and_tokenizer`): its ``merged/``
when present, else its base model with the adapter merged in, so ``postrl eval --model RUN_DIR`` works on a
LoRA run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MERGED_DIR = "merged"
_INSTALL = "pip install 'postrl[lora]' (or pip install peft)"


def lora_enabled(model_cfg: Any) -> bool:
    """Whether a config's ``model`` section asks for LoRA (``model.lora.rank >= 1``)."""
    lora = getattr(model_cfg, "lora", None)
    return lora is not None and lora.rank > 0


def _peft():
    try:
        import peft
    except ImportError as exc:
        from postrl.models.errors import ModelLoadError

        raise ModelLoadError(f"model.lora.rank > 0 trains LoRA adapters with PEFT, which is not installed: "
                             f"{_INSTALL}") from exc
    return peft


def is_lora_model(model: Any) -> bool:
    """Whether ``model`` is a PEFT model (a policy with adapters)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def is_adapter_dir(path: str | Path) -> bool:
    """A directory written by a LoRA run's checkpoint or ``final/``: an adapter, no full ``config.json``."""
    p = Path(path).expanduser()
    return p.is_dir() and (p / ADAPTER_CONFIG).is_file() and not (p / "config.json").is_file()


def peft_config(lora: Any, task_type: str = "CAUSAL_LM"):
    """PEFT's ``LoraConfig`` for a ``model.lora`` section (:class:`postrl.config.LoraConfig`)."""
    peft = _peft()
    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    if isinstance(targets, list) and len(targets) == 1 and targets[0] == "all-linear":
        targets = "all-linear"
    return peft.LoraConfig(r=int(lora.rank), lora_alpha=float(lora.alpha), lora_dropout=float(lora.dropout),
                           target_modules=targets, bias="none", task_type=task_type,
                           modules_to_save=list(getattr(lora, "modules_to_save", None) or []) or None)


def _linear_names(model: torch.nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def add_lora(model: torch.nn.Module, lora: Any, checkpoint: str | Path | None = None, task_type: str = "CAUSAL_LM",
             base_name_or_path: str | None = None):
    """``model`` wrapped with fresh LoRA adapters of ``lora`` (a ``model.lora`` section); only the adapters (and,
    for ``SEQ_CLS``, the new score head) require gradients. ``checkpoint``: a directory written by a LoRA run
    whose adapter weights are loaded (resume). ``base_name_or_path`` is recorded in the adapter's config (where
    the base model comes from when the adapter is loaded on its own)."""
    peft = _peft()
    from postrl.config import ConfigError

    try:
        wrapped = peft.get_peft_model(model, peft_config(lora, task_type))
    except ValueError as exc:
        if "target" not in str(exc).lower():
            raise
        raise ConfigError(f"model.lora.target_modules={lora.target_modules!r} matches no layer of the model ({exc}). "
                          f"Its linear layers are named: {', '.join(_linear_names(model))}; or use all-linear."
                          ) from None
    if base_name_or_path:
        wrapped.peft_config["default"].base_model_name_or_path = str(base_name_or_path)
    if checkpoint is not None:
        load_adapter_weights(wrapped, checkpoint)
    return wrapped


def load_adapter_weights(model, ckpt_dir: str | Path) -> None:
    """Copy the adapter weights of ``ckpt_dir`` (written by ``save_pretrained`` of a PEFT model) into ``model``
    in place; every adapter tensor of ``model`` must be in the file."""
    from safetensors.torch import load_file

    peft = _peft()
    path = Path(ckpt_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt_dir}: no {ADAPTER_WEIGHTS} (not a checkpoint of a LoRA run: a run with "
                                "model.lora.rank > 0 resumes from its own checkpoints only)")
    state = load_file(str(path))
    expected = set(peft.get_peft_model_state_dict(model))
    if set(state) != expected:
        raise KeyError(f"{path}: the adapter does not fit the model (model.lora differs from the run's?): "
                       f"missing {sorted(expected - set(state))[:3]}, unexpected {sorted(set(state) - expected)[:3]}")
    result = peft.set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise KeyError(f"{path}: adapter tensors that fit no layer: {unexpected[:3]}")


class ReferenceView:
    """The policy with its adapter disabled, called like a model: the base model, without a second copy of
    its weights (the KL reference of ``postrl train``, the reference of ``postrl dpo``).

    ``eval()`` / ``train()`` switch the policy's mode (callers restore it, as they do for any model);
    ``requires_grad_`` does nothing: the base weights are frozen already and the adapters must stay trainable.
    """

    def __init__(self, policy):
        self.policy = policy

    def __call__(self, *args, **kwargs):
        with self.policy.disable_adapter():
            return self.policy(*args, **kwargs)

    forward = __call__

    @property
    def training(self) -> bool:
        return self.policy.training

    @property
    def config(self):
        return self.policy.config

    def eval(self) -> "ReferenceView":
        self.policy.eval()
        return self

    def train(self, mode: bool = True) -> "ReferenceView":
        self.policy.train(mode)
        return self

    def requires_grad_(self, requires_grad: bool = True) -> "ReferenceView":
        return self

    def parameters(self):
        return self.policy.parameters()


def reference_view(policy) -> ReferenceView:
    """:class:`ReferenceView` of a PEFT ``policy``."""
    return ReferenceView(policy)


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The state dict of the plain model that equals the PEFT ``model`` (active adapter merged): each targeted
    weight becomes ``W + (alpha / r) B A`` (a new tensor, on the CPU), every other tensor is the base model's own
    (no copy), under the names of the model without adapters. ``model`` itself is not changed."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    inner = model.get_base_model()
    adapter = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapter[0]
    merged: dict[str, torch.Tensor] = {}
    saved_copies: set[str] = set()
    for name, module in inner.named_modules():
        if isinstance(module, LoraLayer) and adapter in getattr(module, "lora_A", {}):
            base = module.get_base_layer()
            with torch.no_grad():
                delta = module.get_delta_weight(adapter)
                merged[f"{name}.weight"] = (base.weight.detach().to(delta.dtype) + delta).to(base.weight.dtype).cpu()
        elif isinstance(module, ModulesToSaveWrapper):
            saved_copies.add(name)
    out: dict[str, torch.Tensor] = {}
    for key, value in inner.state_dict().items():
        if ".lora_" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        for name in saved_copies:  # a trained copy of a whole module (e.g. a classifier head): keep the copy
            if plain.startswith(f"{name}.original_module."):
                plain = ""
            elif plain.startswith(f"{name}.modules_to_save.{adapter}."):
                plain = name + "." + plain[len(f"{name}.modules_to_save.{adapter}."):]
            elif plain.startswith(f"{name}.modules_to_save."):
                plain = ""
        if plain:
            out[plain] = merged.get(plain, value)
    return out


def save_merged(model, tokenizer, target: str | Path) -> Path:
    """Write the PEFT ``model`` with its adapter merged (:func:`merged_state_dict`) and ``tokenizer`` to
    ``target`` as a plain model directory (``from_pretrained``, ``postrl eval --model``, serving engines)."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    inner = model.get_base_model()
    inner.save_pretrained(target, state_dict=merged_state_dict(model), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(target)
    return target


def adapter_base(path: str | Path) -> tuple[str, str]:
    """``(base model, task type)`` recorded in an adapter directory's ``adapter_config.json``."""
    cfg = json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    return cfg.get("base_model_name_or_path") or "", cfg.get("task_type") or "CAUSAL_LM"


def load_adapter_dir(path: str | Path, load_base) -> tuple[Any, Any, str]:
    """``(model, tokenizer, source)`` of an adapter directory: its ``merged/`` model when present, else
    ``load_base(base)`` (``(model, tokenizer, source)`` of the base model recorded in the adapter's config) with
    the adapter loaded and merged in. The tokenizer is the directory's own when it has one."""
    path = Path(path).expanduser()
    if (path / MERGED_DIR / "config.json").is_file():
        return load_base(str(path / MERGED_DIR))
    base, task_type = adapter_base(path)
    if task_type != "CAUSAL_LM":
        raise ValueError(f"{path} holds a {task_type} adapter without a merged/ model; load it with PEFT")
    if not base:
        raise ValueError(f"{path / ADAPTER_CONFIG} names no base_model_name_or_path")
    peft = _peft()
    model, tokenizer, _ = load_base(base)
    merged = peft.PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    if any(path.glob("tokenizer*")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    return merged, tokenizer, str(path)


def trainable_parameter_count(model: torch.nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
