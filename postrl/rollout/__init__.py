"""Rollout: sampling completions for the trainer.

- :mod:`.generator`: postrl's batched torch sampler (:class:`Generator`, :class:`SamplingParams`,
  :class:`Generation`);
- :mod:`.backend`: the :class:`GenerationBackend` interface, the backend registry and :func:`build_backend`;
- :mod:`.batch`: :class:`RolloutBatch`, the typed batch a trainer sees.
"""

from .backend import BACKENDS, GenerationBackend, TorchBackend, build_backend, register_backend
from .batch import RolloutBatch
from .generator import Generation, Generator, SamplingParams, eos_token_ids

__all__ = [
    "BACKENDS", "Generation", "GenerationBackend", "Generator", "RolloutBatch", "SamplingParams", "TorchBackend",
    "build_backend", "eos_token_ids", "register_backend",
]
