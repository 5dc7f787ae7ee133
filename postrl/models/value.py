"""A value model for PPO: a causal-LM backbone with a scalar head, ``V(s_t)`` per completion token."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from postrl.models.logprobs import build_inputs


class ValueModel(nn.Module):
    """``V(s_t)`` for every completion position t: the value of the prefix *before* token t is
    generated, i.e. the hidden state at the same position whose logits sample token t.

    The backbone is the decoder of a Hugging Face causal LM (its LM head is dropped); the head is
    a zero-initialised linear layer, so all values start at 0.
    """

    def __init__(self, causal_lm):
        super().__init__()
        self.backbone = causal_lm.get_decoder()
        hidden = causal_lm.config.hidden_size
        self.head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.head.to(next(self.backbone.parameters()).device, next(self.backbone.parameters()).dtype)

    def forward(self, prompts: list[list[int]], completion_ids: Tensor, completion_mask: Tensor,
                pad_id: int) -> Tensor:
        """Shapes: ``completion_ids, completion_mask [B, T]`` -> values ``[B, T]`` (0 at padding)."""
        input_ids, attn, positions = build_inputs(prompts, completion_ids, completion_mask, pad_id)
        T = completion_ids.shape[1]
        hidden = self.backbone(input_ids=input_ids, attention_mask=attn, position_ids=positions,
                               use_cache=False).last_hidden_state[:, -T - 1:-1, :]
        return self.head(hidden).squeeze(-1).float() * completion_mask.to(torch.float32)


class ValueHead(nn.Module):
    """A value head on the policy's own backbone (``critic.shared_backbone``): a zero-initialised linear map
    of the decoder's last hidden state to a scalar, so every value starts at 0. Its input is the hidden state
    at the position whose logits sample token t (see :func:`postrl.models.logprobs.completion_logprobs_and_values`)."""

    def __init__(self, causal_lm):
        super().__init__()
        self.head = nn.Linear(causal_lm.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        ref = next(causal_lm.parameters())
        self.head.to(ref.device, ref.dtype)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.head(hidden)
