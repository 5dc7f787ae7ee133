"""Per-sentence BLEU on token ids, vectorized in torch, and the ``bleu`` reward.

BLEU (Papineni et al. 2002, "BLEU: a Method for Automatic Evaluation of Machine Translation",
Eq. 1-2): for candidate length ``c`` and effective reference length ``r``,

    BLEU = BP * exp(sum_n w_n log p_n),   BP = 1 if c > r else exp(1 - r / c)  (0 when c = 0),

where ``p_n`` is the *modified* (clipped) n-gram precision: every candidate n-gram counts at most
as often as it occurs in the reference that has most of it (max over references), divided by the
number of candidate n-grams. ``r`` is the length of the reference closest to ``c`` (ties: the
shorter one), as in NLTK and sacrebleu.

The counting follows TensorBLEU (Filipek 2025, "TensorBLEU: Vectorized GPU-based BLEU Score
Implementation for Per-Sentence In-Training Evaluation"): one batched pass over all candidates and
references, a *batch-local dictionary* of the n-grams actually present built with
``torch.unique(return_inverse=True)`` (memory grows with the n-grams in the batch, not with
``vocab ** n``), counts by ``bincount``, reference counts max-reduced over references, clipped.
Two details differ from the paper's description, with identical results:

* the dictionary of order ``n`` is keyed by one int64 per n-gram, ``(id of its (n-1)-gram prefix,
  last token)``, so ``torch.unique`` runs on a 1-D tensor (instead of ``dim=0`` on unfolded rows),
  which is several times faster on CPU;
* the sentence offset goes *into* the dictionary key (the order-1 key is ``b * V + token`` for
  candidate ``b`` and its references), instead of offsetting compact ids by ``b * U`` after the
  ``unique``: every dictionary entry then belongs to one candidate, and plain bincounts of length
  ``U`` (and ``R * U`` for R references) replace the ``[batch, U]`` table, so memory stays linear
  in the number of tokens for any batch size.

Smoothing (Chen & Cherry 2014, "A Systematic Comparison of Smoothing Techniques for
Sentence-Level BLEU"): the two reference implementations define the same methods with small
differences at the edges (an order with no candidate n-gram), and both are reproduced exactly.
With ``m_n`` clipped matches and ``t_n = max(0, c - n + 1)`` candidate n-grams:

=============  ==========================  =================================================
smoothing      reference implementation    precision of order n
=============  ==========================  =================================================
``none``       both                        ``m_n / t_n``; a zero precision gives BLEU 0
``floor``      sacrebleu ``floor``         ``m_n = 0``: ``v / t_n`` (v = smooth_value, 0.1)
``add-k``      sacrebleu ``add-k``         n >= 2: ``(m_n + k) / (t_n + k)`` (k = smooth_value, 1)
``exp``        sacrebleu ``exp``           j-th zero: ``1 / (2^j t_n)`` (NIST geometric)
``method1``    NLTK ``method1``            ``m_n = 0``: ``eps / max(1, t_n)`` (eps = smooth_value, 0.1)
``method2``    NLTK ``method2``            n >= 2: ``(m_n + 1) / (max(1, t_n) + 1)`` (Lin & Och 2004)
``method3``    NLTK ``method3``            j-th zero: ``1 / (2^j max(1, t_n))`` (NIST geometric)
``method4``    NLTK ``method4``            j-th zero: ``ln(c) / (2^j K max(1, t_n))`` (K = smooth_value, 5; c > 1)
=============  ==========================  =================================================

Aliases: ``epsilon`` = ``method1``, ``add-one`` = ``method2``, ``nist`` = ``method3``.
Shared by both implementations: a candidate with no matching unigram scores 0 whatever the
smoothing (sacrebleu: ``not any(correct)``; NLTK: ``p_numerators[1] == 0``).

``effective_order=True`` uses only the orders the candidate has (sacrebleu's
``effective_order``, the default of ``sacrebleu.sentence_bleu``; NLTK's ``auto_reweigh``) with
uniform weights ``1 / N_eff``. For the sacrebleu methods an order is present when its
(smoothed) denominator is positive, so ``add-k`` keeps all orders; for the NLTK methods the
orders ``n <= c`` are kept (NLTK's ``auto_reweigh``, generalized from ``max_n = 4``).

Differences from the references, on purpose: ``none`` returns exactly 0 where NLTK's
``method0`` returns ``exp(w * log(2.2e-308))`` (about 1e-77 for uniform 4-gram weights) and
sacrebleu ``exp(-1e10 / 4)``; the result is in ``[0, 1]`` (sacrebleu reports ``100 *``). NLTK's
``method5``-``method7`` are not provided. ``sacrebleu.sentence_bleu(hyp, refs, tokenize="none")``
on ids written as space-separated strings equals ``sentence_bleu_ids(..., smoothing="exp",
effective_order=True)``.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from postrl.rewards import register_reward
from postrl.rewards.base import RewardBatch, RewardContext, Scored

log = logging.getLogger(__name__)

# smoothing name -> (family, default smooth_value or None when the method takes none)
SMOOTHING: dict[str, tuple[str, Optional[float]]] = {
    "none": ("both", None),
    "floor": ("sacrebleu", 0.1),
    "add-k": ("sacrebleu", 1.0),
    "exp": ("sacrebleu", None),
    "method1": ("nltk", 0.1),
    "method2": ("nltk", None),
    "method3": ("nltk", None),
    "method4": ("nltk", 5.0),
}
ALIASES = {"epsilon": "method1", "add-one": "method2", "nist": "method3", "method0": "none"}


# ----- input normalization ---------------------------------------------------------------------------
def _bad_row(seqs: Sequence[Any], what: str) -> str:
    """Find the first entry that is not a flat sequence of integer ids, for the error message."""
    for i, s in enumerate(seqs):
        if isinstance(s, (str, bytes)):
            return f"{what}[{i}] is text ({s[:30]!r}); expected token ids (tokenize it first)"
        if isinstance(s, Tensor):
            if s.dim() != 1 or s.is_floating_point() or s.is_complex() or s.dtype == torch.bool:
                return f"{what}[{i}] is a {s.dim()}-D {s.dtype} tensor; expected a 1-D integer tensor of token ids"
            continue
        try:
            items = list(s)
        except TypeError:
            return f"{what}[{i}] is a {type(s).__name__}; expected a sequence of token ids"
        for v in items:
            if isinstance(v, Tensor):
                ok = v.dim() == 0 and not (v.is_floating_point() or v.is_complex() or v.dtype == torch.bool)
            else:
                ok = hasattr(v, "__index__") and not isinstance(v, (bool, Sequence))
            if not ok:
                return f"{what}[{i}] holds {v!r} ({type(v).__name__}); expected integer token ids"
    return f"{what}: expected sequences of integer token ids"


def _flatten(seqs: Sequence[Any], what: str, device: torch.device) -> tuple[Tensor, Tensor]:
    """A list of id sequences -> (all ids concatenated, int64 ``[sum(lengths)]``; lengths ``[N]``)."""
    seqs = list(seqs)
    try:
        if any(isinstance(s, Tensor) for s in seqs):
            parts = [s if isinstance(s, Tensor) else torch.tensor(list(s), dtype=torch.long) for s in seqs]
            if any(p.dim() != 1 or p.is_floating_point() or p.dtype == torch.bool for p in parts):
                raise ValueError("not flat integer ids")
            flat = torch.cat([p.to(device=device, dtype=torch.int64) for p in parts]) if parts else \
                torch.zeros(0, dtype=torch.int64, device=device)
            lens = [p.numel() for p in parts]
        else:
            if any(isinstance(s, (str, bytes)) for s in seqs):
                raise ValueError("text")
            lens = [len(s) for s in seqs]
            arr = np.array(list(itertools.chain.from_iterable(seqs)))  # ~2x faster than torch.tensor(list)
            if arr.size and (arr.ndim != 1 or arr.dtype.kind not in "iu"):
                raise ValueError("not flat integer ids")
            flat = torch.from_numpy(arr.astype(np.int64, copy=False).reshape(-1)).to(device)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise ValueError(_bad_row(seqs, what)) from exc
    return flat, torch.tensor(lens, dtype=torch.int64, device=device)


def _from_padded(x: Tensor, lengths: Any, what: str, dims: int) -> tuple[Tensor, Tensor]:
    """A padded ``[..., L]`` tensor with lengths -> (flat ids, lengths flattened over the leading dims)."""
    if x.dim() != dims:
        raise ValueError(f"{what}: expected a {dims}-D padded tensor, got shape {tuple(x.shape)}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{what}: token ids must be an integer tensor, got {x.dtype}")
    if lengths is None:
        lengths = torch.full(x.shape[:-1], x.shape[-1], dtype=torch.int64, device=x.device)
    lengths = torch.as_tensor(lengths, dtype=torch.int64, device=x.device)
    if tuple(lengths.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"{what}: lengths have shape {tuple(lengths.shape)}, expected {tuple(x.shape[:-1])}")
    if bool(((lengths < 0) | (lengths > x.shape[-1])).any()):
        raise ValueError(f"{what}: lengths must lie in [0, {x.shape[-1]}] (the padded width)")
    flat_x, flat_len = x.reshape(-1, x.shape[-1]), lengths.reshape(-1)
    valid = torch.arange(x.shape[-1], device=x.device)[None, :] < flat_len[:, None]
    return flat_x[valid].to(torch.int64), flat_len


def _is_id_sequence(x: Any) -> bool:
    """One reference (ids) rather than a list of references: a 1-D tensor, or a non-empty sequence of scalars."""
    if isinstance(x, Tensor):
        return x.dim() == 1
    if not isinstance(x, Sequence) or isinstance(x, (str, bytes)) or len(x) == 0:
        return False
    first = x[0]
    return (isinstance(first, Tensor) and first.dim() == 0) or (
        not isinstance(first, (Sequence, Tensor)) and hasattr(first, "__index__"))


def _normalize_inputs(candidates: Any, references: Any, candidate_lengths: Any, reference_lengths: Any,
                      device: Optional[torch.device]):
    """-> cand ids (flat), cand_len [B], ref ids (flat), ref_len [M], owner [M] (candidate of each reference)."""
    if isinstance(candidates, Tensor):
        dev = candidates.device if device is None else torch.device(device)
        cand, cand_len = _from_padded(candidates.to(dev), candidate_lengths, "candidates", 2)
    else:
        if candidate_lengths is not None:
            raise ValueError("candidate_lengths is only for a padded candidates tensor; lists carry their lengths")
        dev = torch.device(device) if device is not None else torch.device("cpu")
        cand, cand_len = _flatten(candidates, "candidates", dev)
    B = cand_len.shape[0]
    if isinstance(references, Tensor):
        references = references.to(dev)
        if references.dim() not in (2, 3):
            raise ValueError(f"references: expected a padded [B, L] or [B, R, L] tensor, got shape "
                             f"{tuple(references.shape)}")
        if references.shape[0] != B:
            raise ValueError(f"references cover {references.shape[0]} candidates, candidates has {B}; "
                             "they must be equal")
        R = 1 if references.dim() == 2 else references.shape[1]
        if R == 0:
            raise ValueError("references: the tensor holds 0 references per candidate; give at least one")
        refs, ref_len = _from_padded(references, reference_lengths, "references", references.dim())
        owner = torch.arange(B, device=dev).repeat_interleave(R)
    else:
        if reference_lengths is not None:
            raise ValueError("reference_lengths is only for a padded references tensor; lists carry their lengths")
        references = list(references)
        if len(references) != B:
            raise ValueError(f"references has {len(references)} entries, candidates has {B}; give one reference "
                             "(a sequence of ids) or a list of references per candidate")
        flat, owners = [], []
        for b, r in enumerate(references):
            if isinstance(r, (str, bytes)):
                raise ValueError(f"references[{b}] is text; expected token ids (tokenize it first)")
            if _is_id_sequence(r):
                flat.append(r)
                owners.append(b)
                continue
            r = list(r)
            if not r:
                raise ValueError(f"references[{b}] is empty: give at least one reference per candidate "
                                 "(write [[]] for one empty reference)")
            flat.extend(r)
            owners.extend([b] * len(r))
        refs, ref_len = _flatten(flat, "references", dev)
        owner = torch.tensor(owners, dtype=torch.int64, device=dev)
    for name, x in (("candidates", cand), ("references", refs)):
        if x.numel() and bool((x < 0).any()):
            raise ValueError(f"{name}: token ids must be >= 0 (padding beyond the lengths is ignored)")
    return cand, cand_len, refs, ref_len, owner


# ----- counting ---------------------------------------------------------------------------------------
def _ref_slots(owner: Tensor, B: int) -> Tensor:
    """Index of each reference among the references of its candidate (0, 1, ...)."""
    if owner.numel() == 0:
        return owner
    order = torch.argsort(owner, stable=True)
    sorted_owner = owner[order]
    counts = torch.bincount(sorted_owner, minlength=B)
    starts = torch.cumsum(counts, 0) - counts
    slot_sorted = torch.arange(owner.numel(), device=owner.device) - starts[sorted_owner]
    slots = torch.empty_like(owner)
    slots[order] = slot_sorted
    return slots


def clipped_ngram_matches(cand: Tensor, cand_len: Tensor, refs: Tensor, ref_len: Tensor, owner: Tensor,
                          max_n: int) -> Tensor:
    """Clipped n-gram matches ``m[b, n-1]`` (Papineni et al. 2002, Eq. 1 numerator), shape ``[B, max_n]``.

    ``cand`` / ``refs``: the ids of all candidates / references concatenated (1-D), with their
    lengths ``cand_len [B]`` / ``ref_len [M]``; ``owner [M]`` says which candidate each reference
    belongs to. Per order n, one ``torch.unique`` builds the batch-local dictionary of the
    (candidate b, n-gram) pairs present, then offset ``bincount`` s give the candidate count and
    each reference's count of every entry; the reference counts are max-reduced and clipped.
    """
    B, dev = cand_len.shape[0], cand_len.device
    m = torch.zeros((B, max_n), dtype=torch.int64, device=dev)
    tok = torch.cat([cand, refs])
    N = tok.numel()
    if B == 0 or N == 0:
        return m
    lens = torch.cat([cand_len, ref_len])
    sent = torch.repeat_interleave(torch.arange(lens.shape[0], device=dev), lens)  # sentence of each token
    start = torch.cumsum(lens, 0) - lens
    left = lens[sent] - (torch.arange(N, device=dev) - start[sent])  # tokens from here to the sentence end
    slots = _ref_slots(owner, B)
    R = int(slots.max().item()) + 1 if slots.numel() else 1
    Nc = cand.numel()
    group = torch.cat([torch.arange(B, device=dev), owner])[sent]  # the candidate each token belongs to
    ref_slot = slots[sent[Nc:] - B]  # which of its candidate's references each reference token is in
    V = int(tok.max().item()) + 1
    if B * V >= 1 << 62:
        raise ValueError(f"token ids up to {V - 1} are too large to key n-grams in int64")
    # Every position is kept at every order (no compaction): the n-gram starting at i exists when
    # left[i] >= n; the others get the key -1, i.e. dictionary entry 0, and weight 0 in the counts.
    ids = group * V + tok  # order-1 key: (candidate, token)
    for n in range(1, max_n + 1):
        valid = left >= n
        if not bool(valid.any()):
            break
        if n == 1:
            key = ids
        else:
            if (int(ids.max().item()) + 1) * V >= 1 << 62:
                raise ValueError(f"token ids up to {V - 1} are too large to key {n}-grams in int64")
            key = torch.full_like(ids, -1)
            key[: N - n + 1] = ids[: N - n + 1] * V + tok[n - 1:]  # (id of (b, (n-1)-gram prefix), last token)
            key = torch.where(valid, key, torch.full_like(key, -1))
        _, ids = torch.unique(key, return_inverse=True)  # the batch-local dictionary of order n
        U = int(ids.max().item()) + 1
        weight = valid.to(torch.float64)
        cand_counts = torch.bincount(ids[:Nc], weights=weight[:Nc], minlength=U)
        ref_counts = torch.bincount(ref_slot * U + ids[Nc:], weights=weight[Nc:], minlength=R * U)
        clipped = torch.minimum(cand_counts, ref_counts.view(R, U).amax(0)).to(torch.int64)
        owner_of_entry = torch.zeros(U, dtype=torch.int64, device=dev)
        owner_of_entry[ids] = group  # entry 0 (-1 keys) may get any owner: its clipped count is 0
        m[:, n - 1].index_add_(0, owner_of_entry, clipped)
    return m


def closest_ref_length(cand_len: Tensor, ref_len: Tensor, owner: Tensor) -> Tensor:
    """Per candidate, the reference length closest to the candidate's (ties: the shorter), ``[B]``.

    The effective reference length ``r`` of the brevity penalty (Papineni et al. 2002, Sec. 2.2.2;
    tie rule as NLTK ``closest_ref_length`` and sacrebleu ``_get_closest_ref_len``).
    """
    B = cand_len.shape[0]
    big = int(max(int(ref_len.max().item()) if ref_len.numel() else 0,
                  int(cand_len.max().item()) if cand_len.numel() else 0)) + 1
    key = (ref_len - cand_len[owner]).abs() * big + ref_len
    best = torch.full((B,), -1, dtype=torch.int64, device=cand_len.device)
    best.scatter_reduce_(0, owner, key, reduce="amin", include_self=False)
    if bool((best < 0).any()):
        missing = (best < 0).nonzero()[:, 0].tolist()[:5]
        raise ValueError(f"candidates {missing} have no reference; give at least one reference per candidate")
    return best % big


# ----- the score from sufficient statistics --------------------------------------------------------
def _resolve_smoothing(smoothing: str, smooth_value: Optional[float]) -> tuple[str, str, float]:
    name = ALIASES.get(smoothing, smoothing)
    if name not in SMOOTHING:
        valid = ", ".join(list(SMOOTHING) + list(ALIASES))
        raise ValueError(f"smoothing={smoothing!r} is not known; valid: {valid}")
    family, default = SMOOTHING[name]
    if default is None:
        if smooth_value is not None:
            raise ValueError(f"smoothing={smoothing!r} takes no smooth_value (got {smooth_value}); "
                             "only floor, add-k, method1/epsilon and method4 do")
        return name, family, 0.0
    value = float(default if smooth_value is None else smooth_value)
    if not math.isfinite(value) or value < 0 or (name == "method4" and value == 0):
        raise ValueError(f"smooth_value for {name!r} must be a finite number >= 0 (> 0 for method4), got {value}")
    return name, family, value


def bleu_from_stats(matches: Tensor, cand_len: Tensor, ref_len: Tensor, *, weights: Optional[Sequence[float]] = None,
                    smoothing: str = "none", smooth_value: Optional[float] = None,
                    effective_order: bool = False) -> Tensor:
    """Sentence BLEU (Papineni et al. 2002, Eq. 1-2) from sufficient statistics, in float64.

    matches:  clipped n-gram matches ``[B, N]`` (order 1..N).
    cand_len: candidate lengths ``[B]`` (``t_n = max(0, c - n + 1)`` candidate n-grams).
    ref_len:  effective (closest) reference lengths ``[B]``.
    The smoothing methods and ``effective_order`` are those of the module table.
    """
    name, family, value = _resolve_smoothing(smoothing, smooth_value)
    B, N = matches.shape
    if N < 1:
        raise ValueError("BLEU needs at least one n-gram order (max_n >= 1)")
    if weights is not None:
        if effective_order:
            raise ValueError("effective_order=True uses uniform weights 1/N_eff; do not also give weights")
        w = torch.as_tensor([float(x) for x in weights], dtype=torch.float64, device=matches.device)
        if w.numel() != N:
            raise ValueError(f"weights has {w.numel()} entries for max_n={N}; give one weight per order")
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError(f"weights must be finite and >= 0, got {list(weights)}")
        w = w.expand(B, N)
    f64 = torch.float64
    m = matches.to(f64)
    c = cand_len.to(f64)
    r = ref_len.to(f64)
    n_idx = torch.arange(1, N + 1, device=matches.device, dtype=f64)
    t = (c[:, None] - n_idx[None, :] + 1).clamp(min=0)  # candidate n-grams per order
    if family == "sacrebleu" or name == "none":
        if name == "add-k":
            higher = (n_idx >= 2)[None, :]
            m = torch.where(higher, m + value, m)
            t = torch.where(higher, t + value, t)
        present = t > 0  # a prefix of the orders (t is non-increasing in n)
        d = t
    else:
        present = torch.ones_like(t, dtype=torch.bool) if not effective_order else n_idx[None, :] <= c[:, None]
        d = t.clamp(min=1)
    zero = m == 0
    safe_d = torch.where(d > 0, d, torch.ones_like(d))
    p = m / safe_d
    skip_zero = False  # NLTK drops zero precisions from the sum (``if p_i > 0``) after smoothing
    if name == "floor":
        p = torch.where(zero, value / safe_d, p)
    elif name in ("exp", "method3", "method4"):
        j = torch.cumsum((zero & present).to(f64), dim=1)  # 1 for the first zero, 2 for the next, ...
        if name == "method4":
            num = torch.log(c.clamp(min=1))[:, None] / (2.0 ** j * value)
            p = torch.where(zero & (c[:, None] > 1), num / safe_d, p)
            skip_zero = True
        else:
            p = torch.where(zero, 1.0 / (2.0 ** j * safe_d), p)
    elif name == "method1":
        p = torch.where(zero, value / safe_d, p)
        skip_zero = True
    elif name == "method2":
        p = torch.where((n_idx >= 2)[None, :], (m + 1) / (d + 1), p)
        skip_zero = True
    p = torch.where(present, p, torch.zeros_like(p))  # sacrebleu: an order without n-grams has precision 0
    if weights is None:
        if effective_order:
            n_eff = present.sum(1).clamp(min=1).to(f64)
            w = torch.where(present, 1.0 / n_eff[:, None], torch.zeros_like(p))
        else:
            w = torch.full_like(p, 1.0 / N)
    used = w > 0
    if skip_zero:
        used = used & (p > 0)
    dead = (used & (p <= 0)).any(1)  # an unsmoothed zero precision: BLEU is 0
    log_p = torch.where(used & (p > 0), torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))
    log_bp = torch.where(c < r, 1.0 - r / c.clamp(min=1), torch.zeros_like(c))
    bleu = torch.exp(log_bp + (w * log_p).sum(1))
    dead = dead | (c == 0) | (matches[:, 0] == 0)
    return torch.where(dead, torch.zeros_like(bleu), bleu)


def sentence_bleu_ids(candidates: Any, references: Any, *, max_n: int = 4, weights: Optional[Sequence[float]] = None,
                      smoothing: str = "none", smooth_value: Optional[float] = None, effective_order: bool = False,
                      candidate_lengths: Any = None, reference_lengths: Any = None,
                      device: Optional[Union[str, torch.device]] = None) -> Tensor:
    """Per-sentence BLEU of each candidate against its reference(s), vectorized; float64 ``[B]`` in [0, 1].

    BLEU: Papineni et al. 2002, Eq. 1-2; counting as TensorBLEU (Filipek 2025); smoothing and
    ``effective_order`` as in the module table (equal to NLTK ``sentence_bleu`` / sacrebleu
    sentence BLEU on the same tokens).

    candidates: a list of id sequences (lists or 1-D tensors), or a padded ``[B, L]`` integer
                tensor with ``candidate_lengths [B]`` (full rows when omitted).
    references: per candidate, one id sequence or a list of them (multiple references); or a
                padded ``[B, L]`` tensor (one each) / ``[B, R, L]`` tensor (R each) with
                ``reference_lengths`` of shape ``[B]`` / ``[B, R]``.
    weights:    one non-negative weight per order (default uniform ``1 / max_n``).
    device:     where list inputs are placed (tensor inputs stay where they are).
    """
    if not isinstance(max_n, int) or max_n < 1:
        raise ValueError(f"max_n must be an integer >= 1, got {max_n!r}")
    if weights is not None and len(weights) != max_n:
        raise ValueError(f"weights has {len(weights)} entries but max_n={max_n}; give one weight per order")
    _resolve_smoothing(smoothing, smooth_value)  # fail before any work
    cand, cand_len, refs, ref_len, owner = _normalize_inputs(candidates, references, candidate_lengths,
                                                             reference_lengths, device)
    if cand_len.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64, device=cand.device)
    r = closest_ref_length(cand_len, ref_len, owner)
    matches = clipped_ngram_matches(cand, cand_len, refs, ref_len, owner, max_n)
    return bleu_from_stats(matches, cand_len, r, weights=weights, smoothing=smoothing, smooth_value=smooth_value,
                           effective_order=effective_order)


# ----- the reward --------------------------------------------------------------------------------------
@register_reward("bleu", batched=True)
class BleuReward:
    """Sentence BLEU of each completion's token ids against reference token ids (BLEUBERI:
    Chang et al. 2025, "BLEUBERI: BLEU is a surprisingly effective reward for instruction
    following", use BLEU against references as the RL reward).

    References, per sample: ``sample.metadata[reference_key]`` (default ``"references"``): a text,
    a list of texts, a list of ids, or a list of id lists; otherwise ``sample.answer`` (a text).
    Texts are tokenized with the run's tokenizer (``add_special_tokens=False``). With
    ``drop_special`` (default) the tokenizer's special ids (EOS, padding, ...) are removed from
    completions and references before scoring. A sample without references scores as a failure.
    Statuses: ``ok`` (BLEU > 0), ``zero`` (BLEU = 0), ``empty`` (no completion tokens).
    Defaults match ``sacrebleu.sentence_bleu``: ``smoothing="exp"``, ``effective_order=True``.
    """

    def __init__(self, context: RewardContext, *, max_n: int = 4, weights: Optional[Sequence[float]] = None,
                 smoothing: str = "exp", smooth_value: Optional[float] = None, effective_order: bool = True,
                 reference_key: str = "references", drop_special: bool = True):
        if not isinstance(max_n, int) or max_n < 1:
            raise ValueError(f"bleu: max_n must be an integer >= 1, got {max_n!r}")
        _resolve_smoothing(smoothing, smooth_value)
        if weights is not None and (len(weights) != max_n or effective_order):
            raise ValueError("bleu: weights need one entry per order (max_n) and effective_order=false")
        self.tokenizer = context.tokenizer if context is not None else None
        self.options = dict(max_n=max_n, weights=weights, smoothing=smoothing, smooth_value=smooth_value,
                            effective_order=effective_order)
        self.reference_key = reference_key
        self.special: set[int] = set()
        if drop_special and self.tokenizer is not None:
            self.special = {int(i) for i in getattr(self.tokenizer, "all_special_ids", []) or []}
        self._cache: dict[str, list[int]] = {}
        self._warned = False
        dev = getattr(context, "device", "cpu") if context is not None else "cpu"
        self.device = torch.device(dev) if dev is not None else torch.device("cpu")

    def _ids(self, text: str) -> list[int]:
        if text not in self._cache:
            if self.tokenizer is None:
                raise ValueError("bleu: references are texts but the run has no tokenizer; give token ids in "
                                 f"sample.metadata[{self.reference_key!r}] instead")
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[text] = list(self.tokenizer.encode(text, add_special_tokens=False))
        return self._cache[text]

    def _clean(self, ids: Sequence[int]) -> list[int]:
        return [int(i) for i in ids if int(i) not in self.special]

    def references_of(self, sample: Any) -> Optional[list[list[int]]]:
        """The reference id lists of one sample, or None when it has none."""
        meta = getattr(sample, "metadata", None) or {}
        raw = meta.get(self.reference_key) if isinstance(meta, dict) else None
        if raw is None:
            raw = getattr(sample, "answer", None)
            if not isinstance(raw, str) or not raw.strip():
                return None
        if isinstance(raw, str):
            return [self._clean(self._ids(raw))]
        if isinstance(raw, Tensor):
            raw = raw.tolist()
        raw = list(raw)
        if not raw:
            return None
        if all(isinstance(x, int) for x in raw):
            return [self._clean(raw)]
        out = []
        for ref in raw:
            if isinstance(ref, str):
                out.append(self._clean(self._ids(ref)))
            elif isinstance(ref, (list, tuple, Tensor)):
                out.append(self._clean(ref.tolist() if isinstance(ref, Tensor) else ref))
            else:
                raise ValueError(f"bleu: a reference must be a text or a list of token ids, got {type(ref).__name__}")
        return out

    def __call__(self, batch: RewardBatch) -> list[Optional[Scored]]:
        refs: list[Optional[list[list[int]]]] = [self.references_of(s) for s in batch.samples]
        keep = [i for i, r in enumerate(refs) if r is not None]
        if len(keep) < len(refs) and not self._warned:
            self._warned = True
            log.warning("bleu: %d of %d samples have no references (sample.metadata[%r] or a non-empty answer); "
                        "they score as failures", len(refs) - len(keep), len(refs), self.reference_key)
        out: list[Optional[Scored]] = [None] * len(refs)
        if keep:
            cands = [self._clean(batch.completion_ids[i]) for i in keep]
            scores = sentence_bleu_ids(cands, [refs[i] for i in keep], device=self.device, **self.options)
            for i, c, s in zip(keep, cands, scores.tolist()):
                status = "empty" if not c else ("ok" if s > 0 else "zero")
                out[i] = Scored(float(s), {"status": status})
        return out
