"""Generation backends: one interface for every engine that samples completions for the trainer.

A backend sees token ids, never text: ``generate(prompt_token_ids, params, seed, batch_size)`` returns a
:class:`~postrl.rollout.generator.Generation` (completion ids, mask, the sampler's log-probs and
entropy, truncation flags). The trainer pushes its weights with ``sync_weights(model)`` after each update
and calls ``close()`` at the end. Backends are registered by name (config key ``rollout.backend``) and
built by :func:`build_backend`:

    =============  ==================================================================================
    name           engine
    =============  ==================================================================================
    ``torch``      :class:`TorchBackend`: postrl's own generator, in process, on the trainer's model
                   object (sync is a no-op)
    ``openai_server``  :class:`~postrl.rollout.server.OpenAIServerBackend`: an OpenAI-compatible server (vLLM,
                   SGLang, ...), token ids over HTTP, optionally started and stopped by postrl; weights synced by
                   reload, restart or LoRA hot-load (docs/generation-backends.md)
    =============  ==================================================================================

A new backend is one registered class::

    @register_backend("my_engine")
    class MyBackend:
        name = "my_engine"
        reports_entropy = False  # Generation.entropy is all zeros; metrics skip entropy

        def __init__(self, model, eos_token_ids: list[int], pad_token_id: int, **options): ...
        def generate(self, prompt_token_ids, params, seed=None, batch_size=0) -> Generation: ...
        def sync_weights(self, model) -> None: ...
        def close(self) -> None: ...
"""

from __future__ import annotations

import inspect
from typing import Any, Optional, Protocol, runtime_checkable

from postrl.config import ConfigError
from postrl.rollout.registry import BACKENDS, register_backend
from postrl.rollout.generator import Generation, Generator, SamplingParams, eos_token_ids


@runtime_checkable
class GenerationBackend(Protocol):
    """What the trainer and the evaluation runner call to sample completions.

    ``name``: the registered name. ``reports_entropy``: whether ``Generation.entropy`` holds the sampler's
    entropies (False: zeros, and metrics skip entropy).
    """

    name: str
    reports_entropy: bool

    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams, seed: Optional[int] = None,
                 batch_size: int = 0) -> Generation:
        """One completion per prompt (repeat a prompt n times for a group of n). With a ``seed`` the result
        is reproducible. ``batch_size`` > 0: decode in chunks of that many sequences (a hint that server
        backends may ignore)."""
        ...

    def sync_weights(self, model) -> None:
        """Make the next ``generate`` sample from ``model``'s current weights."""
        ...

    def close(self) -> None:
        """Release what the backend holds (processes, connections, GPU memory)."""
        ...




@register_backend("torch")
class TorchBackend:
    """postrl's :class:`~postrl.rollout.generator.Generator` on the trainer's own model object, in process.

    The model is put in eval mode for each ``generate`` call and given back in the train / eval mode it
    had. ``kv_cache``, ``sampler``, ``share_prefill``, ``decode``, ``continuous_batching``: see
    :class:`Generator` (config keys ``rollout.decode`` and ``rollout.continuous_batching``).
    """

    name = "torch"
    reports_entropy = True

    def __init__(self, model, eos_token_ids: list[int], pad_token_id: int, kv_cache: str = "preallocated",
                 sampler: str = "inverse_cdf", share_prefill: bool = True, decode: str = "auto",
                 continuous_batching: bool = False):
        self.generator = Generator(model, eos_token_ids, pad_token_id, kv_cache=kv_cache, sampler=sampler,
                                   share_prefill=share_prefill, decode=decode,
                                   continuous_batching=continuous_batching)

    @staticmethod
    def config_options(cfg, tokenizer) -> dict:
        """The options ``rollout.decode`` and ``rollout.continuous_batching`` of a config."""
        return {"decode": cfg.rollout.decode, "continuous_batching": cfg.rollout.continuous_batching}

    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams, seed: Optional[int] = None,
                 batch_size: int = 0) -> Generation:
        model = self.generator.model
        was_training = model.training
        model.eval()
        try:
            return self.generator.generate(prompt_token_ids, params, seed=seed, batch_size=batch_size)
        finally:
            model.train(was_training)

    def sync_weights(self, model) -> None:
        """Nothing to copy: the generator runs ``model`` itself. Another model object is an error (build a
        backend for it instead), so that a trainer never samples from a model it did not mean."""
        if model is not self.generator.model:
            raise ValueError("TorchBackend.sync_weights: this backend samples from the model object it was built "
                             "with; got another model (build a new backend for it)")

    def close(self) -> None:
        pass


def build_backend(name: str, model, tokenizer, **options: Any) -> GenerationBackend:
    """The generation backend registered as ``name`` (config ``rollout.backend``) for ``model``.

    The backend stops at every EOS id of :func:`~postrl.rollout.generator.eos_token_ids` (the tokenizer's
    and the model's generation config's; the pad id when there is none) and pads with the tokenizer's pad
    id (its first EOS id when it has none). ``options`` go to the backend's constructor. An unknown name or option raises
    :class:`~postrl.config.ConfigError` listing the valid ones.
    """
    try:
        cls = BACKENDS.get_fn(name)
    except KeyError as exc:
        raise ConfigError(exc.args[0]) from None
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    fixed = ("self", "model", "eos_token_ids", "pad_token_id")
    unknown = [k for k in options if k in fixed or not (takes_any or k in params)]
    if unknown:
        valid = [p for p in params if p not in fixed and params[p].kind is not inspect.Parameter.VAR_KEYWORD]
        raise ConfigError(f"generation backend {name!r} got unknown options {', '.join(map(repr, unknown))}; "
                          f"valid: {', '.join(valid) or 'none'}")
    if "tokenizer" in params and "tokenizer" not in options:  # e.g. a managed server writes it with the weights
        options = {**options, "tokenizer": tokenizer}
    eos = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else None)
    if pad is None:
        raise ValueError("build_backend: the tokenizer has neither a pad token nor an EOS token")
    return cls(model, eos or [pad], pad, **options)


def backend_from_config(cfg, model, tokenizer) -> GenerationBackend:
    """The backend of ``cfg.rollout.backend`` for ``model``, with the options its class reads from the config
    (a backend class may define ``config_options(cfg, tokenizer) -> dict``; the torch backend reads
    ``rollout.decode`` and ``rollout.continuous_batching``)."""
    try:
        cls = BACKENDS.get_fn(cfg.rollout.backend)
    except KeyError as exc:
        raise ConfigError(exc.args[0]) from None
    options = cls.config_options(cfg, tokenizer) if hasattr(cls, "config_options") else {}
    return build_backend(cfg.rollout.backend, model, tokenizer, **options)


from postrl.rollout import server as _server  # noqa: E402,F401  registers openai_server
