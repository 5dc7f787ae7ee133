"""Per-token log-probs (and entropy) of given completions under a causal LM.

Shared prompts (a GRPO group's ``n`` copies of one prompt in a micro batch) go through the model once: the
distinct prompts are run with a KV cache, the cache rows are copied to every completion of their prompt
(a product with a 0/1 matrix, so the gradient of each copy flows back into the one prompt pass), and the
completions run on top of it. Attention, positions and logits are those of the unshared forward, so
log-probs and gradients equal it up to floating-point summation order (tests/test_shared_prefix.py);
the prompt tokens' FLOPs are divided by the number of copies.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from postrl.rollout.generator import cache_keyword, left_pad
from postrl.run.batching import right_pad

# models whose cache is not a plain DynamicCache of full-attention layers (sliding windows, linear
# attention, offloading, no cache under gradient checkpointing): they keep the unshared forward
_NO_SHARING: weakref.WeakSet = weakref.WeakSet()


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


def distinct_prompts(prompts: list[list[int]]) -> tuple[list[list[int]], Tensor]:
    """The distinct prompts (in order of first appearance) and each row's index into them ``[B]``."""
    index: dict[tuple[int, ...], int] = {}
    inverse = [index.setdefault(tuple(p), len(index)) for p in prompts]
    return [list(p) for p in index], torch.tensor(inverse, dtype=torch.long)


def prompt_groups(prompts: list[list[int]]) -> tuple[list[list[int]], Tensor] | None:
    """:func:`distinct_prompts`, or None when every prompt is distinct (nothing to share)."""
    unique, inverse = distinct_prompts(prompts)
    return None if len(unique) == len(prompts) else (unique, inverse)


def _shareable_cache(cache) -> bool:
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers)


def _output_cache(out):
    cache = getattr(out, "cache", None)  # transformers >= 5.24; `past_key_values` before
    return getattr(out, "past_key_values", None) if cache is None else cache


def _copy_rows(x: Tensor, copies: Tensor) -> Tensor:
    """Row ``b`` of the result is row ``u`` of ``x [U, ...]`` where ``copies [B, U]`` has its 1."""
    return (copies.to(x.dtype) @ x.reshape(x.shape[0], -1)).view(copies.shape[0], *x.shape[1:])


def _shared_prefix_states(run, model, prompts: list[list[int]], completion_ids: Tensor, completion_mask: Tensor,
                          pad_id: int, groups: tuple[list[list[int]], Tensor]) -> Tensor | None:
    """The states (logits or hidden states) at the positions that predict each completion token, ``[B, T, .]``,
    with every distinct prompt run once. ``run(keep, **model_kwargs) -> (states, cache)``: the states of the
    last ``keep`` positions for an int ``keep``, of the positions listed in a 1-D tensor ``keep``;
    ``model``: the module whose forward ``run`` calls. None when the model's cache cannot be shared (the
    caller falls back to the unshared forward).

    The prompt pass keeps the states of only the positions that are some prompt's last token (the LM head
    does not run over the whole prompts: for 8 prompts of 234 tokens and SmolLM2's 49,152-word head that is
    ~0.1 TFLOP and a 368 MB logits tensor per forward saved).
    """
    unique, inverse = groups
    device = completion_ids.device
    inverse = inverse.to(device)
    # The distinct prompts right-padded: every position attends to at least its prompt's first token, so the
    # padding positions' cached keys and values are ordinary numbers (the completions mask them out); a
    # left-padded padding position would have every key masked. The last real token's states are gathered.
    p_ids, p_mask = right_pad(unique, pad_id, device)
    lengths = p_mask.sum(-1)
    p_pos = torch.arange(p_ids.shape[1], device=device).expand_as(p_ids)
    last = lengths - 1
    keep = torch.unique(last)  # sorted: the positions that are some prompt's last token
    states, cache = run(keep, input_ids=p_ids, attention_mask=p_mask, position_ids=p_pos, use_cache=True)
    if cache is None or not _shareable_cache(cache):  # None: e.g. gradient checkpointing turns the cache off
        return None
    first = states[torch.arange(len(unique), device=device), torch.searchsorted(keep, last)][:, None]
    # copies by a product with the 0/1 matrix [B, U] rather than an index: an index's backward accumulates the
    # copies' gradients in an order that differed between processes (a seeded run was not reproducible)
    copies = torch.nn.functional.one_hot(inverse, len(unique)).to(first.dtype)
    first = _copy_rows(first, copies)  # [B, 1, .]: predicts completion token 0
    T = completion_ids.shape[1]
    if T == 1:
        return first
    for layer in cache.layers:  # each copy's gradient flows back into its prompt's keys / values
        layer.keys, layer.values = _copy_rows(layer.keys, copies), _copy_rows(layer.values, copies)
    attn = torch.cat([p_mask[inverse], completion_mask.to(p_mask.dtype)], dim=1)
    positions = lengths[inverse][:, None] + torch.arange(T, device=device)
    rest, _ = run(T, input_ids=completion_ids, attention_mask=attn, position_ids=positions, use_cache=True,
                  **{cache_keyword(model): cache})
    return torch.cat([first, rest[:, :-1]], dim=1)


