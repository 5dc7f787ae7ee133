"""Per-token KL estimators between the policy and a frozen reference.

From J. Schulman, "Approximating KL divergence" (2020), with
``log_ratio = logp_ref - logp`` evaluated at tokens sampled from the policy:

* ``k1 = -log_ratio``                       (unbiased, high variance, can be negative)
* ``k2 = 0.5 * log_ratio**2``               (biased, low variance)
* ``k3 = exp(log_ratio) - log_ratio - 1``   (unbiased, always >= 0; used by GRPO,
  DeepSeekMath eq. 4)

Shapes: ``[B, T] -> [B, T]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import register_kl_estimator


@register_kl_estimator("k1")
def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return logprobs - ref_logprobs


@register_kl_estimator("k2")
def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return 0.5 * (ref_logprobs - logprobs) ** 2


@register_kl_estimator("k3")
def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    # clamp the log-ratio so exp() cannot overflow on a badly diverged token
    log_ratio = (ref_logprobs - logprobs).clamp(-20.0, 20.0)
    return torch.expm1(log_ratio) - log_ratio  # expm1 keeps tiny ratios from rounding below 0
