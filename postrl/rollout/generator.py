"""Batched sampling with a KV cache, written in torch on top of any HF causal LM.

The generator returns exactly the token ids it sampled (nothing is re-tokenized
later), a mask of the generated tokens, and the sampler's log-probability of
each sampled token under the temperature-scaled distribution (before top-k /
top-p truncation, which is the distribution the trainer's forward pass
reproduces). Finished sequences are dropped from the decode batch, so they stop
costing compute; with continuous batching their places go to waiting prompts instead.
For Llama-family models the forward is postrl's own (:mod:`postrl.models.fast_llama`), elsewhere the
model's transformers forward; both give the same tokens (tests/test_fast_decode.py).
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from postrl.config.rl import DECODE_PATHS
from postrl.models.fast_llama import FusedLlama, unsupported_reason

PREFILL_MEMO = 4  # continuous batching: prompts whose prefill is kept for their group's later copies


class PreallocatedLayer(DynamicLayer):
    """One layer's KV cache in buffers allocated once for the whole generation.

    ``DynamicLayer`` concatenates every new key/value onto the cache, copying the whole cache at each
    decode step (quadratic in length); here each step writes only its new token into a preallocated
    ``[B, heads, capacity, head_dim]`` buffer and attention reads a view of the filled part. Dropping
    finished rows copies only the filled part of the kept rows. The values are identical to a
    ``DynamicLayer``'s (same tensors, other storage).
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = int(capacity)
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, _ = key_states.shape
        self._k = key_states.new_empty((b, h, self.capacity, key_states.shape[-1]))
        self._v = value_states.new_empty((b, value_states.shape[1], self.capacity, value_states.shape[-1]))
        self.length = 0
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise ValueError(f"PreallocatedLayer: {end} tokens do not fit the capacity {self.capacity}")
        self._k[:, :, self.length:end] = key_states
        self._v[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        for name in ("_k", "_v"):
            old = getattr(self, name)
            new = old.new_empty((len(indices),) + tuple(old.shape[1:]))
            new[:, :, :self.length] = old[indices, :, :self.length]
            setattr(self, name, new)
        self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]


def preallocated_cache(num_layers: int, capacity: int) -> Cache:
    """A transformers ``Cache`` of :class:`PreallocatedLayer` s holding up to ``capacity`` tokens per row."""
    return Cache(layers=[PreallocatedLayer(capacity) for _ in range(num_layers)])


def sample_inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Draw one token per row of ``probs [B, V]`` by inverting its cumulative distribution.

    Token ``i`` is chosen when ``u * total`` falls in ``[cdf[i-1], cdf[i])`` (``u`` uniform in [0, 1),
    ``uniforms [B]``), which has probability ``p_i / total``: the same distribution as
    ``torch.multinomial(probs, 1)``, from one random number per row instead of one per vocabulary
    entry (multinomial draws an exponential variate for each of the V entries). A token of
    probability 0 is never chosen.
    """
    cdf = probs.cumsum(-1)
    target = uniforms[:, None].to(cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


@dataclass
class SamplingParams:
    """How to sample. ``temperature == 0`` means greedy decoding."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_new_tokens: int = 0
    """End-of-sequence ids cannot be sampled before this many tokens (HF ``min_new_tokens``, vLLM
    ``min_tokens``). Like top_k / top_p it changes the sampling distribution only: the recorded log-probs and
    entropies are the policy's own (temperature-scaled, unmasked) distribution's."""

    def __post_init__(self):
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"SamplingParams.min_new_tokens={self.min_new_tokens} must be in [0, max_new_tokens="
                             f"{self.max_new_tokens}]")


def sampling_params(rollout) -> SamplingParams:
    """The :class:`SamplingParams` of a ``rollout`` config section (:class:`~postrl.config.rl.RolloutConfig`)."""
    return SamplingParams(rollout.max_new_tokens, rollout.temperature, rollout.top_p, rollout.top_k,
                          rollout.min_new_tokens)


