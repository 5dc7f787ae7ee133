"""Per-token log-probs (and entropy) of given completions under a causal LM."""

from __future__ import annotations

import torch
from torch import Tensor

from postrl.rollout.generator import left_pad


def build_inputs(prompts: list[list[int]], completion_ids: Tensor, completion_mask: Tensor, pad_id: int):
    """Concatenate left-padded prompts ``[B, P]`` and right-padded completions ``[B, T]``.

    Returns ``input_ids [B, P+T]``, ``attention_mask [B, P+T]``, ``position_ids [B, P+T]``.
    Positions count only real tokens, so they match what the generator used.
    """
    device = completion_ids.device
    p_ids, p_mask = left_pad(prompts, pad_id, device)
    input_ids = torch.cat([p_ids, completion_ids], dim=1)
    attn = torch.cat([p_mask, completion_mask.to(p_mask.dtype)], dim=1)
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attn, positions


def completion_logprobs(
    model,
    prompts: list[list[int]],
    completion_ids: Tensor,
    completion_mask: Tensor,
    pad_id: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Log-prob of each completion token given its prompt and the tokens before it.

    The logits are divided by ``temperature`` as the sampler did, so at the
    first update of an on-policy step these equal the sampler's log-probs (up
    to floating-point differences between cached and full forward passes).
    Only the last ``T + 1`` positions go through the LM head.

    Shapes: ``completion_ids, completion_mask [B, T]`` -> ``logprobs [B, T]``,
    ``entropy [B, T]`` (or None; differentiable only with ``entropy_grad``).
    Padding positions hold 0.
    """
    input_ids, attn, positions = build_inputs(prompts, completion_ids, completion_mask, pad_id)
    T = completion_ids.shape[1]
    logits = model(input_ids=input_ids, attention_mask=attn, position_ids=positions,
                   use_cache=False, logits_to_keep=T + 1).logits[:, :-1, :].float()
    return _from_logits(logits, completion_ids, completion_mask, temperature, with_entropy, entropy_grad)


def completion_logprobs_and_values(model, value_head, prompts: list[list[int]], completion_ids: Tensor,
                                   completion_mask: Tensor, pad_id: int, temperature: float = 1.0,
                                   **entropy_options: bool) -> tuple[Tensor, Tensor | None, Tensor]:
    """:func:`completion_logprobs` and the values of a value head on the same backbone, from one forward pass.

    The decoder's last hidden state (after its final norm) at the position whose logits sample token t goes
    through the LM head (log-prob of token t) and through ``value_head`` (``V(s_t)``, the value of the prefix
    before token t, as :class:`postrl.models.value.ValueModel` defines it); ``entropy_options``: ``with_entropy``,
    ``entropy_grad`` as for :func:`completion_logprobs`. Returns ``(logprobs [B, T],
    entropy [B, T] or None, values [B, T])``, 0 at padding; gradients flow into the backbone from both.
    """
    input_ids, attn, positions = build_inputs(prompts, completion_ids, completion_mask, pad_id)
    T = completion_ids.shape[1]
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attn, position_ids=positions,
                                 use_cache=False).last_hidden_state[:, -T - 1:-1, :]
    logits = model.get_output_embeddings()(hidden).float()
    values = value_head(hidden).squeeze(-1).float() * completion_mask.to(torch.float32)
    lp, ent = _from_logits(logits, completion_ids, completion_mask, temperature, **entropy_options)
    return lp, ent, values


def _from_logits(logits: Tensor, completion_ids: Tensor, completion_mask: Tensor, temperature: float,
                 with_entropy: bool = False, entropy_grad: bool = False) -> tuple[Tensor, Tensor | None]:
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    mask = completion_mask.to(logits.dtype)
    if not with_entropy:
        return token_logprobs(logits, completion_ids) * mask, None
    logp = torch.log_softmax(logits, dim=-1)
    token_logp = logp.gather(-1, completion_ids[..., None]).squeeze(-1)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = -(logp.exp() * logp).sum(-1) * mask
    return token_logp * mask, entropy


def token_logprobs(logits: Tensor, token_ids: Tensor) -> Tensor:
    """``log softmax(logits)[token]`` as ``logits[token] - logsumexp(logits)``.

    Equal to gathering from ``log_softmax`` but without materializing the ``[..., V]`` log-prob
    tensor (nor its backward): only the logits are kept for the gradient.
    Shapes: ``logits [..., V]``, ``token_ids [...]`` -> ``[...]``.
    """
    return logits.gather(-1, token_ids[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
