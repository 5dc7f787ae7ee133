"""Loss aggregation: per-token losses ``[B, T]`` + mask -> scalar.

``token_mean`` averages over all valid tokens of the *mini batch*, however the
mini batch is split into micro batches: each micro batch passes the mini
batch's token count as ``num_tokens``, so the sum of micro-batch losses equals
the loss of the whole mini batch (DAPO, arXiv:2503.14476 eq. 12's token-level
normalisation; the GRPO default in postrl).
"""

from __future__ import annotations

from torch import Tensor

from .registry import register_loss_agg


@register_loss_agg("token_mean")
def token_mean(loss_tokens: Tensor, mask: Tensor, num_tokens: float | None = None) -> Tensor:
    """``sum(loss * mask) / num_tokens`` (``num_tokens`` defaults to ``mask.sum()``).

    Shapes: ``loss_tokens, mask [B, T]`` -> scalar.
    """
    total = mask.sum() if num_tokens is None else num_tokens
    return (loss_tokens * mask).sum() / max(float(total), 1.0)
