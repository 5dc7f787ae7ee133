"""Loss aggregation: per-token losses ``[B, T]`` + mask -> scalar.

==============================  ===================================================  =========================
name                            scalar loss                                          paper
==============================  ===================================================  =========================
``token_mean``                  ``sum_it l_it m_it / num_tokens``                    DAPO (arXiv:2503.14476)
                                                                                     eq. 12, token level
``seq_mean_token_mean``         ``sum_i (sum_t l_it m_it / |o_i|) / num_seqs``       GRPO (DeepSeekMath,
                                                                                     arXiv:2402.03300) eq. 3
``seq_mean_token_sum``          ``sum_i sum_t l_it m_it / num_seqs``                 REINFORCE / RLOO
                                                                                     (sequence log-likelihood)
``seq_mean_token_sum_norm``     ``sum_it l_it m_it / (num_seqs * max_len)``          Dr. GRPO
                                                                                     (arXiv:2503.20783)
==============================  ===================================================  =========================

``m`` is the loss mask, ``|o_i| = sum_t m_it`` the number of valid tokens of completion i
(a row with none contributes 0).

Independent of how a mini batch is split: every function takes the *mini batch's* normalisers
(keyword-only) rather than computing them from the tensors it sees::

    fn(loss_tokens [B, T], mask [B, T], *, num_tokens: float, num_seqs: int, max_len: int) -> scalar

``num_tokens`` = valid tokens in the mini batch, ``num_seqs`` = completions in the mini batch,
``max_len`` = the generation budget (``rollout.max_new_tokens``, a constant, not the padded
width). Each is linear in the per-row sums, so the losses of the micro batches, each called with
the mini batch's normalisers, add up to the loss of the whole mini batch and gradient
accumulation gives the same update as one big batch. Left out (``None``), a normaliser is taken
from the tensors given (the batch is the whole mini batch; ``max_len`` = padded width ``T``).
"""

from __future__ import annotations

from torch import Tensor

from .registry import register_loss_agg


def _masked_rows(loss_tokens: Tensor, mask: Tensor) -> Tensor:
    if loss_tokens.shape != mask.shape:
        raise ValueError(f"loss_tokens {tuple(loss_tokens.shape)} and mask {tuple(mask.shape)} must match")
    return (loss_tokens * mask.to(loss_tokens.dtype)).sum(-1)  # [B]


def _num_seqs(mask: Tensor, num_seqs: int | None) -> float:
    return float(max(mask.shape[0] if num_seqs is None else num_seqs, 1))


@register_loss_agg("token_mean")
def token_mean(
    loss_tokens: Tensor, mask: Tensor, *, num_tokens: float | None = None, num_seqs: int | None = None,
    max_len: int | None = None,
) -> Tensor:
    """``sum(loss * mask) / num_tokens``: every valid token of the mini batch weighs the same
    (DAPO, arXiv:2503.14476 eq. 12: ``1 / sum_i |o_i|``), so long completions are not down-weighted.
    ``num_tokens`` (default ``mask.sum()``) is clamped to >= 1.
    """
    rows = _masked_rows(loss_tokens, mask)
    if num_tokens is None:
        return rows.sum() / mask.to(rows.dtype).sum().clamp(min=1.0)
    return rows.sum() / max(float(num_tokens), 1.0)


@register_loss_agg("seq_mean_token_mean")
def seq_mean_token_mean(
    loss_tokens: Tensor, mask: Tensor, *, num_tokens: float | None = None, num_seqs: int | None = None,
    max_len: int | None = None,
) -> Tensor:
    """``sum_i [sum_t loss_it mask_it / |o_i|] / num_seqs``: average each completion's tokens, then
    the completions (GRPO, DeepSeekMath arXiv:2402.03300 eq. 3: ``1/G sum_i 1/|o_i| sum_t``; the
    aggregation GSPO's eq. 5 needs). ``|o_i|`` = row sum of the mask, clamped to >= 1 (an empty
    row adds 0 but still counts in ``num_seqs``, default ``B``).
    """
    rows = _masked_rows(loss_tokens, mask)
    lengths = mask.to(rows.dtype).sum(-1).clamp(min=1.0)
    return (rows / lengths).sum() / _num_seqs(mask, num_seqs)


@register_loss_agg("seq_mean_token_sum")
def seq_mean_token_sum(
    loss_tokens: Tensor, mask: Tensor, *, num_tokens: float | None = None, num_seqs: int | None = None,
    max_len: int | None = None,
) -> Tensor:
    """``sum_i sum_t loss_it mask_it / num_seqs``: the per-sequence sum (a sequence log-likelihood
    for REINFORCE-style losses), averaged over completions (``num_seqs`` default ``B``).
    """
    return _masked_rows(loss_tokens, mask).sum() / _num_seqs(mask, num_seqs)


@register_loss_agg("seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(
    loss_tokens: Tensor, mask: Tensor, *, num_tokens: float | None = None, num_seqs: int | None = None,
    max_len: int | None = None,
) -> Tensor:
    """``sum(loss * mask) / (num_seqs * max_len)``: Dr. GRPO (Liu et al. 2025, arXiv:2503.20783)
    removes GRPO's ``1/|o_i|`` length normalisation and divides by a constant instead, the
    generation budget ``max_len`` (``rollout.max_new_tokens``; default the padded width ``T``,
    which is only constant if the caller pads to the budget), so no completion length is
    favoured.
    """
    rows = _masked_rows(loss_tokens, mask)
    budget = mask.shape[-1] if max_len is None else max_len
    return rows.sum() / (_num_seqs(mask, num_seqs) * float(max(budget, 1)))
