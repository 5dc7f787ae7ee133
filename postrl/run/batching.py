"""Batching shared by the pairwise trainers: right-padded token tensors and seeded epoch orders."""

from __future__ import annotations

import torch

from postrl.run.rng import step_seed


def right_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, W], mask [B, W])`` of ``seqs`` padded on the right to the longest (W >= 1)."""
    width = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: a permutation of ``range(n)`` seeded by (seed, epoch), cut into batches of
    ``batch_size`` (the last one may be smaller)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(seed, 1_000 + epoch))).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]