@dataclass
class Generation:
    """Output of :meth:`Generator.generate` for B prompts.

    Shapes: ``completion_ids``, ``completion_mask``, ``logprobs`` are ``[B, T]``
    with ``T`` the longest completion; padding positions hold ``pad_id``, 0 and 0.
    ``truncated[b]`` is True when sequence b hit ``max_new_tokens`` without EOS.
    ``entropy [B, T]`` is the entropy of the temperature-scaled next-token
    distribution at each generated position (0 at padding).
    """

    prompt_ids: list[list[int]]
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    logprobs: torch.Tensor
    truncated: torch.Tensor
    decode_steps: int
    entropy: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)

    def select(self, rows: list[int]) -> "Generation":
        """The sub-batch of the given rows (same width)."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        return Generation([self.prompt_ids[i] for i in rows], self.completion_ids[idx], self.completion_mask[idx],
                          self.logprobs[idx], self.truncated[idx], self.decode_steps, self.entropy[idx])

    @staticmethod
    def concat(parts: list["Generation"], pad_id: int) -> "Generation":
        """Stack generations row-wise, right-padding to the widest one."""
        width = max(p.completion_ids.shape[1] for p in parts)

        def cat(name: str, fill: float) -> torch.Tensor:
            return torch.cat([torch.nn.functional.pad(getattr(p, name), (0, width - getattr(p, name).shape[1]),
                                                      value=fill) for p in parts])

        return Generation([ids for p in parts for ids in p.prompt_ids], cat("completion_ids", pad_id),
                          cat("completion_mask", 0), cat("logprobs", 0.0), torch.cat([p.truncated for p in parts]),
                          sum(p.decode_steps for p in parts), cat("entropy", 0.0))


def left_pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists to ``[B, L]`` ids and attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the model's ``generation_config.eos_token_id``
    (an int or a list, e.g. chat models that also stop at an end-of-turn token)."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    return sorted(i for i in ids if isinstance(i, int))


def unique_rows(prompts: list[list[int]]) -> tuple[list[int], list[int]]:
    """First position of each distinct prompt, and for every prompt the index of its distinct prompt.

    ``[[1, 2], [3], [1, 2]] -> ([0, 1], [0, 1, 0])``: ``prompts[first[expand[i]]] == prompts[i]``.
    """
    index: dict[tuple[int, ...], int] = {}
    first: list[int] = []
    expand: list[int] = []
    for i, p in enumerate(prompts):
        key = tuple(p)
        if key not in index:
            index[key] = len(first)
            first.append(i)
        expand.append(index[key])
    return first, expand


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) set to -inf. ``logits``: ``[B, V]``."""
    if top_k and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p (keeps at least one)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def cache_keyword(model) -> str:
    """The forward argument that takes a KV cache: ``cache`` from transformers 5.24 on (``past_key_values`` is
    deprecated there), ``past_key_values`` before."""
    try:
        # a LoRA policy (PEFT) forwards **kwargs to the model it wraps: ask that model
        params = inspect.signature(getattr(model, "get_base_model", lambda: model)().forward).parameters
    except (TypeError, ValueError):
        params = {}
    return "cache" if "cache" in params else "past_key_values"