def completion_logprobs(
    model,
    prompts: list[list[int]],
    completion_ids: Tensor,
    completion_mask: Tensor,
    pad_id: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    share_prefix: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Log-prob of each completion token given its prompt and the tokens before it.

    The logits are divided by ``temperature`` as the sampler did, so at the
    first update of an on-policy step these equal the sampler's log-probs (up
    to floating-point differences between cached and full forward passes).
    Only the last ``T + 1`` positions go through the LM head.

    Shapes: ``completion_ids, completion_mask [B, T]`` -> ``logprobs [B, T]``,
    ``entropy [B, T]`` (or None; differentiable only with ``entropy_grad``).
    Padding positions hold 0. With ``share_prefix``, a prompt that several rows share is run once (see
    the module docstring).
    """
    groups = prompt_groups(prompts) if share_prefix and model not in _NO_SHARING else None
    if groups is not None:

        def run(keep, **kwargs):
            out = model(logits_to_keep=keep, **kwargs)
            return out.logits, _output_cache(out)

        logits = _shared_prefix_states(run, model, prompts, completion_ids, completion_mask, pad_id, groups)
        if logits is not None:
            return _from_logits(logits.float(), completion_ids, completion_mask, temperature, with_entropy,
                                entropy_grad)
        _NO_SHARING.add(model)
    input_ids, attn, positions = build_inputs(prompts, completion_ids, completion_mask, pad_id)
    T = completion_ids.shape[1]
    logits = model(input_ids=input_ids, attention_mask=attn, position_ids=positions,
                   use_cache=False, logits_to_keep=T + 1).logits[:, :-1, :].float()
    return _from_logits(logits, completion_ids, completion_mask, temperature, with_entropy, entropy_grad)


def completion_logprobs_and_values(model, value_head, prompts: list[list[int]], completion_ids: Tensor,
                                   completion_mask: Tensor, pad_id: int, temperature: float = 1.0,
                                   share_prefix: bool = True,
                                   **entropy_options: bool) -> tuple[Tensor, Tensor | None, Tensor]:
    """:func:`completion_logprobs` and the values of a value head on the same backbone, from one forward pass.

    The decoder's last hidden state (after its final norm) at the position whose logits sample token t goes
    through the LM head (log-prob of token t) and through ``value_head`` (``V(s_t)``, the value of the prefix
    before token t, as :class:`postrl.models.value.ValueModel` defines it); ``entropy_options``: ``with_entropy``,
    ``entropy_grad`` as for :func:`completion_logprobs`. Returns ``(logprobs [B, T],
    entropy [B, T] or None, values [B, T])``, 0 at padding; gradients flow into the backbone from both.
    ``share_prefix``: as for :func:`completion_logprobs`.
    """
    decoder = model.get_decoder()
    groups = prompt_groups(prompts) if share_prefix and model not in _NO_SHARING else None
    hidden = None
    if groups is not None:

        def run(keep, **kwargs):
            out = decoder(**kwargs)
            h = out.last_hidden_state
            return (h[:, keep] if torch.is_tensor(keep) else h[:, -keep:]), _output_cache(out)

        hidden = _shared_prefix_states(run, decoder, prompts, completion_ids, completion_mask, pad_id, groups)
        if hidden is None:
            _NO_SHARING.add(model)
    if hidden is None:
        input_ids, attn, positions = build_inputs(prompts, completion_ids, completion_mask, pad_id)
        T = completion_ids.shape[1]
        hidden = decoder(input_ids=input_ids, attention_mask=attn, position_ids=positions,
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
