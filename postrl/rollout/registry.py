"""The generation-backend registry (config key ``rollout.backend``), apart from :mod:`postrl.rollout.backend` so
that backends in their own modules (:mod:`postrl.rollout.server`) register without importing it."""

from __future__ import annotations

from postrl.algorithms.registry import Registry

BACKENDS = Registry("generation backend", "rollout.backend")
register_backend = BACKENDS.register