class Generator:
    """Samples completions from ``model`` (an HF causal LM) for token-id prompts.

    ``decode``: ``auto`` runs :class:`~postrl.models.fast_llama.FusedLlama` (postrl's own decode forward)
    where :func:`~postrl.models.fast_llama.supports` accepts the model (Llama / Mistral / Qwen2 / Qwen3
    without adapters) and the model's own forward otherwise; ``fused`` requires it; ``transformers`` never
    uses it. ``continuous_batching``: with a ``batch_size`` smaller than the prompts, a finished row's place
    in the decode batch goes to the next waiting prompt (fused path; the transformers path decodes in
    chunks). It draws each row's random numbers from the row's own stream (``uniforms[row, t]``, drawn up
    front), so a row's tokens do not depend on the batch it ran in; these streams differ from the default
    one (one draw per active row and step), so turning it on changes a seeded run's samples, not their
    distribution. ``shared_prompt_attention`` (fused path, all prompts in one decode batch, some repeated):
    each distinct prompt's keys / values are kept once and read once per step for all its rows (cascade
    attention, :meth:`~postrl.models.fast_llama.FusedLlama.prefill`); the same tokens and log-probs to float
    rounding, and 1/n of the prompt's attention reads for a group of n.
    """

    def __init__(self, model, eos_token_ids: int | list[int], pad_token_id: int, kv_cache: str = "preallocated",
                 sampler: str = "inverse_cdf", share_prefill: bool = True, decode: str = "auto",
                 continuous_batching: bool = False, shared_prompt_attention: bool = True):
        self.model = model
        eos = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids)
        self.eos = torch.tensor(eos, dtype=torch.long)
        self.pad_id = int(pad_token_id)
        if kv_cache not in ("preallocated", "dynamic"):
            raise ValueError(f"kv_cache={kv_cache!r}: use 'preallocated' (written in place) or 'dynamic' "
                             "(transformers' DynamicCache, concatenated at each step)")
        if sampler not in ("inverse_cdf", "multinomial"):
            raise ValueError(f"sampler={sampler!r}: use 'inverse_cdf' (one uniform per row) or 'multinomial'")
        if decode not in DECODE_PATHS:
            raise ValueError(f"decode={decode!r}: use 'auto' (fused where the architecture is supported, else "
                             "transformers), 'fused' (postrl.models.fast_llama; an error where unsupported) or "
                             "'transformers' (the model's own forward)")
        if decode == "fused" and kv_cache == "dynamic":
            raise ValueError("decode='fused' has its own preallocated cache; kv_cache='dynamic' needs "
                             "decode='transformers' (or 'auto')")
        if continuous_batching and sampler != "inverse_cdf":
            raise ValueError("continuous_batching needs sampler='inverse_cdf': its per-row random streams keep "
                             "the sampled tokens independent of which rows share the decode batch")
        self.kv_cache, self.sampler = kv_cache, sampler
        self.share_prefill = bool(share_prefill)
        self.decode, self.continuous_batching = decode, bool(continuous_batching)
        self.shared_prompt_attention = bool(shared_prompt_attention)
        self._fused = None  # FusedLlama of self.model, built on first use
        self._cache_kw = cache_keyword(model)

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        seed: int | None = None,
        batch_size: int = 0,
    ) -> Generation:
        """Sample one completion per prompt (repeat a prompt n times for a group).

        ``batch_size`` > 0 decodes at most that many sequences at once: in chunks, or with
        ``continuous_batching`` as one batch whose finished rows are refilled with the next prompts. With a
        ``seed`` the result depends only on (seed, prompts, params, batch_size); with
        ``continuous_batching`` (per-row random streams) not on batch_size either.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate() needs a non-empty list of non-empty prompts")
        chunk = batch_size if batch_size > 0 else len(prompts)
        device = next(self.model.parameters()).device
        rng = torch.Generator(device=device)
        rng.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
        # continuous batching: per-row random streams, row i's t-th token is drawn with uniforms[i, t], so that
        # a row's tokens do not depend on which rows share its decode batch (nor on batch_size)
        uniforms = (torch.rand(len(prompts), params.max_new_tokens, generator=rng, device=device)
                    if self.continuous_batching and params.temperature > 0 else None)
        fused = self.fused_decoder()
        try:
            if fused is not None and self.continuous_batching:
                out = Generation(prompts, *self._fused_loop(fused, prompts, params, rng, uniforms, device, chunk))
            else:
                parts = []
                for i in range(0, len(prompts), chunk):
                    u = uniforms[i:i + chunk] if uniforms is not None else None
                    fields = (self._fused_loop(fused, prompts[i:i + chunk], params, rng, u, device, chunk)
                              if fused is not None
                              else self._generate_chunk(prompts[i:i + chunk], params, rng, device, u))
                    parts.append(Generation(prompts[i:i + chunk], *fields))
                out = parts[0] if len(parts) == 1 else Generation.concat(parts, self.pad_id)
        finally:
            if fused is not None:
                fused.release()  # the prepacked weight copies: the update does not need them
        out.prompt_ids = [list(p) for p in prompts]
        return out

    def fused_decoder(self) -> FusedLlama | None:
        """The :class:`~postrl.models.fast_llama.FusedLlama` decode path of the model with its weights
        refreshed, or None when the transformers forward runs (``decode='transformers'``, or ``'auto'`` on an
        unsupported model)."""
        if self.decode == "transformers" or self.kv_cache == "dynamic":  # DynamicCache: transformers' forward
            return None
        reason = unsupported_reason(self.model)
        if reason is not None:
            if self.decode == "fused":
                raise ValueError(f"decode='fused' cannot run this model: {reason}; use decode='auto' or "
                                 "'transformers'")
            return None
        if self._fused is None or self._fused.model is not self.model:
            self._fused = FusedLlama(self.model)
        else:
            self._fused.refresh()
        return self._fused

    def _sample(self, logits: torch.Tensor, params: SamplingParams, rng: torch.Generator,
                uniforms: torch.Tensor | None, order: torch.Tensor | None = None,
                no_eos: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Next tokens ``[B]`` from float logits ``[B, V]``, with their log-probs and the entropies of the
        temperature-scaled distributions. ``uniforms [B]``: the rows' own random numbers (inverse-CDF
        sampler); None draws from ``rng`` in the order of the rows, or in ``order`` (row ``order[j]`` takes
        the j-th draw) when given. ``no_eos [B]`` (bool): rows that may not end yet (``min_new_tokens``), whose
        EOS ids are removed from the sampling distribution (not from the returned log-probs / entropies)."""
        masked = None  # the sampling logits with EOS held back, where some row may not end yet
        if no_eos is not None and bool(no_eos.any()):
            eos = self.eos.to(logits.device)
            eos = eos[(eos >= 0) & (eos < logits.shape[-1])]  # ids outside the vocabulary can never be sampled
            masked = logits.clone()
            masked[:, eos] = masked[:, eos].masked_fill(no_eos[:, None], float("-inf"))
        if params.temperature > 0:
            if params.temperature != 1.0:  # (a pass over [B, V] that changes nothing at 1.0)
                logits = logits / params.temperature
                masked = masked / params.temperature if masked is not None else None
            logp_full = torch.log_softmax(logits, dim=-1)
            p_full = logp_full.exp()
            truncate = params.top_k > 0 or params.top_p < 1.0
            sampling = logits if masked is None else masked
            if truncate:
                probs = filter_logits(sampling, params.top_k, params.top_p).softmax(-1)
            else:
                probs = p_full if masked is None else masked.softmax(-1)
            if self.sampler == "inverse_cdf":
                if uniforms is None:
                    uniforms = torch.rand(probs.shape[0], generator=rng, device=probs.device)
                    if order is not None:
                        uniforms = torch.empty_like(uniforms).index_copy_(0, order, uniforms)
                tok = sample_inverse_cdf(probs, uniforms)
            elif order is None:
                tok = torch.multinomial(probs, 1, generator=rng).squeeze(-1)
            else:
                drawn = torch.multinomial(probs[order], 1, generator=rng).squeeze(-1)
                tok = torch.empty_like(drawn).index_copy_(0, order, drawn)
        else:
            logp_full = torch.log_softmax(logits, dim=-1)
            p_full = logp_full.exp()
            tok = (logits if masked is None else masked).argmax(-1)
        return tok, logp_full.gather(-1, tok[:, None]).squeeze(-1), -(p_full * logp_full).sum(-1)

    def _fused_prefill(self, fused: FusedLlama, cache, slots: torch.Tensor, prompts, device,
                       memo: OrderedDict | None = None, shared: bool = False) -> torch.Tensor:
        """Prefill ``prompts`` into cache rows ``slots`` (each distinct prompt once); their next-token logits.

        ``memo`` (continuous batching): the keys / values and logits of the last prompts prefilled, by prompt;
        a group's copies that join the batch at different steps are prefilled once and copied after that.
        ``shared``: keep each distinct prompt's keys / values once in the cache (every row at once; see
        :meth:`FusedLlama.prefill`).
        """
        logits: list[torch.Tensor | None] = [None] * len(prompts)
        todo = list(range(len(prompts)))
        if memo is not None:
            todo = []
            for j, p in enumerate(prompts):
                hit = memo.get(tuple(p))
                if hit is None:
                    todo.append(j)
                    continue
                memo.move_to_end(tuple(p))
                cache.put(int(slots[j]), hit[0], hit[1])
                logits[j] = hit[2]
            if not todo:
                return torch.stack(logits)
        sub = [prompts[j] for j in todo]
        first, expand = unique_rows(sub) if self.share_prefill else (list(range(len(sub))), None)
        ids, attn = left_pad([sub[i] for i in first], self.pad_id, device)
        exp = None if expand is None or len(first) == len(sub) else torch.tensor(expand, device=device)
        sub_slots = slots[torch.tensor(todo, device=device)] if len(todo) < len(prompts) else slots
        out = fused.prefill(cache, sub_slots, ids, attn, exp, shared=shared)
        if memo is None:
            return out
        width = ids.shape[1]
        for i, j in enumerate(todo):
            logits[j] = out[i]
            key = tuple(prompts[j])
            if key not in memo:
                row, P = int(sub_slots[i]), len(prompts[j])
                memo[key] = (cache.k[:, row, :, width - P:width].clone(), cache.v[:, row, :, width - P:width].clone(),
                             out[i].clone())
                while len(memo) > PREFILL_MEMO:
                    memo.popitem(last=False)
        return torch.stack(logits)

    def _fused_loop(self, fused: FusedLlama, prompts, params: SamplingParams, rng: torch.Generator,
                    uniforms: torch.Tensor | None, device, slots: int):
        """Decode ``prompts`` with the fused forward over at most ``slots`` cache rows.

        With ``slots < len(prompts)`` (continuous batching) a finished row's cache row is refilled with the
        next waiting prompt (prefilled, then decoded with the running rows); rows leave the batch once no
        prompt waits. With ``slots >= len(prompts)`` this is :meth:`_generate_chunk` with another forward:
        finished rows leave the batch (the last rows move into their places, so the cache copies only
        those), and the shared random stream is drawn in prompt order as there.
        """
        N, T = len(prompts), params.max_new_tokens
        out_ids = torch.full((N, T), self.pad_id, dtype=torch.long, device=device)
        out_mask = torch.zeros((N, T), dtype=torch.long, device=device)
        out_lp = torch.zeros((N, T), dtype=torch.float32, device=device)
        out_ent = torch.zeros((N, T), dtype=torch.float32, device=device)
        eos = self.eos.to(device)
        B = min(slots, N)
        longest = max(len(p) for p in prompts)
        # every prompt in the batch from the start and some repeated (a GRPO group): their keys / values are
        # kept once and read once per step for all their rows (cascade attention, FusedLlama.prefill)
        shared = (self.shared_prompt_attention and self.share_prefill and B == N
                  and len(unique_rows(prompts)[0]) < N)
        cache = (fused.new_cache(B, T + 1, positions=longest + T) if shared
                 else fused.new_cache(B, longest + T))
        rows = torch.arange(B, device=device)  # the prompt each cache row decodes
        t = torch.zeros(B, dtype=torch.long, device=device)  # tokens generated so far, per cache row
        memo = OrderedDict() if B < N else None  # prompts waiting: their groups' copies may join one by one
        logits = self._fused_prefill(fused, cache, torch.arange(B, device=device), prompts[:B], device, memo,
                                     shared=shared)
        waiting = B  # index of the next prompt to start
        steps = 0
        order = None  # the rows in prompt order, once dropping rows has permuted them (the shared stream's order)
        while True:
            steps += 1
            u = uniforms[rows, t] if uniforms is not None else None
            no_eos = t < params.min_new_tokens if params.min_new_tokens else None
            tok, lp, ent = self._sample(logits.float(), params, rng, u, order, no_eos)
            out_ids[rows, t] = tok
            out_mask[rows, t] = 1
            out_lp[rows, t] = lp
            out_ent[rows, t] = ent
            t = t + 1
            done = torch.isin(tok, eos) | (t >= T)
            if not bool(done.any()):
                logits = fused.decode(cache, tok)
                continue
            done_idx = done.nonzero().squeeze(-1)
            n_new = min(len(done_idx), N - waiting)
            stay = ~done
            stay[done_idx[:n_new]] = True  # refilled rows stay in the batch
            if not bool(stay.any()):
                break
            if not bool(stay.all()):
                perm = cache.compact(stay)
                rows, t, tok, done = rows[perm], t[perm], tok[perm], done[perm]
                order = None if bool((rows[1:] > rows[:-1]).all()) else rows.argsort()
            refill = done.nonzero().squeeze(-1)  # == the n_new refilled rows, at their new positions
            if bool((~done).any()):
                logits = fused.decode(cache, tok)  # refilled rows decode a stale token; the prefill overwrites it
            if n_new:
                new_logits = self._fused_prefill(fused, cache, refill, prompts[waiting:waiting + n_new], device, memo)
                if len(refill) == len(rows):
                    logits = new_logits
                else:
                    logits[refill] = new_logits
                rows[refill] = torch.arange(waiting, waiting + n_new, device=device)
                t[refill] = 0
                waiting += n_new
                order = None if bool((rows[1:] > rows[:-1]).all()) else rows.argsort()
        finished_len = out_mask.sum(-1)
        last_tok = out_ids.gather(-1, (finished_len - 1).clamp(min=0)[:, None]).squeeze(-1)
        truncated = ~torch.isin(last_tok, eos)
        width = int(finished_len.max().item())
        return (out_ids[:, :width], out_mask[:, :width], out_lp[:, :width], truncated.cpu(), steps,
                out_ent[:, :width])

    def _generate_chunk(self, prompts, params: SamplingParams, rng: torch.Generator, device,
                        uniforms: torch.Tensor | None = None):
        B, T = len(prompts), params.max_new_tokens
        ids, attn = left_pad(prompts, self.pad_id, device)
        out_ids = torch.full((B, T), self.pad_id, dtype=torch.long, device=device)
        out_mask = torch.zeros((B, T), dtype=torch.long, device=device)
        out_lp = torch.zeros((B, T), dtype=torch.float32, device=device)
        out_ent = torch.zeros((B, T), dtype=torch.float32, device=device)
        eos = self.eos.to(device)
        active = torch.arange(B, device=device)  # rows of the full batch still decoding
        num_layers = getattr(self.model.config, "num_hidden_layers", None)
        cache = (preallocated_cache(num_layers, ids.shape[1] + T) if self.kv_cache == "preallocated" and num_layers
                 else DynamicCache())
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        step_ids, step_pos = ids, positions
        # A GRPO group repeats each prompt n times: prefill each distinct prompt once and copy its KV rows
        # (prefix sharing). Same cache values and next-token logits, 1/n of the prefill FLOPs.
        first, expand = unique_rows(prompts) if self.share_prefill else (None, None)
        if first is not None and len(first) == B:
            first = None
        steps = 0
        for t in range(T):
            if t == 0 and first is not None:
                sel = torch.tensor(first, device=device)
                logits = self.model(
                    input_ids=ids[sel], attention_mask=attn[sel], position_ids=positions[sel],
                    use_cache=True, logits_to_keep=1, **{self._cache_kw: cache},
                ).logits[:, -1, :].float()
                rows = torch.tensor(expand, device=device)
                logits = logits[rows]
                cache.batch_select_indices(rows)
            else:
                logits = self.model(
                    input_ids=step_ids, attention_mask=attn, position_ids=step_pos,
                    use_cache=True, logits_to_keep=1, **{self._cache_kw: cache},
                ).logits[:, -1, :].float()
            steps += 1
            no_eos = torch.ones_like(active, dtype=torch.bool) if t < params.min_new_tokens else None
            tok, lp, ent = self._sample(logits, params, rng, uniforms[active, t] if uniforms is not None else None,
                                        no_eos=no_eos)
            out_ids[active, t] = tok
            out_mask[active, t] = 1
            out_lp[active, t] = lp
            out_ent[active, t] = ent
            done = torch.isin(tok, eos)
            keep = ~done
            if not bool(keep.any()):
                break
            if not bool(keep.all()):
                keep_idx = keep.nonzero().squeeze(-1)
                active, tok, attn = active[keep_idx], tok[keep_idx], attn[keep_idx]
                step_pos = step_pos[keep_idx]
                cache.batch_select_indices(keep_idx)
            attn = torch.cat([attn, attn.new_ones((attn.shape[0], 1))], dim=-1)
            step_pos = step_pos[:, -1:] + 1
            step_ids = tok[:, None]
        finished_len = out_mask.sum(-1)
        last_tok = out_ids.gather(-1, (finished_len - 1).clamp(min=0)[:, None]).squeeze(-1)
        truncated = ~torch.isin(last_tok, eos)
        width = int(finished_len.max().item())
        return (out_ids[:, :width], out_mask[:, :width], out_lp[:, :width], truncated.cpu(), steps,
                out_ent[:, :width])  # the fields of Generation after prompt_ids, in order
