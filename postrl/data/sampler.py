"""Reproducible, resumable prompt sampler."""

from __future__ import annotations

import random
from typing import Any, Sequence


class PromptSampler:
    """Yields batches of samples by walking a seeded permutation of ``samples``.

    Epoch ``e`` uses the permutation ``random.Random(seed + e).shuffle(range(n))``. A batch may
    straddle an epoch boundary (its tail then comes from the next epoch's permutation).
    ``state_dict()`` / ``load_state_dict()`` capture (epoch, position) so a resumed run sees exactly
    the same future batches.
    """

    def __init__(self, samples: Sequence[Any], seed: int = 0):
        if len(samples) == 0:
            raise ValueError("PromptSampler needs at least one sample")
        self.samples = list(samples)
        self.seed = int(seed)
        self.epoch = 0
        self.position = 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        perm = list(range(len(self.samples)))
        random.Random(self.seed + epoch).shuffle(perm)
        return perm

    def __len__(self) -> int:
        return len(self.samples)

    def next_batch(self, k: int) -> list[Any]:
        if not isinstance(k, int) or k <= 0:
            raise ValueError(f"batch size must be a positive int, got {k!r}")
        out = []
        while len(out) < k:
            if self.position >= len(self._perm):
                self.epoch += 1
                self.position = 0
                self._perm = self._permutation(self.epoch)
            take = min(k - len(out), len(self._perm) - self.position)
            out.extend(self.samples[i] for i in self._perm[self.position : self.position + take])
            self.position += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_samples": len(self.samples)}

    def load_state_dict(self, d: dict) -> None:
        n = d.get("num_samples", len(self.samples))
        if n != len(self.samples):
            raise ValueError(f"sampler state is for {n} samples but this sampler has {len(self.samples)}")
        if "seed" in d and int(d["seed"]) != self.seed:
            raise ValueError(f"sampler state has seed {d['seed']} but this sampler has seed {self.seed}")
        epoch, position = int(d["epoch"]), int(d["position"])
        if epoch < 0 or not 0 <= position <= len(self.samples):
            raise ValueError(f"invalid sampler state: epoch={epoch}, position={position}")
        self.epoch = epoch
        self.position = position
        self._perm = self._permutation(epoch)
